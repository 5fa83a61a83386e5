"""Hierarchical aggregation vs a NumPy loop over groups, and hand-computed mixing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from demjax import hierarchy
from demjax.types import GroupTree

# A hand-made 2-level tree over 7 agents (level sizes: 4 level-1 slots, 2 level-2
# slots, root; node ids 0-3 level 1, 4-5 level 2, 6 root):
#   root 6 <- level-2 nodes 4, 5 and agent 6 (attached directly to the root)
#   node 4 <- level-1 nodes 0, 1;  node 5 <- level-1 node 2 and agent 5 (direct)
#   node 0 <- agents 0, 1;  node 1 <- agent 2;  node 2 <- agents 3, 4
#   node 3 is padding (no agents).
AGENT_PARENT = np.array([0, 0, 1, 2, 2, 5, 6], np.int32)
NODE_PARENT = np.array([4, 4, 5, 6, 6, 6, 6], np.int32)
ANCESTOR = np.array(
    [
        [0, 0, 1, 2, 2, -1, -1],
        [4, 4, 4, 5, 5, 5, -1],
        [6, 6, 6, 6, 6, 6, 6],
    ],
    np.int32,
)
LEVEL = np.array([1, 1, 1, 1, 2, 2, 3])


def make_tree():
    return GroupTree(AGENT_PARENT, NODE_PARENT, ANCESTOR, (4, 2, 1))


def numpy_aggregate(w, weight, amplify=1.0):
    """Reference: a Python loop over nodes, bottom-up, children listed explicitly."""
    n = len(NODE_PARENT)
    val = np.zeros((n,) + w.shape[1:])
    tot = np.zeros(n)
    for level in (1, 2, 3):
        for g in np.flatnonzero(LEVEL == level):
            kids = [(w[a], weight[a]) for a in np.flatnonzero(AGENT_PARENT == g)]
            kids += [
                (val[c], tot[c])
                for c in range(n)
                if NODE_PARENT[c] == g and c != g and LEVEL[c] == level - 1
            ]
            s = sum(k[1] for k in kids)
            tot[g] = s
            if s > 0:
                val[g] = amplify * sum(k[1] * k[0] for k in kids) / s
    return val, tot


@pytest.mark.parametrize("amplify", [1.0, 1.15])
@pytest.mark.parametrize("sample_weights", [False, True])
def test_aggregate_up_matches_numpy_loop(amplify, sample_weights):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(7, 3, 2)).astype(np.float32)
    b = rng.normal(size=(7, 5)).astype(np.float32)
    weight = (
        rng.integers(1, 30, size=7).astype(np.float32)
        if sample_weights
        else np.ones(7, np.float32)
    )
    tree = jax.tree.map(jnp.asarray, make_tree())
    nodes, tot = jax.jit(hierarchy.aggregate_up)(
        {"w": w, "b": b}, tree, jnp.asarray(weight), jnp.float32(amplify)
    )
    ref_w, ref_tot = numpy_aggregate(w, weight, amplify)
    ref_b, _ = numpy_aggregate(b, weight, amplify)
    np.testing.assert_allclose(nodes["w"], ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nodes["b"], ref_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tot, ref_tot, rtol=1e-6)
    np.testing.assert_allclose(
        hierarchy.node_counts(tree, jnp.asarray(weight)), ref_tot, rtol=1e-6
    )
    # Padding node 3 stays zero with zero weight.
    assert tot[3] == 0 and np.all(np.asarray(nodes["w"][3]) == 0)


def test_amplify_compounds_up_the_tree():
    # All agents hold the same vector v: level-1 groups are 1.15 v, level-2 groups
    # are averages of (1.15 v) children and direct agents v, the root mixes both.
    v = np.ones((7, 1), np.float32)
    tree = jax.tree.map(jnp.asarray, make_tree())
    nodes, _ = hierarchy.aggregate_up(v, tree, jnp.ones(7), 1.15)
    a = 1.15
    node4 = a * a  # children: nodes 0 and 1 (both a * v)
    node5 = a * (2 * a + 1) / 3  # node 2 (2 agents, a v) and agent 5 (v)
    root = a * (3 * node4 + 3 * node5 + 1) / 7
    np.testing.assert_allclose(
        np.asarray(nodes)[[0, 4, 5, 6], 0], [a, node4, node5, root], rtol=1e-6
    )


def test_mix_down_hand_computed_weights():
    # A chain: agent 0 under level-1 node 0, under level-2 node 1, under level-3 node 2,
    # under the root 3. Basis vectors expose every coefficient.
    tree = GroupTree(
        agent_parent=jnp.array([0], jnp.int32),
        node_parent=jnp.array([1, 2, 3, 3], jnp.int32),
        agent_ancestor=jnp.array([[0], [1], [2], [3]], jnp.int32),
        level_sizes=(1, 1, 1, 1),
    )
    agent = jnp.eye(5)[None, 0]
    nodes = jnp.eye(5)[1:]
    mixed_nodes, mixed = hierarchy.mix_down(nodes, agent, tree, 0.6)
    np.testing.assert_allclose(mixed[0], [0.4, 0.24, 0.144, 0.0864, 0.1296], rtol=1e-6)
    np.testing.assert_allclose(mixed_nodes[3], nodes[3])  # root unchanged


def test_mix_down_matches_numpy_loop():
    rng = np.random.default_rng(1)
    nodes = rng.normal(size=(7, 4)).astype(np.float32)
    agents = rng.normal(size=(7, 4)).astype(np.float32)
    alpha = 0.7
    ref = nodes.copy()
    for level in (2, 1):
        for g in np.flatnonzero(LEVEL == level):
            ref[g] = (1 - alpha) * ref[g] + alpha * ref[NODE_PARENT[g]]
    ref_agents = np.stack(
        [(1 - alpha) * agents[a] + alpha * ref[AGENT_PARENT[a]] for a in range(7)]
    )
    tree = jax.tree.map(jnp.asarray, make_tree())
    got_nodes, got = hierarchy.mix_down(
        jnp.asarray(nodes), jnp.asarray(agents), tree, alpha
    )
    np.testing.assert_allclose(got_nodes, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, ref_agents, rtol=1e-5, atol=1e-6)


def test_fedavg_is_sample_weighted_mean_with_trivial_tree():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    n = np.array([3, 10, 1, 7, 4], np.float32)
    tree = GroupTree(
        jnp.zeros(5, jnp.int32),
        jnp.zeros(1, jnp.int32),
        jnp.zeros((1, 5), jnp.int32),
        (1,),
    )
    nodes, _ = hierarchy.aggregate_up(jnp.asarray(w), tree, jnp.asarray(n))
    expected = (n[:, None] * w).sum(0) / n.sum()
    np.testing.assert_allclose(nodes[0], expected, rtol=1e-5)
    _, agents = hierarchy.mix_down(nodes, jnp.asarray(w), tree, 1.0)
    np.testing.assert_allclose(agents, np.tile(expected, (5, 1)), rtol=1e-5)


@pytest.mark.parametrize("block_rows", [None, 1, 3, 7, 100])
def test_weighted_segment_sum_blocks_equal_numpy_loop(block_rows):
    rng = np.random.default_rng(0)
    a, s = 10, 4
    x = rng.normal(size=(a, 3, 2)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, size=a).astype(np.float32)
    ids = np.array([0, 3, 1, 1, -1, 2, 0, 4, 3, 3], np.int32)  # -1 and 4: dropped
    want = np.zeros((s, 3, 2))
    for i in range(a):
        if 0 <= ids[i] < s:
            want[ids[i]] += w[i] * x[i].astype(np.float64)
    got = hierarchy.weighted_segment_sum(
        jnp.asarray(x), jnp.asarray(w), jnp.asarray(ids), s, block_rows
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_blocked_aggregation_holds_no_population_copy():
    """The unblocked weighted sum materialises weight * x ([A, D]); the blocked
    one only a block (XLA's compiled temporary sizes)."""
    a, d, s = 512, 4096, 8
    args = (
        jax.ShapeDtypeStruct((a, d), jnp.float32),
        jax.ShapeDtypeStruct((a,), jnp.float32),
        jax.ShapeDtypeStruct((a,), jnp.int32),
    )

    def temp_bytes(block_rows):
        f = jax.jit(
            lambda x, w, i: hierarchy.weighted_segment_sum(x, w, i, s, block_rows)
        )
        analysis = f.lower(*args).compile().memory_analysis()
        if analysis is None:
            pytest.skip("no memory analysis on this backend")
        return analysis.temp_size_in_bytes

    population = a * d * 4
    assert temp_bytes(None) >= population
    assert temp_bytes(32) <= population // 4


def test_aggregate_up_blocked_equals_unblocked():
    tree = make_tree()
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(7, 5)).astype(np.float32))}
    weight = jnp.asarray(rng.uniform(1, 3, size=7).astype(np.float32))
    plain, pw = hierarchy.aggregate_up(params, tree, weight)
    # 5 float32 = 20 bytes per agent row: blocks of 2 agents (+ a remainder of 1)
    blocked, bw = hierarchy.aggregate_up(params, tree, weight, block_bytes=40)
    np.testing.assert_allclose(blocked["w"], plain["w"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(bw, pw)
