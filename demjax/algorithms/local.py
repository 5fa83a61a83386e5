"""Local-only training: every agent trains on its own data, no communication.

The lower bound on generalization that every federated paper reports (e.g.
Nguyen et al., IEEE TNNLS, arXiv 2007.03278, Sec. V; McMahan et al., AISTATS 2017).
No global model exists, so the Global metric is reported as null.
"""

from demjax.algorithms.hierarchical import Hierarchy, family_algorithm

ALGORITHM = family_algorithm(
    "local",
    "local-only baseline (no communication)",
    Hierarchy(
        self_organizing=False,
        communicates=False,
    ),
)
