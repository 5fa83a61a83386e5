"""Tests of demjax.cluster against independent references (scipy, hand derivations)."""

from __future__ import annotations

import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.cluster import hierarchy as sch
from scipy.spatial import distance as ssd

from demjax import cluster
from demjax.errors import ConfigError
from demjax.types import GroupTree

# ------------------------------------------------------------------------------------
# Features and distances
# ------------------------------------------------------------------------------------


def test_flatten_params_matches_numpy_concat():
    rng = np.random.default_rng(0)
    params = {
        "b": rng.normal(size=(3, 4)).astype(np.float32),
        "a": {"w": rng.normal(size=(3, 2, 5)).astype(np.float32)},
    }
    got = np.asarray(cluster.flatten_params(params))
    # jax.tree.leaves sorts dict keys: "a" (the [3, 2, 5] leaf) comes first.
    want = np.concatenate([params["a"]["w"].reshape(3, -1), params["b"]], axis=1)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_features_updates_and_weights():
    rng = np.random.default_rng(1)
    p = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    q = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    np.testing.assert_array_equal(np.asarray(cluster.features(p)), p["w"])
    np.testing.assert_allclose(
        np.asarray(cluster.features(p, q, kind="updates")), p["w"] - q["w"], atol=1e-7
    )
    with pytest.raises(ValueError, match=r"^kind='grads' is not valid; accepted: "):
        cluster.features(p, q, kind="grads")
    with pytest.raises(ValueError, match=r"^kind='updates' needs .*prev_params"):
        cluster.features(p, None, kind="updates")


def _data_sets():
    rng = np.random.default_rng(2)
    spread = rng.normal(size=(40, 60)).astype(np.float32)
    # Large common mean: without centring, |x|^2 ~ 60 * 1e4^2 dwarfs the squared
    # distances (~120) and float32 cancellation would destroy them.
    offset = (1e4 + rng.normal(size=(40, 60))).astype(np.float32)
    return {"spread": spread, "offset": offset}


@pytest.mark.parametrize("name", ["spread", "offset"])
def test_euclidean_matches_scipy(name):
    x = _data_sets()[name]
    got = np.asarray(cluster.pairwise_distances(x, "euclidean"))
    want = ssd.squareform(ssd.pdist(x.astype(np.float64), "euclidean"))
    assert got.dtype == np.float32 and got.shape == (40, 40)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * want.max())
    np.testing.assert_array_equal(np.diag(got), 0.0)
    np.testing.assert_array_equal(got, got.T)


def test_cosine_matches_scipy():
    x = _data_sets()["spread"]
    got = np.asarray(cluster.pairwise_distances(x, "cosine"))
    want = ssd.squareform(ssd.pdist(x.astype(np.float64), "cosine"))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.diag(got), 0.0)
    np.testing.assert_array_equal(got, got.T)


def test_cosine_zero_vector_has_distance_one():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], np.float32)
    d = np.asarray(cluster.pairwise_distances(x, "cosine"))
    np.testing.assert_allclose(d[0, 1:], 1.0)
    np.testing.assert_allclose(d[1, 2], 1.0, atol=1e-7)
    assert d[0, 0] == 0.0 and not np.isnan(d).any()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_near_identical_rows_no_nan(metric):
    # 8 near-copies of one model plus 4 far-away ones (so that centring does not
    # shrink the near-copies to ~0): the Gram identity gives slightly negative
    # squared distances among the copies, which must be clamped, not NaN.
    rng = np.random.default_rng(3)
    base = rng.normal(size=(1, 500)).astype(np.float32)
    near = np.repeat(base, 8, axis=0) + 1e-6 * rng.normal(size=(8, 500))
    far = 5.0 * rng.normal(size=(4, 500))
    x = np.concatenate([near, far]).astype(np.float32)
    d = np.asarray(cluster.pairwise_distances(x, metric))
    assert np.isfinite(d).all()
    assert d.min() >= 0.0
    # The float32 Gram identity's absolute error is ~sqrt(eps * |x|^2 * k): about
    # 0.01-0.02 here (|x|^2 ~ 500), depending on the CPU's GEMM accumulation order
    # (0.0156 on an AVX2 EPYC, < 0.01 on an AVX-512 Xeon); the far rows are ~150 away.
    assert d[:8, :8].max() < (5e-2 if metric == "euclidean" else 1e-5)
    if metric == "euclidean":
        assert d[:8, 8:].min() > 50.0
    want = ssd.squareform(ssd.pdist(x.astype(np.float64), metric))
    np.testing.assert_allclose(d[8:, :], want[8:, :], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------
# Hand-made dendrogram, binary top-down mode
# ------------------------------------------------------------------------------------

# 6 agents. Merges (cluster id = 6 + row):
#   row 0 -> 6  : agents 1, 2            height 1.0   {1, 2}
#   row 1 -> 7  : agents 3, 4            height 1.5   {3, 4}
#   row 2 -> 8  : agent 0 + cluster 6    height 2.0   {0, 1, 2}
#   row 3 -> 9  : clusters 7, 8          height 3.0   {0, 1, 2, 3, 4}
#   row 4 -> 10 : agent 5 + cluster 9    height 5.0   root; agent 5 split off alone
HAND_Z = np.array(
    [
        [1, 2, 1.0, 2],
        [3, 4, 1.5, 2],
        [0, 6, 2.0, 3],
        [7, 8, 3.0, 5],
        [5, 9, 5.0, 6],
    ],
    np.float64,
)


def _assert_tree(tree, agent_parent, node_parent, agent_ancestor, level_sizes):
    assert tree.level_sizes == level_sizes
    for arr in (tree.agent_parent, tree.node_parent, tree.agent_ancestor):
        assert isinstance(arr, np.ndarray) and arr.dtype == np.int32
    np.testing.assert_array_equal(tree.agent_parent, agent_parent)
    np.testing.assert_array_equal(tree.node_parent, node_parent)
    np.testing.assert_array_equal(tree.agent_ancestor, agent_ancestor)


def test_binary_tree_hand_dendrogram_two_levels():
    # level_sizes (4, 2, 1): level-1 nodes 0..3, level-2 nodes 4..5, root 6.
    # Root (cluster 10) splits into agent 5 (-> direct member of the root) and
    # cluster 9 (-> level 2, heap pos 1, node 5). Cluster 9 splits into cluster 7
    # (level 1, pos 2, node 2) and cluster 8 (level 1, pos 3, node 3). Level-1
    # nodes take all agents below them: node 2 = {3, 4}, node 3 = {0, 1, 2}
    # (agent 0 would be split off one level further down, but level 1 stops).
    tree = cluster.tree_from_linkage(HAND_Z, 6, 2)
    _assert_tree(
        tree,
        agent_parent=[3, 3, 3, 2, 2, 6],
        node_parent=[6, 6, 5, 5, 6, 6, 6],  # nodes 0, 1, 4 are padding
        agent_ancestor=[
            [3, 3, 3, 2, 2, -1],
            [5, 5, 5, 5, 5, -1],
            [6, 6, 6, 6, 6, 6],
        ],
        level_sizes=(4, 2, 1),
    )


def test_binary_tree_hand_dendrogram_one_level():
    # level_sizes (2, 1): root 2. Agent 5 -> root; cluster 9 -> node 1 with all
    # of agents 0..4; node 0 is padding.
    tree = cluster.tree_from_linkage(HAND_Z, 6, 1)
    _assert_tree(
        tree,
        agent_parent=[1, 1, 1, 1, 1, 2],
        node_parent=[2, 2, 2],
        agent_ancestor=[[1, 1, 1, 1, 1, -1], [2, 2, 2, 2, 2, 2]],
        level_sizes=(2, 1),
    )


def test_binary_tree_hand_dendrogram_three_levels():
    # level_sizes (8, 4, 2, 1), offsets (0, 8, 12, 14), root 14.
    # Root: agent 5 -> root; cluster 9 -> level 3 pos 1 = node 13.
    # Cluster 9: cluster 7 -> level 2 pos 2 = node 10; cluster 8 -> pos 3 = node 11.
    # Cluster 7 (level 2): both children are agents (3, 4) -> direct members of 10.
    # Cluster 8 (level 2): agent 0 -> direct member of 11; cluster 6 -> level 1
    # pos 7 = node 7, which takes agents 1, 2.
    tree = cluster.tree_from_linkage(HAND_Z, 6, 3)
    node_parent = [14] * 15
    node_parent[7] = 11
    node_parent[10] = 13
    node_parent[11] = 13
    node_parent[13] = 14
    _assert_tree(
        tree,
        agent_parent=[11, 7, 7, 10, 10, 14],
        node_parent=node_parent,
        agent_ancestor=[
            [-1, 7, 7, -1, -1, -1],
            [11, 11, 11, 10, 10, -1],
            [13, 13, 13, 13, 13, -1],
            [14] * 6,
        ],
        level_sizes=(8, 4, 2, 1),
    )


def test_binary_tree_zero_levels_is_trivial():
    tree = cluster.tree_from_linkage(HAND_Z, 6, 0)
    _assert_tree(tree, [0] * 6, [0], [[0] * 6], (1,))
    _assert_tree(cluster.trivial_tree(6), [0] * 6, [0], [[0] * 6], (1,))


def _check_consistent(tree: GroupTree, num_agents: int):
    """Structural invariants, checked by walking parents (independent of the code)."""
    root = tree.root
    offsets = tree.level_offsets
    level_of = np.repeat(np.arange(1, tree.num_levels + 2), tree.level_sizes)
    assert tree.node_parent[root] == root
    for a in range(num_agents):
        node = int(tree.agent_parent[a])
        chain = {}
        while True:
            chain[int(level_of[node])] = node
            if node == root:
                break
            parent = int(tree.node_parent[node])
            assert level_of[parent] == level_of[node] + 1
            node = parent
        for lv in range(1, tree.num_levels + 2):
            assert tree.agent_ancestor[lv - 1, a] == chain.get(lv, -1)
    assert len(offsets) == len(tree.level_sizes)


def test_binary_tree_random_invariants():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(37, 5))
    z = sch.linkage(ssd.pdist(x), "average")
    for levels in range(0, 5):
        tree = cluster.tree_from_linkage(z, 37, levels)
        _check_consistent(tree, 37)
        used = np.unique(tree.agent_ancestor[0][tree.agent_ancestor[0] >= 0])
        assert len(used) <= 2**levels


# ------------------------------------------------------------------------------------
# Maxclust mode
# ------------------------------------------------------------------------------------


def _blobs(rng, jitter=0.1):
    centers = np.array([[0, 0], [0, 10], [100, 0], [100, 10]], np.float64)
    blob = np.repeat(np.arange(4), 5)
    perm = rng.permutation(20)
    blob = blob[perm]
    x = centers[blob] + jitter * rng.normal(size=(20, 2))
    return x.astype(np.float32), blob


def _partition(labels):
    return {frozenset(np.flatnonzero(labels == v).tolist()) for v in np.unique(labels)}


def test_maxclust_recovers_blobs_and_nests():
    rng = np.random.default_rng(5)
    x, blob = _blobs(rng)
    tree, info = cluster.build_tree(
        x, num_levels=2, mode="maxclust", level_groups=(4, 2)
    )
    assert set(info) == {"distance_s", "linkage_s", "tree_s", "linkage"}
    assert info["linkage"].shape == (19, 4)  # scipy Z of the 20 agents
    assert tree.level_sizes == (4, 2, 1)
    # Level 1 = the 4 blobs; level 2 = blobs {0, 1} and {2, 3}.
    assert _partition(tree.agent_ancestor[0]) == _partition(blob)
    assert _partition(tree.agent_ancestor[1]) == _partition(blob // 2)
    np.testing.assert_array_equal(tree.agent_parent, tree.agent_ancestor[0])
    np.testing.assert_array_equal(tree.agent_ancestor[2], 6)
    # Nesting: a level-1 node's parent is the level-2 node of its members.
    np.testing.assert_array_equal(
        tree.node_parent[tree.agent_ancestor[0]], tree.agent_ancestor[1]
    )
    # Dense labels ordered by smallest member agent index.
    first = [
        int(tree.agent_ancestor[0][np.flatnonzero(blob == b)[0]]) for b in range(4)
    ]
    order = np.argsort([np.flatnonzero(blob == b)[0] for b in range(4)])
    assert [first[b] for b in order] == [0, 1, 2, 3]
    assert tree.agent_ancestor[1][0] == 4  # agent 0's level-2 group comes first
    _check_consistent(tree, 20)


def test_maxclust_fewer_clusters_gives_padding():
    # 4 blobs of identical points: within-blob merges have height 0, so asking for
    # 6 level-1 groups yields only 4 and leaves 2 padding slots.
    rng = np.random.default_rng(6)
    x, blob = _blobs(rng, jitter=0.0)
    z = sch.linkage(ssd.pdist(x.astype(np.float64)), "average")
    tree = cluster.tree_from_linkage_maxclust(z, 20, (6, 2))
    assert tree.level_sizes == (6, 2, 1)
    assert tree.node_parent.shape == (9,)
    assert _partition(tree.agent_ancestor[0]) == _partition(blob)
    np.testing.assert_array_equal(np.unique(tree.agent_parent), [0, 1, 2, 3])
    np.testing.assert_array_equal(tree.node_parent[[4, 5]], [8, 8])  # padding
    assert set(tree.node_parent[:4].tolist()) == {6, 7}
    js = cluster.tree_to_json(tree)
    assert [n["num_agents"] for n in js["nodes"]] == [5, 5, 5, 5, 0, 0, 10, 10, 20]
    assert js["nodes"][4]["members"] == [] and js["nodes"][8]["members"] == []


def test_maxclust_non_nested_cuts_raise(monkeypatch):
    z = HAND_Z
    fake = {3: np.array([1, 1, 2, 2, 3, 3]), 2: np.array([1, 2, 2, 2, 2, 2])}
    monkeypatch.setattr(cluster.sch, "fcluster", lambda z, t, criterion: fake[t])
    with pytest.raises(ValueError, match="nested"):
        cluster.tree_from_linkage_maxclust(z, 6, (3, 2))


# ------------------------------------------------------------------------------------
# Static shapes, backends, JSON
# ------------------------------------------------------------------------------------


def test_same_capacities_for_different_data_no_recompile():
    rng = np.random.default_rng(7)
    xa = rng.normal(size=(30, 8)).astype(np.float32)
    xb = (rng.normal(size=(30, 8)) ** 3).astype(np.float32)
    f = jax.jit(lambda t: jnp.sum(t.agent_ancestor) + jnp.sum(t.node_parent))
    for kw in (
        {"num_levels": 3},
        {"num_levels": 2, "mode": "maxclust", "level_groups": (7, 3)},
    ):
        ta, _ = cluster.build_tree(xa, **kw)
        tb, _ = cluster.build_tree(xb, metric="cosine", method="single", **kw)
        assert not np.array_equal(ta.agent_parent, tb.agent_parent)
        assert ta.level_sizes == tb.level_sizes
        for name in ("agent_parent", "node_parent", "agent_ancestor"):
            assert getattr(ta, name).shape == getattr(tb, name).shape
            assert getattr(ta, name).dtype == getattr(tb, name).dtype
        f(ta), f(tb)
    assert f._cache_size() == 2  # one compile per configuration, not per tree


@pytest.mark.skipif(
    importlib.util.find_spec("fastcluster") is None, reason="fastcluster missing"
)
@pytest.mark.parametrize("method", cluster.LINKAGE_METHODS)
def test_fastcluster_matches_scipy(method):
    rng = np.random.default_rng(8)
    d = np.asarray(cluster.pairwise_distances(rng.normal(size=(50, 6)), "euclidean"))
    za = cluster.linkage(d, method, "scipy")
    zb = cluster.linkage(d, method, "fastcluster")
    assert za.shape == zb.shape == (49, 4) and za.dtype == np.float64
    np.testing.assert_allclose(za[:, 2], zb[:, 2], rtol=0, atol=1e-10)
    np.testing.assert_array_equal(za[:, [0, 1, 3]], zb[:, [0, 1, 3]])


def test_linkage_matches_scipy_on_square_matrix():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(12, 3))
    want = sch.linkage(ssd.pdist(x), "complete")
    got = cluster.linkage(ssd.squareform(ssd.pdist(x)), "complete")
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_fastcluster_missing_is_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastcluster", None)
    with pytest.raises(ConfigError, match="pip install fastcluster"):
        cluster.linkage(np.ones((3, 3)) - np.eye(3), "average", "fastcluster")


def test_tree_to_json_hand_tree():
    js = cluster.tree_to_json(cluster.tree_from_linkage(HAND_Z, 6, 2))
    assert js["agent_parent"] == [3, 3, 3, 2, 2, 6]
    assert js["level_sizes"] == [4, 2, 1] and js["root"] == 6
    assert [n["members"] for n in js["nodes"]] == [
        [],
        [],
        [3, 4],
        [0, 1, 2],
        [],
        [],
        [5],
    ]
    assert [n["num_agents"] for n in js["nodes"]] == [0, 0, 2, 3, 0, 5, 6]
    assert [n["level"] for n in js["nodes"]] == [1, 1, 1, 1, 2, 2, 3]
    import json

    json.dumps(js)  # plain Python types only


# ------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------

X = np.random.default_rng(10).normal(size=(6, 3)).astype(np.float32)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_levels": 2, "metric": "manhattan"}, "metric='manhattan'"),
        ({"num_levels": 2, "method": "centroid"}, "method='centroid'"),
        ({"num_levels": 2, "method": "ward", "metric": "cosine"}, "method='ward'"),
        ({"num_levels": 2, "mode": "kmeans"}, "mode='kmeans'"),
        ({"num_levels": 2, "backend": "sklearn"}, "backend='sklearn'"),
        ({"num_levels": -1}, "num_levels"),
        ({"num_levels": 2, "mode": "maxclust", "level_groups": (2, 3)}, "level_groups"),
        ({"num_levels": 2, "mode": "maxclust", "level_groups": (7, 3)}, "level_groups"),
        ({"num_levels": 2, "mode": "maxclust", "level_groups": (3, 0)}, "level_groups"),
        ({"num_levels": 1, "mode": "maxclust", "level_groups": (3, 2)}, "level_groups"),
    ],
)
def test_build_tree_bad_inputs(kwargs, field):
    """Argument errors of the public API: ``ValueError`` naming the argument (a
    run's config fields are ``ConfigError``s of ``demjax.config.validate``)."""
    with pytest.raises(ValueError, match=f"^{field}") as err:
        cluster.build_tree(X, **kwargs)
    assert not isinstance(err.value, ConfigError)


def test_direct_bad_inputs():
    with pytest.raises(ValueError, match="^metric='l1'"):
        cluster.pairwise_distances(X, "l1")
    with pytest.raises(ValueError, match="^method='median'"):
        cluster.linkage(np.zeros((3, 3)), "median")
    with pytest.raises(ValueError, match="^backend='torch'"):
        cluster.linkage(np.zeros((3, 3)), "average", "torch")
    with pytest.raises(ValueError, match="num_levels"):
        cluster.tree_from_linkage(HAND_Z, 6, -2)
    with pytest.raises(ValueError, match="level_groups"):
        cluster.tree_from_linkage_maxclust(HAND_Z, 6, (2, 4))
    with pytest.raises(ValueError):
        cluster.tree_from_linkage(HAND_Z, 7, 2)  # Z is for 6 agents


def test_single_agent():
    z = cluster.linkage(np.zeros((1, 1)))
    assert z.shape == (0, 4)
    t = cluster.tree_from_linkage(z, 1, 2)
    assert t.agent_parent.tolist() == [6] and t.level_sizes == (4, 2, 1)
    t = cluster.tree_from_linkage_maxclust(z, 1, (1, 1))
    assert t.agent_parent.tolist() == [0] and t.node_parent.tolist() == [1, 2, 2]


def test_sketch_preserves_distances_and_the_tree():
    from sklearn.metrics import adjusted_rand_score

    from demjax import cluster

    # Two super-clusters of two blobs each, 10 agents per blob.
    rng = np.random.default_rng(7)
    supers = rng.normal(scale=1.0, size=(2, 3000))
    centers = [s + rng.normal(scale=0.5, size=3000) for s in supers for _ in range(2)]
    feats = np.concatenate(
        [c + rng.normal(scale=0.2, size=(10, 3000)) for c in centers]
    )
    feats = feats.astype(np.float32)
    key = jax.random.PRNGKey(0)
    sk = np.asarray(cluster.sketch(key, feats, 512, block_size=1000))
    assert sk.shape == (40, 512)
    exact = ssd.pdist(feats)
    approx = ssd.pdist(sk)
    ratio = approx / exact
    assert 0.85 < ratio.min() and ratio.max() < 1.15  # JL with k = 512
    kw = dict(num_levels=2, mode="maxclust", level_groups=(4, 2))
    exact_tree, _ = cluster.build_tree(feats, **kw)
    sk_tree, info = cluster.build_tree(feats, sketch_dim=256, key=key, **kw)
    assert "sketch_s" in info
    blobs = np.repeat(np.arange(4), 10)
    for level, truth in ((0, blobs), (1, blobs // 2)):
        exact = np.asarray(exact_tree.agent_ancestor[level])
        approx = np.asarray(sk_tree.agent_ancestor[level])
        assert adjusted_rand_score(exact, truth) == 1.0
        assert adjusted_rand_score(exact, approx) > 0.99
    with pytest.raises(ValueError, match="sketch_dim"):
        cluster.sketch(key, feats, 0)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_blocked_distances_equal_pdist(metric):
    rng = np.random.default_rng(11)
    feats = (rng.normal(size=(9, 1003)) + 5.0).astype(np.float32)
    ref = ssd.squareform(ssd.pdist(feats.astype(np.float64), metric))
    got = np.asarray(cluster.pairwise_distances(feats, metric, block_size=100))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_sketch_params_of_a_pytree_preserves_distances():
    """Leaf-by-leaf sketch (no [A, D] concatenation) obeys the JL bound on the
    flattened parameters, and differs from the concatenated sketch only in R."""
    from demjax import cluster

    rng = np.random.default_rng(3)
    params = {
        "a": {"kernel": rng.normal(size=(30, 40, 50)).astype(np.float32)},
        "b": rng.normal(size=(30, 700)).astype(np.float32),
    }
    flat = np.asarray(cluster.flatten_params(params))
    assert flat.shape == (30, 2700)
    key = jax.random.PRNGKey(1)
    sk = np.asarray(cluster.sketch_params(key, params, 512, block_size=300))
    assert sk.shape == (30, 512)
    ratio = ssd.pdist(sk) / ssd.pdist(flat)
    assert 0.85 < ratio.min() and ratio.max() < 1.15
    # Linear in the parameters: sketch(x) - sketch(y) = sketch(x - y).
    other = jax.tree.map(lambda v: v * 0.5, params)
    diff = jax.tree.map(lambda u, v: u - v, params, other)
    np.testing.assert_allclose(
        sk - np.asarray(cluster.sketch_params(key, other, 512, block_size=300)),
        np.asarray(cluster.sketch_params(key, diff, 512, block_size=300)),
        rtol=1e-4,
        atol=1e-3,
    )
    with pytest.raises(ValueError, match="sketch_dim"):
        cluster.sketch_params(key, params, 0)


def test_nearest_rows_matches_numpy():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(4)
    x = rng.normal(size=(37, 6)).astype(np.float32)
    s = rng.normal(size=(5, 6)).astype(np.float32)
    for metric in ("euclidean", "cosine"):
        got = np.asarray(cluster.nearest_rows(x, s, metric, block=8))
        np.testing.assert_array_equal(got, cdist(x, s, metric).argmin(axis=1))


def test_linkage_sample_tree_matches_exact_on_clustered_data():
    """CURE-style sampling: linkage on 60 of 600 agents + nearest-sample
    assignment recovers the exact tree's level-1 groups (ARI) on clustered data."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(5)
    centers = rng.normal(size=(6, 40)) * 6
    labels = rng.integers(0, 6, 600)
    x = (centers[labels] + rng.normal(size=(600, 40))).astype(np.float32)
    kw = dict(num_levels=2, mode="maxclust", level_groups=(6, 2))
    exact, _ = cluster.build_tree(x, **kw)
    key = jax.random.PRNGKey(0)
    sampled, info = cluster.build_tree(x, key=key, linkage_sample=60, **kw)
    assert len(info["linkage_agents"]) == 60 and info["linkage"].shape == (59, 4)
    ari = adjusted_rand_score(
        np.asarray(exact.agent_parent), np.asarray(sampled.agent_parent)
    )
    assert ari > 0.95, ari
    assert adjusted_rand_score(labels, np.asarray(sampled.agent_parent)) > 0.95
    # Every agent has a full ancestor chain in the same capacities.
    assert sampled.level_sizes == exact.level_sizes
    assert (np.asarray(sampled.agent_ancestor)[-1] == sampled.num_nodes - 1).all()


def test_linkage_sample_errors():
    x = np.zeros((10, 3), np.float32)
    for bad in (1, 11, -1, 2.5, True):
        with pytest.raises(ValueError, match="linkage_sample"):
            cluster.build_tree(
                x, num_levels=2, key=jax.random.PRNGKey(0), linkage_sample=bad
            )
    with pytest.raises(ValueError, match="needs a PRNG key"):
        cluster.build_tree(x, num_levels=2, linkage_sample=5)
