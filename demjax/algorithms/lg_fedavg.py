"""LG-FedAvg: Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency,
"Think Locally, Act Globally: Federated Learning with Local and Global
Representations", arXiv 2001.01523 (2020), Sec. 3 and Algorithm 1.

The model is a local representation (the body: every layer below the last
``head_layers`` dense layers, ``layer_split.head_keys``) kept by each agent, and
global layers on top (the head) shared by all. Each round every participating
agent k combines its own local layers ``theta_k^l`` with the server's global
layers ``theta^g``, trains the whole model on its data for ``local_epochs``
(Alg. 1, ClientUpdate), and uploads only the global layers; the server sets
``theta^g <- sum_k n_k theta^g_k / sum_k n_k`` over the participants (Alg. 1,
ServerUpdate; or the robust ``config.aggregator``). C-SPE / C-GEN evaluate
``(theta_k^l, theta^g)``; there is no global model (Global is null).

State: ``params [A, ...]`` (the agents' models), ``opt [A, ...]``, ``shared`` the
server's global layers. ``bytes_up`` = ``bytes_down`` = participants x bytes of
the global layers.
"""

from __future__ import annotations

from demjax.algorithms import layer_split
from demjax.algorithms.protocol import Algorithm, Rounds

HPARAMS = {
    "head_layers": layer_split.head_layers_hparam(
        "lg_fedavg", "the global, averaged layers; the rest stays local"
    ),
}


def build(ctx) -> Rounds:
    head, body = layer_split.split_keys(ctx, "lg_fedavg")
    return layer_split.build_split(
        ctx, shared_keys=head, stages=(layer_split.frozen_trainer(ctx, ()),)
    )


ALGORITHM = Algorithm(
    name="lg_fedavg",
    citation="Liang et al., arXiv 2001.01523 (2020), Sec. 3, Alg. 1 (LG-FedAvg)",
    hparams=HPARAMS,
    build=build,
    has_global=False,
)
