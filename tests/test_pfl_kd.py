"""FedGen and FedGKT plug-ins (knowledge distillation): one round each against a
NumPy reference.

FedGen (data-free distillation through a server-side generator):
The reference is a tiny MLP (3 inputs, 5 ReLU units, 3 classes) and a tiny
generator (noise 2, hidden 4, 5 output features) written in NumPy (float64),
trained by a Python loop over agents with full-batch local steps and a loop over
the generator's Adam steps; gradients are central finite differences of the NumPy
losses, independent of JAX. Only the random draws (generated labels and noise)
are taken from the module's draw functions with the keys the round derives.
Participation is fixed (agent 1 sits out); agent 3's data are NaN: it diverges,
is counted, keeps its optimizer state and stays out of the mean and the
generator's ensemble.

FedGKT (edge models, a server model on their features, logits exchanged both
ways): the same MLP as edge model, a NumPy server MLP (5 features, 4 hidden
units) trained by SGD with momentum on the uploaded rows in the minibatches the
module's ``server_batches`` draws; the agents start from given server logits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    build_rounds,
    cli_records,
    run_round,
    traced_sizes,
    train_is_test_partition,
)
from helpers import tiny_config as base_config

from demjax.algorithms import fedgen, fedgkt
from demjax.config import validate
from demjax.errors import ConfigError

N, F, H, C = 4, 3, 5, 3  # padded rows per agent, features, hidden units, classes
NOISE, GH = 2, 4  # generator noise dimension and hidden width
N_TRAIN = [4, 3, 4, 2]
A = len(N_TRAIN)
ACTIVE = np.array([True, False, True, True])
NAN_AGENT = 3
TRAINED = ACTIVE & (np.arange(A) != NAN_AGENT)
LR, EPOCHS = 0.2, 2
ALPHA, ETA, GEN_LR, GEN_STEPS, GEN_BATCH = 0.7, 0.5, 0.05, 3, 6
MODEL_BYTES = (F * H + H + H * C + C) * 4
GEN_BYTES = ((NOISE + C) * GH + GH + GH * H + H) * 4
tiny_config = functools.partial(
    base_config,
    num_agents=A,
    num_rounds=1,
    model="mlp",
    hidden=(H,),
    batch_size=N,
    local_epochs=EPOCHS,
    lr=LR,
    local_buckets=1,
    local_plan="all",
    optimizer="sgd",
    checkpoint_every=0,
)


def fedgen_config(**kw):
    cfg = tiny_config(algorithm="fedgen", **kw)
    g = cfg.fedgen
    g.alpha, g.eta, g.gen_lr = ALPHA, ETA, GEN_LR
    g.gen_steps, g.gen_batch, g.noise_dim, g.hidden = GEN_STEPS, GEN_BATCH, NOISE, GH
    return cfg


def make_part(n_train=N_TRAIN, seed=0, nan_agent=None):
    n_train = np.asarray(n_train, np.int32)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(n_train), N, F)).astype(np.float32)
    if nan_agent is not None:
        x[nan_agent] = np.nan
    y = rng.integers(0, C, size=(len(n_train), N)).astype(np.int32)
    return train_is_test_partition(x, y, n_train, C)


# -------------------------------------------------------------- NumPy reference

MODEL_KEYS = (("Dense_0", "kernel", (F, H)), ("Dense_0", "bias", (H,)),
              ("Dense_1", "kernel", (H, C)), ("Dense_1", "bias", (C,)))  # fmt: skip
GEN_KEYS = (("Dense_0", "kernel", (NOISE + C, GH)), ("Dense_0", "bias", (GH,)),
            ("Dense_1", "kernel", (GH, H)), ("Dense_1", "bias", (H,)))  # fmt: skip


def flat(p, keys, i=None):
    out = []
    for a, b, _ in keys:
        v = np.asarray(p[a][b], np.float64)
        out.append((v if i is None else v[i]).ravel())
    return np.concatenate(out)


def unflat(v, keys):
    sizes = [int(np.prod(s)) for _, _, s in keys]
    parts = np.split(v, np.cumsum(sizes)[:-1])
    return [x.reshape(s) for x, (_, _, s) in zip(parts, keys, strict=True)]


def mlp(v, x):
    """``(logits, features)`` of the MLP with flat parameters ``v``."""
    k0, b0, k1, b1 = unflat(v, MODEL_KEYS)
    h = np.maximum(x @ k0 + b0, 0.0)
    return h @ k1 + b1, h


def head(v, feats):
    _, _, k1, b1 = unflat(v, MODEL_KEYS)
    return feats @ k1 + b1


def generator(g, z, y):
    k0, b0, k1, b1 = unflat(g, GEN_KEYS)
    h = np.maximum(np.concatenate([z, np.eye(C)[y]], 1) @ k0 + b0, 0.0)
    return h @ k1 + b1


def ce_logits(z, y):
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def num_grad(fn, v, eps=1e-6):
    g = np.zeros_like(v)
    for j in range(len(v)):
        e = np.zeros_like(v)
        e[j] = eps
        g[j] = (fn(v + e) - fn(v - e)) / (2 * eps)
    return g


def local_loss(v, x, y, feats, yh, alpha):
    """Eq. 6: CE on the data + alpha * CE of the head on generated features."""
    logits, _ = mlp(v, x)
    return np.mean(ce_logits(logits, y)) + alpha * np.mean(
        ce_logits(head(v, feats), yh)
    )


def gen_loss(g, models, weights, z, y, eta):
    """Eq. 4 (label-weighted ensemble CE) + eta * the authors' diversity loss."""
    feats = generator(g, z, y)
    teacher = sum(weights[i, y] * ce_logits(head(m, feats), y)
                  for i, m in enumerate(models))  # fmt: skip
    d_f = np.abs(feats[:, None] - feats[None]).mean(-1)
    d_z = np.square(z[:, None] - z[None]).mean(-1)
    return np.mean(teacher) + eta * np.exp(-np.mean(d_f * d_z))


def test_fedgen_round_matches_numpy():
    """Alg. 1 at round 1: local steps on Eq. 6 with the old generator, the
    generator's Adam steps on Eq. 4 against the new heads weighted by label
    counts, sample-weighted mean of the models."""
    part = make_part(seed=3, nan_agent=NAN_AGENT)
    rounds, dev = build_rounds(fedgen_config(), part, ACTIVE)
    old = rounds.init(jax.random.PRNGKey(0), dev)
    key = jax.random.PRNGKey(1)
    new, info = run_round(rounds, old, dev, key, 1)
    old, new = jax.device_get(old), jax.device_get(new)

    k_train, k_gen, _ = jax.random.split(jax.random.fold_in(key, 17), 3)
    agent_keys = jax.random.split(k_train, A)
    counts = np.zeros((A, C))
    for i in range(A):
        for c in part.y_train[i, : N_TRAIN[i]]:
            counts[i, c] += 1
    py = counts.sum(0) / counts.sum()
    w, g = flat(old.w, MODEL_KEYS), flat(old.gen, GEN_KEYS)
    models, losses = [], []
    for i in range(A):  # reference loop over agents
        if not TRAINED[i]:
            continue
        m = N_TRAIN[i]
        xi = part.x_train[i, :m].astype(np.float64)
        yi = part.y_train[i, :m]
        _, drop = jax.random.split(agent_keys[i])
        v, ls = w.copy(), []
        for s in range(EPOCHS):
            step_key = jax.random.fold_in(jax.random.fold_in(drop, s), 7)
            yh, z = fedgen.local_draws(step_key, jnp.log(jnp.float32(py)), N, NOISE)
            yh, z = np.asarray(yh), np.asarray(z, np.float64)
            feats = generator(g, z, yh)
            ls.append(np.mean(ce_logits(mlp(v, xi)[0], yi)))
            fn = functools.partial(local_loss, x=xi, y=yi, feats=feats, yh=yh,
                                   alpha=ALPHA)  # fmt: skip
            v = v - LR * num_grad(fn, v)
        models.append(v)
        losses.append(np.mean(ls))
    want_w = np.average(models, axis=0, weights=np.asarray(N_TRAIN)[TRAINED])
    np.testing.assert_allclose(flat(new.w, MODEL_KEYS), want_w, atol=3e-5)
    np.testing.assert_allclose(info["train_loss"], np.mean(losses), atol=1e-5)
    # the generated-feature term matters: plain SGD lands elsewhere
    assert np.abs(flat(new.w, MODEL_KEYS) - w).max() > 1e-3

    c_t = counts * TRAINED[:, None]
    weights = c_t / np.maximum(c_t.sum(0, keepdims=True), 1.0)
    weights = weights[TRAINED]
    p_t = c_t.sum(0) / c_t.sum()
    ys, zs = fedgen.gen_draws(k_gen, jnp.log(jnp.float32(p_t)), GEN_STEPS,
                              GEN_BATCH, NOISE)  # fmt: skip
    ys, zs = np.asarray(ys), np.asarray(zs, np.float64)
    m1, m2, b1, b2 = np.zeros_like(g), np.zeros_like(g), 0.9, 0.999
    for s in range(GEN_STEPS):  # optax.adam, in NumPy
        fn = functools.partial(gen_loss, models=models, weights=weights, z=zs[s],
                               y=ys[s], eta=ETA)  # fmt: skip
        grad = num_grad(fn, g)
        m1 = b1 * m1 + (1 - b1) * grad
        m2 = b2 * m2 + (1 - b2) * grad**2
        mh, vh = m1 / (1 - b1 ** (s + 1)), m2 / (1 - b2 ** (s + 1))
        g = g - GEN_LR * mh / (np.sqrt(vh) + 1e-8)
    np.testing.assert_allclose(flat(new.gen, GEN_KEYS), g, atol=3e-5)
    assert np.isfinite(info["gen_loss"])

    assert int(info["num_active"]) == ACTIVE.sum()
    assert int(info["num_diverged"]) == 1
    for leaf in jax.tree.leaves(new):
        assert np.all(np.isfinite(leaf))
    n_act = int(ACTIVE.sum())
    assert float(info["bytes_down"]) == (MODEL_BYTES + GEN_BYTES + 4 * C) * n_act
    assert float(info["bytes_up"]) == (MODEL_BYTES + 4 * C) * n_act


# ------------------------------------------------------------------------ FedGKT

SH = 4  # server hidden units
T_KD, GKT_ALPHA, SERVER_LR, SERVER_BATCH = 2.0, 0.6, 0.3, 5
SERVER_KEYS = (("Dense_0", "kernel", (H, SH)), ("Dense_0", "bias", (SH,)),
               ("Dense_1", "kernel", (SH, C)), ("Dense_1", "bias", (C,)))  # fmt: skip


def gkt_config(**kw):
    cfg = tiny_config(algorithm="fedgkt", **kw)
    g = cfg.fedgkt
    g.alpha, g.temperature, g.server_lr = GKT_ALPHA, T_KD, SERVER_LR
    g.server_epochs, g.server_batch, g.server_hidden = 1, SERVER_BATCH, SH
    return cfg


def kd_np(t, s):
    """Per-row T^2 KL(softmax(t/T) || softmax(s/T))."""
    def logsm(z):
        z = z / T_KD
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lt, ls = logsm(t), logsm(s)
    return T_KD**2 * np.sum(np.exp(lt) * (lt - ls), 1)


def server_np(s, h):
    k0, b0, k1, b1 = unflat(s, SERVER_KEYS)
    return np.maximum(h @ k0 + b0, 0.0) @ k1 + b1


def test_fedgkt_round_matches_numpy():
    """Alg. 1: edge steps on CE + alpha KD(server logits) (agents with server
    logits), upload of features/logits, server SGD-momentum steps on CE + alpha
    KD(edge logits), server logits back to the trained agents only."""
    part = make_part(seed=8, nan_agent=NAN_AGENT)
    rounds, dev = build_rounds(gkt_config(), part, ACTIVE)
    has = np.array([True, True, False, True])
    rng = np.random.default_rng(9)
    given = rng.normal(size=(A, N, C)).astype(np.float32)

    def edit(s):
        return s.replace(logits=jnp.asarray(given), has_logits=jnp.asarray(has))

    old = edit(rounds.init(jax.random.PRNGKey(0), dev))
    key = jax.random.PRNGKey(1)
    new, info = run_round(rounds, old, dev, key, 1)
    old, new = jax.device_get(old), jax.device_get(new)

    edges, feats = [], []
    losses = []
    for i in range(A):  # reference loop over agents
        v = flat(old.edge, MODEL_KEYS, i)
        if TRAINED[i]:
            m = N_TRAIN[i]
            xi = part.x_train[i, :m].astype(np.float64)
            yi = part.y_train[i, :m]
            zs = given[i, :m].astype(np.float64)

            def loss(v, xi=xi, yi=yi, zs=zs, kd_on=has[i]):
                logits, _ = mlp(v, xi)
                ce = np.mean(ce_logits(logits, yi))
                return ce + GKT_ALPHA * kd_on * np.mean(kd_np(zs, logits))

            ls = []
            for _ in range(EPOCHS):
                ls.append(np.mean(ce_logits(mlp(v, xi)[0], yi)))
                v = v - LR * num_grad(loss, v)
            losses.append(np.mean(ls))
        else:
            np.testing.assert_array_equal(flat(new.edge, MODEL_KEYS, i), v)
        np.testing.assert_allclose(flat(new.edge, MODEL_KEYS, i), v, atol=3e-5)
        z, h = mlp(v, part.x_train[i].astype(np.float64))
        edges.append(z)
        feats.append(h)
    np.testing.assert_allclose(info["train_loss"], np.mean(losses), atol=1e-5)

    h_all = np.concatenate(feats)
    z_all = np.concatenate(edges)
    y_all = part.y_train.reshape(-1)
    real = np.arange(N)[None] < np.asarray(N_TRAIN)[:, None]
    valid = (real & TRAINED[:, None]).reshape(-1)
    _, k_server = jax.random.split(jax.random.fold_in(key, 23))
    idx, mask = fedgkt.server_batches(k_server, jnp.asarray(valid), 1, SERVER_BATCH)
    idx, mask = np.asarray(idx), np.asarray(mask)
    assert sorted(idx[mask].tolist()) == np.flatnonzero(valid).tolist()
    s, trace = flat(old.server, SERVER_KEYS), None
    for b in range(len(idx)):
        rows = idx[b][mask[b]]
        if not len(rows):
            continue

        def sloss(s, rows=rows):
            out = server_np(s, h_all[rows])
            return np.mean(ce_logits(out, y_all[rows])) + GKT_ALPHA * np.mean(
                kd_np(z_all[rows], out)
            )

        g = num_grad(sloss, s)
        trace = g if trace is None else g + 0.9 * trace
        s = s - SERVER_LR * trace
    np.testing.assert_allclose(flat(new.server, SERVER_KEYS), s, atol=3e-5)
    for i in range(A):
        want = server_np(s, feats[i]) if TRAINED[i] else given[i]
        np.testing.assert_allclose(new.logits[i], want, atol=3e-5)
    np.testing.assert_array_equal(new.has_logits, has | TRAINED)

    assert int(info["num_active"]) == ACTIVE.sum()
    assert int(info["num_diverged"]) == 1
    for leaf in jax.tree.leaves(new):
        assert np.all(np.isfinite(leaf))
    rows_active = int(np.asarray(N_TRAIN)[ACTIVE].sum())
    assert float(info["bytes_up"]) == rows_active * (H + C + 1) * 4
    assert float(info["bytes_down"]) == rows_active * C * 4


@pytest.mark.parametrize("algorithm", ["fedgen", "fedgkt"])
def test_round_has_no_python_loop_over_agents(algorithm):
    """The traced round and the personal models are the same size for 2 and 6
    agents: the agent axis is an array axis, not a Python loop."""
    sizes = []
    for a in (2, 6):
        part = make_part([N] * a, seed=12)
        make = fedgen_config if algorithm == "fedgen" else gkt_config
        cfg = make(num_agents=a)
        sizes.append(traced_sizes(*build_rounds(cfg, part)))
    assert sizes[0] == sizes[1]
    assert sizes[0][0] > 50  # the count sees inside the nested jaxprs


@pytest.mark.parametrize(
    "alg,field,value,match",
    [
        ("fedgen", "alpha", -1.0, r"fedgen\.alpha=-1\.0 is not valid; accepted: a finite number in \[0\.0, inf\)"),
        ("fedgen", "gen_lr", 0.0, r"fedgen\.gen_lr=0\.0 is not valid; accepted: a finite number in \(0\.0, inf\)"),
        ("fedgen", "gen_steps", 0, r"fedgen\.gen_steps=0 is not valid; accepted: an integer in \[1, inf\)"),
        ("fedgen", "hidden", 0, r"fedgen\.hidden=0 is not valid; accepted: an integer in \[1, inf\)"),
        ("fedgkt", "temperature", 0.0, r"fedgkt\.temperature=0\.0 is not valid; accepted: a finite number in \(0\.0, inf\)"),
        ("fedgkt", "alpha", -0.5, r"fedgkt\.alpha=-0\.5 is not valid"),
        ("fedgkt", "server_batch", 0, r"fedgkt\.server_batch=0 is not valid; accepted: an integer in \[1, inf\)"),
    ],
)  # fmt: skip
def test_bad_hparams_name_the_field(alg, field, value, match):
    cfg = tiny_config(algorithm=alg)
    cfg[alg][field] = value
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


CLI = ["--quiet", "--config.num_agents=4", "--config.num_rounds=2",
       "--config.checkpoint_every=0", "--config.local_buckets=1",
       "--config.local_plan=all"]  # fmt: skip
DIGITS_MLP_BYTES = (64 * 100 + 100 + 100 * 10 + 10) * 4  # the default model
DIGITS_GEN_BYTES = ((32 + 10) * 256 + 256 + 256 * 100 + 100) * 4  # defaults


@pytest.mark.cli(
    fedgen=[*CLI, "--config.algorithm=fedgen", "--config.fedgen.gen_steps=5"],
    fedgen_bad=[*CLI, "--config.algorithm=fedgen", "--config.fedgen.eta=-1.0"],
    fedgkt=[*CLI, "--config.algorithm=fedgkt"],
    fedgkt_bad=[*CLI, "--config.algorithm=fedgkt", "--config.fedgkt.server_lr=0.0"],
)
def test_cli_runs_fedgen_fedgkt(cli):
    """scripts/run.py: two rounds each with the communication counts; a bad
    hyper-parameter exits 2 naming the field."""
    recs = cli_records(cli["fedgen"])
    assert "fedgen on digits" in cli["fedgen"].stdout
    for r in recs:
        assert 0.0 <= r["c_spe"] <= 1.0 and 0.0 <= r["global_acc"] <= 1.0
        assert r["bytes_up"] == 4 * (DIGITS_MLP_BYTES + 40)
        assert r["bytes_down"] == 4 * (DIGITS_MLP_BYTES + DIGITS_GEN_BYTES + 40)
        assert np.isfinite(r["gen_loss"])
    bad = cli["fedgen_bad"]
    assert bad.returncode == 2
    assert "fedgen.eta=-1.0 is not valid" in bad.stderr
    recs = cli_records(cli["fedgkt"])
    for r in recs:
        assert 0.0 <= r["c_spe"] <= 1.0 and r["global_acc"] is None
        # every agent takes part: all training rows, (100 features + 10 logits
        # + 1 label) * 4 bytes up, 10 logits * 4 down
        assert r["bytes_up"] / r["bytes_down"] == (100 + 10 + 1) / 10
        assert r["bytes_down"] % 40 == 0 and r["bytes_down"] > 0
        assert np.isfinite(r["server_loss"])
    bad = cli["fedgkt_bad"]
    assert bad.returncode == 2
    assert "fedgkt.server_lr=0.0 is not valid" in bad.stderr
