"""A run blown up by the amplify step: models stay finite, distances of huge
models are computed without float32 overflow, and non-finite models stop the
re-grouping with a one-line ``DivergenceError`` instead of a scipy traceback.

The run: DemLearn on the digits, 4 agents, MLR, ``amplify_factor=1e6`` for every
round. Agents' weights reach ~1e22 after round 1 (their squared norms overflow
float32) and the group averages overflow float32 (~1e34 times the
factor compounded up the tree) in round 3.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_round
from helpers import tiny_config as base_config
from scipy.spatial.distance import pdist, squareform

from demjax import cluster, data, train
from demjax.errors import ConfigError, DivergenceError

A = 4
ROUNDS = 4
tiny_config = functools.partial(
    base_config,
    num_agents=A,
    num_rounds=ROUNDS,
    local_plan="all",
    matmul_impl="xla",
    eval_batch=4,
    checkpoint_every=0,
    algorithm="demlearn",
    amplify=True,
    amplify_factor=1e6,
    amplify_rounds=ROUNDS,
)


def max_abs(tree) -> float:
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


def all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def amplified():
    cfg = tiny_config()
    part = jax.tree.map(jnp.asarray, data.make_partition(cfg))
    _, _, rounds = train.build(cfg, part)
    state = rounds.init(jax.random.PRNGKey(0), part)
    states = []
    for t in range(ROUNDS):
        state, _ = run_round(rounds, state, part, jax.random.PRNGKey(t + 1), t)
        states.append(state)
    return rounds, part, states


def test_amplified_run_keeps_every_model_finite(amplified):
    _, _, states = amplified
    # Round 1 leaves weights whose squared norm overflows float32: the round-2
    # regrouping still builds its tree (it used to fail in scipy).
    assert max_abs(states[1].params) > 1e20
    for t, s in enumerate(states):
        assert all_finite(s.params), f"round {t}: non-finite agent model"
        assert all_finite(s.node_params), f"round {t}: non-finite group model"


def test_overflowing_group_average_keeps_previous_group_model(amplified):
    _, _, states = amplified
    # Round 3's amplified averages exceed float32 (1e34 weights x 1e6): every
    # group keeps its round-2 model (then mixed top-down, a convex combination),
    # so no group grows past round 2.
    assert max_abs(states[2].node_params) > 1e33
    assert max_abs(states[3].node_params) <= max_abs(states[2].node_params)


def test_regrouping_non_finite_models_is_one_line_error(amplified):
    rounds, _, states = amplified
    host = rounds.phases[0].host
    bad = states[-1].replace(
        params=jax.tree.map(lambda x: x.at[1].set(jnp.nan), states[-1].params)
    )
    with pytest.raises(DivergenceError) as err:
        host(bad, {}, 8, jax.random.PRNGKey(0))
    msg = str(err.value)
    assert msg.startswith("round 8: 1 of 4 agents' models are non-finite")
    assert "\n" not in msg and "lr" in msg
    assert isinstance(err.value, ConfigError)  # scripts/run.py: one line, exit 2


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("scale", [1.0, 1e10, 1e25, 1e36])
def test_distances_of_huge_features_match_float64(metric, scale):
    x = np.random.default_rng(0).normal(size=(6, 40)).astype(np.float32)
    feats = (x * np.float32(scale)).astype(np.float32)
    got = np.asarray(cluster.pairwise_distances(feats, metric), np.float64)
    want = squareform(pdist(feats.astype(np.float64), metric))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * want.max())


def test_feature_scaling_is_exact():
    # Distances scale exactly with a power-of-two factor: the internal scaling of
    # large features changes no bit of the result.
    x = np.random.default_rng(1).normal(size=(5, 30)).astype(np.float32)
    small = np.asarray(cluster.pairwise_distances(x * np.float32(2.0**10)))
    large = np.asarray(cluster.pairwise_distances(x * np.float32(2.0**40)))
    np.testing.assert_array_equal(large, small * np.float32(2.0**30))


def test_build_tree_rejects_distances_beyond_float32():
    feats = np.zeros((4, 8), np.float32)
    feats[0], feats[1] = 3e38, -3e38  # finite weights, distance ~ 1.7e39
    with pytest.raises(DivergenceError, match="too large for float32 distances"):
        cluster.build_tree(feats, num_levels=2)


def test_linkage_rejects_non_finite_distances():
    d = np.ones((3, 3)) - np.eye(3)
    d[0, 1] = d[1, 0] = np.inf
    with pytest.raises(ValueError, match="2 non-finite entries"):
        cluster.linkage(d)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_nearest_rows_of_huge_features_match_float64(metric):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(7, 20)) * 1e30).astype(np.float32)
    s = (rng.normal(size=(3, 20)) * 1e30).astype(np.float32)
    want = np.argmin(
        squareform(pdist(np.concatenate([x, s]).astype(np.float64), metric))[:7, 7:],
        axis=1,
    )
    np.testing.assert_array_equal(np.asarray(cluster.nearest_rows(x, s, metric)), want)
