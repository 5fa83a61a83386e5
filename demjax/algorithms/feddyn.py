"""FedDyn: Acar, Zhao, Matas, Mattina, Whatmough, Saligrama, "Federated Learning
Based on Dynamic Regularization", ICLR 2021, Algorithm 1.

The server holds the model ``theta`` and the state ``h`` (zero at the start);
every agent k holds the linear term ``g_k``, its last local gradient
``grad L_k(theta_k)`` (zero at the start). Each round every participating agent
k approximately solves (Alg. 1, the local problem)::

    theta_k = argmin_v  L_k(v) - <g_k, v> + alpha / 2 * ||v - theta||^2

(``theta`` the round's server model) by ``local_epochs`` of ``config.optimizer``
at ``config.lr`` (the engine's minibatch loop, ``L_k`` the mean cross-entropy of
a minibatch), starting from the server model, then updates its linear term by
the first-order condition::

    g_k <- g_k - alpha * (theta_k - theta)

and uploads ``theta_k``. The server, over the set P of participants (A agents in
all)::

    h     <- h - alpha / A * sum_{k in P} (theta_k - theta)
    theta <- aggregate(theta_k) - h / alpha

``aggregate`` is the plain mean over P of the paper or the robust
``config.aggregator``; with no participant the server keeps its state. An agent
whose ``theta_k`` turns non-finite keeps ``g_k`` and its optimizer state, is
left out of P and counted in ``num_diverged``. Agents download ``theta`` and
upload ``theta_k``: one model each way per participant.

C-SPE / C-GEN evaluate the server model ``theta`` (what every agent holds
entering the next round), Global the same model.

State (leaves stacked over A agents where marked): ``theta``, ``h`` one model
each (float32, D parameters); ``g [A, ...]``; ``opt [A, ...]`` the local
optimizer state.
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
    round_counts,
    stack,
    tree_bytes,
    where_agents,
)


@flax.struct.dataclass
class FedDynState:
    theta: object
    h: object
    g: object
    opt: object


HPARAMS = {
    "alpha": HParam(
        0.01,
        "feddyn: dynamic regularizer weight alpha (> 0; paper tunes over "
        "{0.1, 0.01, 0.001}, 0.01 here)",
        low=0.0,
        low_open=True,
    ),
}


def make_grad_fn(apply_fn, alpha: float):
    """The trainer's ``grad_fn`` of the local problem.

    ``anchor = {"server": theta, "g": g_k}`` (params-shaped each).

    Returns:
      ``grad_fn(params, xb [B, ...], yb [B], mask bool [B], anchor, mu, key) ->
      (grad L + alpha (params - theta) - g_k, ce)``, ``ce`` the minibatch's mean
      cross-entropy (``mu`` unused).
    """

    def ce_fn(params, xb, yb, mask, key):
        return masked_cross_entropy(apply_fn(params, xb, True, key), yb, mask)

    grad_ce = jax.value_and_grad(ce_fn)

    def grad_fn(params, xb, yb, mask, anchor, mu, key):
        ce, g = grad_ce(params, xb, yb, mask, key)
        grads = jax.tree.map(
            lambda gl, p, s, gk: gl + alpha * (p - s) - gk,
            g,
            params,
            anchor["server"],
            anchor["g"],
        )
        return grads, ce

    return grad_fn


def build(ctx) -> Rounds:
    alpha = float(ctx.hp["alpha"])
    train = ctx.trainer(grad_fn=make_grad_fn(ctx.apply_fn, alpha))
    num_agents = ctx.num_agents

    def init(key, part):
        theta = ctx.init_model(key)
        g = jax.tree.map(lambda p: jnp.zeros((num_agents, *p.shape), p.dtype), theta)
        return FedDynState(
            theta=theta,
            h=jax.tree.map(jnp.zeros_like, theta),
            g=g,
            opt=jax.vmap(ctx.tx.init)(g),
        )

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_train, k_agg = jax.random.split(jax.random.fold_in(key, 17))
        server = stack(state.theta, num_agents)
        local, opt, loss = train(
            jax.random.split(k_train, num_agents),
            server,
            state.opt,
            part.x_train,
            part.y_train,
            part.n_train,
            {"server": server, "g": state.g},
            jnp.float32(0.0),
            max_steps,
        )
        finite = finite_agents(local)
        trained = active & finite
        local = where_agents(trained, local, server)  # no NaN reaches a sum below
        delta = jax.tree.map(lambda p, s: p - s[None], local, state.theta)
        g = jax.tree.map(lambda gk, d: gk - alpha * d, state.g, delta)
        weight = trained.astype(jnp.float32)
        h = jax.tree.map(
            lambda h, d: h - alpha / num_agents * jnp.tensordot(weight, d, axes=1),
            state.h,
            delta,
        )
        mean = ctx.aggregate(local, weight, k_agg)
        any_trained = jnp.any(trained)
        theta = jax.tree.map(
            lambda m, h, old: jnp.where(any_trained, m - h / alpha, old),
            mean,
            h,
            state.theta,
        )
        new = FedDynState(
            theta=theta, h=h, g=g, opt=where_agents(trained, opt, state.opt)
        )
        one_model = tree_bytes(state.theta)
        info = {
            "train_loss": masked_mean(jnp.where(trained, loss, 0.0), weight),
            **round_counts(active, active & ~finite),
            **comm_bytes(one_model, active, one_model, active),
        }
        return new, info

    return one_round(
        ctx,
        init=init,
        round=round_fn,
        personal=lambda state, part, key: stack(state.theta, num_agents),
        global_model=lambda state: state.theta,
    )


ALGORITHM = Algorithm(
    name="feddyn",
    citation="Acar et al., ICLR 2021, Algorithm 1 (FedDyn)",
    hparams=HPARAMS,
    build=build,
)


__all__ = ["ALGORITHM", "make_grad_fn"]
