"""FedBABU: Oh, Kim, Yun, "FedBABU: Toward Enhanced Representation for Federated
Image Classification", ICLR 2022, Algorithm 1 and Sec. 4.

The model is a body and a head (the last ``head_layers`` dense layers,
``layer_split.head_keys``). The head stays at its random initialization,
identical for every agent, during the whole federated training; each round
every participating agent k starts from the server's body, trains only the body
for ``local_epochs`` with the head frozen (Alg. 1: the head's learning rate is
0), and the server sets ``body <- sum_k n_k body_k / sum_k n_k`` over the
participants (FedAvg on the body; or the robust ``config.aggregator``).

Evaluation (Sec. 4, "personalization"): each agent fine-tunes the global model
(body + initial head) on its own training data for ``finetune_epochs`` of
``config.optimizer`` at ``config.lr`` from a fresh optimizer state, the whole
model (``finetune=full``, the paper's FedBABU) or only the head
(``finetune=head``); C-SPE / C-GEN evaluate the fine-tuned models, Global the
global model without fine-tuning. ``finetune_epochs=0`` evaluates the global
model everywhere.

State: ``params [A, ...]`` (the agents' last trained models), ``opt [A, ...]``,
``shared`` the global model (server body + initial head). ``bytes_up`` =
``bytes_down`` = participants x bytes of the body (the head is never sent: every
agent draws it from the shared seed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from demjax.algorithms import layer_split
from demjax.algorithms.protocol import Algorithm, HParam, Rounds
from demjax.pytrees import stack

HPARAMS = {
    "head_layers": layer_split.head_layers_hparam(
        "fedbabu", "frozen at its initialization"
    ),
    "finetune_epochs": HParam(
        5,
        "fedbabu: fine-tuning epochs on the agent's data before C-SPE/C-GEN "
        "(>= 0; 0 = none; paper tau_f in 1-20, 5 in most tables)",
        low=0,
    ),
    "finetune": HParam(
        "full",
        "fedbabu: what the evaluation fine-tunes: full (paper) or head",
        choices=("full", "head"),
    ),
}


def build(ctx) -> Rounds:
    head, body = layer_split.split_keys(ctx, "fedbabu")
    num_agents = ctx.num_agents
    epochs = int(ctx.hp["finetune_epochs"])
    frozen = body if ctx.hp["finetune"] == "head" else ()
    tune, tune_tx = layer_split.frozen_trainer(ctx, frozen, epochs or None)

    def personal(state, part, key):
        start = stack(state.shared, num_agents)
        if epochs == 0:
            return start
        params, _, _ = tune(
            jax.random.split(jax.random.fold_in(key, 29), num_agents),
            start,
            jax.vmap(tune_tx.init)(start),
            part.x_train,
            part.y_train,
            part.n_train,
            start,
            jnp.float32(0.0),
        )
        return params

    return layer_split.build_split(
        ctx,
        shared_keys=body,
        stages=(layer_split.frozen_trainer(ctx, head),),
        personal=personal,
        global_model=lambda state: state.shared,
    )


ALGORITHM = Algorithm(
    name="fedbabu",
    citation="Oh, Kim, Yun, ICLR 2022, Algorithm 1, Sec. 4 (FedBABU)",
    hparams=HPARAMS,
    build=build,
)
