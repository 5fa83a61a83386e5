"""DemLearn: Nguyen et al., "Self-organizing Democratized Learning: Towards
Large-scale Distributed Learning Systems", IEEE TNNLS (arXiv 2007.03278), Alg. 1.

Each round: local (personalized) training from the model the agent holds;
self-organizing re-grouping by agglomerative clustering of the agents' models
every ``tau`` rounds (Sec. IV-A); bottom-up hierarchical generalization with
agent-count weights (Sec. IV-B); top-down mixing ``w <- (1 - alpha) w + alpha
w_parent`` from the root down (Sec. IV-C). ``mu = 0``: no proximal term.
"""

from demjax.algorithms.hierarchical import Hierarchy, family_algorithm

ALGORITHM = family_algorithm(
    "demlearn",
    "Nguyen et al., IEEE TNNLS (arXiv 2007.03278), Algorithm 1 (DemLearn)",
    Hierarchy(
        self_organizing=True,
    ),
)
