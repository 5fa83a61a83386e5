"""APFL: Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning",
arXiv 2003.13461 (2020), Algorithm 1 and Sec. 3.1 (adaptive mixing weight).

Every agent i keeps a local model ``v_i`` and a mixing weight ``alpha_i``; its
personalized model is the mixture ``vbar_i = alpha_i v_i + (1 - alpha_i) w_i``.
Each round every participating agent i sets ``w_i <- w`` (the global model) and,
for each of its local steps (``local_epochs`` passes over its data in
minibatches xi, the engine's loop), updates, all from the step's old values
(Alg. 1, lines 6-8, and the alpha step of Sec. 3.1)::

    w_i     <- w_i     - lr * grad f_i(w_i; xi)
    v_i     <- v_i     - lr * alpha_i * grad f_i(vbar_i; xi)
    alpha_i <- clip(alpha_i - alpha_lr * <v_i - w_i, grad f_i(vbar_i; xi)>, 0, 1)

(``lr`` = ``config.lr``; ``w_i`` and ``v_i`` go through ``config.optimizer``,
exactly this with ``sgd``; ``alpha_i`` is clipped to [0, 1] as in the authors'
code; ``adaptive=False`` keeps ``alpha_i`` fixed). Every participant uploads
``w_i`` and the server sets ``w <- aggregate(w_i)``, the plain mean over the
participants of Alg. 1 (or the robust ``config.aggregator``); agents download
``w``: one model each way per participant. An agent whose models turn
non-finite keeps ``v_i``, ``alpha_i`` and its optimizer state, is left out of
the mean and counted in ``num_diverged``.

C-SPE / C-GEN evaluate the personalized models ``alpha_i v_i + (1 - alpha_i) w``
with the current global model ``w`` (what agent i holds entering the next round),
Global the model ``w``; ``metrics.jsonl`` adds ``mean_alpha``, the mean of
``alpha_i`` over all agents.

State (leaves stacked over A agents where marked): ``w`` one model (float32, D
parameters); ``v [A, ...]``; ``alpha`` float32 ``[A]``; ``opt [A, ...]`` the
local optimizer state of ``(w_i, v_i, alpha_i)``.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from demjax.algorithms.protocol import Algorithm, HParam, Rounds, one_round
from demjax.local import masked_cross_entropy
from demjax.pytrees import (
    comm_bytes,
    finite_agents,
    masked_mean,
    per_agent,
    round_counts,
    stack,
    tree_bytes,
    where_agents,
)


@flax.struct.dataclass
class APFLState:
    w: object
    v: object
    alpha: jax.Array
    opt: object


HPARAMS = {
    "alpha": HParam(
        0.5,
        "apfl: initial mixing weight alpha_i of the local model, in [0, 1] (paper's "
        "experiments: 0.25, 0.5 or 0.75, or learned; 0.5 here)",
        low=0.0,
        high=1.0,
    ),
    "adaptive": HParam(
        True,
        "apfl: learn alpha_i by gradient steps (Sec. 3.1, the paper's adaptive APFL) "
        "or keep it fixed",
    ),
    "alpha_lr": HParam(
        0.0,
        "apfl: step size of the alpha_i updates (>= 0; 0 = config.lr, the paper's "
        "shared rate)",
        low=0.0,
    ),
}


def mix(alpha, v, w):
    """``alpha v + (1 - alpha) w`` for one agent (scalar ``alpha``) or stacked
    (``alpha [A]``, leaves ``[A, ...]``)."""

    def one(vv, ww):
        a = per_agent(alpha, vv) if jnp.ndim(alpha) else alpha
        return a * vv + (1.0 - a) * ww

    return jax.tree.map(one, v, w)


def make_grad_fn(apply_fn, adaptive: bool):
    """The trainer's ``grad_fn`` over ``params = {"w", "v", "alpha"}`` of one
    agent (``alpha`` a float32 scalar).

    Returns:
      ``grad_fn(params, xb [B, ...], yb [B], mask bool [B], anchor, mu, key) ->
      (grads, ce)`` with ``grads = {"w": grad f(w), "v": alpha grad f(vbar),
      "alpha": <v - w, grad f(vbar)>}`` (0 when not ``adaptive``) and ``ce`` the
      personalized model's minibatch loss ``f(vbar)`` (``anchor``, ``mu``
      unused).
    """

    def ce_fn(params, xb, yb, mask, key):
        return masked_cross_entropy(apply_fn(params, xb, True, key), yb, mask)

    grad_ce = jax.value_and_grad(ce_fn)

    def grad_fn(params, xb, yb, mask, anchor, mu, key):
        w, v, alpha = params["w"], params["v"], params["alpha"]
        _, g_w = grad_ce(w, xb, yb, mask, key)
        ce, g_bar = grad_ce(mix(alpha, v, w), xb, yb, mask, key)
        g_v = jax.tree.map(lambda g: alpha * g, g_bar)
        if adaptive:
            g_alpha = sum(
                jnp.vdot(a - b, g)
                for a, b, g in zip(
                    jax.tree.leaves(v),
                    jax.tree.leaves(w),
                    jax.tree.leaves(g_bar),
                    strict=True,
                )
            )
        else:
            g_alpha = jnp.zeros_like(alpha)
        return {"w": g_w, "v": g_v, "alpha": g_alpha.astype(alpha.dtype)}, ce

    return grad_fn


def clipped_sgd(lr: float) -> optax.GradientTransformation:
    """Projected SGD on [0, 1]: ``p <- clip(p - lr * g, 0, 1)``."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params):
        new = jax.tree.map(
            lambda p, g: jnp.clip(p - lr * g, 0.0, 1.0) - p, params, updates
        )
        return new, state

    return optax.GradientTransformation(init, update)


def make_tx(model_tx: optax.GradientTransformation, alpha_lr: float):
    """``model_tx`` on ``w`` and ``v``; ``clipped_sgd(alpha_lr)`` on ``alpha``."""
    return optax.multi_transform(
        {"model": model_tx, "alpha": clipped_sgd(alpha_lr)},
        lambda p: {
            "w": jax.tree.map(lambda _: "model", p["w"]),
            "v": jax.tree.map(lambda _: "model", p["v"]),
            "alpha": "alpha",
        },
    )


def build(ctx) -> Rounds:
    alpha0 = float(ctx.hp["alpha"])
    adaptive = bool(ctx.hp["adaptive"])
    alpha_lr = float(ctx.hp["alpha_lr"]) or float(ctx.config.lr)
    tx = make_tx(ctx.tx, alpha_lr)
    train = ctx.trainer(grad_fn=make_grad_fn(ctx.apply_fn, adaptive), tx=tx)
    num_agents = ctx.num_agents

    def init(key, part):
        w = ctx.init_model(key)
        v = stack(w, num_agents)
        alpha = jnp.full((num_agents,), alpha0, jnp.float32)
        opt = jax.vmap(tx.init)({"w": v, "v": v, "alpha": alpha})
        return APFLState(w=w, v=v, alpha=alpha, opt=opt)

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_train, k_agg = jax.random.split(jax.random.fold_in(key, 17))
        w0 = stack(state.w, num_agents)
        params = {"w": w0, "v": state.v, "alpha": state.alpha}
        out, opt, loss = train(
            jax.random.split(k_train, num_agents),
            params,
            state.opt,
            part.x_train,
            part.y_train,
            part.n_train,
            w0,  # anchor unused by grad_fn
            jnp.float32(0.0),
            max_steps,
        )
        finite = finite_agents(out)
        trained = active & finite
        weight = trained.astype(jnp.float32)
        w_i = where_agents(trained, out["w"], w0)  # no NaN reaches the mean
        mean = ctx.aggregate(w_i, weight, k_agg)
        any_trained = jnp.any(trained)
        w = jax.tree.map(lambda m, o: jnp.where(any_trained, m, o), mean, state.w)
        alpha = jnp.where(trained, out["alpha"], state.alpha)
        new = APFLState(
            w=w,
            v=where_agents(trained, out["v"], state.v),
            alpha=alpha,
            opt=where_agents(trained, opt, state.opt),
        )
        one_model = tree_bytes(state.w)
        info = {
            "train_loss": masked_mean(jnp.where(trained, loss, 0.0), weight),
            "mean_alpha": jnp.mean(alpha),
            **round_counts(active, active & ~finite),
            **comm_bytes(one_model, active, one_model, active),
        }
        return new, info

    def personal(state, part, key):
        return mix(state.alpha, state.v, stack(state.w, num_agents))

    return one_round(
        ctx,
        init=init,
        round=round_fn,
        personal=personal,
        global_model=lambda state: state.w,
    )


ALGORITHM = Algorithm(
    name="apfl",
    citation="Deng, Kamani, Mahdavi, arXiv 2003.13461 (2020), Algorithm 1 (APFL)",
    hparams=HPARAMS,
    build=build,
)


__all__ = ["ALGORITHM", "clipped_sgd", "make_grad_fn", "make_tx", "mix"]
