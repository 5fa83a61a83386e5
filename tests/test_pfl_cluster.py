"""FedAMP, IFCA and CFL plug-ins: update rules against NumPy references.

Every round reference is multinomial logistic regression (``model='mlr'``,
parameters ``Dense_0/kernel [F, C]`` and ``bias [C]``) trained by one full-batch
SGD step (``batch_size >= n``, ``local_epochs=1``), so the engine's shuffles do
not change the result and every gradient has a closed form in NumPy. Participation
is fixed by replacing the context's ``round_masks``; the references loop over
agents in Python, the plug-ins must not (checked on the traced round).
"""

import dataclasses
import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    cli_records,
    mlr_numpy,
    run_round,
    traced_sizes,
    train_is_test_partition,
)
from helpers import tiny_config as base_config
from scipy.cluster import hierarchy as sch
from scipy.spatial import distance as ssd

from demjax import local, train
from demjax.algorithms import cfl, fedamp, ifca
from demjax.config import validate
from demjax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N, F, C = 4, 3, 3  # training rows per agent (padded), features, classes
tiny_config = functools.partial(
    base_config,
    num_rounds=1,
    batch_size=N,
    local_buckets=1,
    optimizer="sgd",
    checkpoint_every=0,
)


def make_part(n_train, seed=0, labels=None):
    n_train = np.asarray(n_train, np.int32)
    a = len(n_train)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(a, N, F)).astype(np.float32)
    if labels is None:
        y = rng.integers(0, C, size=(a, N)).astype(np.int32)
    else:
        y = np.asarray(labels, np.int32)
    return train_is_test_partition(x, y, n_train, C)


def build(cfg, part, active=None, hp=None):
    """``(ctx, rounds, device partition)``; ``active`` fixes the participants
    (bool ``[A]``, no stragglers), ``hp`` overrides hyper-parameters."""
    plugin, ctx, rounds = train.build(cfg, jax.tree.map(jnp.asarray, part))
    if active is not None or hp is not None:
        changes = {}
        if active is not None:
            act = jnp.asarray(active, bool)
            steps = jnp.full(act.shape, local._NO_LIMIT, jnp.int32)
            changes["round_masks"] = lambda key, n_train: (act, steps)
        if hp is not None:
            changes["hp"] = {**ctx.hp, **hp}
        ctx = dataclasses.replace(ctx, **changes)
        rounds = plugin.build(ctx)
    return ctx, rounds, jax.tree.map(jnp.asarray, part)


def step(rounds, state, dev):
    new, info = run_round(rounds, state, dev, jax.random.PRNGKey(1), 0)
    assert np.isfinite(float(info["train_loss"]))
    return new, jax.device_get(info)


def softmax(z):
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def loss_np(wb, x, y):
    """Mean softmax cross-entropy of ``x @ W + b``."""
    p = softmax(x @ wb[0] + wb[1])
    return -np.mean(np.log(p[np.arange(len(y)), y]))


def grad_np(wb, x, y):
    """Gradient of ``loss_np``."""
    w, b = wb
    p = softmax(x @ w + b)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return x.T @ p, p.sum(0)


mlr = mlr_numpy


def mlr_params(kernel, bias, like):
    """An MLR parameter pytree with the structure of ``like``."""
    out = {"Dense_0": {"kernel": jnp.float32(kernel), "bias": jnp.float32(bias)}}
    assert jax.tree.structure(out) == jax.tree.structure(like)
    return out


def flat(wb):
    return np.concatenate([wb[0].ravel(), wb[1].ravel()])


def close(got, want, atol):
    np.testing.assert_allclose(got[0], want[0], atol=atol)
    np.testing.assert_allclose(got[1], want[1], atol=atol)


def agent_data(part, i):
    m = int(part.n_train[i])
    return part.x_train[i, :m].astype(np.float64), part.y_train[i, :m]


def sgd_step(wb, part, i, lr, extra=(0.0, 0.0)):
    """``wb - lr * (grad F_i(wb) + extra)``."""
    g = grad_np(wb, *agent_data(part, i))
    return tuple(p - lr * (gq + e) for p, gq, e in zip(wb, g, extra, strict=True))


# ----------------------------------------------------------------------- FedAMP


@pytest.mark.parametrize("attention", ["euclidean", "cosine"])
def test_fedamp_round_matches_numpy(attention):
    """Eq. 6-8: attention weights over the participants, cloud models u_i, one
    SGD step on F_i + lam / (2 alpha_k) ||w - u_i||^2; agent 2 sits out."""
    alpha_k, sigma, lam, lr = 0.3, 0.8, 0.15, 0.4
    n_train = [4, 3, 4, 2]
    active = np.array([True, True, False, True])
    a = len(n_train)
    part = make_part(n_train, seed=1)
    cfg = tiny_config(algorithm="fedamp", num_agents=a, lr=lr)
    cfg.fedamp.alpha_k, cfg.fedamp.sigma, cfg.fedamp.lam = alpha_k, sigma, lam
    cfg.fedamp.attention = attention
    ctx, rounds, dev = build(cfg, part, active)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    rng = np.random.default_rng(2)  # distinct personal models
    w0 = jax.tree.map(
        lambda p: p + jnp.float32(0.25 * rng.normal(size=p.shape)), state.w
    )
    state = state.replace(w=w0)
    new, info = step(rounds, state, dev)

    ws = [mlr(state.w, i) for i in range(a)]
    v = np.stack([flat(wb) for wb in ws])
    xi = np.zeros((a, a))
    for i in range(a):  # reference loop over agents
        for j in range(a):
            if j == i or not active[j]:
                continue
            if attention == "euclidean":
                d = np.sum((v[i] - v[j]) ** 2)
            else:
                d = 1.0 - v[i] @ v[j] / (np.linalg.norm(v[i]) * np.linalg.norm(v[j]))
            xi[i, j] = alpha_k * np.exp(-d / sigma) / sigma
        xi[i, i] = 1.0 - xi[i].sum()
    off = xi[~np.eye(a, dtype=bool) & active[None, :]]
    assert off.min() > 0.01 and xi.diagonal().min() > 0  # the attention matters

    got_xi = fedamp_xi(state.w, active, alpha_k, sigma, attention)
    np.testing.assert_allclose(got_xi, xi, atol=1e-6)
    got_u = fedamp.cloud_models(got_xi, state.w)
    mu = lam / alpha_k
    for i in range(a):
        u = tuple(sum(xi[i, j] * ws[j][q] for j in range(a)) for q in range(2))
        close(mlr(got_u, i), u, 1e-6)
        if not active[i]:
            close(mlr(new.w, i), ws[i], 0.0)
            continue
        pull = tuple(mu * (p - uq) for p, uq in zip(ws[i], u, strict=True))
        want = sgd_step(ws[i], part, i, lr, pull)
        close(mlr(new.w, i), want, 1e-5)
        plain = sgd_step(ws[i], part, i, lr)
        assert np.abs(want[0] - plain[0]).max() > 1e-3  # the proximal pull matters
    np.testing.assert_allclose(
        info["self_attention"], xi.diagonal()[active].mean(), atol=1e-6
    )
    assert rounds.global_model is None
    personal = rounds.personal(new, dev, None)
    close(mlr(personal), mlr(new.w), 0.0)


def fedamp_xi(w, active, alpha_k, sigma, attention):
    dist = fedamp.model_distances(w, attention)
    return fedamp.attention_weights(dist, jnp.asarray(active), alpha_k, sigma)


def test_fedamp_cloud_models_are_attention_mixtures():
    """u_i = sum_j xi_ij w_j on every leaf (Eq. 6), rows of xi summing to 1."""
    rng = np.random.default_rng(3)
    xi = rng.uniform(size=(3, 3))
    xi /= xi.sum(1, keepdims=True)
    w = {"a": rng.normal(size=(3, 2, 2)), "b": rng.normal(size=(3, 5))}
    u = fedamp.cloud_models(jnp.float32(xi), jax.tree.map(jnp.float32, w))
    for name, p in w.items():
        want = np.stack([sum(xi[i, j] * p[j] for j in range(3)) for i in range(3)])
        np.testing.assert_allclose(u[name], want, atol=1e-6)


# ------------------------------------------------------------------------- IFCA


@pytest.mark.parametrize("aggregator", ["mean", "median"])
def test_ifca_round_matches_numpy(aggregator):
    """Alg. 2: c_i = argmin_j F_i(theta_j), one SGD step from theta_{c_i}, the
    cluster-wise sample-weighted mean (or per-cluster median) of the participants;
    cluster 2 is chosen by nobody and keeps its model, agent 1 sits out."""
    k, lr = 3, 0.5
    n_train = [4, 4, 4, 3]
    labels = [[0, 0, 0, 1], [0, 0, 2, 0], [1, 1, 1, 0], [1, 2, 1, 0]]
    active = np.array([True, False, True, True])
    a = len(n_train)
    part = make_part(n_train, seed=3, labels=labels)
    cfg = tiny_config(algorithm="ifca", num_agents=a, lr=lr, aggregator=aggregator)
    cfg.ifca.k = k
    ctx, rounds, dev = build(cfg, part, active)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    rng = np.random.default_rng(4)
    kern = 0.3 * rng.normal(size=(k, F, C))
    bias = 2.0 * np.eye(k, C)  # model j favours class j
    state = state.replace(
        models=mlr_params(kern, bias, state.models),
        cluster=jnp.full((a,), 2, jnp.int32),
    )
    new, info = step(rounds, state, dev)

    models = [mlr(state.models, j) for j in range(k)]
    losses = np.array(
        [[loss_np(m, *agent_data(part, i)) for m in models] for i in range(a)]
    )
    choice = losses.argmin(1)
    assert choice.tolist() == [0, 0, 1, 1]  # the construction works
    trained = [sgd_step(models[choice[i]], part, i, lr) for i in range(a)]
    for j in range(k):
        members = [i for i in range(a) if active[i] and choice[i] == j]
        if not members:
            want = models[j]
        elif aggregator == "mean":
            wts = np.array([n_train[i] for i in members], float)
            want = tuple(
                sum(w * trained[i][q] for w, i in zip(wts, members, strict=True))
                / wts.sum()
                for q in range(2)
            )
        else:
            want = tuple(np.median([trained[i][q] for i in members], 0) for q in (0, 1))
        close(mlr(new.models, j), want, 1e-5)
    # cluster 1 (agents 2, 3): the weighted mean and the median differ
    assert np.abs(trained[2][0] - trained[3][0]).max() > 1e-2
    np.testing.assert_array_equal(new.cluster, [0, 2, 1, 1])  # agent 1 keeps its id
    assert info["num_clusters"] == 2.0

    # personal models: the cluster each agent picks with the new models
    new_models = [mlr(new.models, j) for j in range(k)]
    pick = [
        np.argmin([loss_np(m, *agent_data(part, i)) for m in new_models])
        for i in range(a)
    ]
    personal = rounds.personal(new, dev, None)
    for i in range(a):
        close(mlr(personal, i), new_models[pick[i]], 1e-6)


def test_ifca_ties_pick_the_lowest_cluster_and_shared_init():
    got = ifca.choose_clusters(jnp.array([[1.0, 1.0, 1.0], [2.0, 0.5, 0.5]]))
    np.testing.assert_array_equal(got, [0, 1])
    part = make_part([4, 4], seed=5)
    cfg = tiny_config(algorithm="ifca", num_agents=2)
    cfg.ifca.init = "shared"
    _, rounds, dev = build(cfg, part)
    kern = np.asarray(
        rounds.init(jax.random.PRNGKey(0), dev).models["Dense_0"]["kernel"]
    )
    assert kern.shape[0] == 4 and np.all(kern == kern[:1])
    cfg.ifca.init = "random"
    _, rounds, dev = build(cfg, part)
    kern = np.asarray(
        rounds.init(jax.random.PRNGKey(0), dev).models["Dense_0"]["kernel"]
    )
    assert np.abs(kern[1] - kern[0]).max() > 1e-3


# -------------------------------------------------------------------------- CFL


def test_cfl_round_matches_numpy():
    """Alg. 1 without a split: every participant takes one SGD step from its
    cluster model, the split statistics per cluster id, then the cluster-wise
    weighted mean update moves every cluster model (the personal models)."""
    lr = 0.4
    n_train = [4, 3, 4, 4]
    active = np.array([True, True, False, True])
    cid = np.array([0, 0, 3, 3])
    prev_weight = np.array([4.0, 0.0, 2.0, 3.0])  # agent 1 sat out last round
    a = len(n_train)
    part = make_part(n_train, seed=6)
    cfg = tiny_config(algorithm="cfl", num_agents=a, lr=lr)
    ctx, rounds, dev = build(cfg, part, active)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    rng = np.random.default_rng(7)
    k0, b0 = mlr(state.theta, 0)
    offset = [0.3 * rng.normal(size=k0.shape), 0.3 * rng.normal(size=b0.shape)]
    theta = [(k0, b0) if c == 0 else (k0 + offset[0], b0 + offset[1]) for c in cid]
    dth = [  # pending updates of the last round
        (0.1 * rng.normal(size=k0.shape), 0.1 * rng.normal(size=b0.shape))
        for _ in range(a)
    ]

    def stacked(pairs):
        return mlr_params(
            np.stack([p[0] for p in pairs]),
            np.stack([p[1] for p in pairs]),
            state.theta,
        )

    def cluster_mean(upd, wts, c):
        members = [j for j in range(a) if cid[j] == c and wts[j] > 0]
        if not members:
            return np.zeros_like(flat(upd[0]))
        tot = sum(wts[j] for j in members)
        return sum(wts[j] * flat(upd[j]) for j in members) / tot

    def unflat(v):
        return v[: F * C].reshape(F, C), v[F * C :]

    # The cluster models entering the round (the last round's aggregation).
    start = [
        unflat(flat(theta[i]) + cluster_mean(dth, prev_weight, cid[i]))
        for i in range(a)
    ]
    state = state.replace(
        theta=stacked(start),
        dtheta=stacked(dth),
        weight=jnp.float32(prev_weight),
        cluster=jnp.int32(cid),
    )
    new, info = step(rounds, state, dev)

    weight = active * np.asarray(n_train, float)
    upd = []
    for i in range(a):  # reference loop over agents
        if active[i]:
            stepped = sgd_step(start[i], part, i, lr)
            upd.append(tuple(s - p for s, p in zip(stepped, start[i], strict=True)))
        else:
            upd.append((np.zeros_like(k0), np.zeros_like(b0)))
    for i in range(a):
        close(mlr(new.dtheta, i), upd[i], 1e-5)
        want = unflat(flat(start[i]) + cluster_mean(upd, weight, cid[i]))
        close(mlr(new.theta, i), want, 1e-5)
    np.testing.assert_array_equal(new.weight, weight)
    np.testing.assert_array_equal(new.cluster, cid)

    mean_norm, max_norm, count = np.zeros(a), np.zeros(a), np.zeros(a, int)
    for c in range(a):
        members = [j for j in range(a) if cid[j] == c and weight[j] > 0]
        if members:
            mean_norm[c] = np.linalg.norm(cluster_mean(upd, weight, c))
            max_norm[c] = max(np.linalg.norm(flat(upd[j])) for j in members)
            count[c] = len(members)
    np.testing.assert_allclose(new.mean_norm, mean_norm, atol=1e-6)
    np.testing.assert_allclose(new.max_norm, max_norm, atol=1e-6)
    np.testing.assert_array_equal(new.count, count)
    assert mean_norm[0] < max_norm[0] - 1e-3  # the two statistics differ
    assert info["num_clusters"] == 2.0
    np.testing.assert_allclose(info["mean_update_norm"], mean_norm.max(), atol=1e-6)
    np.testing.assert_allclose(info["max_update_norm"], max_norm.max(), atol=1e-6)

    personal = rounds.personal(new, dev, None)
    for i in range(a):
        want = unflat(flat(start[i]) + cluster_mean(upd, weight, cid[i]))
        close(mlr(personal, i), want, 1e-5)


def two_groups(a, seed, scale=2.0, noise=0.1):
    """Flat updates ``[a, F*C + C]``: even agents near ``+v``, odd near ``-v``."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=F * C + C)
    v *= scale / np.linalg.norm(v)
    sign = np.where(np.arange(a) % 2 == 0, 1.0, -1.0)
    return sign[:, None] * v + noise * rng.normal(size=(a, v.size))


def cos_dist(u):
    n = np.linalg.norm(u, axis=1)
    return 1.0 - (u @ u.T) / np.outer(n, n)


@pytest.mark.parametrize("linkage", ["complete", "single", "average"])
def test_cfl_bipartition_matches_references(linkage):
    # two obvious clusters of updates
    upd = two_groups(6, seed=8)
    labels = cfl.bipartition(cos_dist(upd), linkage)
    np.testing.assert_array_equal(labels, [0, 1, 0, 1, 0, 1])
    # random updates on which the three linkages disagree: the root split is
    # scipy's two-cluster cut of the requested linkage
    rng = np.random.default_rng(13)
    upd = rng.normal(size=(7, 5))
    dist = cos_dist(upd)
    labels = cfl.bipartition(dist, linkage)
    assert labels[0] == 0 and 0 < labels.sum() < 7
    ref = {}
    for method in ("complete", "single", "average"):
        z = sch.linkage(ssd.squareform(dist, checks=False), method=method)
        cut = sch.fcluster(z, 2, criterion="maxclust") - 1
        ref[method] = tuple(cut if cut[0] == 0 else 1 - cut)
    assert len(set(ref.values())) == 3
    np.testing.assert_array_equal(labels, ref[linkage])
    if linkage == "single":  # Alg. 1: argmin over bipartitions of max cross alpha
        alpha = 1.0 - dist

        def cross_max(lab):
            lab = np.asarray(lab)
            return alpha[np.ix_(lab == 0, lab == 1)].max()

        best = min(
            cross_max((0,) + rest)
            for rest in itertools.product((0, 1), repeat=6)
            if any(rest)
        )
        np.testing.assert_allclose(cross_max(labels), best, atol=1e-12)


def dtheta_tree(dtheta_flat):
    """Flat MLR updates ``[A, F*C + C]`` -> the parameter pytree."""
    a = dtheta_flat.shape[0]
    kernel = jnp.float32(dtheta_flat[:, : F * C].reshape(a, F, C))
    return {"Dense_0": {"kernel": kernel, "bias": jnp.float32(dtheta_flat[:, F * C :])}}


def cfl_split(part, dtheta_flat, weight, cluster, t, **hp):
    """The cluster ids after CFL's host step on constructed updates."""
    a = len(weight)
    cfg = tiny_config(algorithm="cfl", num_agents=a)
    _, rounds, dev = build(cfg, part, hp=hp)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    dtheta = dtheta_tree(dtheta_flat)
    assert jax.tree.structure(dtheta) == jax.tree.structure(state.theta)
    w, cid = jnp.float32(weight), jnp.int32(cluster)
    mean_norm, max_norm, count = cfl.cluster_stats(dtheta, w, cid)
    state = state.replace(
        dtheta=dtheta,
        weight=w,
        cluster=cid,
        mean_norm=mean_norm,
        max_norm=max_norm,
        count=count,
    )
    split = next(p.host for p in rounds.phases if p.host is not None)
    out, _ = split(state, {}, t, jax.random.PRNGKey(0))
    assert jax.tree.structure(out) == jax.tree.structure(state)
    return np.asarray(out.cluster)


def norms_np(upd, weight, members):
    members = [j for j in members if weight[j] > 0]
    mean = sum(weight[j] * upd[j] for j in members) / sum(weight[j] for j in members)
    return np.linalg.norm(mean), max(np.linalg.norm(upd[j]) for j in members)


def test_cfl_split_criterion_and_bipartition():
    """Split iff t >= warmup, mean norm < eps1, max norm > eps2 and > 2
    participants; the halves follow the cosine similarity of the updates."""
    a = 6
    part = make_part([4, 3, 4, 4, 4, 4], seed=10)
    upd = two_groups(a, seed=11)
    weight = np.array([4.0, 3.0, 4.0, 4.0, 4.0, 4.0])
    one = np.zeros(a, int)
    mean, mx = norms_np(upd, weight, range(a))
    assert mean < 0.5 < 1.5 < mx  # the constructed updates: near stationary
    halves = [0, 1, 0, 1, 0, 1]
    cases = [  # (eps1, eps2, t, expected ids); warmup = 3
        (1.1 * mean, 0.9 * mx, 3, halves),
        (1.1 * mean, 0.9 * mx, 7, halves),
        (1.1 * mean, 0.9 * mx, 2, one),  # warmup
        (0.9 * mean, 0.9 * mx, 3, one),  # mean update too large
        (1.1 * mean, 1.1 * mx, 3, one),  # no agent far from stationary
    ]
    for eps1, eps2, t, want in cases:
        got = cfl_split(part, upd, weight, one, t, eps1=eps1, eps2=eps2, warmup=3)
        np.testing.assert_array_equal(got, want, err_msg=f"{eps1=} {eps2=} {t=}")

    loose = {"eps1": 1e3, "eps2": 1e-6, "warmup": 0}
    # a non-participant stays in the half that keeps the old id, and its update
    # does not enter the statistics
    w5 = weight * (np.arange(a) != 5)
    upd5 = upd * np.where(np.arange(a) == 5, 3.0, 1.0)[:, None]  # the largest
    stats = cfl.cluster_stats(dtheta_tree(upd5), jnp.float32(w5), jnp.int32(one))
    np.testing.assert_allclose(
        [stats[0][0], stats[1][0]], norms_np(upd5, w5, range(a)), rtol=1e-5
    )
    np.testing.assert_array_equal(stats[2], [5, 0, 0, 0, 0, 0])
    got = cfl_split(part, upd5, w5, one, 0, **loose)
    np.testing.assert_array_equal(got, [0, 1, 0, 1, 0, 0])
    # two participants are not split
    w2 = weight * (np.arange(a) < 2)
    np.testing.assert_array_equal(cfl_split(part, upd, w2, one, 0, **loose), one)
    # two clusters split in the same round get distinct fresh ids
    cid = np.array([0, 0, 0, 2, 2, 2])
    upd2 = np.concatenate([upd[[0, 1, 2]], np.roll(upd[[3, 4, 5]], 1, axis=1)])
    got = cfl_split(part, upd2, weight, cid, 0, **loose)
    np.testing.assert_array_equal(got, [0, 1, 0, 2, 3, 2])


# ------------------------------------------------------------ vectorized rounds


@pytest.mark.parametrize("algorithm", ["fedamp", "ifca", "cfl"])
def test_round_has_no_python_loop_over_agents(algorithm):
    """The traced round (and the personal models) are the same size for 3 and 9
    agents: the agent axis is an array axis, not a Python loop."""
    sizes = []
    for a in (3, 9):
        part = make_part([N] * a, seed=12)
        _, rounds, dev = build(tiny_config(algorithm=algorithm, num_agents=a), part)
        sizes.append(traced_sizes(rounds, dev))
    assert sizes[0] == sizes[1]
    assert sizes[0][0] > 20  # the count sees inside the nested jaxprs


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "alg,field,value,match",
    [
        ("fedamp", "alpha_k", 0.0, r"fedamp\.alpha_k=0\.0 is not valid; accepted: a finite number in \("),
        ("fedamp", "sigma", -1.0, r"fedamp\.sigma=-1\.0 is not valid"),
        ("fedamp", "lam", -0.1, r"fedamp\.lam=-0\.1 is not valid; accepted: a finite number in \[0"),
        ("fedamp", "attention", "l1", r"fedamp\.attention='l1' .*euclidean, cosine"),
        ("ifca", "k", 0, r"ifca\.k=0 is not valid; accepted: an integer in \[1, inf\)"),
        ("ifca", "init", "zeros", r"ifca\.init='zeros' .*accepted: random, shared"),
        ("cfl", "eps1", 0.0, r"cfl\.eps1=0\.0 is not valid; accepted: a finite number in \(0\.0, inf\)"),
        ("cfl", "eps2", -1.0, r"cfl\.eps2=-1\.0 is not valid"),
        ("cfl", "warmup", -1, r"cfl\.warmup=-1 is not valid; accepted: an integer in \[0, inf\)"),
        ("cfl", "linkage", "ward", r"cfl\.linkage='ward' .*complete, single, average"),
    ],
)
def test_bad_hparams_name_the_field(alg, field, value, match):
    cfg = tiny_config(algorithm=alg, num_agents=4)
    cfg[alg][field] = value
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


# ----------------------------------------------------------------- end to end


@pytest.mark.cli(
    cfl=[
        "--quiet", "--config.algorithm=cfl", "--config.num_agents=6",
        "--config.model=mlr", "--config.num_rounds=3", "--config.cfl.warmup=0",
        "--config.local_epochs=1", "--config.local_buckets=1",
        "--config.checkpoint_every=0", "--config.cfl.eps1=1000.0",
        "--config.cfl.eps2=1e-6",
    ]
)  # fmt: skip
def test_cli_runs_cfl_and_splits(cli):
    """scripts/run.py with CFL thresholds that split at the first round: the
    host-side split shows in the next round's ``num_clusters``."""
    ok = cli["cfl"]
    recs = cli_records(ok, num_rounds=3)
    assert "cfl on digits" in ok.stdout
    cfg = json.loads((ok.workdir / "config.json").read_text())
    assert cfg["cfl"]["eps1"] == 1000.0 and cfg["cfl"]["warmup"] == 0
    clusters = [r["num_clusters"] for r in recs]
    assert clusters[:2] == [1.0, 2.0] and clusters[2] >= 2.0
    for r in recs:
        assert 0.0 <= r["c_spe"] <= 1.0 and r["global_acc"] is None
