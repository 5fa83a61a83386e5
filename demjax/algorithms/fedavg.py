"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, Algorithm 1.

Every agent starts the round from the global model, trains locally, and the
server replaces the global model with the sample-weighted average
``w = sum_a n_a w_a / sum_a n_a``; agents then receive it (alpha = 1).
"""

from demjax.algorithms.hierarchical import Hierarchy, family_algorithm

ALGORITHM = family_algorithm(
    "fedavg",
    "McMahan et al., AISTATS 2017, Algorithm 1 (FederatedAveraging)",
    Hierarchy(
        self_organizing=False,
        sample_weighted=True,
        broadcast=True,
    ),
)
