"""The DemLearn paper's Fashion-MNIST reference setup (DemLearn-P, authors' code).

50 agents, pathological 2 labels per agent, the paper's CNN, 100 rounds, 2 local
epochs, batch 10, lr 0.05, alpha 0.7, 3 group levels (K = 4), tau 1, mu 0.002.
Needs the IDX files (``apt-get install dataset-fashion-mnist``).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset = "fashion_mnist"
    c.model = "cnn"
    c.algorithm = "demlearn_p"
    c.mu = 0.002
    c.num_rounds = 100
    c.alpha = 0.7
    c.num_levels = 3
    c.tau = 1
    return c
