"""The Fashion-MNIST reference setup with the fedprox baseline."""

from configs import fmnist_paper


def get_config():
    c = fmnist_paper.get_config()
    c.algorithm = "fedprox"
    c.mu = None
    return c
