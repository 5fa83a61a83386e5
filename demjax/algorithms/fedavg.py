"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, Algorithm 1.

Every agent starts the round from the global model, trains locally, and the
server replaces the global model with the sample-weighted average
``w = sum_a n_a w_a / sum_a n_a``; agents then receive it (alpha = 1).
"""

from demjax.algorithms.base import Algorithm

ALGORITHM = Algorithm(
    name="fedavg",
    citation="McMahan et al., AISTATS 2017, Algorithm 1 (FederatedAveraging)",
    self_organizing=False,
    sample_weighted=True,
    broadcast=True,
)
