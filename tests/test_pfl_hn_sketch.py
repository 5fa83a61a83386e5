"""pFedHN and FetchSGD: rounds against per-agent references, vectorization,
hyper-parameter errors and end-to-end runs.

Every round reference trains by one full-batch SGD step (``batch_size >= n``,
``local_epochs=1``), so the engine's shuffles do not change the result; the local
gradients come from ``jax.grad`` of a loss written here, one agent at a time.
Participation is fixed by replacing the context's ``round_masks``; agent 1 sits
out and agent 3's data is non-finite (it diverges: reset, excluded, counted).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cli_records, run_round, traced_sizes, train_is_test_partition
from helpers import tiny_config as base_config

from demjax import local, train
from demjax.algorithms import fetchsgd
from demjax.config import validate
from demjax.errors import ConfigError

N, F, C, H = 4, 3, 3, 4  # rows per agent (padded), features, classes, MLP width
ACTIVE = np.array([True, False, True, True])
N_TRAIN = [4, 3, 2, 4]
LR = 0.3  # local SGD rate
tiny_config = functools.partial(
    base_config,
    num_rounds=2,
    batch_size=N,
    local_buckets=1,
    optimizer="sgd",
    lr=LR,
    checkpoint_every=0,
)


def make_part(a=4, seed=0, nan_agent=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(a, N, F)).astype(np.float32)
    if nan_agent is not None:
        x[nan_agent] = np.nan
    y = rng.integers(0, C, size=(a, N)).astype(np.int32)
    n_train = np.asarray((N_TRAIN * a)[:a], np.int32)
    return train_is_test_partition(x, y, n_train, C)


def build(cfg, part, active=None):
    """``(rounds, device partition)``; ``active`` fixes the participants: bool
    ``[A]`` every round, or ``[T, A]`` row t in round t (``run`` passes round t
    the key ``PRNGKey(1 + t)``, whose second word is ``1 + t``)."""
    plugin, ctx, rounds = train.build(cfg, jax.tree.map(jnp.asarray, part))
    if active is not None:
        act = jnp.asarray(active, bool)
        steps = jnp.full(act.shape[-1:], local._NO_LIMIT, jnp.int32)
        if act.ndim == 1:
            masks = lambda key, n: (act, steps)  # noqa: E731
        else:
            masks = lambda key, n: (act[key[1] - 1], steps)  # noqa: E731
        ctx = dataclasses.replace(ctx, round_masks=masks)
        rounds = plugin.build(ctx)
    return rounds, jax.tree.map(jnp.asarray, part)


def run(cfg, part, rounds_n=2, active=ACTIVE):
    rounds, dev = build(cfg, part, active)
    state0 = rounds.init(jax.random.PRNGKey(0), dev)
    state, infos = state0, []
    for t in range(rounds_n):
        state, info = run_round(rounds, state, dev, jax.random.PRNGKey(1 + t), t)
        infos.append(info)
    return rounds, dev, state0, state, infos


# ------------------------------------------------------------- local references


def model_logits(p, x):
    """MLR (``Dense_0``) or one-hidden-layer MLP (``Dense_0``, ``Dense_1``)."""
    h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    if "Dense_1" in p:
        h = jax.nn.relu(h) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    return h


@jax.jit
def _sgd_step(p, x, y, mask):
    def loss(q):
        ce = -jnp.take_along_axis(jax.nn.log_softmax(model_logits(q, x)), y[:, None], 1)
        return jnp.sum(ce[:, 0] * mask) / jnp.sum(mask)

    return jax.tree.map(lambda a, b: a - LR * b, p, jax.grad(loss)(p))


def local_step(p, part, i):
    """One full-batch SGD step of agent ``i`` on its real rows."""
    mask = (np.arange(N) < int(part.n_train[i])).astype(np.float32)
    return _sgd_step(p, part.x_train[i], part.y_train[i], mask)


LAYERS = {  # flat layout: layers in name order, bias before kernel
    "mlr": [("Dense_0", (F, C))],
    "mlp": [("Dense_0", (F, H)), ("Dense_1", (H, C))],
}


def unflatten(flat, layers):
    out, o = {}, 0
    for name, (fi, fo) in layers:
        b = flat[o : o + fo]
        k = flat[o + fo : o + fo + fi * fo].reshape(fi, fo)
        out[name] = {"bias": b, "kernel": k}
        o += fo + fi * fo
    return out


def flatten(p, layers):
    return jnp.concatenate(
        [jnp.concatenate([p[n]["bias"], p[n]["kernel"].ravel()]) for n, _ in layers]
    )


def agent(tree, i):
    return jax.tree.map(lambda v: v[i], tree)


# ----------------------------------------------------------------------- FetchSGD


def np_sketch(v, buckets, signs, cols):
    rows, d = buckets.shape
    t = np.zeros((rows, cols))
    for r in range(rows):
        for j in range(d):
            t[r, buckets[r, j]] += signs[r, j] * v[j]
    return t


def np_unsketch(t, buckets, signs):
    rows, d = buckets.shape
    est = np.zeros(d)
    for j in range(d):
        est[j] = np.median([signs[r, j] * t[r, buckets[r, j]] for r in range(rows)])
    return est


# FetchSGD's participants per round: agents 0 and 1 miss a round each.
ACTIVE_T = np.array(
    [[True, True, False, True], [False, True, True, True], [True, False, True, True]]
)


@pytest.mark.parametrize(
    "aggregator,nan_agent,download",
    [("mean", 3, "changed"), ("median", None, "model")],
)
def test_fetchsgd_rounds_match_numpy_count_sketch(aggregator, nan_agent, download):
    """Three rounds of Algorithm 1 (momentum and error feedback carried over)
    against a NumPy Count Sketch and a Python loop over agents: sketches, their
    mean (or bucket-wise median), momentum, error, top-k unsketch, bucket zeroing,
    the model step; the NaN agent is counted as diverged and left out. Download
    bytes: the whole model, or the coordinates of the model that changed since
    the agent last took part (8 bytes each, at most the model's 48)."""
    rows, cols, k, rho, slr = 3, 7, 4, 0.8, 0.7
    cfg = tiny_config(
        algorithm="fetchsgd", num_agents=4, model="mlr", aggregator=aggregator
    )
    cfg.fetchsgd.update(rows=rows, cols=cols, k=k, rho=rho, lr=slr, download=download)
    part = make_part(nan_agent=nan_agent)
    _, _, s0, state, infos = run(cfg, part, rounds_n=3, active=ACTIVE_T)
    combine = np.mean if aggregator == "mean" else np.median

    layers = LAYERS["mlr"]
    model_bytes = (F * C + C) * 4
    b, s = np.asarray(s0.buckets), np.asarray(s0.signs, np.float64)
    w = np.asarray(flatten(s0.w, layers), np.float64)
    mom, err = np.zeros((rows, cols)), np.zeros((rows, cols))
    history, seen = [w], [None] * 4  # the model at each round's start
    for t in range(3):
        tables, down = [], 0
        for i in range(4):
            if not ACTIVE_T[t, i]:
                continue
            if download == "model" or seen[i] is None:
                down += model_bytes
            else:
                moved = np.zeros(w.shape, bool)
                for r in range(seen[i], t):
                    moved |= history[r + 1] != history[r]
                down += min(8 * int(moved.sum()), model_bytes)
            seen[i] = t
            if i == nan_agent:  # diverges
                continue
            wi = local_step(unflatten(jnp.asarray(w, jnp.float32), layers), part, i)
            g = w - np.asarray(flatten(wi, layers), np.float64)
            tables.append(np_sketch(g, b, s, cols))
        mom = rho * mom + combine(tables, axis=0)
        err = err + slr * mom
        est = np_unsketch(err, b, s)
        top = np.argsort(-np.abs(est), kind="stable")[:k]  # ties: lower index (top_k)
        for r in range(rows):
            mom[r, b[r, top]] = 0.0
            err[r, b[r, top]] = 0.0
        w = w.copy()
        w[top] -= est[top]
        history.append(w)
        assert float(infos[t]["bytes_down"]) == down
    np.testing.assert_allclose(flatten(state.w, layers), w, atol=1e-5)
    np.testing.assert_allclose(state.mom, mom, atol=1e-5)
    np.testing.assert_allclose(state.err, err, atol=1e-5)
    assert np.count_nonzero(err) < rows * cols  # the zeroing happened
    for info in infos:
        assert int(info["num_active"]) == 3
        assert int(info["num_diverged"]) == (nan_agent is not None)
        assert float(info["bytes_up"]) == 3 * rows * cols * 4
        assert np.isfinite(float(info["train_loss"]))
    if download == "changed":  # fewer than 3 whole models after round 0
        assert float(infos[2]["bytes_down"]) < 3 * model_bytes


def test_sketch_is_linear_and_exact_without_collisions():
    """``sketch`` of many vectors at once equals the per-vector NumPy sketch; with
    one row whose buckets are a permutation, unsketching recovers the vector."""
    d, cols = 6, 6
    v = np.random.default_rng(3).normal(size=(2, d)).astype(np.float32)
    b, s = fetchsgd.make_hashes(jax.random.PRNGKey(4), 3, 4, d)
    sketch = jax.jit(fetchsgd.sketch, static_argnums=3)
    got = sketch(jnp.asarray(v), b, s, 4)
    for a in range(2):
        want = np_sketch(v[a], np.asarray(b), np.asarray(s), 4)
        np.testing.assert_allclose(got[a], want, atol=1e-6)
    perm = jnp.asarray(np.random.default_rng(5).permutation(d)[None], jnp.int32)
    sign = jnp.asarray([[1.0, -1.0, 1.0, 1.0, -1.0, -1.0]])
    t = sketch(jnp.asarray(v), perm, sign, cols)[1]
    est = jax.jit(fetchsgd.unsketch)(t, perm, sign)
    np.testing.assert_allclose(est, v[1], atol=1e-6)


# ------------------------------------------------------------------------- pFedHN


def ref_hypernet(phi, v):
    h = v
    for i, layer in enumerate(phi["mlp"]):
        h = (jax.nn.relu(h) if i else h) @ layer["w"] + layer["b"]
    return h @ phi["head"]["w"] + phi["head"]["b"]


ref_forward = jax.jit(ref_hypernet)


@jax.jit
def ref_vjp(phi, v, cotangent):
    """``(d h / d phi)^T c, (d h / d v)^T c`` of one embedding."""
    return jax.vjp(ref_hypernet, phi, v)[1](cotangent)


def ref_server_step(params, grads, *, lr, embed_lr, wd, clip, momentum, mom):
    """The server optimizer in NumPy: clip by global norm, weight decay, momentum
    trace, then ``-lr`` (phi) / ``-embed_lr`` (emb)."""
    flat = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    norm = np.sqrt(sum(np.sum(g * g) for g in flat))
    scale = clip / max(norm, clip) if clip > 0 else 1.0
    grads = jax.tree.map(lambda g: np.asarray(g, np.float64) * scale, grads)
    grads = jax.tree.map(lambda g, p: g + wd * np.asarray(p, np.float64), grads, params)
    mom = jax.tree.map(lambda g, m: g + momentum * m, grads, mom)
    new = {
        "phi": jax.tree.map(lambda p, m: p - lr * m, params["phi"], mom["phi"]),
        "emb": np.asarray(params["emb"]) - embed_lr * mom["emb"],
    }
    return new, mom


@pytest.mark.parametrize(
    "model,pc,reduce,clip",
    [("mlr", False, "mean", 0.0), ("mlp", True, "sum", 0.05)],
)
def test_pfedhn_rounds_match_per_agent_vjp(model, pc, reduce, clip):
    """Two rounds of Algorithm 1: theta_i = h(v_i), one local SGD step, the server
    step on sum_i (or mean_i) of jax.vjp(h, .)(theta_i - theta~_i) computed agent
    by agent; pFedHN-PC keeps each agent's trained output layer; the NaN agent is
    reset and counted."""
    hp = dict(lr=0.05, embed_lr=0.2, wd=0.01, momentum=0.5, hidden=5, n_hidden=1)
    hp.update(embed_dim=2, server_reduce=reduce, clip=clip, personal_classifier=pc)
    cfg = tiny_config(algorithm="pfedhn", num_agents=4, model=model, hidden=(H,))
    cfg.pfedhn.update(**hp)
    part = make_part(seed=1, nan_agent=3)
    rounds, dev, s0, state, infos = run(cfg, part)

    layers = LAYERS[model]
    body_layers = layers[:-1] if pc else layers
    server = jax.tree.map(np.asarray, {"phi": s0.phi, "emb": s0.emb})
    head = jax.tree.map(np.asarray, s0.head) if pc else None
    mom = jax.tree.map(np.zeros_like, server)
    for _ in range(2):
        g_phi = jax.tree.map(np.zeros_like, server["phi"])
        g_emb = np.zeros_like(server["emb"])
        users = [i for i in range(4) if ACTIVE[i] and i != 3]
        new_head = {k: v.copy() for k, v in head.items()} if pc else None
        for i in users:
            flat = ref_forward(server["phi"], server["emb"][i])
            p = unflatten(flat, body_layers)
            if pc:
                p["Dense_1"] = agent(head, i)
            q = local_step(p, part, i)
            if pc:
                for name in new_head:
                    new_head[name][i] = np.asarray(q["Dense_1"][name])
            gp, gv = ref_vjp(
                server["phi"], server["emb"][i], flat - flatten(q, body_layers)
            )
            g_phi = jax.tree.map(lambda a, c: a + np.asarray(c), g_phi, gp)
            g_emb[i] = np.asarray(gv)
        if reduce == "mean":
            g_phi = jax.tree.map(functools.partial(np.multiply, 1 / len(users)), g_phi)
        server, mom = ref_server_step(
            server, {"phi": g_phi, "emb": g_emb}, lr=hp["lr"],
            embed_lr=hp["embed_lr"], wd=hp["wd"], clip=clip,
            momentum=hp["momentum"], mom=mom,
        )  # fmt: skip
        head = new_head
    got = {"phi": state.phi, "emb": state.emb}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), got, server)
    if pc:
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), state.head, head
        )
        # agents that sat out or diverged keep their output layer
        for i in (1, 3):
            np.testing.assert_array_equal(state.head["kernel"][i], s0.head["kernel"][i])
    d = (H * F + H) if pc else (F * C + C)
    for info in infos:
        assert int(info["num_active"]) == 3 and int(info["num_diverged"]) == 1
        assert float(info["bytes_up"]) == float(info["bytes_down"]) == 3 * d * 4
    # the personal models are h(v_i) (with the agent's own output layer)
    pers = rounds.personal(state, dev, jax.random.PRNGKey(0))
    want = unflatten(ref_forward(server["phi"], server["emb"][2]), body_layers)
    if pc:
        want["Dense_1"] = agent(head, 2)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), agent(pers, 2), want
    )


# ------------------------------------------------------------ vectorized rounds


@pytest.mark.parametrize("algorithm", ["pfedhn", "fetchsgd"])
def test_round_has_no_python_loop_over_agents(algorithm):
    """The traced round and the personal models are the same size for 2 and 6
    agents: the agent axis is an array axis, not a Python loop."""
    sizes = []
    for a in (2, 6):
        cfg = tiny_config(algorithm=algorithm, num_agents=a, model="mlr")
        cfg.pfedhn.embed_dim = 3  # the default grows with A (a shape, not a loop)
        rounds, dev = build(cfg, make_part(a, seed=2))
        sizes.append(traced_sizes(rounds, dev))
    assert sizes[0] == sizes[1]
    assert sizes[0][0] > 20  # the count sees inside the nested jaxprs


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "alg,field,value,match",
    [
        ("pfedhn", "lr", 0.0, r"pfedhn\.lr=0\.0 is not valid; accepted: a finite number in \(0"),
        ("pfedhn", "hidden", 0, r"pfedhn\.hidden=0 is not valid; accepted: an integer in \[1, inf\)"),
        ("pfedhn", "server_reduce", "max", r"pfedhn\.server_reduce='max' .*accepted: mean, sum"),
        ("pfedhn", "personal_classifier", True, r"pfedhn\.personal_classifier=True with model='mlr'"),
        ("fetchsgd", "rows", 0, r"fetchsgd\.rows=0 is not valid; accepted: an integer in \[1, inf\)"),
        ("fetchsgd", "rho", 1.5, r"fetchsgd\.rho=1\.5 is not valid; accepted: a finite number in \[0\.0, 1\.0\]"),
        ("fetchsgd", "lr", -1.0, r"fetchsgd\.lr=-1\.0 is not valid"),
    ],
)  # fmt: skip
def test_bad_hparams_name_the_field(alg, field, value, match):
    cfg = tiny_config(algorithm=alg, num_agents=4, model="mlr")
    cfg[alg][field] = value
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_pfedhn_rejects_a_robust_aggregator():
    cfg = tiny_config(algorithm="pfedhn", num_agents=4, aggregator="median")
    with pytest.raises(ConfigError, match=r"aggregator='median' .*accepted: mean"):
        validate(cfg)


def test_fetchsgd_k_larger_than_the_model_names_the_field():
    cfg = tiny_config(algorithm="fetchsgd", num_agents=4, model="mlr")
    cfg.fetchsgd.k = 13  # D = 12
    validate(cfg)
    with pytest.raises(ConfigError, match=r"fetchsgd\.k=13 .*\[0, 12\]"):
        build(cfg, make_part())


# ----------------------------------------------------------------- end to end

_E2E = [
    "--quiet", "--config.num_agents=4", "--config.num_rounds=2",
    "--config.local_epochs=1", "--config.local_buckets=1",
    "--config.checkpoint_every=0",
]  # fmt: skip


@pytest.mark.cli(
    pfedhn_pc=[*_E2E, "--config.algorithm=pfedhn", "--config.model=mlp",
               "--config.pfedhn.personal_classifier=True"],
    fetchsgd=[*_E2E, "--config.algorithm=fetchsgd", "--config.model=mlr"],
)  # fmt: skip
def test_cli_runs_pfedhn_and_fetchsgd(cli):
    """scripts/run.py runs both for 2 rounds; metrics.jsonl carries the bytes of
    what 4 agents send: pFedHN-PC the MLP body (64*100 + 100 floats) each way;
    FetchSGD a 5 x 70 sketch up (k = ceil(650 / 100) = 7, cols = 10 k) and the
    650-float MLR down."""
    want = {
        "pfedhn_pc": (4 * 6500 * 4, 4 * 6500 * 4, None),
        "fetchsgd": (4 * 5 * 70 * 4, 4 * 650 * 4, "global"),
    }
    for name, (up, down, glob) in want.items():
        for r in cli_records(cli[name]):
            assert r["bytes_up"] == up and r["bytes_down"] == down
            assert 0.0 <= r["c_spe"] <= 1.0 and np.isfinite(r["train_loss"])
            assert (r["global_acc"] is None) == (glob is None)
