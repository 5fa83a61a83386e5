"""FedPer, FedRep, LG-FedAvg and FedBABU (layer-split personalized FL) against
a per-agent NumPy loop.

Every reference is a one-hidden-layer ReLU MLP (``Dense_0`` the body, ``Dense_1``
the head) with full-batch minibatches (``batch_size >= n``), so the engine's
shuffles do not change the result and every gradient has a closed form in NumPy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cli_records, traced_sizes, train_is_test_partition
from helpers import tiny_config as base_config

from demjax import train
from demjax.algorithms import layer_split
from demjax.config import validate
from demjax.errors import ConfigError

A, N, F, H, C = 3, 4, 3, 4, 3
N_TRAIN = np.array([4, 3, 2], np.int32)  # agents 1 and 2 hold padding rows
LR, EPOCHS = 0.4, 2
SPLIT = ("fedper", "fedrep", "lg_fedavg", "fedbabu", "fedbn")
tiny_config = functools.partial(
    base_config,
    num_agents=A,
    num_rounds=1,
    batch_size=4,
    local_buckets=1,
    optimizer="sgd",
    lr=LR,
    local_epochs=EPOCHS,
    model="mlp",
    hidden=(H,),
    checkpoint_every=0,
    local_plan="all",
)


def make_part(n_train=N_TRAIN, seed=0):
    a = len(n_train)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(a, N, F)).astype(np.float32)
    y = rng.integers(0, C, size=(a, N)).astype(np.int32)
    return train_is_test_partition(x, y, np.asarray(n_train, np.int32), C)


def build(cfg, part):
    _, ctx, rounds = train.build(cfg, jax.tree.map(jnp.asarray, part))
    return ctx, rounds, jax.tree.map(jnp.asarray, part)


def to_np(tree):
    return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def agent(tree, i):
    return jax.tree.map(lambda v: v[i], tree)


def grads_np(p, x, y):
    """Gradient of the mean cross-entropy of the MLP ``relu(x W0 + b0) W1 + b1``."""
    h = np.maximum(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0.0)
    z = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    q[np.arange(len(y)), y] -= 1.0
    q /= len(y)
    dh = (q @ p["Dense_1"]["kernel"].T) * (h > 0)
    return {
        "Dense_0": {"kernel": x.T @ dh, "bias": dh.sum(0)},
        "Dense_1": {"kernel": h.T @ q, "bias": q.sum(0)},
    }


def sgd_np(p, x, y, steps, layers=("Dense_0", "Dense_1")):
    """``steps`` full-batch SGD steps on the layers ``layers`` only."""
    p = {k: dict(v) for k, v in p.items()}
    for _ in range(steps):
        g = grads_np(p, x, y)
        for k in layers:
            p[k] = {n: p[k][n] - LR * g[k][n] for n in p[k]}
    return p


def reference_round(alg, params, shared, part, hp, exclude=()):
    """One round, agent by agent: ``(agents' params, server's shared layers,
    personal models)`` as lists / dicts of float64 arrays."""
    body, head = ("Dense_0",), ("Dense_1",)
    keys = head if alg == "lg_fedavg" else body
    new = []
    for i in range(A):  # reference loop over agents
        m = N_TRAIN[i]
        x, y = part.x_train[i, :m].astype(np.float64), part.y_train[i, :m]
        p = {**params[i], **{k: shared[k] for k in keys}}
        if alg in ("fedper", "lg_fedavg"):
            p = sgd_np(p, x, y, EPOCHS)
        elif alg == "fedrep":
            p = sgd_np(p, x, y, hp["head_epochs"], head)
            p = sgd_np(p, x, y, hp["body_epochs"], body)
        else:  # fedbabu
            p = sgd_np(p, x, y, EPOCHS, body)
        new.append(p)
    wts = np.array([0.0 if i in exclude else N_TRAIN[i] for i in range(A)], float)
    wts /= wts.sum()
    avg = {
        k: {
            n: sum(w * q[k][n] for w, q in zip(wts, new, strict=True) if w > 0)
            for n in new[0][k]
        }
        for k in keys
    }
    kept = [params[i] if i in exclude else new[i] for i in range(A)]
    if alg == "fedbabu":
        glob = {**shared, **avg}
        layers = ("Dense_1",) if hp.get("finetune") == "head" else body + head
        personal = []
        for i in range(A):
            m = N_TRAIN[i]
            x, y = part.x_train[i, :m].astype(np.float64), part.y_train[i, :m]
            personal.append(sgd_np(glob, x, y, hp["finetune_epochs"], layers))
    else:
        personal = [{**p, **avg} for p in kept]
    return kept, avg, personal


def close(got, want, **tol):
    for k in want:
        for n in want[k]:
            np.testing.assert_allclose(got[k][n], want[k][n], err_msg=f"{k}/{n}", **tol)


def distinct_heads(state):
    """Agents' models made different (scaled per agent), so a personal part
    that is not each agent's own shows."""
    scale = jnp.asarray([1.0, 0.5, -0.7])

    def one(v):
        return v * scale.reshape((A,) + (1,) * (v.ndim - 1))

    return state.replace(params=jax.tree.map(one, state.params))


CASES = [
    ("fedper", {}),
    ("lg_fedavg", {}),
    ("fedrep", {"head_epochs": 3, "body_epochs": 2}),
    ("fedbabu", {"finetune_epochs": 2, "finetune": "full"}),
    ("fedbabu", {"finetune_epochs": 3, "finetune": "head"}),
]


@pytest.mark.parametrize("alg,hp", CASES)
def test_round_matches_numpy_loop(alg, hp):
    """One round of each algorithm equals the per-agent NumPy loop: the agents'
    models, the server's shared layers, the personal models behind C-SPE /
    C-GEN, and the communication (participants x bytes of the shared layers)."""
    part = make_part()
    cfg = tiny_config(algorithm=alg)
    for k, v in hp.items():
        cfg[alg][k] = v
    _, rounds, dev = build(cfg, part)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    if alg != "fedbabu":  # FedBABU's heads are the shared initial head
        state = distinct_heads(state)
    new, info = jax.jit(rounds.round)(state, dev, jax.random.PRNGKey(1), jnp.int32(0))
    params0, shared0 = to_np(state.params), to_np(state.shared)
    kept, avg, personal = reference_round(
        alg, [agent(params0, i) for i in range(A)], shared0, part, hp
    )
    got = to_np(new.params)
    for i in range(A):
        close(agent(got, i), kept[i], rtol=1e-4, atol=1e-6)
    close(to_np(new.shared), avg, rtol=1e-4, atol=1e-6)
    pers = to_np(jax.jit(rounds.personal)(new, dev, jax.random.PRNGKey(2)))
    for i in range(A):
        close(agent(pers, i), personal[i], rtol=1e-4, atol=1e-6)
    # the layers not shared stay at their start on the server
    other = "Dense_0" if alg == "lg_fedavg" else "Dense_1"
    close(to_np(new.shared), {other: shared0[other]}, rtol=0, atol=0)
    layer = (F * H + H) if alg != "lg_fedavg" else (H * C + C)
    assert int(info["num_active"]) == A and int(info["num_diverged"]) == 0
    assert float(info["bytes_up"]) == float(info["bytes_down"]) == 4.0 * layer * A


def bn_round_reference(layers, shared, part):
    """FedBN, agent by agent: full-batch SGD on a hand-written ``jnp`` forward
    (dense -> batch normalization over the agent's real rows -> ReLU -> dense),
    running averages ``0.9 old + 0.1 batch`` (biased variance); the server's
    dense layers the sample-weighted mean."""
    eps = 1e-5

    def loss(p, st, x, y):
        h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        mu, var = h.mean(0), ((h - h.mean(0)) ** 2).mean(0)
        bn = p["BatchNorm_0"]
        h = (h - mu) / jnp.sqrt(var + eps) * bn["scale"] + bn["bias"]
        z = jnp.maximum(h, 0) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
        ce = -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(len(y)), y])
        return ce, (0.9 * st[0] + 0.1 * mu, 0.9 * st[1] + 0.1 * var)

    grad = jax.jit(jax.grad(loss, has_aux=True))  # one agent's step, no vmap
    new = []
    for i in range(A):  # reference loop over agents
        m = N_TRAIN[i]
        x, y = part.x_train[i, :m], part.y_train[i, :m]
        p = {**layers[i], **{k: shared[k] for k in ("Dense_0", "Dense_1")}}
        st = (p["BatchNorm_0"]["mean"], p["BatchNorm_0"]["var"])
        train_p = {
            k: {n: v for n, v in d.items() if n not in ("mean", "var")}
            for k, d in p.items()
        }
        for _ in range(EPOCHS):
            g, st = grad(train_p, st, x, y)
            train_p = jax.tree.map(lambda a, b: a - LR * b, train_p, g)
        train_p["BatchNorm_0"].update(mean=st[0], var=st[1])
        new.append(to_np(train_p))
    wts = N_TRAIN / N_TRAIN.sum()
    avg = {
        k: {
            n: sum(w * q[k][n] for w, q in zip(wts, new, strict=True))
            for n in new[0][k]
        }
        for k in ("Dense_0", "Dense_1")
    }
    return new, avg


def test_fedbn_round_matches_reference_loop():
    """FedBN (Alg. 1): the agents' models (BatchNorm scale, bias and running
    statistics their own) and the averaged dense layers equal the per-agent
    loop (atol 1e-5: the first dense bias's gradient is 0 up to rounding, the
    normalization cancels it); the personal models pair the server's dense layers with each agent's
    BatchNorm layers; the traffic is the dense layers."""
    part = make_part()
    _, rounds, dev = build(tiny_config(algorithm="fedbn"), part)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    scale = jnp.asarray([1.0, 0.5, 2.0])[:, None]  # distinct BatchNorm layers
    bn = {n: v * scale for n, v in state.params["BatchNorm_0"].items()}
    state = state.replace(params={**state.params, "BatchNorm_0": bn})
    new, info = jax.jit(rounds.round)(state, dev, jax.random.PRNGKey(1), jnp.int32(0))
    params0 = jax.device_get(state.params)
    kept, avg = bn_round_reference(
        [agent(params0, i) for i in range(A)], jax.device_get(state.shared), part
    )
    got = to_np(new.params)
    for i in range(A):
        close(agent(got, i), kept[i], rtol=1e-4, atol=1e-5)
    close(to_np(new.shared), avg, rtol=1e-4, atol=1e-5)
    pers = to_np(jax.jit(rounds.personal)(new, dev, None))
    for i in range(A):
        close(agent(pers, i), {**kept[i], **avg}, rtol=1e-4, atol=1e-5)
    dense = F * H + H + H * C + C
    assert float(info["bytes_up"]) == float(info["bytes_down"]) == 4.0 * dense * A
    assert int(info["num_diverged"]) == 0


def test_fedbn_needs_a_model_with_batchnorm():
    with pytest.raises(
        ConfigError,
        match=r"model='mlr' is not valid for algorithm='fedbn'.*accepted: mlp, cnn4",
    ):
        validate(tiny_config(algorithm="fedbn", model="mlr"))


def cnn4bn_reference(p, st, x, mask, eps=1e-5):
    """``CNN4BN`` in training mode by hand (NumPy): 'SAME' 5x5 convolutions as
    loops over the kernel, per-channel batch normalization over the masked rows
    and both spatial axes, ReLU, 2x2 max-pool; the hidden dense layer's units
    normalized over the masked rows. Returns ``(logits, new running stats)``."""
    rows = np.asarray(mask, bool)

    def conv(x, w, b):
        k = w.shape[0]
        xp = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
        out = np.zeros(x.shape[:3] + (w.shape[-1],))
        for di in range(k):
            for dj in range(k):
                out += xp[:, di:di + x.shape[1], dj:dj + x.shape[2]] @ w[di, dj]
        return out + b

    def bn(h, q, s, axes):
        mu = h[rows].mean(axis=axes)
        var = h[rows].var(axis=axes)
        out = (h - mu) / np.sqrt(var + eps) * q["scale"] + q["bias"]
        return out, {"mean": 0.9 * s["mean"] + 0.1 * mu, "var": 0.9 * s["var"] + 0.1 * var}

    new = {}
    h = x
    for i in range(2):
        c = p[f"conv{i}"]
        h, new[f"BatchNorm_{i}"] = bn(conv(h, c["kernel"], c["bias"]),
                                      p[f"BatchNorm_{i}"], st[f"BatchNorm_{i}"],
                                      (0, 1, 2))  # fmt: skip
        h = np.maximum(h, 0)
        b, hh, ww, ch = h.shape
        h = h.reshape(b, hh // 2, 2, ww // 2, 2, ch).max(axis=(2, 4))
    h = h.reshape(h.shape[0], -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    h, new["BatchNorm_2"] = bn(h, p["BatchNorm_2"], st["BatchNorm_2"], (0,))
    h = np.maximum(h, 0)
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], new


@pytest.mark.parametrize("conv_impl", ["patches", "xla"])
def test_cnn4bn_matches_numpy_reference(conv_impl):
    """``CNN4BN``'s training-mode forward and running statistics (masked rows
    only) equal a NumPy reference, for both convolution implementations."""
    from demjax import models

    model = models.CNN4BN(10, conv_impl=conv_impl)
    x = np.random.default_rng(0).normal(size=(5, 8, 8, 1)).astype(np.float32)
    mask = np.array([True, True, False, True, True])
    v = model.init({"params": jax.random.PRNGKey(0)}, jnp.asarray(x), train=False)
    # distinct BatchNorm parameters and running statistics
    rng = np.random.default_rng(1)
    v = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(a.dtype), v)
    logits, upd = model.apply(v, jnp.asarray(x), train=True, mask=jnp.asarray(mask),
                              mutable=["batch_stats"])  # fmt: skip
    want, stats = cnn4bn_reference(to_np(v["params"]), to_np(v["batch_stats"]), x, mask)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=2e-4, atol=2e-4)
    close(to_np(upd["batch_stats"]), stats, rtol=1e-4, atol=1e-5)
    assert sorted(v["batch_stats"]) == ["BatchNorm_0", "BatchNorm_1", "BatchNorm_2"]


def test_fedbabu_head_never_moves_and_traffic_counts_participants():
    """FedBABU under AdamW with half the agents participating: the frozen head
    stays bit-identical to its initialization even with decoupled weight decay
    (zero updates, not zero gradients) while the body trains, and the traffic
    is the participants times one body (4 bytes x (F H + H))."""
    a = 6
    part = make_part([4] * a, seed=3)
    cfg = tiny_config(
        algorithm="fedbabu", num_agents=a, participation=0.5, optimizer="adamw", lr=0.05
    )
    _, rounds, dev = build(cfg, part)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    new, info = jax.jit(rounds.round)(state, dev, jax.random.PRNGKey(1), jnp.int32(0))
    for n in ("kernel", "bias"):
        np.testing.assert_array_equal(
            new.params["Dense_1"][n], state.params["Dense_1"][n]
        )
        np.testing.assert_array_equal(
            new.shared["Dense_1"][n], state.shared["Dense_1"][n]
        )
    assert not np.allclose(
        new.shared["Dense_0"]["kernel"], state.shared["Dense_0"]["kernel"]
    )
    k = int(info["num_active"])
    assert 0 < k < a
    assert float(info["bytes_up"]) == float(info["bytes_down"]) == 4.0 * (F * H + H) * k


def test_diverged_agent_is_reset_and_left_out():
    """An agent whose data are NaN: reset to its old model, counted in
    ``num_diverged``, and the body average is over the two others."""
    part = make_part()
    part.x_train[2] = np.nan
    _, rounds, dev = build(tiny_config(algorithm="fedper"), part)
    state = distinct_heads(rounds.init(jax.random.PRNGKey(0), dev))
    new, info = jax.jit(rounds.round)(state, dev, jax.random.PRNGKey(1), jnp.int32(0))
    assert int(info["num_diverged"]) == 1 and int(info["num_active"]) == A
    assert np.isfinite(float(info["train_loss"]))
    params0, shared0 = to_np(state.params), to_np(state.shared)
    kept, avg, _ = reference_round(
        "fedper", [agent(params0, i) for i in range(A)], shared0, part, {}, exclude=(2,)
    )
    got = to_np(new.params)
    for i in range(A):
        close(agent(got, i), kept[i], rtol=1e-4, atol=1e-6)
    close(to_np(new.shared), avg, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alg", SPLIT)
def test_round_has_no_python_loop_over_agents(alg):
    """The traced round and personal models are the same size for 2 and 6
    agents: the agent axis is an array axis, not a Python loop."""
    sizes = []
    for a in (2, 6):
        part = make_part([4] * a, seed=5)
        _, rounds, dev = build(tiny_config(algorithm=alg, num_agents=a), part)
        sizes.append(traced_sizes(rounds, dev))
    assert sizes[0] == sizes[1]
    assert sizes[0][0] > 20  # the count sees inside the nested jaxprs


def test_head_keys_rule():
    """The head is the highest-numbered ``Dense_i`` layers; the rest is the body."""
    params = {"conv0": 0, "Dense_0": 0, "Dense_10": 0, "Dense_2": 0}
    assert layer_split.head_keys(params, 1) == ("Dense_10",)
    assert layer_split.head_keys(params, 2) == ("Dense_2", "Dense_10")
    assert layer_split.head_keys(params, 3) == ("Dense_0", "Dense_2", "Dense_10")
    with pytest.raises(ConfigError, match=r"x\.h=4 .*accepted: an integer in \[1, 3\]"):
        layer_split.head_keys(params, 4, "x.h")


@pytest.mark.parametrize(
    "alg,field,value,match",
    [
        ("fedper", "head_layers", 0, r"fedper\.head_layers=0 is not valid; accepted: an integer in \[1, inf\)"),
        ("fedrep", "head_epochs", 0, r"fedrep\.head_epochs=0 is not valid; accepted: an integer in \[1, inf\)"),
        ("fedrep", "body_epochs", 0, r"fedrep\.body_epochs=0 is not valid; accepted: an integer"),
        ("fedbabu", "finetune_epochs", -1, r"fedbabu\.finetune_epochs=-1 is not valid"),
        ("fedbabu", "finetune", "body", r"fedbabu\.finetune='body' .*accepted: full, head"),
        ("lg_fedavg", "head_layers", -2, r"lg_fedavg\.head_layers=-2 is not valid"),
    ],
)  # fmt: skip
def test_bad_hparams_name_the_field(alg, field, value, match):
    cfg = tiny_config(algorithm=alg)
    cfg[alg][field] = value
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


@pytest.mark.parametrize(
    "model,layers,match",
    [
        ("mlp", 2, r"lg_fedavg\.head_layers=2 is not valid for a model with 2 dense "
         r"layer\(s\); accepted: an integer in \[1, 1\] for this model"),
        ("mlr", 1, r"lg_fedavg\.head_layers=1 .*accepted: a model with a body"),
    ],
)  # fmt: skip
def test_head_without_body_is_refused(model, layers, match):
    cfg = tiny_config(algorithm="lg_fedavg", model=model)
    cfg.lg_fedavg.head_layers = layers
    with pytest.raises(ConfigError, match=match):
        build(cfg, make_part())


# ----------------------------------------------------------------- end to end

_CLI = [
    "--quiet", "--config.num_agents=4", "--config.num_rounds=2",
    "--config.local_epochs=1", "--config.local_buckets=1",
    "--config.checkpoint_every=0", "--config.hidden=(16,)",
]  # fmt: skip


@pytest.mark.cli(
    fedper=[*_CLI, "--config.algorithm=fedper"],
    fedrep=[*_CLI, "--config.algorithm=fedrep", "--config.fedrep.head_epochs=2"],
    lg_fedavg=[*_CLI, "--config.algorithm=lg_fedavg"],
    fedbabu=[*_CLI, "--config.algorithm=fedbabu", "--config.fedbabu.finetune_epochs=1"],
    fedbn=[*_CLI, "--config.algorithm=fedbn"],
    fedbn_cnn4=[
        "--quiet", "--config.num_agents=4", "--config.num_rounds=2",
        "--config.local_epochs=1", "--config.checkpoint_every=0",
        "--config.algorithm=fedbn", "--config.model=cnn4", "--config.dataset=digits",
        "--config.samples_per_agent=16",
    ],
    fedper_bad=[*_CLI, "--config.algorithm=fedper", "--config.fedper.head_layers=2"],
)  # fmt: skip
def test_cli_runs_split_algorithms(cli):
    """scripts/run.py runs each algorithm 2 rounds on digits (64 inputs, 16
    hidden units, 10 classes): the traffic of the shared layers is in
    metrics.jsonl; a head with no body under it exits 2 naming the field."""
    body, head = 4 * (64 * 16 + 16), 4 * (16 * 10 + 10)
    traffic = {"fedbn": body + head, "lg_fedavg": head}
    for alg in SPLIT:
        recs = cli_records(cli[alg])
        assert f"{alg} on digits" in cli[alg].stdout
        per_agent = traffic.get(alg, body)
        assert all(r["bytes_up"] == r["bytes_down"] == 4 * per_agent for r in recs)
        assert all(0.0 <= r["c_spe"] <= 1.0 for r in recs)
        assert (recs[0]["global_acc"] is None) == (alg != "fedbabu")
    # FedBN on the CNN (CNN4BN, digits 8x8x1): the convolutions and dense
    # layers travel, the three BatchNorm layers stay with the agents.
    recs = cli_records(cli["fedbn_cnn4"])
    shared = 4 * (5 * 5 * 1 * 32 + 32 + 5 * 5 * 32 * 64 + 64 + 2 * 2 * 64 * 512 + 512
                  + 512 * 10 + 10)  # fmt: skip
    assert all(r["bytes_up"] == r["bytes_down"] == 4 * shared for r in recs)
    assert all(0.0 <= r["c_spe"] <= 1.0 and r["global_acc"] is None for r in recs)
    bad = cli["fedper_bad"]
    assert bad.returncode == 2
    err = [x for x in bad.stderr.splitlines() if x.startswith("error:")]
    assert err == [
        "error: fedper.head_layers=2 is not valid for a model with 2 dense layer(s); "
        "accepted: an integer in [1, 1] for this model"
    ]
