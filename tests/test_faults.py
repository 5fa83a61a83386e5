"""Participation, dropout, stragglers, the divergence guard, bad input, SIGINT."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demjax import data, local, memory, models, train
from demjax.algorithms.hierarchical import simulator
from demjax.config import validate
from demjax.engine import placeholder_tree
from demjax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import default  # noqa: E402


def small(**kw):
    c = default.get_config()
    c.num_agents, c.num_rounds, c.model, c.num_levels = 12, 2, "mlr", 2
    c.progress, c.local_epochs = False, 1
    for k, v in kw.items():
        c[k] = v
    return c


def one_round(c, poison=()):
    part = data.make_partition(c)
    if poison:  # absurd inputs for a few agents: their SGD overflows to inf/NaN
        x = np.array(part.x_train)
        x[list(poison)] *= 1e30
        part = part.replace(x_train=x)
    part = jax.tree.map(jnp.asarray, part)
    sim = simulator(c, part)
    state = sim.init(jax.random.PRNGKey(0), part)
    tree = jax.tree.map(jnp.asarray, placeholder_tree(sim.num_agents, sim.level_sizes))
    weight = sim.agent_weight(part)
    key = jax.random.PRNGKey(5)
    params, opt, loss, active, diverged = sim.local_phase(
        state, part, tree, jnp.float32(sim.round_mu(1)), key
    )
    nodes, size, mixed_nodes, synced = sim.sync_phase(
        params, tree, weight, active, diverged,
        jnp.float32(sim.round_alpha()), jnp.float32(1.0), state.node_params,
    )  # fmt: skip
    return dict(state=state, params=params, loss=loss, active=active,
                diverged=diverged, nodes=nodes, synced=synced, weight=weight,
                anchor=jax.tree.map(lambda m: m[tree.agent_parent], state.node_params))  # fmt: skip


def leaves(t, a=None):
    return [np.asarray(x if a is None else x[a]) for x in jax.tree.leaves(t)]


def test_partial_participation_keeps_absent_agents_and_renormalizes():
    r = one_round(small(algorithm="fedavg", participation=0.5))
    active = np.asarray(r["active"])
    assert active.sum() == 6
    for a in np.flatnonzero(~active):  # untouched: same params as at the start
        for got, start in zip(
            leaves(r["synced"], a), leaves(r["state"].params, a), strict=True
        ):
            np.testing.assert_array_equal(got, start)
    # The global model is the sample-weighted mean of the participants only.
    w = np.asarray(r["weight"]) * active
    for node_leaf, p_leaf in zip(leaves(r["nodes"]), leaves(r["params"]), strict=True):
        expect = np.tensordot(w / w.sum(), p_leaf, axes=1)
        np.testing.assert_allclose(node_leaf[-1], expect, rtol=1e-5, atol=1e-6)
    for a in np.flatnonzero(active):  # participants received the global model
        for got, node in zip(leaves(r["synced"], a), leaves(r["nodes"]), strict=True):
            np.testing.assert_allclose(got, node[-1], rtol=1e-6)


def test_dropout_is_bernoulli_and_seeded():
    c = small(num_agents=200, dropout=0.5, model="mlr", labels_per_agent=1)
    c.partition = "iid"
    a1 = np.asarray(one_round(c)["active"])
    a2 = np.asarray(one_round(c)["active"])
    np.testing.assert_array_equal(a1, a2)
    assert 60 < a1.sum() < 140  # Binomial(200, 0.5): 10 standard deviations


def test_straggler_budget_caps_steps():
    # One agent, 12 samples, batch 3: 4 steps per epoch. max_steps=2 must equal
    # training on exactly the first two minibatches of the epoch.
    model = models.make_model("mlr", 3)
    apply_fn = lambda p, xb, train=False, key=None: model.apply({"params": p}, xb)  # noqa: E731
    tx = optax.sgd(0.1)
    params = models.init_population(jax.random.PRNGKey(0), model, (2, 2, 1), 1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 12, 2, 2, 1)).astype(np.float32)
    y = rng.integers(0, 3, size=(1, 12)).astype(np.int32)
    n = np.array([12], np.int32)
    key = jax.random.split(jax.random.PRNGKey(1), 1)
    one = local.make_train_one(apply_fn, tx, batch_size=3, local_epochs=1, n_max=12)
    train_all = jax.jit(local.make_train_all(one))
    opt = jax.vmap(tx.init)(params)
    capped, _, _ = train_all(key, params, opt, x, y, n, params, 0.0, jnp.array([2]))
    # Reference: the same shuffle, only the first 2 minibatches.
    perm = np.asarray(local.epoch_permutations(jax.random.split(key[0])[0], 12, 12, 1))[
        0
    ]
    p = jax.tree.map(lambda v: v[0], params)

    def loss(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(
            apply_fn(p, xb), yb
        ).mean()

    for s in range(2):
        idx = perm[3 * s : 3 * s + 3]
        g = jax.grad(loss)(p, x[0][idx], y[0][idx])
        p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
    for got, want in zip(leaves(capped, 0), leaves(p), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_stragglers_run_end_to_end(tmp_path):
    res = train.run(small(stragglers=0.5, participation=0.75), str(tmp_path))
    rec = res["final"]["sync"]
    assert rec["num_active"] == 9 and 0 <= rec["c_spe"] <= 1


def test_divergence_guard_resets_and_keeps_nan_out_of_groups():
    c = small(algorithm="demlearn", lr=0.5)
    r = one_round(c, poison=(1, 4))
    diverged = np.asarray(r["diverged"])
    assert diverged.tolist() == [a in (1, 4) for a in range(12)]
    for a in (1, 4):  # reset to the parent group model
        for got, anchor in zip(
            leaves(r["params"], a), leaves(r["anchor"], a), strict=True
        ):
            np.testing.assert_array_equal(got, anchor)
    for leaf in leaves(r["nodes"]) + leaves(r["synced"]):
        assert np.all(np.isfinite(leaf))


def test_diverged_agents_are_counted_in_metrics(tmp_path):
    part = data.make_partition(small())
    x = np.array(part.x_train)
    x[[0, 3]] *= 1e30  # poisoned data, given as a ready partition
    poisoned = part.replace(x_train=x)
    res = train.run(
        small(lr=0.5, partition="arrays"), str(tmp_path), partition=poisoned
    )
    assert res["records"][0]["num_diverged"] == 2
    assert all(np.isfinite(r["global_acc"]) for r in res["records"])


def test_unwritable_workdir_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="workdir"):
        train.run(small(), str(blocker / "sub"))


def test_config_that_cannot_fit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 10_000)
    with pytest.raises(ConfigError, match="num_agents=12 does not fit"):
        train.run(small(), str(tmp_path))


def test_truncated_data_file_is_refused(tmp_path):
    import gzip
    import shutil

    src = "/usr/share/datasets/fashion-mnist"
    if not os.path.isdir(src):
        pytest.skip("dataset-fashion-mnist not installed")
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x27\x10" + b"\x01" * 10)  # says 10,000
    with pytest.raises(ConfigError, match="t10k-labels"):
        data.load_source("fashion_mnist", data_dir=str(tmp_path))


# Non-finite values, refused for every float field.
NONFINITE = st.sampled_from([float("inf"), float("-inf"), float("nan")])
# Invalid values per field: (field, strategy of invalid values).
BAD = {
    "algorithm": st.text(min_size=1).filter(lambda s: s not in ("demlearn", "demlearn_p", "fedavg", "fedprox", "local")),
    "dataset": st.sampled_from(["imagenet", "", "MNIST", "digit"]),
    "partition": st.sampled_from(["noniid", "", "Dirichlet"]),
    "distance": st.sampled_from(["manhattan", "l2", ""]),
    "linkage": st.sampled_from(["median", "centroid", "ward2"]),
    "tree_mode": st.sampled_from(["flat", ""]),
    "cluster_features": st.sampled_from(["grads", ""]),
    "weighting": st.sampled_from(["uniform", ""]),
    "model": st.sampled_from(["resnet", "cnn2"]),
    "optimizer": st.sampled_from(["nope", "softmax_cross_entropy"]),
    "num_agents": st.integers(max_value=1),
    "num_rounds": st.integers(max_value=0),
    "local_epochs": st.integers(max_value=0),
    "batch_size": st.integers(max_value=0),
    "labels_per_agent": st.integers(max_value=0),
    "num_levels": st.integers(max_value=-1),
    "tau": st.integers(max_value=-1),
    "eval_samples": st.integers(max_value=-1),
    "eval_every": st.integers(max_value=0),
    "local_buckets": st.integers(max_value=0),
    "sketch_dim": st.integers(max_value=-1),
    "alpha": st.floats(min_value=1.0001, max_value=1e9) | st.floats(max_value=-1e-6, min_value=-1e9) | NONFINITE,
    "lr": st.floats(max_value=0.0, min_value=-1e9) | NONFINITE,
    "participation": st.floats(min_value=1.0001, max_value=1e6) | st.floats(max_value=0.0, min_value=-1e6) | NONFINITE,
    "dropout": st.floats(min_value=1.0, max_value=1e6) | st.floats(max_value=-1e-6, min_value=-1e6) | NONFINITE,
    "stragglers": st.floats(min_value=1.0001, max_value=1e6) | NONFINITE,
    "mu": st.floats(max_value=-1e-9, min_value=-1e9) | NONFINITE,
    "seed": st.integers(max_value=-1),
    "amplify_rounds": st.integers(max_value=-1),
    "keep_checkpoints": st.integers(max_value=0),
    "amplify_factor": st.floats(max_value=0.0, min_value=-1e9) | NONFINITE,
    "hidden": st.sampled_from([(), (0,), (-3, 4), (1.5,), "100"]),
    "standardize": st.sampled_from(["yes", 1, None]),
    "progress": st.sampled_from(["no", 0]),
    "data_dir": st.sampled_from([None, 3]),
    "dirichlet_alpha": st.floats(max_value=0.0, min_value=-1e9) | NONFINITE,
    "trim_fraction": st.floats(min_value=0.4901, max_value=1e6) | NONFINITE,
    "aggregator_noise": st.floats(max_value=-1e-9, min_value=-1e9) | NONFINITE,
    "network_edge_prob": st.floats(min_value=1.0001, max_value=1e6) | NONFINITE,
    "samples_per_agent": st.integers(max_value=-1),
    "num_devices": st.integers(max_value=-1),
    "local_plan": st.sampled_from(["fast", "block:0", "block:x", "blocks:2", ""]),
    "distance_block": st.integers(max_value=-1),
    "eval_batch": st.integers(max_value=-1),
    "conv_impl": st.sampled_from(["cudnn", "", "Auto"]),
    "matmul_impl": st.sampled_from(["onednn", "", "XLA"]),
    "linkage_backend": st.sampled_from(["sklearn", ""]),
}  # fmt: skip


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(BAD)).flatmap(lambda f: st.tuples(st.just(f), BAD[f])))
def test_invalid_configs_raise_named_errors(case):
    field, value = case
    # A type-unsafe copy: wrong types must be caught by validate() itself (from the
    # CLI, ml_collections already refuses them while parsing flags: exit 2).
    c = ml_collections.ConfigDict(default.get_config().to_dict(), type_safe=False)
    c[field] = value
    with pytest.raises(ConfigError) as err:
        validate(c)
    assert field in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_field_refuses_non_finite_values(value):
    """Every float field of the default config, plug-in groups included."""
    from demjax.config import flat_fields

    c = default.get_config()
    fields = [k for k, v in flat_fields(c).items() if isinstance(v, float)]
    assert {"lr", "alpha", "amplify_factor", "aggregator_noise"} <= set(fields)
    assert any("." in k for k in fields)  # a plug-in hyper-parameter
    for field in [*fields, "mu"]:  # mu: a float placeholder (None by default)
        c = default.get_config()
        group, _, name = field.rpartition(".")
        (c[group] if group else c)[name] = value
        with pytest.raises(ConfigError, match=rf"^{field}={value!r} is not valid; acc"):
            validate(c)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="ward"):
        validate(small(linkage="ward", distance="cosine"))
    with pytest.raises(ConfigError, match="mu=0"):
        validate(small(algorithm="demlearn_p", mu=0.0))
    with pytest.raises(ConfigError, match="level_groups"):
        validate(small(tree_mode="maxclust", level_groups=(2, 4)))


def test_sigint_exits_cleanly_with_results_on_disk(interrupted_run):
    run = interrupted_run  # scripts/run.py, SIGINT after 5 of 40 rounds
    if run.returncode == 0:
        pytest.skip("the run finished before SIGINT arrived")
    assert run.returncode == 130, run.stderr
    assert "interrupted (SIGINT)" in run.stderr and "Traceback" not in run.stderr
    lines = run.metrics.splitlines()
    assert len(lines) >= 4
    for line in lines:
        json.loads(line)  # every flushed record is complete
