"""pFedMe, Per-FedAvg and FedProto plug-ins: update rules against NumPy references.

Every reference is multinomial logistic regression (``model='mlr'``, parameters
``Dense_0/kernel [F, C]`` and ``bias [C]``) with full-batch minibatches
(``batch_size >= n``), so the engine's shuffles do not change the result and every
gradient, Hessian-vector product and prototype has a closed form in NumPy.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import mlr_numpy, train_is_test_partition
from helpers import tiny_config as base_config

from demjax import train
from demjax.algorithms import fedproto, perfedavg
from demjax.config import validate
from demjax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

A, N, F, C = 2, 4, 3, 3
N_TRAIN = np.array([4, 3], np.int32)  # agent 1 has 3 real samples + 1 padding row
tiny_config = functools.partial(
    base_config,
    num_agents=A,
    num_rounds=1,
    batch_size=4,
    local_buckets=1,
    optimizer="sgd",
    checkpoint_every=0,
)


def make_part(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(A, N, F)).astype(np.float32)
    y = rng.integers(0, C, size=(A, N)).astype(np.int32)
    y[0, :3] = [0, 1, 2]  # agent 0 holds every class
    return train_is_test_partition(x, y, N_TRAIN, C)


def build(cfg, part):
    _, ctx, rounds = train.build(cfg, jax.tree.map(jnp.asarray, part))
    dev = jax.tree.map(jnp.asarray, part)
    return ctx, rounds, dev


def softmax(z):
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def grad_np(wb, x, y):
    """Gradient of the mean softmax cross-entropy of ``x @ W + b``."""
    w, b = wb
    p = softmax(x @ w + b)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return x.T @ p, p.sum(0)


def hvp_np(wb, x, y, v):
    """Exact Hessian-vector product of the same loss, direction ``v = (V, c)``."""
    w, b = wb
    p = softmax(x @ w + b)
    dz = x @ v[0] + v[1]
    dp = p * (dz - np.sum(p * dz, axis=1, keepdims=True)) / len(y)
    return x.T @ dp, dp.sum(0)


mlr = mlr_numpy


def axpy(a, u, v):
    """``u + a * v`` for (W, b) pairs."""
    return u[0] + a * v[0], u[1] + a * v[1]


def close(got, want, atol):
    np.testing.assert_allclose(got[0], want[0], atol=atol)
    np.testing.assert_allclose(got[1], want[1], atol=atol)


def run_round(cfg, part, edit_state=None):
    ctx, rounds, dev = build(cfg, part)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    if edit_state is not None:
        state = edit_state(state)
    new, info = jax.jit(rounds.round)(state, dev, jax.random.PRNGKey(1), jnp.int32(0))
    assert np.isfinite(float(info["train_loss"]))
    return ctx, rounds, dev, state, new


# ----------------------------------------------------------------------- pFedMe


def test_pfedme_round_matches_numpy():
    """Alg. 1: two local steps (local_epochs=2, one full batch each), K=3 inner
    steps warm-started from the previous theta, server mixing with beta=0.7."""
    lr, lam, k, plr, beta = 0.3, 2.0, 3, 0.2, 0.7
    part = make_part()
    cfg = tiny_config(algorithm="pfedme", lr=lr, local_epochs=2)
    cfg.pfedme.lam, cfg.pfedme.K, cfg.pfedme.personal_lr = lam, k, plr
    cfg.pfedme.beta = beta
    *_, state, new = run_round(cfg, part)

    w = mlr(state.w)
    w_k, th_k = [], []
    for i in range(A):  # reference loop over agents
        m = N_TRAIN[i]
        x, y = part.x_train[i, :m].astype(np.float64), part.y_train[i, :m]
        wi, th = w, w
        for _ in range(2):  # local steps
            for _ in range(k):  # inner solver of the Moreau envelope
                g = grad_np(th, x, y)
                th = tuple(
                    t - plr * (gt + lam * (t - wt))
                    for t, gt, wt in zip(th, g, wi, strict=True)
                )
            wi = tuple(a - lr * lam * (a - t) for a, t in zip(wi, th, strict=True))
        w_k.append(wi)
        th_k.append(th)
    wts = N_TRAIN / N_TRAIN.sum()
    mean = tuple(
        sum(q * wk[j] for q, wk in zip(wts, w_k, strict=True)) for j in range(2)
    )
    want_w = tuple((1 - beta) * a + beta * m for a, m in zip(w, mean, strict=True))
    close(mlr(new.w), want_w, 1e-5)
    for i in range(A):
        close(mlr(new.theta, i), th_k[i], 1e-5)
    # the personalized models are not the global one
    assert np.abs(mlr(new.theta, 0)[0] - mlr(new.w)[0]).max() > 1e-2


# ------------------------------------------------------------------- Per-FedAvg


def perfedavg_reference(w, x, y, alpha, variant):
    """One Per-FedAvg meta-gradient with D = D' = D'' = the agent's data."""
    g0 = grad_np(w, x, y)
    w_t = axpy(-alpha, w, g0)
    g1 = grad_np(w_t, x, y)
    if variant == "fo":
        return g1
    return axpy(-alpha, g1, hvp_np(w, x, y, g1))


@pytest.mark.parametrize(
    "variant,hvp,delta,atol",
    [
        ("fo", "exact", 1e-3, 1e-5),
        ("hf", "exact", 1e-3, 1e-5),
    ],
)
def test_perfedavg_round_matches_numpy(variant, hvp, delta, atol):
    alpha, beta = 0.8, 0.5
    part = make_part(1)
    cfg = tiny_config(algorithm="perfedavg", lr=123.0)  # lr unused: beta is the rate
    p = cfg.perfedavg
    p.variant, p.alpha, p.beta, p.hvp, p.delta = variant, alpha, beta, hvp, delta
    ctx, rounds, dev, state, new = run_round(cfg, part)

    w = mlr(state.w)
    w_k, pers = [], []
    for i in range(A):
        m = N_TRAIN[i]
        x, y = part.x_train[i, :m].astype(np.float64), part.y_train[i, :m]
        g = perfedavg_reference(w, x, y, alpha, variant)
        w_k.append(axpy(-beta, w, g))
        pers.append((x, y))
    wts = N_TRAIN / N_TRAIN.sum()
    want = tuple(
        sum(q * wk[j] for q, wk in zip(wts, w_k, strict=True)) for j in range(2)
    )
    close(mlr(new.w), want, atol)
    # the HF correction is not negligible here, so FO and HF cannot both pass
    x0, y0 = part.x_train[0].astype(np.float64), part.y_train[0]
    fo, hf = (perfedavg_reference(w, x0, y0, alpha, v) for v in ("fo", "hf"))
    assert np.abs(fo[0] - hf[0]).max() > 20 * atol

    # evaluation model: one SGD step of alpha from the global model (Sec. 5)
    personal = rounds.personal(new, dev, jax.random.PRNGKey(5))
    w1 = mlr(new.w)
    for i, (x, y) in enumerate(pers):
        close(mlr(personal, i), axpy(-alpha, w1, grad_np(w1, x, y)), 1e-5)


def test_perfedavg_fd_hvp_approximates_exact_meta_gradient():
    """make_meta_grad on distinct D, D', D'': exact HVP vs NumPy, fd close to it."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 5, F)).astype(np.float32)
    y = rng.integers(0, C, size=(3, 5)).astype(np.int32)
    w = (rng.normal(size=(F, C)), rng.normal(size=(C,)))
    params = {"Dense_0": {"kernel": jnp.float32(w[0]), "bias": jnp.float32(w[1])}}

    def apply_fn(p, xb, train, key):
        return xb @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]

    alpha = 0.7
    batches = [(x[j], y[j], np.ones(5, bool)) for j in range(3)]
    g0 = grad_np(w, x[0], y[0])
    g1 = grad_np(axpy(-alpha, w, g0), x[1], y[1])
    want = axpy(-alpha, g1, hvp_np(w, x[2], y[2], g1))
    for hvp, delta, atol in (("exact", 1e-3, 1e-5), ("fd", 1e-2, 3e-4)):
        fn = jax.jit(perfedavg.make_meta_grad(apply_fn, alpha, "hf", hvp, delta))
        got, ce = fn(params, *batches, jax.random.PRNGKey(0))
        close(mlr(got), want, atol)
    fo, _ = jax.jit(perfedavg.make_meta_grad(apply_fn, alpha, "fo", "exact", 1e-3))(
        params, *batches, jax.random.PRNGKey(0)
    )
    close(mlr(fo), g1, 1e-5)


def test_perfedavg_sample_batch_draws_real_rows_without_replacement():
    x = jnp.arange(10.0)[:, None]
    y = jnp.arange(10, dtype=jnp.int32)
    for s in range(5):
        xb, yb, mask = perfedavg.sample_batch(jax.random.PRNGKey(s), x, y, 6, 4)
        yb = np.asarray(yb)
        assert mask.all() and len(set(yb)) == 4 and yb.max() < 6
    _, yb, mask = perfedavg.sample_batch(jax.random.PRNGKey(0), x, y, 3, 4)
    assert mask.tolist() == [True, True, True, False]
    assert sorted(np.asarray(yb)[:3].tolist()) == [0, 1, 2]


# --------------------------------------------------------------------- FedProto


def test_fedproto_prototype_aggregation_matches_numpy():
    rng = np.random.default_rng(4)
    a, n, f, c = 3, 6, 4, 4
    feats = rng.normal(size=(a, n, f)).astype(np.float32)
    y = rng.integers(0, 3, size=(a, n)).astype(np.int32)  # class 3 never present
    n_real = np.array([6, 4, 5])
    mask = np.arange(n)[None, :] < n_real[:, None]
    active = np.array([1.0, 0.0, 1.0], np.float32)  # agent 1 does not upload
    old = rng.normal(size=(c, f)).astype(np.float32)
    old_count = np.array([0.0, 0.0, 0.0, 7.0], np.float32)

    sums, counts = jax.vmap(fedproto.class_sums, in_axes=(0, 0, 0, None))(
        feats, y, mask, c
    )
    protos, count = fedproto.aggregate_protos(sums, counts, active, old, old_count)

    want = old.astype(np.float64).copy()
    want_count = old_count.copy()
    for j in range(c):
        rows, local = [], []
        for i in range(a):  # reference: count-weighted mean of local prototypes
            sel = feats[i][mask[i] & (y[i] == j)]
            if active[i] and len(sel):
                local.append((len(sel), sel.mean(0)))
                rows.append(sel)
        if local:
            tot = sum(k for k, _ in local)
            want[j] = sum(k * p for k, p in local) / tot
            want_count[j] = tot
            np.testing.assert_allclose(want[j], np.concatenate(rows).mean(0), atol=1e-6)
    np.testing.assert_allclose(protos, want, atol=1e-5)
    np.testing.assert_allclose(count, want_count)
    np.testing.assert_allclose(protos[3], old[3])  # nobody held class 3: kept


@pytest.mark.parametrize("distance", ["mse", "sq_l2"])
def test_fedproto_loss_and_gradient_match_numpy(distance):
    """Eq. 5 with a linear embedding f = x A and head logits = f W."""
    rng = np.random.default_rng(5)
    b, d, f, c, lam = 5, 4, 3, 3, 0.7
    x = rng.normal(size=(b, d))
    y = np.array([0, 1, 2, 1, 0], np.int32)
    mask = np.array([1, 1, 1, 1, 0], bool)
    protos = rng.normal(size=(c, f))
    count = np.array([3.0, 0.0, 2.0])  # class 1 has no global prototype yet
    am, wm = rng.normal(size=(d, f)), rng.normal(size=(f, c))

    def feat_apply(p, xb, train, key):
        feats = xb @ p["A"]
        return feats @ p["W"], feats

    loss = jax.jit(fedproto.make_loss(feat_apply, lam, distance))
    params = {"A": jnp.float32(am), "W": jnp.float32(wm)}
    args = (jnp.float32(x), jnp.int32(y), jnp.asarray(mask))
    pr = (jnp.float32(protos), jnp.float32(count))
    (total, ce) = loss(params, *args, *pr, None)
    grads, _ = jax.jit(jax.grad(loss, has_aux=True))(params, *args, *pr, None)

    m = mask.sum()
    feats = x @ am
    p = softmax(feats @ wm)
    ce_ref = -np.sum(np.log(p[np.arange(b), y]) * mask) / m
    scale = 1.0 / f if distance == "mse" else 1.0
    use = (mask & (count[y] > 0)).astype(float)
    diff = feats - protos[y]
    reg = np.sum(np.sum(diff**2, 1) * use) * scale / m
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-5)
    np.testing.assert_allclose(total, ce_ref + lam * reg, rtol=1e-5)
    dlog = p.copy()
    dlog[np.arange(b), y] -= 1.0
    dlog *= mask[:, None] / m
    dfeat = dlog @ wm.T + lam * scale * 2.0 * diff * use[:, None] / m
    np.testing.assert_allclose(grads["W"], feats.T @ dlog, atol=1e-5)
    np.testing.assert_allclose(grads["A"], x.T @ dfeat, atol=1e-5)


def test_fedproto_round_and_nearest_prototype_inference():
    """MLR's embedding is the input itself: after a round the global prototypes are
    the pooled class means of x, the models took one plain CE step (the
    regularizer has no parameter gradient), and inference is the nearest mean."""
    lr = 0.4
    part = make_part(2)
    cfg = tiny_config(algorithm="fedproto", lr=lr)
    ctx, rounds, dev, state, new = run_round(cfg, part)

    xs = np.concatenate([part.x_train[i, : N_TRAIN[i]] for i in range(A)])
    ys = np.concatenate([part.y_train[i, : N_TRAIN[i]] for i in range(A)])
    for j in range(C):
        np.testing.assert_allclose(new.protos[j], xs[ys == j].mean(0), atol=1e-5)
        assert float(new.count[j]) == np.sum(ys == j)
    for i in range(A):
        m = N_TRAIN[i]
        x, y = part.x_train[i, :m].astype(np.float64), part.y_train[i, :m]
        w = mlr(state.params, i)
        close(mlr(new.params, i), axpy(-lr, w, grad_np(w, x, y)), 1e-5)

    personal = rounds.personal(new, dev, None)
    logits = rounds.eval_apply(
        jax.tree.map(lambda v: v[0], personal), jnp.asarray(part.x_all), False, None
    )
    d = ((part.x_all[:, None, :] - np.asarray(new.protos)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.argmax(logits, 1), np.argmin(d, 1))
    # a class without a prototype is never predicted
    no1 = dict(personal, count=personal["count"].at[:, 1].set(0.0))
    logits = rounds.eval_apply(
        jax.tree.map(lambda v: v[0], no1), jnp.asarray(part.x_all), False, None
    )
    assert 1 not in np.argmax(logits, 1).tolist()


def test_fedproto_regularizer_pulls_features_in_second_round():
    """With an MLP embedding, round-2 training differs with and without the round-1
    global prototypes (the anchor reaches the loss); round 1 has none."""
    part = make_part(3)
    cfg = tiny_config(algorithm="fedproto", model="mlp", hidden=(4,), lr=0.3)
    cfg.fedproto.lam = 5.0
    ctx, rounds, dev = build(cfg, part)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    step = jax.jit(rounds.round)
    s1, _ = step(state, dev, jax.random.PRNGKey(1), jnp.int32(0))
    assert float(jnp.sum(s1.count)) == N_TRAIN.sum()
    with_p, _ = step(s1, dev, jax.random.PRNGKey(2), jnp.int32(1))
    blind = s1.replace(count=jnp.zeros_like(s1.count))
    without, _ = step(blind, dev, jax.random.PRNGKey(2), jnp.int32(1))
    k = [s.params["Dense_0"]["kernel"] for s in (with_p, without)]
    assert np.abs(np.asarray(k[0]) - np.asarray(k[1])).max() > 1e-4


# ----------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "alg,field,value,match",
    [
        (
            "pfedme",
            "lam",
            0.0,
            r"pfedme\.lam=0\.0 is not valid; accepted: a finite number in \(0\.0, inf\)",
        ),
        ("pfedme", "K", 0, r"pfedme\.K=0 is not valid; accepted: an integer in \[1, inf\)"),
        ("pfedme", "beta", -1.0, r"pfedme\.beta=-1\.0 is not valid"),
        ("perfedavg", "variant", "so", r"perfedavg\.variant='so' .*accepted: fo, hf"),
        ("perfedavg", "hvp", "fast", r"perfedavg\.hvp='fast' .*accepted: exact, fd"),
        ("perfedavg", "alpha", 0.0, r"perfedavg\.alpha=0\.0 is not valid"),
        ("perfedavg", "delta", -0.1, r"perfedavg\.delta=-0\.1 is not valid"),
        ("fedproto", "lam", -1.0, r"fedproto\.lam=-1\.0 is not valid; accepted: a finite number in \[0"),
        ("fedproto", "distance", "l1", r"fedproto\.distance='l1' .*mse, sq_l2"),
        ("fedproto", "inference", "knn", r"fedproto\.inference='knn' .*proto, model"),
    ],
)
def test_bad_hparams_name_the_field(alg, field, value, match):
    cfg = tiny_config(algorithm=alg)
    cfg[alg][field] = value
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_unknown_hparam_is_rejected():
    cfg = tiny_config(algorithm="pfedme")
    cfg.pfedme.mu = 0.1
    with pytest.raises(ConfigError, match=r"pfedme\.mu is not a field of pfedme"):
        validate(cfg)


def test_fedproto_model_inference_uses_the_classifier_head():
    cfg = tiny_config(algorithm="fedproto")
    cfg.fedproto.inference = "model"
    ctx, rounds, dev = build(cfg, make_part())
    state = rounds.init(jax.random.PRNGKey(0), dev)
    assert rounds.eval_apply is None and rounds.global_model is None
    got = rounds.personal(state, dev, None)
    assert jax.tree.structure(got) == jax.tree.structure(state.params)
