"""Stochastic directed networks, push-sum, SGP and PDBO (issue 8).

Each test checks against an independent reference: NumPy loops over edges, the
true average, binomial statistics, the hyper-gradient obtained by differentiating
through an unrolled inner loop (``jax.grad``) and a closed form, an SGP round by
hand in NumPy.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_round, train_is_test_partition
from helpers import tiny_config as base_config

from demjax import config as config_lib
from demjax import data, network, train
from demjax.algorithms.pdbo import auto_row_chunk, hypergradient_push, row_chunked_sum
from demjax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tiny_config = functools.partial(base_config, num_agents=6, checkpoint_every=0)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    """Tiny programs, compile-bound: skip XLA's expensive passes in this module."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def directed_ring(a: int) -> np.ndarray:
    """Bool ``[A, A]``: edges i -> i + 1 (mod A) and one chord 0 -> A // 2."""
    adj = np.zeros((a, a), bool)
    adj[np.arange(a), (np.arange(a) + 1) % a] = True
    adj[0, a // 2] = True
    return adj


def numpy_mixing(net, weights):
    """Reference column-stochastic matrix from the active edges, by a loop.

    Returns ``(P [A, A], active bool [E])``: ``P[j, i] = 1 / outdeg_i`` for every
    active edge i -> j, outdeg counted over active out-edges incl. the self-loop.
    """
    w = np.asarray(weights)
    active = w > 0
    a = net.num_agents
    outdeg = np.zeros(a)
    for e in range(net.num_edges):
        if active[e]:
            outdeg[net.senders[e]] += 1
    p = np.zeros((a, a))
    for e in range(net.num_edges):
        if active[e]:
            p[net.receivers[e], net.senders[e]] += 1.0 / outdeg[net.senders[e]]
    return p, active


# --------------------------------------------------------------------- push-sum


@pytest.mark.parametrize(
    "graph,impl", [("erdos_renyi", "dense"), ("directed_ring", "sparse")]
)
def test_push_sum_reaches_the_true_average_on_a_stochastic_directed_graph(graph, impl):
    a, steps = 10, 400
    if graph == "erdos_renyi":
        net = network.build(a, "erdos_renyi", "directed", edge_prob=0.3, impl=impl)
    else:
        net = network.build(
            a, "file", "directed", adjacency=directed_ring(a), impl=impl, seed=1
        )
    x0 = np.random.default_rng(0).normal(size=(a, 3)).astype(np.float32)

    @jax.jit
    def run(x, key):
        def step(carry, k):
            xx, om = carry
            w = net.sample(k)
            return (net.mix(w, xx), net.mix(w, om)), None

        init = (x, network.push_sum_weights(a))
        (x, omega), _ = jax.lax.scan(step, init, jax.random.split(key, steps))
        return x, omega

    x, omega = run(jnp.asarray(x0), jax.random.PRNGKey(4))
    x, omega = np.asarray(x), np.asarray(omega)
    mean = x0.mean(axis=0)
    np.testing.assert_allclose(x.sum(0), x0.sum(0), atol=1e-4)  # mass conserved
    np.testing.assert_allclose(omega.sum(), a, rtol=1e-5)
    np.testing.assert_allclose(x / omega[:, None], np.broadcast_to(mean, x.shape),
                               atol=1e-4)  # fmt: skip
    z = np.asarray(network.debias(jnp.asarray(x), jnp.asarray(omega)))
    np.testing.assert_allclose(z, x / omega[:, None], rtol=1e-6)
    # Not doubly stochastic: the weights (and x itself) are not at the average.
    assert np.abs(omega - 1).max() > 0.05


# ----------------------------------------------------------------------- mixing


@pytest.mark.parametrize("mode", ["directed", "undirected", "static"])
def test_mixing_equals_numpy_edge_loop_and_is_column_stochastic(mode):
    a = 7
    nets = {
        impl: network.build(a, "erdos_renyi", mode, edge_prob=0.6, impl=impl, seed=2)
        for impl in network.NETWORK_IMPLS
    }
    net = nets["dense"]
    weights = jax.jit(net.sample)(jax.random.PRNGKey(5))
    p_ref, active = numpy_mixing(net, weights)
    loops = net.senders == net.receivers
    assert loops.sum() == a and active[loops].all()  # self-loops always on
    if mode == "static":
        assert active.all()
    else:
        assert not active.all()  # some edge is off at this step
    np.testing.assert_allclose(p_ref.sum(axis=0), np.ones(a), atol=1e-12)
    np.testing.assert_allclose(np.asarray(net.matrix(weights)), p_ref, atol=1e-6)
    rng = np.random.default_rng(1)
    tree = {
        "w": rng.normal(size=(a, 2, 3)).astype(np.float32),
        "b": rng.normal(size=(a,)).astype(np.float32),
    }
    ref = {}
    for name, x in tree.items():  # reference: loop over edges
        out = np.zeros(x.shape, np.float64)
        for e in range(net.num_edges):
            i, j = net.senders[e], net.receivers[e]
            out[j] += p_ref[j, i] * x[i]
        ref[name] = out
    for impl, nn in nets.items():
        got = jax.jit(nn.mix)(weights, jax.tree.map(jnp.asarray, tree))
        for name in tree:
            np.testing.assert_allclose(got[name], ref[name], atol=1e-5, err_msg=impl)
            assert got[name].dtype == np.float32


# ------------------------------------------------------------- edge activation


def _activation_samples(net, num):
    keys = jax.random.split(jax.random.PRNGKey(11), num)
    return np.asarray(jax.jit(jax.vmap(net.sample))(keys)) > 0  # [num, E]


@pytest.mark.parametrize("mode", ["directed", "undirected"])
def test_edge_activation_rates_and_direction_independence(mode):
    a, num = 8, 4000
    net = network.build(a, "complete", mode, rates=(0.4, 0.8), seed=3)
    act = _activation_samples(net, num)
    loops = net.senders == net.receivers
    assert act[:, loops].all()
    r = net.rates[~loops].astype(np.float64)
    assert r.min() >= 0.4 and r.max() <= 0.8
    edges = zip(net.senders, net.receivers, strict=True)
    edge = {(int(s), int(t)): e for e, (s, t) in enumerate(edges)}
    pairs = [(edge[(i, j)], edge[(j, i)]) for i in range(a) for j in range(i + 1, a)]
    fwd, bwd = np.array(pairs).T
    # Rates ~ U(0.4, 0.8): one per pair (undirected) or per direction (directed).
    n_rates = len(pairs) if mode == "undirected" else 2 * len(pairs)
    assert abs(r.mean() - 0.6) < 3.5 * 0.4 / np.sqrt(12 * n_rates)
    # Empirical activation frequency of every edge = its rate (binomial, 5 sigma).
    freq = act[:, ~loops].mean(0)
    sigma = np.sqrt(r * (1 - r) / num)
    assert np.all(np.abs(freq - r) < 5 * sigma), np.abs(freq - r).max()
    both = (act[:, fwd] & act[:, bwd]).mean(0)
    rf, rb = net.rates[fwd].astype(np.float64), net.rates[bwd].astype(np.float64)
    if mode == "undirected":
        np.testing.assert_array_equal(net.rates[fwd], net.rates[bwd])
        np.testing.assert_array_equal(act[:, fwd], act[:, bwd])  # one draw per pair
    else:
        assert np.abs(rf - rb).max() > 0.05  # rates drawn per direction
        assert (act[:, fwd] != act[:, bwd]).mean() > 0.2
        # Independent directions: P(i->j and j->i) = r_ij * r_ji.
        prod = rf * rb
        sigma = np.sqrt(prod * (1 - prod) / num)
        assert np.all(np.abs(both - prod) < 5 * sigma), np.abs(both - prod).max()


def test_static_mode_keeps_every_edge_on():
    net = network.build(6, "erdos_renyi", "static", edge_prob=0.5, seed=4)
    act = _activation_samples(net, 50)
    assert act.all()
    np.testing.assert_array_equal(net.adjacency(), net.adjacency().T)
    assert net.adjacency().diagonal().all()


# --------------------------------------------------------------------------- HGP

A_HGP, D_HGP, L_HGP = 5, 3, 2


def _quadratic_problem():
    """Tiny bilevel problem: strongly convex quadratic inner losses whose Hessian
    and linear term depend on lambda, quadratic outer losses."""
    rng = np.random.default_rng(7)
    a, d, m = A_HGP, D_HGP, L_HGP
    q = []
    for _ in range(a):
        u, _ = np.linalg.qr(rng.normal(size=(d, d)))
        q.append(u @ np.diag(rng.uniform(0.5, 1.5, d)) @ u.T)
    data_in = (
        jnp.asarray(np.stack(q), jnp.float32),  # Q_i [A, D, D]
        jnp.asarray(rng.normal(size=(a, d)), jnp.float32),  # c_i [A, D]
        jnp.asarray(rng.normal(size=(a, m, d)), jnp.float32),  # B_i [A, L, D]
    )
    data_out = jnp.asarray(rng.normal(size=(a, d)), jnp.float32)  # t_i [A, D]
    lam = jnp.asarray(0.3 * rng.normal(size=(a, m)), jnp.float32)

    def inner_loss(x, lam_i, d_i):
        q_i, c_i, b_i = d_i
        r = x - c_i
        return (
            0.5 * r @ q_i @ r
            + lam_i @ (b_i @ x)
            + 0.05 * jnp.exp(lam_i[0]) * jnp.sum(x * x)
        )

    def outer_loss(x, lam_i, t_i):
        return 0.5 * jnp.sum((x - t_i) ** 2) + 0.05 * jnp.sum(lam_i**2) + 0.3 * lam_i[1]

    return inner_loss, outer_loss, data_in, data_out, lam


def test_hgp_matches_grad_through_unrolled_inner_loop():
    inner_loss, outer_loss, data_in, data_out, lam = _quadratic_problem()
    a = A_HGP

    def mean_inner(x, lam):
        return jnp.mean(jax.vmap(inner_loss, (None, 0, 0))(x, lam, data_in))

    def unrolled(lam):  # gradient descent on the inner problem (H eig 0.9..1.2)
        def step(x, _):
            return x - 0.8 * jax.grad(mean_inner)(x, lam), None

        x, _ = jax.lax.scan(step, jnp.zeros(D_HGP), None, length=60)
        return x

    def total_outer(lam):
        x = unrolled(lam)
        return jnp.sum(jax.vmap(outer_loss, (None, 0, 0))(x, lam, data_out))

    @jax.jit
    def references(lam):
        x = unrolled(lam)
        ref = jax.grad(total_outer)(lam)  # through the unrolled loop
        # Implicit-function closed form, and the local-only estimate (each agent
        # its own Hessian and outer gradient).
        v = jnp.linalg.solve(
            jax.hessian(mean_inner)(x, lam),
            jnp.mean(jax.vmap(jax.grad(outer_loss), (None, 0, 0))(x, lam, data_out), 0),
        )

        def per_agent(l_i, d_i, t_i):
            g_l = jax.grad(outer_loss, 1)(x, l_i, t_i)
            mixed = jax.jacfwd(jax.grad(inner_loss, 1), 0)(x, l_i, d_i)  # [L, D]
            own = jnp.linalg.solve(
                jax.hessian(inner_loss)(x, l_i, d_i), jax.grad(outer_loss)(x, l_i, t_i)
            )
            return g_l - mixed @ v, g_l - mixed @ own

        closed, local = jax.vmap(per_agent)(lam, data_in, data_out)
        return x, ref, closed, local, v

    x_star, ref, closed, local, v = (np.asarray(t) for t in references(lam))
    np.testing.assert_allclose(ref, closed, rtol=1e-4, atol=1e-5)
    assert np.abs(ref).max() > 0.1
    scale = np.abs(ref).max()
    # The local-only estimate is far off: the test tells a network-wide estimate
    # from a local one.
    assert np.abs(local - ref).max() / scale > 0.1

    z = jnp.broadcast_to(jnp.asarray(x_star), (a, D_HGP))
    runs = {  # name -> (network mode, Neumann step alpha, M)
        "static": ("static", 0.5, 60),
        "directed_small": ("directed", 0.05, 400),
        "directed_big": ("directed", 0.5, 60),
    }
    nets = {m: network.build(a, "complete", m, rates=(0.4, 0.8), seed=6)
            for m in ("static", "directed")}  # fmt: skip

    @jax.jit
    @jax.vmap
    def hgp_all(key):
        return {
            name: hypergradient_push(
                nets[mode],
                key,
                z,
                lam,
                inner_loss,
                outer_loss,
                data_in,
                data_out,
                alpha,
                steps,
            )  # fmt: skip
            for name, (mode, alpha, steps) in runs.items()
        }

    out = hgp_all(jax.random.split(jax.random.PRNGKey(2), 3))
    err, u_err = {}, {}
    for name, (hyper, u) in out.items():
        err[name] = np.abs(np.asarray(hyper) - ref).max(axis=(1, 2)) / scale
        u_err[name] = np.abs(np.asarray(u) - v).max()
    # Static complete graph: exact consensus before every Hessian-vector product,
    # so HGP is the Neumann series of H^-1 b itself.
    assert err["static"].max() < 1e-4 and u_err["static"] < 1e-4, (err, u_err)
    # Stochastic directed graph: push-sum's consensus error biases the estimate
    # by O(alpha); with a small Neumann step it is within a few percent.
    small, big = err["directed_small"], err["directed_big"]
    assert small.mean() < 0.03 and u_err["directed_small"] < 0.05, (err, u_err)
    assert small.mean() < 0.3 * big.mean(), err


def test_row_chunked_sum_matches_one_call_in_value_gradient_and_hvp():
    """Chunked (padded, checkpointed scan) vs one call of a row sum: value,
    gradient and Hessian-vector product, with masked rows and a ragged tail."""
    rng = np.random.default_rng(3)
    n, f = 10, 4
    xr = jnp.asarray(rng.normal(size=(n, f)), jnp.float32)
    yr = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
    mask = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
    w = jnp.asarray(rng.normal(size=(f, 3)), jnp.float32)
    lam = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(f, 3)), jnp.float32)

    def row_sum(w, lam, rows):
        x, y, m = rows
        err = jnp.tanh(x @ w) @ lam - y
        return jnp.sum(jnp.where(m, err**2, 0.0))

    def value_grad_hvp(chunk):
        def f(w):
            return row_chunked_sum(row_sum, w, lam, (xr, yr, mask), chunk)

        g = jax.grad(f)
        return f(w), g(w), jax.jvp(g, (w,), (v,))[1]

    ref = value_grad_hvp(n)
    # The reference by hand: a NumPy-side sum over the unmasked rows only.
    keep = np.asarray(mask)
    err = np.tanh(np.asarray(xr)[keep] @ np.asarray(w)) @ np.asarray(lam)
    np.testing.assert_allclose(ref[0], np.sum((err - np.asarray(yr)[keep]) ** 2),
                               rtol=1e-5)  # fmt: skip
    for chunk in (1, 3, 4):
        for got, want in zip(value_grad_hvp(chunk), ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert float(jnp.abs(ref[2]).max()) > 0.1  # a non-trivial HVP


def test_auto_row_chunk_measures_bytes_per_row_and_fits_the_budget():
    """A Hessian-vector product whose rows each hold a [1000] hidden layer
    (4,000 bytes float32, and its tangent): the measured bytes per row are at
    least that, and the chunk is the budget divided by agents x bytes per row."""
    w = jax.ShapeDtypeStruct((256, 1000), jnp.float32)

    def hvp(w, x, v):
        g = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) ** 2))
        return jax.jvp(g, (w,), (v,))[1]

    def hvp_rows(n):
        return hvp, (w, jax.ShapeDtypeStruct((n, 256), jnp.float32), w)

    chunk, rep = auto_row_chunk(hvp_rows, 500, 4, 10**15)
    per_row = rep["bytes_per_row"]
    assert chunk == 500 and 4_000 <= per_row <= 100_000, rep
    chunk, _ = auto_row_chunk(hvp_rows, 500, 4, 4 * 100 * per_row + 1)
    assert chunk == 100  # 5 chunks of 100 rows fit the budget exactly
    chunk, _ = auto_row_chunk(hvp_rows, 500, 4, 4 * 120 * per_row + 1)
    assert chunk == 100  # 120 fit, but 5 chunks of 100 pad less than 120s
    chunk, _ = auto_row_chunk(hvp_rows, 500, 4, 1)
    assert chunk == 1  # never 0: one row at a time at worst


def test_pdbo_round_is_the_same_for_any_hgp_batch():
    """One PDBO round (SGP steps + the hyper-gradient step) with the HGP losses
    summed 3 rows at a time equals the round with all rows in one call."""
    out = {}
    for chunk in (3, 0):  # 0: auto (all rows of these tiny agents fit)
        cfg = tiny_config(algorithm="pdbo", num_rounds=1, **{"pdbo.hgp_batch": chunk})
        part = jax.tree.map(jnp.asarray, data.make_partition(cfg))
        _, _, rounds = train.build(cfg, part)
        state = rounds.init(jax.random.PRNGKey(0), part)
        out[chunk] = run_round(rounds, state, part, jax.random.PRNGKey(1), 0)
    (s3, i3), (s_all, i_all) = out[3], out[0]
    assert float(i_all["hypergrad_norm"]) > 0
    np.testing.assert_allclose(i3["hypergrad_norm"], i_all["hypergrad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s3.lam), jax.tree.leaves(s_all.lam), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(s_all.lam["cls"]).max()) > 0  # the outer step moved lambda


# ------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("network", "ring", r"network='ring' is not valid; accepted: complete"),
        ("network_mode", "random", r"network_mode='random' is not valid; accepted"),
        ("network_impl", "csr", r"network_impl='csr' is not valid; accepted: dense"),
        ("network_rates", "0.9,0.4", r"network_rates='0.9,0.4' is not valid"),
        ("network_rates", "abc", r"network_rates='abc' is not valid"),
        ("network_rates", "0,0.5", r"network_rates='0,0.5' is not valid"),
        ("network_rates", "0.2,0.4,0.6", r"network_rates='0.2,0.4,0.6' is not"),
        ("network_edge_prob", 0.0, r"network_edge_prob=0.0 is not valid"),
        ("network_edge_prob", 1.5, r"network_edge_prob=1.5 is not valid"),
        ("network", "file", r"network_file='' is not valid for network='file'"),
        ("pdbo.mode", "personal", r"pdbo.mode='personal' is not valid; accepted: da"),
        (
            "pdbo.hgp_steps",
            0,
            r"pdbo.hgp_steps=0 is not valid; accepted: an integer in \[1",
        ),
        (
            "pdbo.outer_lr",
            0.0,
            r"pdbo.outer_lr=0.0 is not valid; accepted: a finite number in \(0",
        ),
        ("pdbo.val_fraction", 0.95, r"pdbo.val_fraction=0.95 is not valid"),
        ("pdbo.num_learners", 0, r"pdbo.num_learners=0 is not valid"),
        (
            "pdbo.hgp_batch",
            -1,
            r"pdbo.hgp_batch=-1 is not valid; accepted: an integer in \[0",
        ),
        (
            "sgp.mix_every",
            0,
            r"sgp.mix_every=0 is not valid; accepted: an integer in \[1",
        ),
    ],
)
def test_bad_network_and_pdbo_config_names_the_field(field, value, message):
    c = tiny_config(algorithm="pdbo", **{field: value})
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(c)


def test_bad_network_file_and_graph_names_the_field(tmp_path):
    def from_file(adj, mode="directed", name="g.npy", a=4):
        path = str(tmp_path / name)
        if adj is not None and name.endswith(".npy"):
            np.save(path, adj)
        elif adj is not None:
            np.savetxt(path, adj)
        c = tiny_config(network="file", network_file=path, network_mode=mode)
        return network.from_config(c, a)

    with pytest.raises(ConfigError, match=r"network_file='.*missing.npy' does not"):
        from_file(None, name="missing.npy")
    with pytest.raises(ConfigError, match=r"network_file=.* holds a \(3, 3\) matrix"):
        from_file(np.ones((3, 3)))
    with pytest.raises(ConfigError, match=r"network_file=.* entries other than 0"):
        from_file(np.full((4, 4), 2.0))
    two_parts = np.kron(np.eye(2), np.ones((2, 2)))
    with pytest.raises(ConfigError, match=r"network_file .* not strongly connected"):
        from_file(two_parts)
    with pytest.raises(ConfigError, match=r"network_file .*non-symmetric.*undirected"):
        from_file(directed_ring(4).astype(float), mode="undirected")
    # A valid text file: the directed ring is read edge for edge.
    net = from_file(directed_ring(4).astype(float), name="g.txt")
    np.testing.assert_array_equal(
        net.adjacency(), directed_ring(4) | np.eye(4, dtype=bool)
    )
    with pytest.raises(ConfigError, match=r"network_edge_prob=0.001 gives no conn"):
        network.build(30, "erdos_renyi", edge_prob=0.001)


# ----------------------------------------------------------------- SGP and PDBO


def _partition(a, n, f, c, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(a, n, f)).astype(np.float32)
    y = rng.integers(0, c, size=(a, n)).astype(np.int32)
    n_train = np.full((a,), n, np.int32)
    n_train[1] = n - 1  # one agent with a padding row
    return train_is_test_partition(x, y, n_train, c)


def _softmax_grad(w, b, x, y, c):
    """NumPy gradient of the mean softmax cross-entropy of ``x @ w + b``."""
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return x.T @ p, p.sum(0)


def test_sgp_round_matches_numpy_push_sum_sgd(tmp_path):
    """One SGP step (full batch) on a static directed ring, from distinct models
    and push-sum weights: gradient at ``z = x / omega``, then ``x, omega <- P``."""
    a, n, f, c, lr = 4, 4, 3, 3, 0.5
    part = _partition(a, n, f, c)
    ring = directed_ring(a)
    np.save(tmp_path / "ring.npy", ring.astype(np.int64))
    cfg = tiny_config(algorithm="sgp", num_agents=a, batch_size=n, lr=lr,
                      network="file", network_file=str(tmp_path / "ring.npy"))  # fmt: skip
    _, _, rounds = train.build(cfg, jax.tree.map(jnp.asarray, part))
    dev = jax.tree.map(jnp.asarray, part)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    rng = np.random.default_rng(3)
    x0 = jax.tree.map(
        lambda p: p + jnp.asarray(rng.normal(size=p.shape), jnp.float32), state.x
    )
    omega0 = jnp.asarray([1.0, 0.5, 1.5, 1.0], jnp.float32)
    state = state.replace(x=x0, omega=omega0)
    new, info = jax.jit(rounds.round)(state, dev, jax.random.PRNGKey(1), jnp.int32(0))

    # Static directed ring with a chord from agent 0: P[j, i] = 1 / outdeg_i.
    adj = ring | np.eye(a, dtype=bool)
    p = (adj / adj.sum(1, keepdims=True)).T
    w, b = (np.asarray(x0["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    om = np.asarray(omega0, np.float64)
    half_w, half_b = np.empty_like(w), np.empty_like(b)
    for i in range(a):  # reference loop over agents
        zw, zb = w[i] / om[i], b[i] / om[i]
        m = part.n_train[i]
        gw, gb = _softmax_grad(zw, zb, part.x_train[i, :m], part.y_train[i, :m], c)
        half_w[i], half_b[i] = w[i] - lr * gw, b[i] - lr * gb
    np.testing.assert_allclose(new.omega, p @ om, rtol=1e-6)
    np.testing.assert_allclose(
        new.x["Dense_0"]["kernel"], np.einsum("ji,ikl->jkl", p, half_w), atol=1e-5
    )
    np.testing.assert_allclose(new.x["Dense_0"]["bias"], p @ half_b, atol=1e-5)
    assert np.isfinite(float(info["train_loss"]))


def test_sgp_agents_reach_consensus_on_static_complete_graph():
    a = 6
    part = _partition(a, 8, 5, 3, seed=1)
    cfg = tiny_config(algorithm="sgp", num_agents=a, batch_size=4, lr=0.3)
    _, _, rounds = train.build(cfg, jax.tree.map(jnp.asarray, part))
    dev = jax.tree.map(jnp.asarray, part)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    # Start from different models and weights: one mixing step already averages.
    rng = np.random.default_rng(2)
    state = state.replace(
        x=jax.tree.map(
            lambda p: p + jnp.asarray(rng.normal(size=p.shape), jnp.float32), state.x
        ),
        omega=jnp.asarray(rng.uniform(0.5, 1.5, a), jnp.float32),
    )
    x0, omega0 = state.x, state.omega
    round_fn = jax.jit(rounds.round)
    for t in range(2):
        state, info = round_fn(state, dev, jax.random.PRNGKey(t), jnp.int32(t))
    z = rounds.personal(state, dev, None)
    # Mixing conserves sum(omega) and averages it at once on a complete graph.
    np.testing.assert_allclose(state.omega, np.full(a, np.mean(omega0)), rtol=1e-5)
    for leaf, leaf0 in zip(jax.tree.leaves(z), jax.tree.leaves(x0), strict=True):
        leaf = np.asarray(leaf)
        np.testing.assert_allclose(leaf, np.broadcast_to(leaf[0], leaf.shape),
                                   atol=1e-6)  # fmt: skip
        start = np.asarray(leaf0).mean(0) / np.mean(omega0)
        assert np.abs(leaf[0] - start).max() > 1e-3  # trained
    g = rounds.global_model(state)
    for lg, lz in zip(jax.tree.leaves(g), jax.tree.leaves(z), strict=True):
        np.testing.assert_allclose(lg, np.asarray(lz)[0], atol=1e-6)
    assert np.isfinite(float(info["train_loss"]))


@pytest.mark.cli(
    pdbo=[
        "--quiet", "--config.algorithm=pdbo", "--config.num_agents=6",
        "--config.model=mlr", "--config.num_rounds=2", "--config.local_epochs=1",
        "--config.network=erdos_renyi", "--config.network_mode=directed",
        "--config.network_edge_prob=0.5", "--config.network_impl=sparse",
        "--config.pdbo.hgp_steps=1", "--config.pdbo.num_learners=2",
        "--config.checkpoint_every=0",
    ]
)  # fmt: skip
def test_cli_runs_pdbo_on_a_stochastic_directed_network(cli):
    out = cli["pdbo"]
    assert out.returncode == 0, out.stderr
    assert "pdbo on digits" in out.stdout
    cfg = json.loads((out.workdir / "config.json").read_text())
    assert cfg["network_mode"] == "directed" and cfg["pdbo"]["hgp_steps"] == 1
    recs = [
        json.loads(x) for x in (out.workdir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in recs] == [0, 1]
    for r in recs:
        assert 0.0 <= r["c_spe"] <= 1.0 and 0.0 <= r["global_acc"] <= 1.0
        assert np.isfinite(r["train_loss"]) and r["hypergrad_norm"] > 0
        assert 0 < r["omega_min"] <= 1.0 + 1e-6
