"""Byzantine attacks (demjax.attacks) against hand-computed values on a tiny problem."""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_round, tiny_config
from scipy.stats import norm

from demjax import attacks, data, robust, train
from demjax.config import validate
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


# --- The attacks inside runs: config, Context.aggregate, the hierarchical phase ---


small = functools.partial(tiny_config, num_agents=10, local_plan="all")


@functools.cache
def _base_build(algorithm: str):
    """``(ctx, rounds, part)`` of a tiny digits run (MLR, 10 agents)."""
    c = small(algorithm=algorithm)
    part = jax.tree.map(jnp.asarray, data.make_split(c, None).partition)
    _, ctx, rounds = train.build(c, part)
    return ctx, rounds, part


def _ctx(algorithm: str, **overrides):
    """The ``Context`` of ``algorithm`` with a validated config of ``overrides``
    (the server step reads the attack from ``ctx.config``)."""
    c = small(algorithm=algorithm, **overrides)
    validate(c)
    return dataclasses.replace(_base_build(algorithm)[0], config=c)


def _built(**overrides):
    """``(ctx, rounds, part)`` of a tiny digits run (MLR, 10 agents)."""
    c = small(**overrides)
    validate(c)
    part = jax.tree.map(jnp.asarray, data.make_split(c, None).partition)
    _, ctx, rounds = train.build(c, part)
    return ctx, rounds, part


def _expected_messages(sent, start, bad, kind, *, scale=1.0, epsilon=0.1, z=0.0):
    """A NumPy loop over agents: the messages the server should receive."""
    out = {}
    for name in sent:
        x = np.asarray(sent[name], np.float64)
        s = np.broadcast_to(np.asarray(start[name], np.float64), x.shape)
        delta = x - s
        honest = delta[~bad]
        mu, sd = honest.mean(0), honest.std(0)
        y = x.copy()
        for a in range(x.shape[0]):
            if not bad[a]:
                continue
            if kind == "sign_flip":
                y[a] = s[a] - scale * delta[a]
            elif kind == "scaling":
                y[a] = s[a] + scale * delta[a]
            elif kind == "ipm":
                y[a] = s[a] - epsilon * mu
            elif kind == "alie":
                y[a] = s[a] + mu - z * sd
        out[name] = y
    return out


@pytest.mark.parametrize(
    "kind,extra",
    [
        ("sign_flip", {"attack_scale": 2.0}),
        ("scaling", {}),  # default scale: num_agents
        ("ipm", {"attack_epsilon": 0.5}),
        ("alie", {}),  # default z: alie_z(10, 3)
    ],
)
def test_context_aggregate_corrupts_exactly_the_fixed_byzantine_messages(kind, extra):
    """Ditto's server step (Context.aggregate with the round-start model) receives
    the Byzantine agents' corrupted messages, the others' unchanged: its mean
    equals the mean of a NumPy loop's messages."""
    ctx = _ctx("ditto", attack=kind, attack_fraction=0.3, seed=4, **extra)
    rng = np.random.default_rng(0)
    start = {"w": rng.normal(size=(3,)), "b": rng.normal(size=())}
    sent = {"w": rng.normal(size=(10, 3)), "b": rng.normal(size=(10,))}
    bad = attacks.byzantine_set(4, 10, 0.3)
    assert bad.sum() == 3
    scale = extra.get("attack_scale", 10.0)
    z = attacks.alie_z(10, 3)
    want = _expected_messages(sent, start, bad, kind, scale=scale, epsilon=0.5, z=z)
    weights = jnp.ones((10,), jnp.float32)
    key = jax.random.key(1)
    got = ctx.aggregate(
        jax.tree.map(jnp.float32, sent), weights, key,
        reference=jax.tree.map(jnp.float32, start),
    )  # fmt: skip
    for name in ("w", "b"):
        np.testing.assert_allclose(got[name], want[name].mean(0), rtol=1e-5, atol=1e-6)
    # The messages themselves: honest rows bit for bit, Byzantine rows as the loop.
    attack = attacks.Attack.from_config(ctx.config, 10)
    msgs = attack(key, jax.tree.map(jnp.float32, sent), start)
    for name in ("w", "b"):
        m = np.asarray(msgs[name])
        np.testing.assert_array_equal(m[~bad], np.float32(sent[name])[~bad])
        np.testing.assert_allclose(m[bad], want[name][bad], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reference"):
        ctx.aggregate(sent, weights, key)


def test_fixed_set_is_the_runs_and_redraw_changes_with_the_round_key():
    c = small(attack="sign_flip", attack_fraction=0.3, seed=2)
    fixed = attacks.Attack.from_config(c, 10)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(fixed.mask(k1), fixed.mask(k2))
    np.testing.assert_array_equal(fixed.mask(None), attacks.byzantine_set(2, 10, 0.3))
    c.attack_redraw = True
    redraw = attacks.Attack.from_config(c, 10)
    masks = [np.asarray(redraw.mask(jax.random.key(i))) for i in range(4)]
    assert all(m.sum() == 3 for m in masks)
    assert len({m.tobytes() for m in masks}) > 1  # re-drawn every round
    np.testing.assert_array_equal(redraw.mask(k1), redraw.mask(k1))
    with pytest.raises(ValueError, match="key"):
        redraw.mask(None)
    # Through the server step: a fixed set gives one aggregate whatever the
    # round's key (sign_flip is deterministic), a re-drawn one does not.
    ctx_fixed = _ctx("pfedme", attack="sign_flip", attack_fraction=0.3)
    ctx_redraw = _ctx(
        "pfedme", attack="sign_flip", attack_fraction=0.3, attack_redraw=True
    )
    start = {"w": jnp.zeros((2,))}
    sent = {"w": jnp.arange(20.0).reshape(10, 2)}
    w = jnp.ones((10,))

    def agg(ctx, key):
        return np.asarray(ctx.aggregate(sent, w, key, reference=start)["w"])

    np.testing.assert_array_equal(agg(ctx_fixed, k1), agg(ctx_fixed, k2))
    assert not np.array_equal(agg(ctx_redraw, k1), agg(ctx_redraw, k2))


def _mean_rows(x, rows):
    return np.asarray(x, np.float64)[rows].mean(0)


@pytest.mark.parametrize("algorithm", ["fedavg", "demlearn"])
def test_hierarchical_aggregation_receives_the_corrupted_messages(algorithm):
    """One round through the hierarchical phases: FedAvg's global model and
    DemLearn's level-1 group models are the means of the messages with the
    Byzantine agents' updates (relative to the round-start model: the global
    model, or the agent's own model) sign-flipped x3."""
    ctx, rounds, part = _built(
        algorithm=algorithm, attack="sign_flip", attack_fraction=0.2,
        attack_scale=3.0, num_levels=1, seed=1,
    )  # fmt: skip
    bad = attacks.byzantine_set(1, 10, 0.2)
    key = jax.random.key(5)
    state = rounds.init(key, part)
    state, _ = run_round(rounds, state, part, key, 0)  # round 0 builds the tree
    start = jax.tree.map(np.asarray, state.params)  # the models entering round 1
    root0 = jax.tree.map(lambda p: np.asarray(p[-1]), state.node_params)
    local_fn, aggregate_fn = rounds.phases[0], rounds.phases[1]
    k1 = jax.random.key(6)
    s1, _ = jax.jit(local_fn.fn)(state, part, k1, jnp.int32(1))
    if local_fn.host is not None:
        s1, _ = local_fn.host(s1, {}, 1, k1)
        s1 = jax.tree.map(jnp.asarray, s1)
    s2, _ = jax.jit(aggregate_fn.fn)(s1, part, k1, jnp.int32(1))
    sent = jax.tree.map(np.asarray, s1.params)
    ref = root0 if algorithm == "fedavg" else start
    nodes = jax.tree.map(np.asarray, s2.node_params)
    weight = np.asarray(part.n_train, np.float64)
    for leaf_path, x in jax.tree_util.tree_leaves_with_path(sent):
        r = ref
        for p in leaf_path:
            r = r[p.key]
        node = nodes
        for p in leaf_path:
            node = node[p.key]
        x = np.asarray(x, np.float64)
        r = np.broadcast_to(np.asarray(r, np.float64), x.shape)
        m = np.where(bad.reshape((-1,) + (1,) * (x.ndim - 1)), r - 3.0 * (x - r), x)
        if algorithm == "fedavg":  # sample-weighted mean at the root
            want = np.tensordot(weight, m, axes=1) / weight.sum()
            np.testing.assert_allclose(node[-1], want, rtol=1e-4, atol=1e-5)
        else:  # each level-1 group: the plain mean of its agents' messages
            parent = np.asarray(s1.tree.agent_parent)
            for g in np.unique(parent):
                np.testing.assert_allclose(
                    node[g], m[parent == g].mean(0), rtol=1e-4, atol=1e-5
                )
    assert bad.sum() == 2


@pytest.mark.slow(seconds=20)  # two 3-round runs
def test_median_beats_mean_under_sign_flip_end_to_end(tmp_path):
    """FedAvg on digits, 10 agents (2 Byzantine, updates flipped x5), 3 rounds:
    the median keeps the global model useful, the mean does not; the run
    records the Byzantine count in timing.jsonl."""
    acc = {}
    for agg in ("mean", "median"):
        c = small(
            algorithm="fedavg", aggregator=agg, partition="iid", num_rounds=3,
            attack="sign_flip", attack_fraction=0.2, attack_scale=5.0,
            checkpoint_every=0,
        )  # fmt: skip
        out = train.run(c, str(tmp_path / agg))
        acc[agg] = out["final"]["sync"]["global_acc"]
    print(acc)
    assert acc["median"] > 0.6 and acc["median"] > acc["mean"] + 0.3, acc
    rows = [json.loads(line) for line in open(tmp_path / "median" / "timing.jsonl")]
    assert [r["num_byzantine"] for r in rows if r["round"] >= 0] == [2, 2, 2]


def test_label_flip_poisons_exactly_the_fixed_set_at_data_time():
    c = small(attack="label_flip", attack_fraction=0.3, seed=3)
    part = data.make_split(c, None).partition
    poisoned = attacks.poison_partition(c, part)
    bad = attacks.byzantine_set(3, 10, 0.3)
    y, y2 = np.asarray(part.y_train), np.asarray(poisoned.y_train)
    np.testing.assert_array_equal(y2[~bad], y[~bad])
    np.testing.assert_array_equal(y2[bad], 9 - y[bad])
    np.testing.assert_array_equal(poisoned.y_test, part.y_test)  # tests honest
    c.attack = "sign_flip"
    assert attacks.poison_partition(c, part) is part


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("attack", "flip", "attack='flip' is not valid; accepted: none, sign_flip"),
        ("attack_fraction", 1.0, "attack_fraction=1.0 is not valid; accepted"),
        ("attack_fraction", -0.1, "attack_fraction=-0.1 is not valid"),
        ("attack_redraw", 1, "attack_redraw=1 is not valid; accepted: True or False"),
        ("attack_scale", 0.0, "attack_scale=0.0 is not valid; accepted: a finite"),
        ("attack_noise_std", -1.0, "attack_noise_std=-1.0 is not valid"),
        ("attack_epsilon", float("inf"), "attack_epsilon=inf is not valid"),
        ("attack_alie_z", float("nan"), "attack_alie_z=nan is not valid"),
    ],
)
def test_bad_attack_fields_are_named(field, value, match):
    import ml_collections

    c = ml_collections.ConfigDict(small().to_dict(), type_safe=False)
    c.attack = "sign_flip"
    c[field] = value
    with pytest.raises(ConfigError, match=match) as err:
        validate(c)
    assert "\n" not in str(err.value)


def test_attack_rules_across_fields_and_algorithms():
    with pytest.raises(ConfigError, match="attack_redraw=True is not valid with "
                       "attack='label_flip'"):  # fmt: skip
        validate(small(attack="label_flip", attack_redraw=True))
    for algorithm in ("local", "sgp", "pdbo", "cfl", "ifca", "fedamp", "fedproto"):
        with pytest.raises(ConfigError, match=f"algorithm='{algorithm}'"):
            validate(small(algorithm=algorithm, attack="alie", attack_fraction=0.2))
        validate(small(algorithm=algorithm, attack="label_flip", attack_fraction=0.2))
    for algorithm in ("fedavg", "fedprox", "demlearn", "demlearn_p", "ditto",
                      "pfedme", "perfedavg"):  # fmt: skip
        validate(small(algorithm=algorithm, attack="ipm", attack_fraction=0.2,
                       attack_redraw=True))  # fmt: skip
