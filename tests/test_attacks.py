"""Byzantine attacks (demjax.attacks) against hand-computed values on a tiny problem."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from demjax import attacks, robust
from demjax.errors import ConfigError

# Four agents, a model of one [2]-vector and one scalar leaf; agents 1 and 3 Byzantine.
START = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)}
SENT = {
    "w": jnp.array([[1.5, 2.0], [2.0, 1.0], [0.5, 3.0], [1.0, 2.25]]),
    "b": jnp.array([0.75, 0.25, 0.5, 1.5]),
}
BAD = jnp.array([False, True, False, True])
DELTA_W = np.array([[0.5, 0.0], [1.0, -1.0], [-0.5, 1.0], [0.0, 0.25]])
DELTA_B = np.array([0.25, -0.25, 0.0, 1.0])


def _corrupt(kind, **kw):
    return attacks.corrupt(jax.random.key(0), SENT, START, BAD, kind, **kw)


def _assert_honest_unchanged(out):
    for name in ("w", "b"):
        np.testing.assert_array_equal(
            np.asarray(out[name])[[0, 2]], np.asarray(SENT[name])[[0, 2]]
        )


def test_sign_flip_and_scaling_change_only_the_byzantine_updates():
    flip = _corrupt("sign_flip", scale=2.0)
    _assert_honest_unchanged(flip)
    # agent 1: start + (-2) * delta = [1, 2] - 2 * [1, -1] = [-1, 4]; b: .5 + .5
    np.testing.assert_allclose(flip["w"][1], [-1.0, 4.0])
    np.testing.assert_allclose(flip["b"][1], 1.0)
    np.testing.assert_allclose(flip["w"][3], [1.0, 1.5])
    np.testing.assert_allclose(flip["b"][3], -1.5)
    boost = _corrupt("scaling", scale=3.0)
    _assert_honest_unchanged(boost)
    np.testing.assert_allclose(boost["w"][1], [4.0, -1.0])
    np.testing.assert_allclose(boost["b"][3], 3.5)


def test_ipm_sends_minus_epsilon_times_the_honest_mean():
    out = _corrupt("ipm", epsilon=0.5)
    _assert_honest_unchanged(out)
    mu_w = DELTA_W[[0, 2]].mean(0)  # [0, 0.5]
    mu_b = DELTA_B[[0, 2]].mean()  # 0.125
    for a in (1, 3):
        np.testing.assert_allclose(out["w"][a], np.array([1.0, 2.0]) - 0.5 * mu_w)
        np.testing.assert_allclose(out["b"][a], 0.5 - 0.5 * mu_b)


def test_alie_shift_matches_the_paper_formula_and_honest_spread():
    # n = 4, f = 2: s = floor(4/2 + 1) - 2 = 1, z = Phi^-1(3/4)
    assert attacks.alie_z(4, 2) == pytest.approx(norm.ppf(0.75))
    # n = 50, f = 10: s = 16, z = Phi^-1(34/50)
    assert attacks.alie_z(50, 10) == pytest.approx(norm.ppf(34 / 50))
    assert attacks.alie_z(4, 3) == 0.0  # s <= 0: no valid shift
    out = _corrupt("alie")
    _assert_honest_unchanged(out)
    z = norm.ppf(0.75)
    honest_w = DELTA_W[[0, 2]]
    want = np.array([1.0, 2.0]) + honest_w.mean(0) - z * honest_w.std(0)
    np.testing.assert_allclose(out["w"][1], want, rtol=1e-6)
    np.testing.assert_allclose(out["w"][3], want, rtol=1e-6)


def test_gaussian_replaces_the_update_by_noise_of_the_given_std():
    start = {"w": jnp.zeros((4000,))}
    sent = {"w": jnp.ones((3, 4000))}
    bad = jnp.array([False, True, False])
    out = attacks.corrupt(
        jax.random.key(1), sent, start, bad, "gaussian", noise_std=2.0
    )
    np.testing.assert_array_equal(out["w"][0], 1.0)
    np.testing.assert_array_equal(out["w"][2], 1.0)
    assert np.std(np.asarray(out["w"][1])) == pytest.approx(2.0, rel=0.05)
    assert abs(np.mean(np.asarray(out["w"][1]))) < 0.1


def test_none_and_label_flip_leave_messages_and_flip_labels_flips_rows():
    assert _corrupt("none") is SENT
    assert _corrupt("label_flip") is SENT
    y = jnp.array([[0, 3, 9], [1, 2, 9]], jnp.int32)
    out = attacks.flip_labels(y, jnp.array([False, True]), 10)
    np.testing.assert_array_equal(out, [[0, 3, 9], [8, 7, 0]])
    assert out.dtype == jnp.int32


def test_choose_byzantine_draws_exactly_floor_fraction_agents():
    for a, frac, want in ((50, 0.1, 5), (50, 0.3, 15), (7, 0.2, 1), (10, 0.0, 0)):
        mask = attacks.choose_byzantine(jax.random.key(a), a, frac)
        assert mask.shape == (a,) and int(mask.sum()) == want
    m1 = attacks.choose_byzantine(jax.random.key(1), 100, 0.2)
    m2 = attacks.choose_byzantine(jax.random.key(2), 100, 0.2)
    assert not np.array_equal(m1, m2)  # re-drawn with the key
    assert attacks.num_byzantine(30, 0.1) == 3 == math.floor(0.1 * 30 + 1e-9)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "x"])
def test_bad_fraction_is_named(bad):
    with pytest.raises(ConfigError, match="attack_fraction"):
        attacks.num_byzantine(10, bad)


def test_unknown_attack_is_named():
    with pytest.raises(ConfigError, match="attack=.*accepted: none, sign_flip"):
        _corrupt("flip")


def test_median_resists_sign_flip_where_mean_does_not():
    # 10 agents with update +1 (plus small spread); 2 flip and boost by 10.
    key = jax.random.key(3)
    start = {"w": jnp.zeros((5,))}
    sent = {"w": 1.0 + 0.1 * jax.random.normal(key, (10, 5))}
    bad = jnp.arange(10) < 2
    out = attacks.corrupt(key, sent, start, bad, "sign_flip", scale=10.0)
    w = jnp.ones((10,))
    mean = robust.aggregate(out, w, "mean")["w"]
    median = robust.aggregate(out, w, "median")["w"]
    assert np.all(np.asarray(mean) < 0)  # the mean is pulled past zero
    assert np.all(np.abs(np.asarray(median) - 1.0) < 0.2)
