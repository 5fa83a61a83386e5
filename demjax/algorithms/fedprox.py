"""FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.

FedAvg whose local objective adds ``mu / 2 * ||w - w_global||^2`` (Eq. 2), from
round 0, anchored to the global model the agent received. The DemLearn reference
runs use mu = 0.5.
"""

from demjax.algorithms.hierarchical import Hierarchy, family_algorithm

ALGORITHM = family_algorithm(
    "fedprox",
    "Li et al., MLSys 2020, Eq. 2 (proximal local objective)",
    Hierarchy(
        self_organizing=False,
        default_mu=0.5,
        requires_mu_positive=True,
        prox_from_round0=True,
        sample_weighted=True,
        broadcast=True,
    ),
)
