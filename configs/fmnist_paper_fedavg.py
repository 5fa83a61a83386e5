"""The Fashion-MNIST reference setup with the fedavg baseline."""

from configs import fmnist_paper


def get_config():
    c = fmnist_paper.get_config()
    c.algorithm = "fedavg"
    c.mu = None
    return c
