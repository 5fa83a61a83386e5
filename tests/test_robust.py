"""Robust aggregators (issue 5) against NumPy: flat, segment-wise, over the group
tree, and end to end through the tree engine and a plug-in."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from demjax import hierarchy, robust
from tests.test_hierarchy import AGENT_PARENT, LEVEL, NODE_PARENT, make_tree


def np_trimmed(rows, frac):
    k = len(rows)
    b = int(np.floor(frac * k))
    return np.sort(rows, axis=0)[b : k - b].mean(axis=0)


@pytest.mark.parametrize("kind", ["mean", "median", "trimmed_mean"])
def test_aggregate_matches_numpy(kind):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 4, 3)).astype(np.float32)
    w = rng.uniform(1, 5, size=9).astype(np.float32)
    w[[2, 7]] = 0.0  # excluded agents
    out = robust.aggregate({"k": jnp.asarray(x)}, jnp.asarray(w), kind, 0.2)["k"]
    inc = w > 0
    if kind == "mean":
        ref = (w[:, None, None] * x).sum(0) / w.sum()
    elif kind == "median":
        ref = np.median(x[inc], axis=0)
    else:
        ref = np_trimmed(x[inc], 0.2)  # 7 included: floor(1.4) = 1 cut each end
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)


def test_trimmed_mean_hand_computed():
    # 1..9 and an outlier 1000: mean 104.5; cut 1 from each end -> mean(2..9)
    # = 5.5; with trim 0.3 cut 3 -> mean(4..7) = 5.5; the median (5 + 6) / 2.
    x = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 1000], np.float32)
    mean = robust.aggregate(jnp.asarray(x), jnp.ones(10), "mean")
    assert float(mean) == pytest.approx(104.5)
    out = robust.aggregate(jnp.asarray(x), jnp.ones(10), "trimmed_mean", 0.1)
    assert float(out) == pytest.approx(5.5)
    x[0] = -50.0  # cut -50 and 1000 -> mean(2..9) still 5.5; trim 0: 99.4
    out = robust.aggregate(jnp.asarray(x), jnp.ones(10), "trimmed_mean", 0.1)
    assert float(out) == pytest.approx(5.5)
    out0 = robust.aggregate(jnp.asarray(x), jnp.ones(10), "trimmed_mean", 0.0)
    assert float(out0) == pytest.approx(99.4)
    med = robust.aggregate(jnp.asarray(x), jnp.ones(10), "median")
    assert float(med) == pytest.approx(5.5)


def test_noisy_median_interpolates_median_and_mean():
    """Chen et al. (NeurIPS 2020), Sec. 3: with noise of scale sigma before the
    median, E[median] moves from the median (sigma = 0) towards the mean."""
    x = jnp.asarray([0.0, 0.0, 0.0, 1.0, 10.0])  # median 0, mean 2.2
    w = jnp.ones(5)
    zero = robust.aggregate(x, w, "noisy_median", noise_scale=0.0,
                            key=jax.random.PRNGKey(0))  # fmt: skip
    assert float(zero) == 0.0
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    noisy = jax.vmap(
        lambda k: robust.aggregate(x, w, "noisy_median", noise_scale=20.0, key=k)
    )(keys)
    mean_est = float(jnp.mean(noisy))
    assert abs(mean_est - 2.2) < 0.6, mean_est  # far from the median 0
    with pytest.raises(ValueError, match="needs a PRNG key"):
        robust.aggregate(x, w, "noisy_median", noise_scale=1.0)
    with pytest.raises(ValueError, match="accepted: mean, median"):
        robust.aggregate(x, w, "mode")


@pytest.mark.parametrize("kind", ["median", "trimmed_mean"])
def test_segment_aggregate_matches_numpy_loop(kind):
    rng = np.random.default_rng(2)
    k, g = 40, 6
    x = rng.normal(size=(k, 3, 2)).astype(np.float32)
    seg = rng.integers(-1, g + 1, size=k)  # -1 and g are dropped
    seg[seg == 4] = 0  # segment 4 is empty
    inc = rng.random(k) > 0.25
    out = np.asarray(
        robust.segment_aggregate(
            jnp.asarray(x), jnp.asarray(seg), jnp.asarray(inc), g, kind, 0.25
        )
    )
    assert out.shape == (g, 3, 2)
    for s in range(g):
        rows = x[(seg == s) & inc]
        if len(rows) == 0:
            assert np.isnan(out[s]).all()
            continue
        ref = np.median(rows, 0) if kind == "median" else np_trimmed(rows, 0.25)
        np.testing.assert_allclose(out[s], ref, rtol=1e-5, atol=1e-6)


def numpy_median_tree(w, weight):
    """Reference: per group, the coordinate-wise median of its contributing
    children (agents with weight > 0 and non-empty child groups), bottom-up."""
    n = len(NODE_PARENT)
    val = np.zeros((n,) + w.shape[1:])
    tot = np.zeros(n)
    for level in (1, 2, 3):
        for g in np.flatnonzero(LEVEL == level):
            agents = np.flatnonzero(AGENT_PARENT == g)
            kids = [w[a] for a in agents if weight[a] > 0]
            tot[g] = weight[agents].sum()
            for c in range(n):
                if NODE_PARENT[c] == g and c != g and LEVEL[c] == level - 1:
                    tot[g] += tot[c]
                    if tot[c] > 0:
                        kids.append(val[c])
            if kids:
                val[g] = np.median(np.stack(kids), axis=0)
    return val, tot


def test_aggregate_up_median_matches_numpy_tree():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(7, 3, 2)).astype(np.float32)
    weight = np.array([1, 1, 1, 1, 0, 1, 1], np.float32)  # agent 4 excluded
    nodes, tot = hierarchy.aggregate_up(
        {"w": jnp.asarray(w)}, make_tree(), jnp.asarray(weight), aggregator="median"
    )
    ref, ref_tot = numpy_median_tree(w, weight)
    np.testing.assert_allclose(np.asarray(tot), ref_tot)
    np.testing.assert_allclose(np.asarray(nodes["w"]), ref, rtol=1e-5, atol=1e-6)


def test_median_tree_resists_a_byzantine_agent():
    """Agent 1 sends 1e6. The mean carries it to the root (hand-computed:
    node 0 = 5e5, node 4 = (2 * 5e5 + 1) / 3, root = (3 * node 4 + 3 + 1) / 7 ~
    1.43e5); with medians node 0 = 5e5, node 4 = median(5e5, 1), but the root =
    median(node 4, node 5 = 1, agent 6 = 1) = 1: honest."""
    w = np.ones((7, 4), np.float32)
    w[1] = 1e6
    weight = jnp.ones(7)
    tree = make_tree()
    root = tree.num_nodes - 1
    mean_nodes, _ = hierarchy.aggregate_up({"w": jnp.asarray(w)}, tree, weight)
    med_nodes, _ = hierarchy.aggregate_up(
        {"w": jnp.asarray(w)}, tree, weight, aggregator="median"
    )
    expect_mean = (3 * (2 * 5e5 + 1) / 3 + 3 + 1) / 7
    np.testing.assert_allclose(mean_nodes["w"][root], expect_mean, rtol=1e-5)
    np.testing.assert_allclose(med_nodes["w"][0], 5e5, rtol=1e-6)
    np.testing.assert_allclose(med_nodes["w"][4], (5e5 + 1) / 2, rtol=1e-6)
    np.testing.assert_allclose(med_nodes["w"][root], 1.0)


def test_aggregate_up_robust_errors():
    tree = make_tree()
    w = {"w": jnp.ones((7, 2))}
    with pytest.raises(ValueError, match="needs a PRNG key"):
        hierarchy.aggregate_up(w, tree, jnp.ones(7), aggregator="noisy_median")
    with pytest.raises(ValueError, match="accepted: mean, median"):
        hierarchy.aggregate_up(w, tree, jnp.ones(7), aggregator="mode")


@pytest.mark.parametrize("aggregator", ["trimmed_mean"])
def test_tree_engine_runs_with_robust_aggregator(aggregator, tmp_path):
    """DemLearn through ``train.run``: the aggregator reaches the group models
    (group accuracies differ from the mean run), metrics stay finite."""
    from demjax.train import run
    from tests.test_plugins import tiny_config

    outs = {}
    for agg in ("mean", aggregator):
        c = tiny_config(algorithm="demlearn", aggregator=agg, trim_fraction=0.25,
                        aggregator_noise=0.05, num_rounds=2)  # fmt: skip
        outs[agg] = run(c, str(tmp_path / agg))["final"]["sync"]
    robust_final = outs[aggregator]
    assert all(np.isfinite(v) for k, v in robust_final.items()
               if isinstance(v, float))  # fmt: skip
    assert robust_final["c_spe"] > 0.3
    diffs = [abs(robust_final[k] - outs["mean"][k]) for k in robust_final
             if k.startswith("g_") and isinstance(robust_final[k], float)]  # fmt: skip
    assert diffs and max(diffs) > 0.0


def test_plugin_runs_with_median(tmp_path):
    from demjax.train import run
    from tests.test_plugins import tiny_config

    c = tiny_config(algorithm="ditto", aggregator="median")
    out = run(c, str(tmp_path / "ditto"))["final"]["sync"]
    assert np.isfinite(out["global_acc"]) and out["c_spe"] > 0.3
