"""Registry of algorithms: name -> ``Algorithm`` (see ``demjax.algorithms.base``)."""

from demjax.algorithms import demlearn, demlearn_p, fedavg, fedprox, local
from demjax.algorithms.base import Algorithm
from demjax.errors import check_choice

REGISTRY: dict[str, Algorithm] = {
    m.ALGORITHM.name: m.ALGORITHM
    for m in (demlearn, demlearn_p, fedavg, fedprox, local)
}


def get_algorithm(name: str) -> Algorithm:
    """Looks an algorithm up by name.

    Raises:
      ConfigError: unknown ``algorithm`` (the message lists the accepted names).
    """
    check_choice("algorithm", name, tuple(REGISTRY))
    return REGISTRY[name]


__all__ = ["REGISTRY", "Algorithm", "get_algorithm"]
