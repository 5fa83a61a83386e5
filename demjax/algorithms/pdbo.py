"""PDBO: Terashita & Hara, "Personalized Decentralized Bilevel Optimization over
Stochastic and Directed Networks" (arXiv 2210.02129): personalization as a
bilevel problem with client-wise hyper-parameters ``lambda_i`` (outer) and
shared parameters ``x`` (inner), solved over a stochastic directed network with
push-sum communication only.

Bilevel problem (the paper's Sec. 3, written here for A agents)::

    min_{lambda_1..A}  sum_i g_i(x*(lambda), lambda_i)          (outer, validation)
    s.t.  x*(lambda) = argmin_x  sum_i f_i(x, lambda_i)          (inner, training)

Inner: Stochastic Gradient Push (``demjax.algorithms.sgp``, Assran et al. 2019,
Algorithm 1) on ``f_i``: agents reach consensus on ``x`` over the stochastic
directed network ``config.network*``.

Hyper-parameters (``pdbo.mode``; the paper's Sec. 5 personalization types):

- ``da`` (per-class loss weights): ``f_i = mean_n C softmax(lambda_i^cls)[y_n]
  CE_n`` over the agent's training rows; one shared model.
- ``mtl`` (mixture of ``k`` shared learners): ``p_i(y|x) = sum_k
  softmax(lambda_i^mix)_k p_k(y|x)``; ``f_i`` = its mean negative log-likelihood.
- ``da_mtl``: both (class weights on the mixture's NLL).

Outer loss ``g_i`` = mean NLL of agent i's model (``p_i``) on its validation rows
(the last ``val_fraction`` of its training data, not used by the inner problem)
``+ l2 / 2 * ||lambda_i||^2``.

Hyper-gradient push (HGP, the paper's Sec. 4 decentralized hyper-gradient
estimate). With ``H = mean_j d^2 f_j / dx^2`` and ``b = mean_j d g_j / dx`` at
the de-biased SGP parameters ``z_j``, the implicit-function hyper-gradient of the
total outer loss is::

    d/d lambda_i sum_j g_j = d g_i/d lambda_i - d^2 f_i/(d lambda_i dx) H^-1 b

``u = H^-1 b`` is estimated by a push-sum Neumann series (``hgp_steps = M``,
step ``alpha``), all vectors ``[A, D]`` and every product vmapped over agents::

    q_i = d g_i/dx (z_i), s_i = 0, w_i = 1
    repeat M times (a fresh stochastic graph P each step):
        q, s, w <- P q, P s, P w                        (push-sum mixing)
        s_i <- s_i + alpha q_i
        q_i <- q_i - alpha * Hvp_i(z_i, q_i / w_i)      (jax.jvp of jax.grad)
    s, w <- P s, P w;   u_i = s_i / w_i ~ alpha sum_m (I - alpha H)^m b

Column stochasticity keeps ``sum_i q_i`` equal to ``A (I - alpha H)^m b`` once
the ``q_i / w_i`` agree, so every ``u_i -> H^-1 b``. The mixed partial
``d^2 f_i/(d lambda_i dx) u_i`` is a ``jax.jvp`` of ``grad_lambda f_i`` in x
along ``u_i``. The full-batch losses behind ``b``, the Hessian-vector products
and the mixed partials take all of an agent's rows in one call when every
agent's fit in a quarter of the free memory, else are summed chunk by chunk
(``row_chunked_sum``: a checkpointed scan; ``hgp_batch`` rows per chunk, 0 =
the fewest chunks that fit, measured by ``auto_row_chunk``). Each agent
then takes one optax Adam step (``outer_lr``) on its ``lambda_i`` every
``outer_every`` rounds, after the round's SGP steps.

Divergence guard: the SGP steps undo a gradient step that turns an agent's
``x_i`` non-finite and stop its training for the round (``sgp``); the agent
then sits out the round's HGP, as does any agent whose outer gradients or
Hessian-vector products turn non-finite (``q_i = 0``, no Hessian-vector product,
``lambda_i`` and its Adam state unchanged): nothing non-finite is pushed to a
neighbour. ``num_diverged`` counts both. Communication (float32, every push to
an active out-neighbour, self-loops excluded, received as sent so ``bytes_up``
= ``bytes_down``): each SGP mixing step pushes ``x_i`` (all k learners) and
``omega_i``; on outer rounds each of the M HGP steps pushes ``q_i``, ``s_i``
(``x``-shaped) and ``w_i``, and the last mixing ``s_i`` and ``w_i``;
``lambda_i`` never leaves the agent.

Evaluation: C-SPE / C-GEN use each agent's model ``p_i`` (its de-biased ``z_i``
and its ``lambda_i``); Global uses the mean ``z`` with the mean ``lambda``.

State: ``x [A, k, ...]`` (k = 1 for ``da``), ``omega [A]``, ``opt [A, ...]``,
``lam = {"cls": [A, C], "mix": [A, k]}``, ``outer_opt [A, ...]`` (Adam).
"""

from __future__ import annotations

import logging

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from demjax import network
from demjax.algorithms.protocol import Algorithm, HParam, Rounds, one_round
from demjax.algorithms.sgp import make_sgp_steps
from demjax.pytrees import (
    agent_bytes,
    comm_bytes,
    finite_agents,
    round_counts,
    stack,
    where_agents,
)

MODES = ("da", "mtl", "da_mtl")


@flax.struct.dataclass
class PDBOState:
    x: object
    omega: jax.Array
    opt: object
    lam: object
    outer_opt: object


HPARAMS = {
    "mode": HParam(
        "da_mtl",
        "pdbo: hyper-parameters lambda_i: da (per-class loss weights C softmax), "
        "mtl (mixture weights over k shared learners), da_mtl (both; default)",
        choices=MODES,
    ),
    "outer_lr": HParam(
        0.05,
        "pdbo: Adam learning rate of lambda_i (> 0; demjax default)",
        low=0.0,
        low_open=True,
    ),  # fmt: skip
    "hgp_steps": HParam(
        10, "pdbo: M, push-sum Neumann steps of the HGP estimate (>= 1)", low=1
    ),
    "hgp_alpha": HParam(
        0.0,
        "pdbo: Neumann step alpha of HGP (< 2 / max Hessian eigenvalue); 0 = config.lr",
        low=0.0,
    ),
    "num_learners": HParam(
        3, "pdbo: k shared learners of the mtl / da_mtl mixture (>= 1)", low=1
    ),
    "l2": HParam(
        1e-3,
        "pdbo: L2 penalty l2 / 2 * ||lambda_i||^2 in the outer loss (>= 0)",
        low=0.0,
    ),  # fmt: skip
    "outer_every": HParam(
        1, "pdbo: one hyper-gradient (outer) step every k rounds (>= 1)", low=1
    ),
    "hgp_batch": HParam(
        0,
        "pdbo: rows per chunk of the full-batch losses of the hyper-gradient "
        "(>= 0; 0 = auto: all rows when they fit in a quarter of the free "
        "memory, else the fewest chunks that do); same result to float tolerance",
        low=0,
    ),
    "val_fraction": HParam(
        0.2,
        "pdbo: fraction of each agent's training rows held out for the outer "
        "loss, [0, 0.9]; 0 = the outer loss uses the training rows",
        low=0.0,
        high=0.9,
    ),
}


def mixture_log_probs(apply_fn, learners, lam, xb, train, key, use_mix: bool):
    """Log ``p_i(y|x)`` of one agent, float32 ``[B, C]``.

    Args:
      learners: k stacked models (leaves ``[k, ...]``); lam: ``{"cls": [C],
        "mix": [k]}``; use_mix: mixture weights ``softmax(lam["mix"])`` (else k
        must be 1).
    """
    logits = jax.vmap(lambda p: apply_fn(p, xb, train, key))(learners)  # [k, B, C]
    logp = jax.nn.log_softmax(logits, axis=-1)
    if not use_mix:
        return logp[0]
    logw = jax.nn.log_softmax(lam["mix"])
    return jax.nn.logsumexp(logp + logw[:, None, None], axis=0)


def weighted_nll(logp, y, mask, lam, use_cls: bool):
    """``sum_n m_n w_n NLL_n / sum_n m_n`` with ``w = C softmax(lam["cls"])[y]``
    (``use_cls``) or 1; logp ``[B, C]``, y int ``[B]``, mask bool ``[B]``."""
    count = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    return weighted_nll_sum(logp, y, mask, lam, use_cls) / count


def weighted_nll_sum(logp, y, mask, lam, use_cls: bool):
    """``sum_n m_n w_n NLL_n`` (``weighted_nll`` before its division)."""
    nll = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
    m = mask.astype(jnp.float32)
    if use_cls:
        c = logp.shape[-1]
        m = m * c * jax.nn.softmax(lam["cls"])[y]
    return jnp.sum(nll * m)


def row_chunked_sum(row_sum, x, lam, rows, chunk: int):
    """``row_sum(x, lam, rows)`` over all rows, evaluated ``chunk`` rows at a time.

    ``row_sum`` must be a sum over rows (zero for a row whose mask is False):
    the rows are padded with masked rows to a multiple of ``chunk`` and summed
    chunk by chunk in a ``lax.scan`` whose body is ``jax.checkpoint``-ed, so a
    gradient (or a Hessian-vector product: ``jax.jvp`` of ``jax.grad``) keeps
    one chunk's activations at a time instead of all rows' (one more forward
    pass per chunk in the backward pass). Same value as one call to float
    tolerance.

    Args:
      row_sum: ``row_sum(x, lam, (xr [n, ...], yr [n], mask bool [n])) -> scalar``.
      rows: ``(xr [N, ...], yr [N], mask bool [N])`` of one agent.
      chunk: rows per chunk (>= 1); ``chunk >= N`` is one call.
    """
    xr, yr, mask = rows
    n = yr.shape[0]
    if chunk >= n:
        return row_sum(x, lam, rows)
    num = -(-n // chunk)
    pad = num * chunk - n

    def split(v, fill):
        v = jnp.concatenate([v, jnp.full((pad,) + v.shape[1:], fill, v.dtype)])
        return v.reshape((num, chunk) + v.shape[1:])

    chunks = (split(xr, 0), split(yr, 0), split(mask, False))

    @jax.checkpoint
    def body(total, part):
        return total + row_sum(x, lam, part), None

    total, _ = jax.lax.scan(body, jnp.float32(0.0), chunks)
    return total


def auto_row_chunk(hvp_rows, num_rows: int, num_agents: int,
                   budget_bytes: int) -> tuple[int, dict]:  # fmt: skip
    """Rows per chunk of the HGP's full-batch losses that fit ``budget_bytes``.

    ``hvp_rows(n)`` returns ``(fn, args)``: one agent's Hessian-vector product on
    ``n`` rows (abstract ``args``). XLA's ``memory_analysis`` of it compiled at
    2 and 8 rows gives the temporary bytes per row ``b``; ``c``, the largest
    row count with ``num_agents * c * b <= budget_bytes`` (at least 1), sets the
    number of chunks ``ceil(num_rows / c)``, and the rows are split evenly
    over them (chunk ``ceil(num_rows / chunks)``, the least padding);
    ``num_rows`` when all rows fit.

    Returns:
      ``(chunk, report)``: report holds ``bytes_per_row`` and ``budget_bytes``.
    """
    from demjax import memory  # deferred: memory imports the model zoo

    temp = {}
    for n in (2, 8):
        fn, args = hvp_rows(n)
        temp[n] = memory.probe_step(fn, *args)["temp_bytes"]
    per_row = max(-(-(temp[8] - temp[2]) // 6), 1)  # int bytes, rounded up
    chunk = int(budget_bytes // (per_row * max(num_agents, 1)))
    chunk = max(1, min(num_rows, chunk))
    # As many chunks as that needs, evened out: the least padding (120 rows at
    # most 54 at a time: 3 chunks of 40, not 3 of 54 with 42 padded rows).
    num_chunks = -(-num_rows // chunk)
    chunk = -(-num_rows // num_chunks)
    return chunk, {"bytes_per_row": int(per_row), "budget_bytes": int(budget_bytes)}


def hypergradient_push(net, key, z, lam, inner_loss, outer_loss, data_in,
                       data_out, alpha: float, num_steps: int):  # fmt: skip
    """The HGP estimate of ``d/d lambda_i sum_j g_j(x*(lambda), lambda_j)``.

    Args:
      net: ``demjax.network.Network`` (one graph sample per step).
      key: PRNG key of the graph samples.
      z: de-biased inner parameters, leaves ``[A, ...]``.
      lam: hyper-parameters, leaves ``[A, ...]``.
      inner_loss: ``inner_loss(x, lam_i, data_in_i) -> scalar`` of ONE agent.
      outer_loss: ``outer_loss(x, lam_i, data_out_i) -> scalar`` of ONE agent.
      data_in, data_out: per-agent data, leaves ``[A, ...]``.
      alpha: Neumann step (``0 < alpha < 2 / max eig(H)``).
      num_steps: M.

    Returns:
      ``(hypergrad, u)``: lam-shaped leaves ``[A, ...]``, and each agent's
      estimate ``u_i ~ H^-1 b`` (z-shaped). ``guarded_hypergradient_push``
      gives the same with the divergence guard's outputs.
    """
    hyper, u, _, _ = guarded_hypergradient_push(
        net, key, z, lam, inner_loss, outer_loss, data_in, data_out, alpha, num_steps
    )
    return hyper, u


def inner_hvp(inner_loss):
    """``hvp(x, lam_i, d, v) = d^2 f_i/dx^2 v`` of one agent's ``inner_loss``
    (``jax.jvp`` of ``jax.grad`` in x), x-shaped."""
    grad_x_f = jax.grad(inner_loss, argnums=0)

    def hvp(x, lam_i, d, v):
        return jax.jvp(lambda xx: grad_x_f(xx, lam_i, d), (x,), (v,))[1]

    return hvp


def stacked_learners(ctx, key, k: int):
    """k freshly initialized models stacked on a leading axis (leaves ``[k, ...]``)."""
    keys = jax.random.split(key, k)
    return jax.tree.map(lambda *ls: jnp.stack(ls), *[ctx.init_model(kk) for kk in keys])


def guarded_hypergradient_push(net, key, z, lam, inner_loss, outer_loss, data_in,
                               data_out, alpha: float, num_steps: int,
                               ok=None):  # fmt: skip
    """``hypergradient_push`` with the divergence guard and its traffic.

    An agent takes part while its outer gradients and Hessian-vector products
    are finite (and ``ok`` holds): an excluded agent starts with ``q_i = 0``,
    adds no Hessian-vector product (its mixing stays finite: no non-finite mass
    reaches its neighbours) and gets a zero hyper-gradient.

    Args:
      ok: bool ``[A]`` agents allowed to take part (None: all).
      (the others as ``hypergradient_push``).

    Returns:
      ``(hypergrad, u, ok, sent)``: ``ok`` bool ``[A]`` the agents that took part
      to the end; ``sent`` float32 bytes pushed (``(q_i, s_i, w_i)`` at each of
      the M steps, ``(s_i, w_i)`` at the last mixing, to every active
      out-neighbour but itself).
    """
    grad_l_f = jax.grad(inner_loss, argnums=1)
    hvp = inner_hvp(inner_loss)

    def mixed(x, lam_i, d, u):
        return jax.jvp(lambda xx: grad_l_f(xx, lam_i, d), (x,), (u,))[1]

    g_x, g_l = jax.vmap(jax.grad(outer_loss, argnums=(0, 1)))(z, lam, data_out)
    num_agents = jax.tree.leaves(z)[0].shape[0]
    if ok is None:
        ok = jnp.ones((num_agents,), bool)
    ok = ok & finite_agents(g_x) & finite_agents(g_l)
    zero_x = jax.tree.map(jnp.zeros_like, g_x)
    g_x = where_agents(ok, g_x, zero_x)
    vhvp = jax.vmap(hvp)
    others = np.asarray(net.senders != net.receivers)  # static: no self-loop

    def pushes(weights):
        return jnp.sum((weights > 0) & others).astype(jnp.float32)

    def step(carry, k):
        q, s, w, ok, count = carry
        weights = net.sample(k)
        q, s, w = net.mix(weights, (q, s, w))
        s = jax.tree.map(lambda a, b: a + alpha * b, s, q)
        hq = vhvp(z, lam, data_in, network.debias(q, w))
        ok = ok & finite_agents(hq)
        hq = where_agents(ok, hq, zero_x)
        q = jax.tree.map(lambda a, b: a - alpha * b, q, hq)
        return (q, s, w, ok, count + pushes(weights)), None

    keys = jax.random.split(key, num_steps + 1)
    init = (g_x, zero_x, jnp.ones((num_agents,)), ok, jnp.float32(0.0))
    (q, s, w, ok, count), _ = jax.lax.scan(step, init, keys[:-1])
    last = net.sample(keys[-1])
    s, w = net.mix(last, (s, w))
    u = network.debias(s, w)
    jac_u = jax.vmap(mixed)(z, lam, data_in, u)
    ok = ok & finite_agents(jac_u)
    hyper = jax.tree.map(jnp.subtract, g_l, jac_u)
    hyper = where_agents(ok, hyper, jax.tree.map(jnp.zeros_like, hyper))
    msg = agent_bytes(z)
    sent = count * jnp.float32(2 * msg + 4) + pushes(last) * jnp.float32(msg + 4)
    return hyper, u, ok, sent


def choose_rows(ctx, inner_loss, k: int) -> dict:
    """``{"rows": chunk}`` for ``hgp_batch=0``: ``auto_row_chunk`` with one
    agent's Hessian-vector product of ``inner_loss`` (k learners), every agent
    of every replica at once, a quarter of the free memory; ``{}`` (all rows in
    one call) when they fit. Logged."""
    from demjax import memory

    part = ctx.partition
    num_rows = int(part.y_train.shape[1])
    learners = jax.eval_shape(lambda key: stacked_learners(ctx, key, k),
                              jax.random.PRNGKey(0))  # fmt: skip
    lam = {
        "cls": jax.ShapeDtypeStruct((ctx.num_classes,), jnp.float32),
        "mix": jax.ShapeDtypeStruct((k,), jnp.float32),
    }

    hvp = inner_hvp(inner_loss)

    def hvp_rows(n):
        d = (
            jax.ShapeDtypeStruct((n, *part.x_train.shape[2:]), part.x_train.dtype),
            jax.ShapeDtypeStruct((n,), part.y_train.dtype),
            jax.ShapeDtypeStruct((n,), jnp.bool_),
        )
        return hvp, (learners, lam, d, learners)

    agents = ctx.num_agents * int(ctx.config.num_replicas)
    budget = memory.available_bytes() // 4
    chunk, report = auto_row_chunk(hvp_rows, num_rows, agents, budget)
    logging.info(
        "pdbo: hyper-gradient losses in chunks of %d of %d rows (%d bytes per "
        "row and agent, %d agents, budget %d bytes)",
        chunk, num_rows, report["bytes_per_row"], agents, budget,
    )  # fmt: skip
    return {} if chunk >= num_rows else {"rows": chunk}


def build(ctx) -> Rounds:
    hp = ctx.hp
    mode = hp["mode"]
    use_cls = mode in ("da", "da_mtl")
    use_mix = mode in ("mtl", "da_mtl")
    k = int(hp["num_learners"]) if use_mix else 1
    l2 = float(hp["l2"])
    alpha = float(hp["hgp_alpha"]) or float(ctx.config.lr)
    m_steps = int(hp["hgp_steps"])
    outer_every = int(hp["outer_every"])
    val_fraction = float(hp["val_fraction"])
    hgp_batch = int(hp["hgp_batch"])  # 0: chosen in init, from the data's rows
    net = network.from_config(ctx.config, ctx.num_agents)
    num_agents, num_classes = ctx.num_agents, ctx.num_classes
    outer_tx = optax.adam(float(hp["outer_lr"]))

    def model_logp(learners, lam, xb, train, key, apply_fn=ctx.apply_fn):
        return mixture_log_probs(apply_fn, learners, lam, xb, train, key, use_mix)

    def sgp_loss(z, lam, xb, yb, mask, key):
        logp = model_logp(z, lam, xb, True, key)
        loss = weighted_nll(logp, yb, mask, lam, use_cls)
        return loss, weighted_nll(logp, yb, mask, lam, False)

    steps = make_sgp_steps(
        net, ctx.tx, sgp_loss, int(ctx.config.batch_size), int(ctx.config.local_epochs)
    )

    # The full-batch losses of the hyper-gradient, chosen["rows"] rows at a time
    # (absent: all rows in one call).
    chosen = {"rows": hgp_batch} if hgp_batch else {}

    def full_batch_nll(x, lam, d, cls: bool):
        def row_sum(x, lam, rows):
            xr, yr, mask = rows
            return weighted_nll_sum(model_logp(x, lam, xr, False, None), yr, mask,
                                    lam, cls)  # fmt: skip

        count = jnp.maximum(jnp.sum(d[2].astype(jnp.float32)), 1.0)
        chunk = chosen.get("rows", d[2].shape[0])
        return row_chunked_sum(row_sum, x, lam, d, chunk) / count

    def inner_loss(x, lam, d):
        return full_batch_nll(x, lam, d, use_cls)

    def outer_loss(x, lam, d):
        sq = sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(lam))
        return full_batch_nll(x, lam, d, False) + 0.5 * l2 * sq

    if not hgp_batch and ctx.partition is not None:
        chosen.update(choose_rows(ctx, inner_loss, k))

    def splits(part):
        n = part.n_train
        if val_fraction > 0:
            n_val = jnp.clip((val_fraction * n).astype(jnp.int32), 1, n - 1)
        else:
            n_val = jnp.zeros_like(n)
        n_in = n - n_val
        rows = jnp.arange(part.y_train.shape[1])[None, :]
        in_mask = rows < n_in[:, None]
        val_mask = (rows >= n_in[:, None]) & (rows < n[:, None])
        if val_fraction == 0:
            val_mask = in_mask
        return n_in, in_mask, val_mask

    def init(key, part):
        learners = stacked_learners(ctx, key, k)
        x = jax.tree.map(jnp.array, stack(learners, num_agents))
        lam = {
            "cls": jnp.zeros((num_agents, num_classes), jnp.float32),
            "mix": jnp.zeros((num_agents, k), jnp.float32),
        }
        return PDBOState(
            x=x,
            omega=network.push_sum_weights(num_agents),
            opt=jax.vmap(ctx.tx.init)(x),
            lam=lam,
            outer_opt=jax.vmap(outer_tx.init)(lam),
        )

    def outer_step(args):
        state, part, key, ok = args
        _, in_mask, val_mask = splits(part)
        z = network.debias(state.x, state.omega)
        hyper, _, ok, sent = guarded_hypergradient_push(
            net,
            key,
            z,
            state.lam,
            inner_loss,
            outer_loss,
            (part.x_train, part.y_train, in_mask),
            (part.x_train, part.y_train, val_mask),
            alpha,
            m_steps,
            ok,
        )
        if not use_cls:
            hyper = {**hyper, "cls": jnp.zeros_like(hyper["cls"])}
        if not use_mix:
            hyper = {**hyper, "mix": jnp.zeros_like(hyper["mix"])}
        updates, outer_opt = jax.vmap(outer_tx.update)(
            hyper, state.outer_opt, state.lam
        )
        lam = optax.apply_updates(state.lam, updates)
        lam, outer_opt = where_agents(
            ok, (lam, outer_opt), (state.lam, state.outer_opt)
        )
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(h)) for h in jax.tree.leaves(hyper)))
        new = state.replace(lam=lam, outer_opt=outer_opt)
        return new, norm / num_agents, ~ok, sent

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        n_in, _, _ = splits(part)
        x, omega, opt, ce, diverged, messages = steps(
            state.x,
            state.omega,
            state.opt,
            state.lam,
            part.x_train,
            part.y_train,
            n_in,
            jax.random.fold_in(key, 23),
            active,
            max_steps,
        )
        state = state.replace(x=x, omega=omega, opt=opt)
        state, hnorm, excluded, hgp_bytes = jax.lax.cond(
            (t + 1) % outer_every == 0,
            outer_step,
            lambda args: (
                args[0],
                jnp.float32(0.0),
                jnp.zeros((num_agents,), bool),
                jnp.float32(0.0),
            ),
            (state, part, jax.random.fold_in(key, 29), ~diverged),
        )
        act = (active & ~diverged).astype(jnp.float32)
        # SGP pushes carry x_i (the k learners) and omega_i (float32).
        push = agent_bytes(state.x) + 4
        sgp = comm_bytes(push, messages, push, messages)
        info = {
            "train_loss": jnp.sum(ce * act) / jnp.maximum(jnp.sum(act), 1.0),
            "hypergrad_norm": hnorm,
            "omega_min": jnp.min(state.omega),
            **round_counts(active, diverged | excluded),
            "bytes_up": sgp["bytes_up"] + hgp_bytes,
            "bytes_down": sgp["bytes_down"] + hgp_bytes,
        }
        return state, info

    def personal(state, part, key):
        return {"x": network.debias(state.x, state.omega), "lam": state.lam}

    def global_model(state):
        p = personal(state, None, None)
        return jax.tree.map(lambda v: jnp.mean(v, axis=0), p)

    def eval_apply(params, xb, train, key):
        return model_logp(params["x"], params["lam"], xb, False, None,
                          apply_fn=ctx.eval_apply_fn)  # fmt: skip

    return one_round(
        ctx,
        init=init,
        round=round_fn,
        personal=personal,
        global_model=global_model,
        eval_apply=eval_apply,
    )


ALGORITHM = Algorithm(
    name="pdbo",
    citation="Terashita & Hara, arXiv 2210.02129: bilevel problem (Sec. 3), "
    "hyper-gradient push (Sec. 4), DA / MTL personalization (Sec. 5); inner SGP "
    "(Assran et al., ICML 2019, Algorithm 1)",
    hparams=HPARAMS,
    build=build,
    shard_mapped=False,  # its own gossip steps, not Context.trainer
)

__all__ = [
    "MODES",
    "auto_row_chunk",
    "ALGORITHM",
    "PDBOState",
    "guarded_hypergradient_push",
    "hypergradient_push",
    "mixture_log_probs",
    "row_chunked_sum",
    "weighted_nll",
    "weighted_nll_sum",
]
