"""The registry of algorithms: every module of this package that defines
``ALGORITHM`` (a ``demjax.algorithms.protocol.Algorithm``), discovered, so adding
an algorithm is adding one file.

- ``REGISTRY``: name -> ``Algorithm``, every registered algorithm.
- ``ALGORITHMS``: the names, the hierarchical family (DemLearn, DemLearn-P,
  FedAvg, FedProx, local) first.
"""

import importlib
import pkgutil

from demjax.algorithms.protocol import Algorithm
from demjax.errors import check_choice

# The hierarchical family first (the order of the docs and of --help).
_FIRST = ("demlearn", "demlearn_p", "fedavg", "fedprox", "local")
_LIBRARIES = ("hierarchical", "protocol")


def _discover() -> dict[str, Algorithm]:
    names = [i.name for i in pkgutil.iter_modules(__path__)]
    order = [n for n in _FIRST if n in names] + sorted(
        n for n in names if n not in _FIRST and n not in _LIBRARIES
    )
    found = {}
    for name in order:
        module = importlib.import_module(f"{__name__}.{name}")
        algo = getattr(module, "ALGORITHM", None)
        if isinstance(algo, Algorithm):
            found[algo.name] = algo
    return found


REGISTRY: dict[str, Algorithm] = _discover()
ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)


def get(name: str) -> Algorithm:
    """Looks an algorithm up by name.

    Raises:
      ConfigError: unknown ``algorithm`` (the message lists the accepted names).
    """
    check_choice("algorithm", name, ALGORITHMS)
    return REGISTRY[name]


__all__ = ["ALGORITHMS", "REGISTRY", "Algorithm", "get"]
