"""Ditto: Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning
Through Personalization", ICML 2021, Algorithm 1.

Each round every participating agent k

1. trains a copy of the global model ``w`` on its data (``local_epochs`` of SGD,
   the FedAvg update) -> ``w_k``;
2. trains its personal model ``v_k`` on ``F_k(v) + lam / 2 * ||v - w||^2``
   (Eq. 2), the proximal pull towards the round's global model ``w``;

and the server sets ``w <- aggregate(w_k)`` (sample-weighted mean, or the robust
``config.aggregator``). C-SPE / C-GEN evaluate the personal models ``v``, Global
the model ``w``.

Divergence guard: an agent whose ``w_k``, ``v_k``, optimizer states or losses
turn non-finite keeps its previous ``v_k`` and states and gets no weight in the
aggregate (``num_diverged``). Communication per round: every participating agent
downloads ``w`` (``bytes_down`` = active x model bytes); every participating agent
that did not diverge uploads ``w_k`` (``bytes_up`` = those x model bytes); ``v_k``
never leaves the agent.

State (leaves stacked over A agents where marked):
``w`` one model; ``v [A, ...]``; ``opt_w [A, ...]``, ``opt_v [A, ...]`` optimizer
states of the two local problems.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from demjax.algorithms.protocol import Algorithm, HParam, Rounds, one_round
from demjax.pytrees import (
    comm_bytes,
    divergence_guard,
    keep_if_finite,
    masked_mean,
    round_counts,
    stack,
    tree_bytes,
)


@flax.struct.dataclass
class DittoState:
    w: object
    v: object
    opt_w: object
    opt_v: object


HPARAMS = {
    "lam": HParam(
        0.1,
        "ditto: personal proximal weight lambda (>= 0; paper tunes over "
        "{0.01, 0.1, 1, 2}, 0.1 default)",
        low=0.0,
    ),
    "personal_epochs": HParam(
        0,
        "ditto: epochs on the personal model per round; 0 = local_epochs",
        low=0,
    ),
}


def build(ctx) -> Rounds:
    lam = float(ctx.hp["lam"])
    epochs_v = int(ctx.hp["personal_epochs"]) or int(ctx.config.local_epochs)
    train_w = ctx.trainer()
    train_v = ctx.trainer(local_epochs=epochs_v)
    num_agents = ctx.num_agents

    def init(key, part):
        w = ctx.init_model(key)
        v = stack(w, num_agents)
        opt = jax.vmap(ctx.tx.init)(v)
        return DittoState(w=w, v=v, opt_w=opt, opt_v=opt)

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_w, k_v, k_agg = jax.random.split(jax.random.fold_in(key, 17), 3)
        w0 = stack(state.w, num_agents)
        w_k, opt_w, loss_w = train_w(
            jax.random.split(k_w, num_agents),
            w0,
            state.opt_w,
            part.x_train,
            part.y_train,
            part.n_train,
            w0,
            jnp.float32(0.0),
            max_steps,
        )
        v, opt_v, loss_v = train_v(
            jax.random.split(k_v, num_agents),
            state.v,
            state.opt_v,
            part.x_train,
            part.y_train,
            part.n_train,
            w0,
            jnp.float32(lam),
            max_steps,
        )
        (w_k, v, opt_w, opt_v), ok, diverged = divergence_guard(
            active,
            (w_k, v, opt_w, opt_v),
            (w0, state.v, state.opt_w, state.opt_v),
            loss_w,
            loss_v,
        )
        weight = ok * part.n_train.astype(jnp.float32)
        w = keep_if_finite(
            ctx.aggregate(w_k, weight, k_agg, reference=state.w), state.w
        )
        new = DittoState(w=w, v=v, opt_w=opt_w, opt_v=opt_v)
        model = tree_bytes(state.w)
        info = {
            "train_loss": masked_mean(loss_v, ok.astype(jnp.float32)),
            **round_counts(active, diverged),
            **comm_bytes(model, ok, model, active),
        }
        return new, info

    return one_round(
        ctx,
        init=init,
        round=round_fn,
        personal=lambda state, part, key: state.v,
        global_model=lambda state: state.w,
    )


ALGORITHM = Algorithm(
    name="ditto",
    citation="Li et al., ICML 2021, Algorithm 1 (Ditto), Eq. 2",
    hparams=HPARAMS,
    build=build,
    attackable=True,
)
