"""SCAFFOLD, FedDyn, APFL and MOON plug-ins: one round against NumPy references.

Every reference is a tiny MLP (3 inputs, 5 ReLU units, 3 classes; 38
parameters) written in NumPy (float64), trained by a Python loop over agents with
full-batch steps (``batch_size >= n``, so the engine's shuffles do not change the
result); gradients are central finite differences of the NumPy loss, independent
of JAX. Participation is fixed by replacing the context's ``round_masks``
(agent 1 sits out); the plug-ins must not loop over agents in Python (checked on
the traced round). Agent 3's data are NaN: its training diverges, so it must be
counted in ``num_diverged``, keep its state and stay out of every aggregate (the
references leave it out).
"""

import functools
import json

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

from demjax.config import validate
from demjax.errors import ConfigError

N, F, H, C = 4, 3, 5, 3  # padded rows per agent, features, hidden units, classes
N_TRAIN = [4, 3, 4, 2]
ACTIVE = np.array([True, False, True, True])
NAN_AGENT = 3  # active, NaN data: diverges
TRAINED = ACTIVE & (np.arange(len(N_TRAIN)) != NAN_AGENT)
LR, EPOCHS = 0.2, 2  # two full-batch local steps per agent
MODEL_BYTES = (F * H + H + H * C + C) * 4  # float32
tiny_config = functools.partial(
    base_config,
    num_agents=len(N_TRAIN),
    num_rounds=1,
    model="mlp",
    hidden=(H,),
    batch_size=N,
    local_epochs=EPOCHS,
    lr=LR,
    local_buckets=1,
    optimizer="sgd",
    checkpoint_every=0,
)


def make_part(n_train=N_TRAIN, seed=0, nan_agent=None):
    n_train = np.asarray(n_train, np.int32)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(n_train), N, F)).astype(np.float32)
    if nan_agent is not None:
        x[nan_agent] = np.nan
    y = rng.integers(0, C, size=(len(n_train), N)).astype(np.int32)
    return train_is_test_partition(x, y, n_train, C)


def one_round(cfg, part, edit=None, active=ACTIVE):
    """``(state before, state after, info)`` of round 0."""
    rounds, dev = build_rounds(cfg, part, active)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    if edit is not None:
        state = edit(state)
    new, info = run_round(rounds, state, dev, jax.random.PRNGKey(1), 0)
    return jax.device_get(state), jax.device_get(new), info


# -------------------------------------------------------------- NumPy reference

KEYS = (("Dense_0", "kernel"), ("Dense_0", "bias"), ("Dense_1", "kernel"),
        ("Dense_1", "bias"))  # fmt: skip


def flat(p, i=None):
    """float64 ``[38]`` of one model (``i``: agent i of a stacked tree)."""
    leaves = [np.asarray(p[a][b], np.float64) for a, b in KEYS]
    return np.concatenate([(v if i is None else v[i]).ravel() for v in leaves])


def unflat(v):
    sizes = [F * H, H, H * C, C]
    k0, b0, k1, b1 = np.split(v, np.cumsum(sizes)[:-1])
    return k0.reshape(F, H), b0, k1.reshape(H, C), b1


def forward(v, x):
    """``(logits [n, C], features [n, H])`` of the MLP with flat parameters v."""
    k0, b0, k1, b1 = unflat(v)
    h = np.maximum(x @ k0 + b0, 0.0)
    return h @ k1 + b1, h


def ce(v, x, y):
    z, _ = forward(v, x)
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -np.mean(logp[np.arange(len(y)), y])


def num_grad(fn, v, eps=1e-6):
    g = np.zeros_like(v)
    for j in range(len(v)):
        e = np.zeros_like(v)
        e[j] = eps
        g[j] = (fn(v + e) - fn(v - e)) / (2 * eps)
    return g


def data(part, i):
    m = int(part.n_train[i])
    return part.x_train[i, :m].astype(np.float64), part.y_train[i, :m]


def perturb(tree, seed, scale=0.3):
    """``tree`` plus Gaussian noise (one draw per leaf, float32)."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    out = [np.asarray(x) + scale * rng.normal(size=np.shape(x)) for x in leaves]
    return jax.tree.unflatten(treedef, [jnp.float32(x) for x in out])


def check_counts(info, old, new, messages):
    """Counts and bytes of the round; the diverged agent's per-agent leaves
    (``[A, ...]``) are unchanged."""
    a_active = int(ACTIVE.sum())
    assert int(info["num_active"]) == a_active
    assert int(info["num_diverged"]) == 1
    assert np.isfinite(info["train_loss"])
    for o, n in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True):
        assert np.all(np.isfinite(n))
        if np.ndim(o) and np.shape(o)[0] == len(N_TRAIN):
            np.testing.assert_array_equal(n[NAN_AGENT], o[NAN_AGENT])
    want = float(messages * MODEL_BYTES * a_active)
    assert float(info["bytes_up"]) == want and float(info["bytes_down"]) == want


ATOL = 2e-5


# --------------------------------------------------------------------- SCAFFOLD


def test_scaffold_round_matches_numpy():
    """Alg. 1: corrected local steps y -= lr (g - c_i + c), option II c_i, server
    lr eta_g on the mean dy, c += sum(dc) / A; non-zero c and c_i to start."""
    eta_g = 0.7
    part = make_part(seed=1, nan_agent=NAN_AGENT)
    cfg = tiny_config(algorithm="scaffold")
    cfg.scaffold.server_lr = eta_g

    def edit(s):
        return s.replace(c=perturb(s.c, 2, 0.1), c_i=perturb(s.c_i, 3, 0.1))

    old, new, info = one_round(cfg, part, edit)
    x, c = flat(old.x), flat(old.c)
    a = len(N_TRAIN)
    dys, dcs, ci_new, losses = [], [], [], []
    for i in range(a):  # reference loop over agents
        ci = flat(old.c_i, i)
        if not TRAINED[i]:
            ci_new.append(ci)
            continue
        xi, yi = data(part, i)
        y, ls = x.copy(), []
        for _ in range(EPOCHS):
            ls.append(ce(y, xi, yi))
            y = y - LR * (num_grad(functools.partial(ce, x=xi, y=yi), y) - ci + c)
        ci_plus = ci - c + (x - y) / (EPOCHS * LR)
        dys.append(y - x)
        dcs.append(ci_plus - ci)
        ci_new.append(ci_plus)
        losses.append(np.mean(ls))
    np.testing.assert_allclose(flat(new.x), x + eta_g * np.mean(dys, 0), atol=ATOL)
    np.testing.assert_allclose(flat(new.c), c + np.sum(dcs, 0) / a, atol=ATOL)
    for i in range(a):
        np.testing.assert_allclose(flat(new.c_i, i), ci_new[i], atol=1e-4)
    np.testing.assert_allclose(info["train_loss"], np.mean(losses), atol=1e-5)
    check_counts(info, old, new, messages=2)


# ----------------------------------------------------------------------- FedDyn


def test_feddyn_round_matches_numpy():
    """Alg. 1: local problem L_k - <g_k, .> + alpha/2 ||. - theta||^2, linear term
    g_k -= alpha (theta_k - theta), h -= alpha/A sum(theta_k - theta), theta =
    mean(theta_k) - h / alpha; non-zero h and g_k to start."""
    alpha = 0.3
    part = make_part(seed=4, nan_agent=NAN_AGENT)
    cfg = tiny_config(algorithm="feddyn")
    cfg.feddyn.alpha = alpha

    def edit(s):
        return s.replace(h=perturb(s.h, 5, 0.05), g=perturb(s.g, 6, 0.1))

    old, new, info = one_round(cfg, part, edit)
    theta, h = flat(old.theta), flat(old.h)
    a = len(N_TRAIN)
    locals_, g_new = [], []
    for i in range(a):
        gk = flat(old.g, i)
        if not TRAINED[i]:
            g_new.append(gk)
            continue
        xi, yi = data(part, i)
        th = theta.copy()
        for _ in range(EPOCHS):
            grad = num_grad(functools.partial(ce, x=xi, y=yi), th)
            th = th - LR * (grad - gk + alpha * (th - theta))
        locals_.append(th)
        g_new.append(gk - alpha * (th - theta))
    h_want = h - alpha / a * np.sum([t - theta for t in locals_], 0)
    np.testing.assert_allclose(flat(new.h), h_want, atol=ATOL)
    np.testing.assert_allclose(
        flat(new.theta), np.mean(locals_, 0) - h_want / alpha, atol=1e-4
    )
    for i in range(a):
        np.testing.assert_allclose(flat(new.g, i), g_new[i], atol=ATOL)
    check_counts(info, old, new, messages=1)


# ------------------------------------------------------------------------- APFL


@pytest.mark.parametrize("adaptive", [True, False])
def test_apfl_round_matches_numpy(adaptive):
    """Alg. 1 + Sec. 3.1: per step, from the old values, w_i -= lr grad f(w_i),
    v_i -= lr alpha_i grad f(vbar_i), alpha_i -= alpha_lr <v_i - w_i, grad
    f(vbar_i)> clipped to [0, 1]; w = mean of the participants' w_i."""
    alpha_lr = 0.9
    alphas = np.array([0.3, 0.5, 0.8, 0.6], np.float32)
    part = make_part(seed=7, nan_agent=NAN_AGENT)
    cfg = tiny_config(algorithm="apfl")
    cfg.apfl.alpha_lr, cfg.apfl.adaptive = alpha_lr, adaptive

    def edit(s):
        return s.replace(v=perturb(s.v, 8, 0.5), alpha=jnp.asarray(alphas))

    old, new, info = one_round(cfg, part, edit)
    w = flat(old.w)
    ws = []
    for i in range(len(N_TRAIN)):
        v, al = flat(old.v, i), float(alphas[i])
        if TRAINED[i]:
            xi, yi = data(part, i)
            wi = w.copy()
            for _ in range(EPOCHS):
                g_w = num_grad(functools.partial(ce, x=xi, y=yi), wi)
                g_bar = num_grad(
                    functools.partial(ce, x=xi, y=yi), al * v + (1 - al) * wi
                )
                step_a = np.clip(al - alpha_lr * np.dot(v - wi, g_bar), 0, 1)
                wi, v = wi - LR * g_w, v - LR * al * g_bar
                al = step_a if adaptive else al
            ws.append(wi)
        np.testing.assert_allclose(flat(new.v, i), v, atol=ATOL)
        np.testing.assert_allclose(new.alpha[i], al, atol=1e-5)
    np.testing.assert_allclose(flat(new.w), np.mean(ws, 0), atol=ATOL)
    assert adaptive == (not np.allclose(new.alpha, alphas))
    check_counts(info, old, new, messages=1)


# ------------------------------------------------------------------------- MOON


def moon_loss(v, x, y, glob, prev, mu, tau):
    """Eq. 4 in NumPy: CE + mu * mean of Eq. 3 over the batch."""
    _, z = forward(v, x)
    _, zg = forward(glob, x)
    _, zp = forward(prev, x)

    def cos(a, b):
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        return np.sum(a * b, 1) / np.maximum(den, 1e-8)

    pos, neg = np.exp(cos(z, zg) / tau), np.exp(cos(z, zp) / tau)
    return ce(v, x, y) + mu * np.mean(-np.log(pos / (pos + neg)))


def test_moon_round_matches_numpy():
    """Eq. 3-4: CE + mu * model-contrastive loss (positive: the global model,
    negative: the agent's previous model), sample-weighted mean of the
    participants' models; their models become the next round's negatives."""
    mu, tau = 2.0, 0.5
    part = make_part(seed=9, nan_agent=NAN_AGENT)
    cfg = tiny_config(algorithm="moon")
    cfg.moon.mu, cfg.moon.tau = mu, tau

    def edit(s):
        return s.replace(prev=perturb(s.prev, 10, 0.5))

    old, new, info = one_round(cfg, part, edit)
    w = flat(old.w)
    models, weights = [], []
    for i in range(len(N_TRAIN)):
        prev = flat(old.prev, i)
        if not TRAINED[i]:
            np.testing.assert_array_equal(flat(new.prev, i), prev)
            continue
        xi, yi = data(part, i)
        wi = w.copy()
        for _ in range(EPOCHS):
            wi = wi - LR * num_grad(
                functools.partial(
                    moon_loss, x=xi, y=yi, glob=w, prev=prev, mu=mu, tau=tau
                ),
                wi,
            )
        models.append(wi)
        weights.append(N_TRAIN[i])
        np.testing.assert_allclose(flat(new.prev, i), wi, atol=ATOL)
    want = np.average(models, axis=0, weights=weights)
    np.testing.assert_allclose(flat(new.w), want, atol=ATOL)
    # the contrastive term matters here: plain SGD on CE lands elsewhere
    xi, yi = data(part, 0)
    plain = w - LR * num_grad(functools.partial(ce, x=xi, y=yi), w)
    plain = plain - LR * num_grad(functools.partial(ce, x=xi, y=yi), plain)
    assert np.abs(plain - models[0]).max() > 1e-3
    check_counts(info, old, new, messages=1)


# ------------------------------------------------------------ vectorized rounds

ALGOS = ["scaffold", "feddyn", "apfl", "moon"]


@pytest.mark.parametrize("algorithm", ALGOS)
def test_round_has_no_python_loop_over_agents(algorithm):
    """The traced round and the personal models are the same size for 2 and 6
    agents: the agent axis is an array axis, not a Python loop."""
    sizes = []
    for a in (2, 6):
        part = make_part([N] * a, seed=12)
        cfg = tiny_config(algorithm=algorithm, num_agents=a)
        sizes.append(traced_sizes(*build_rounds(cfg, part)))
    assert sizes[0] == sizes[1]
    assert sizes[0][0] > 50  # the count sees inside the nested jaxprs


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "alg,field,value,match",
    [
        ("scaffold", "server_lr", 0.0, r"scaffold\.server_lr=0\.0 is not valid; accepted: a finite number in \(0\.0, inf\)"),
        ("feddyn", "alpha", -0.1, r"feddyn\.alpha=-0\.1 is not valid; accepted: a finite number in \(0\.0, inf\)"),
        ("apfl", "alpha", 1.5, r"apfl\.alpha=1\.5 is not valid; accepted: a finite number in \[0\.0, 1\.0\]"),
        ("apfl", "alpha_lr", -1.0, r"apfl\.alpha_lr=-1\.0 is not valid"),
        ("moon", "mu", -1.0, r"moon\.mu=-1\.0 is not valid; accepted: a finite number in \[0\.0, inf\)"),
        ("moon", "tau", 0.0, r"moon\.tau=0\.0 is not valid; accepted: a finite number in \(0\.0, inf\)"),
    ],
)  # fmt: skip
def test_bad_hparams_name_the_field(alg, field, value, match):
    cfg = tiny_config(algorithm=alg)
    cfg[alg][field] = value
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


# ----------------------------------------------------------------- end to end

CLI = ["--quiet", "--config.num_agents=4", "--config.num_rounds=2",
       "--config.checkpoint_every=0", "--config.local_buckets=1"]  # fmt: skip
DIGITS_MLP_BYTES = (64 * 100 + 100 + 100 * 10 + 10) * 4  # the default model


@pytest.mark.cli(
    scaffold=[*CLI, "--config.algorithm=scaffold"],
    feddyn=[*CLI, "--config.algorithm=feddyn", "--config.feddyn.alpha=0.1"],
    apfl=[*CLI, "--config.algorithm=apfl"],
    moon=[*CLI, "--config.algorithm=moon", "--config.moon.mu=5.0"],
    moon_bad=[*CLI, "--config.algorithm=moon", "--config.moon.tau=-1.0"],
)
def test_cli_runs_each_algorithm(cli):
    """scripts/run.py: two rounds each, metrics with the communication counts;
    a bad hyper-parameter exits 2 naming the field."""
    for name in ALGOS:
        recs = cli_records(cli[name])
        assert f"{name} on digits" in cli[name].stdout
        per_agent = DIGITS_MLP_BYTES * (2 if name == "scaffold" else 1)
        for r in recs:
            assert r["point"] == "sync"
            assert 0.0 <= r["c_spe"] <= 1.0 and 0.0 <= r["global_acc"] <= 1.0
            assert r["bytes_up"] == r["bytes_down"] == 4 * per_agent
        if name == "apfl":
            assert all(0.0 <= r["mean_alpha"] <= 1.0 for r in recs)
    cfg = json.loads((cli["moon"].workdir / "config.json").read_text())
    assert cfg["moon"]["mu"] == 5.0
    bad = cli["moon_bad"]
    assert bad.returncode == 2
    assert "moon.tau=-1.0 is not valid" in bad.stderr
