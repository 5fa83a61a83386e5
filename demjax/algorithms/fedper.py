"""FedPer: Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with
Personalization Layers", arXiv 1912.00818 (2019), Sec. 3 and Algorithm 1
(client) / Algorithm 2 (server).

The model is a shared *base* (the body) and *personalization layers* (the head:
the last ``head_layers`` dense layers, ``layer_split.head_keys``). Each round
every participating agent k takes the server's base ``W_B``, keeps its own
personalization layers ``W_P,k``, trains both on its data for ``local_epochs``
of SGD (the client update of Alg. 1), and uploads only the base; the server
sets ``W_B <- sum_k n_k W_B,k / sum_k n_k`` over the participants (Alg. 2; or the
robust ``config.aggregator``). C-SPE / C-GEN evaluate ``(W_B, W_P,k)``; there is
no global model (Global is null).

State: ``params [A, ...]`` (the agents' models), ``opt [A, ...]``, ``shared`` the
server's base. ``bytes_up`` = ``bytes_down`` = participants x bytes of the base.
"""

from __future__ import annotations

from demjax.algorithms import layer_split
from demjax.algorithms.protocol import Algorithm, Rounds

HPARAMS = {
    "head_layers": layer_split.head_layers_hparam(
        "fedper", "the personalization layers kept local; paper K_P 1-2"
    ),
}


def build(ctx) -> Rounds:
    head, body = layer_split.split_keys(ctx, "fedper")
    return layer_split.build_split(
        ctx, shared_keys=body, stages=(layer_split.frozen_trainer(ctx, ()),)
    )


ALGORITHM = Algorithm(
    name="fedper",
    citation="Arivazhagan et al., arXiv 1912.00818 (2019), Sec. 3, Alg. 1-2 (FedPer)",
    hparams=HPARAMS,
    build=build,
    has_global=False,
)
