"""FedAvg on the default digits setup."""

from configs import default


def get_config():
    c = default.get_config()
    c.algorithm = "fedavg"
    return c
