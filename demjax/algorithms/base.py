"""The shape every demjax algorithm shares.

An algorithm is a frozen description of how one round combines the shared
blocks (``local.train_all``, ``cluster.build_tree``, ``hierarchy.aggregate_up``,
``hierarchy.mix_down``); ``demjax.engine`` runs it. Every algorithm measured at
the same two points (after local training, after synchronization).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Static description of a distributed-learning algorithm.

    Attributes:
      name: registry name.
      citation: the paper (and equation) the algorithm follows.
      self_organizing: builds a group tree by clustering agents' models (DemLearn);
        otherwise every agent hangs directly under one global model.
      communicates: False for local-only training (no aggregation, no global model).
      default_mu: proximal coefficient used when ``config.mu`` is unset.
      requires_mu_positive: ``mu`` must be > 0 (DemLearn-P, FedProx); ``mu`` must
        be 0 when False and ``default_mu`` is 0 (DemLearn, FedAvg).
      prox_from_round0: apply the proximal term from round 0 (FedProx, anchored to
        the global model) rather than from round 1 (DemLearn-P, anchored to the
        parent group model of the previous round).
      sample_weighted: aggregate with sample-count weights (FedAvg); otherwise
        ``config.weighting`` decides (DemLearn's reference: agent counts).
      broadcast: after aggregation agents take the parent model outright
        (alpha = 1, FedAvg/FedProx); otherwise ``config.alpha`` mixing.
    """

    name: str
    citation: str
    self_organizing: bool
    communicates: bool = True
    default_mu: float = 0.0
    requires_mu_positive: bool = False
    prox_from_round0: bool = False
    sample_weighted: bool = False
    broadcast: bool = False
