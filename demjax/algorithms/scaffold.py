"""SCAFFOLD: Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning", ICML 2020, Algorithm 1.

The server holds the model ``x`` and a control variate ``c``; every agent i holds
its own control variate ``c_i`` (all zero at the start). Each round every
participating agent i

1. sets ``y_i <- x`` and takes its ``K_i`` local steps (``local_epochs`` passes
   over its data in minibatches, the engine's loop) with the corrected gradient
   (Alg. 1, line 10)::

       y_i <- y_i - lr * (g_i(y_i) - c_i + c)

   (``lr`` = ``config.lr``; with ``optimizer='sgd'`` exactly this, another
   ``config.optimizer`` is fed the corrected gradient);
2. updates its control variate by option II (Alg. 1, line 12)::

       c_i+ <- c_i - c + (x - y_i) / (K_i * lr)

   with ``K_i`` the steps it took (``local_epochs * ceil(n_i / batch_size)``, or
   fewer for a straggler; an agent without steps keeps ``c_i``);
3. uploads ``(dy_i, dc_i) = (y_i - x, c_i+ - c_i)`` and sets ``c_i <- c_i+``;

and the server (Alg. 1, lines 16-17), over the set S of participants::

    x <- x + server_lr * aggregate(dy_i)       (the plain mean over S)
    c <- c + (1 / A) * sum_{i in S} dc_i       (A agents in all)

``aggregate`` is the unweighted mean of the paper or the robust
``config.aggregator``. Agents download ``(x, c)`` and upload ``(dy_i, dc_i)``:
two models each way per participant (``bytes_up`` / ``bytes_down``). An agent
whose ``y_i`` turns non-finite keeps its ``c_i`` and optimizer state, is left out
of S and counted in ``num_diverged``.

C-SPE / C-GEN evaluate the server model ``x`` (what every agent holds entering
the next round), Global the same model.

State (leaves stacked over A agents where marked): ``x``, ``c`` one model each
(float32, D parameters); ``c_i [A, ...]``; ``opt [A, ...]`` the local optimizer
state.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

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
class ScaffoldState:
    x: object
    c: object
    c_i: object
    opt: object


HPARAMS = {
    "server_lr": HParam(
        1.0,
        "scaffold: global step size eta_g, x <- x + eta_g mean(dy_i) (> 0; paper: 1)",
        low=0.0,
        low_open=True,
    ),
}


def make_grad_fn(apply_fn):
    """The trainer's ``grad_fn``: the minibatch gradient plus the correction.

    Returns:
      ``grad_fn(params, xb [B, ...], yb [B], mask bool [B], anchor, mu, key) ->
      (g + anchor, ce)`` with ``anchor = c - c_i`` (params-shaped) and ``ce``
      the minibatch's mean cross-entropy (``mu`` unused).
    """

    def ce_fn(params, xb, yb, mask, key):
        return masked_cross_entropy(apply_fn(params, xb, True, key), yb, mask)

    grad_ce = jax.value_and_grad(ce_fn)

    def grad_fn(params, xb, yb, mask, anchor, mu, key):
        ce, g = grad_ce(params, xb, yb, mask, key)
        return jax.tree.map(jnp.add, g, anchor), ce

    return grad_fn


def local_steps(n_train, max_steps, local_epochs: int, batch_size: int):
    """int32 ``[A]``: the local steps every agent takes, ``local_epochs *
    ceil(n / batch_size)`` capped by ``max_steps`` (stragglers)."""
    steps = local_epochs * ((n_train + batch_size - 1) // batch_size)
    return jnp.minimum(steps, max_steps).astype(jnp.int32)


def build(ctx) -> Rounds:
    server_lr = float(ctx.hp["server_lr"])
    lr = float(ctx.config.lr)
    epochs, batch = int(ctx.config.local_epochs), int(ctx.config.batch_size)
    train = ctx.trainer(grad_fn=make_grad_fn(ctx.apply_fn))
    num_agents = ctx.num_agents

    def init(key, part):
        x = ctx.init_model(key)
        zeros = jax.tree.map(jnp.zeros_like, x)
        c_i = jax.tree.map(lambda z: jnp.zeros((num_agents, *z.shape), z.dtype), zeros)
        return ScaffoldState(x=x, c=zeros, c_i=c_i, opt=jax.vmap(ctx.tx.init)(c_i))

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_train, k_agg = jax.random.split(jax.random.fold_in(key, 17))
        x0 = stack(state.x, num_agents)
        corr = jax.tree.map(lambda c, ci: c[None] - ci, state.c, state.c_i)
        y, opt, loss = train(
            jax.random.split(k_train, num_agents),
            x0,
            state.opt,
            part.x_train,
            part.y_train,
            part.n_train,
            corr,
            jnp.float32(0.0),
            max_steps,
        )
        finite = finite_agents(y)
        trained = active & finite
        y = where_agents(trained, y, x0)  # no NaN reaches a sum below
        steps = local_steps(part.n_train, max_steps, epochs, batch)
        scale = 1.0 / (jnp.maximum(steps, 1).astype(jnp.float32) * lr)
        moved = trained & (steps > 0)

        def new_ci(ci, c, x, yi):  # option II
            upd = ci - c[None] + (x[None] - yi) * per_agent(scale, yi)
            return jnp.where(per_agent(moved, yi), upd, ci)

        c_i = jax.tree.map(new_ci, state.c_i, state.c, state.x, y)
        weight = trained.astype(jnp.float32)
        dy = jax.tree.map(lambda yi, x: yi - x[None], y, state.x)
        dx = ctx.aggregate(dy, weight, k_agg)
        any_trained = jnp.any(trained)
        x = jax.tree.map(
            lambda x, d: jnp.where(any_trained, x + server_lr * d, x), state.x, dx
        )
        c = jax.tree.map(
            lambda c, new, old: (
                c + jnp.tensordot(weight, new - old, axes=1) / num_agents
            ),
            state.c,
            c_i,
            state.c_i,
        )
        new = ScaffoldState(
            x=x, c=c, c_i=c_i, opt=where_agents(trained, opt, state.opt)
        )
        two_models = 2 * tree_bytes(state.x)
        info = {
            "train_loss": masked_mean(jnp.where(trained, loss, 0.0), weight),
            **round_counts(active, active & ~finite),
            **comm_bytes(two_models, active, two_models, active),
        }
        return new, info

    return one_round(
        ctx,
        init=init,
        round=round_fn,
        personal=lambda state, part, key: stack(state.x, num_agents),
        global_model=lambda state: state.x,
    )


ALGORITHM = Algorithm(
    name="scaffold",
    citation="Karimireddy et al., ICML 2020, Algorithm 1 (SCAFFOLD, option II)",
    hparams=HPARAMS,
    build=build,
)


__all__ = ["ALGORITHM", "local_steps", "make_grad_fn"]
