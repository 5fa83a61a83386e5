"""FedRep: Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared
Representations for Personalized Federated Learning", ICML 2021, Algorithm 1.

The model is a shared representation ``phi`` (the body) and a personal head
``h_k`` (the last ``head_layers`` dense layers, ``layer_split.head_keys``).
Each round every participating agent k

1. receives the server's ``phi`` and trains its own head for ``head_epochs``
   with the body frozen (Alg. 1, lines 6-8: ``h_k <- GRD(f_k(h, phi), h, lr)``),
2. then trains the body for ``body_epochs`` with the new head frozen (lines
   9-11: ``phi_k <- GRD(f_k(h_k, phi), phi, lr)``),

and the server sets ``phi <- sum_k n_k phi_k / sum_k n_k`` over the participants
(line 13; the paper writes a plain mean over the sampled clients; or the robust
``config.aggregator``). Freezing is ``optax.multi_transform`` with zero updates
(``layer_split.freeze``), so a frozen part never moves whatever
``config.optimizer``; each stage keeps its own optimizer state per agent.
C-SPE / C-GEN evaluate ``(phi, h_k)``; there is no global model (Global null).

State: ``params [A, ...]``, ``opt`` = (head stage, body stage) ``[A, ...]``,
``shared`` the server's body. ``bytes_up`` = ``bytes_down`` = participants x
bytes of the body.
"""

from __future__ import annotations

from demjax.algorithms import layer_split
from demjax.algorithms.protocol import Algorithm, HParam, Rounds

HPARAMS = {
    "head_layers": layer_split.head_layers_hparam("fedrep", "personal"),
    "head_epochs": HParam(
        10,
        "fedrep: epochs on the head (body frozen) per round (>= 1; paper 10)",
        low=1,
    ),
    "body_epochs": HParam(
        1,
        "fedrep: epochs on the body (head frozen) per round (>= 1; paper 1)",
        low=1,
    ),
}


def build(ctx) -> Rounds:
    head, body = layer_split.split_keys(ctx, "fedrep")
    stages = (
        layer_split.frozen_trainer(ctx, body, int(ctx.hp["head_epochs"])),
        layer_split.frozen_trainer(ctx, head, int(ctx.hp["body_epochs"])),
    )
    return layer_split.build_split(ctx, shared_keys=body, stages=stages)


ALGORITHM = Algorithm(
    name="fedrep",
    citation="Collins et al., ICML 2021, Algorithm 1 (FedRep)",
    hparams=HPARAMS,
    build=build,
    has_global=False,
)
