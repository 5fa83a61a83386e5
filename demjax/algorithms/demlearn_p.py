"""DemLearn-P: DemLearn with a proximal personalized objective.

Nguyen et al., "Self-organizing Democratized Learning", IEEE TNNLS
(arXiv 2007.03278), Sec. IV-C (DemLearn-P): for t > 0 every local step uses
``w <- w - lr * (grad CE(w) + mu * (w - w_parent))`` where ``w_parent`` is the
agent's direct parent group model from the end of the previous round, held fixed
during the round. The reference uses mu = 0.002 (0.0005 with 100 agents).
"""

from demjax.algorithms.hierarchical import Hierarchy, family_algorithm

ALGORITHM = family_algorithm(
    "demlearn_p",
    "Nguyen et al., IEEE TNNLS (arXiv 2007.03278), Sec. IV-C (DemLearn-P)",
    Hierarchy(
        self_organizing=True,
        default_mu=0.002,
        requires_mu_positive=True,
    ),
)
