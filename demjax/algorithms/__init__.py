"""Registries of algorithms.

- ``REGISTRY``: name -> ``Algorithm`` run by the tree engine (``demjax.engine``):
  DemLearn, DemLearn-P, FedAvg, FedProx, local.
- ``PLUGINS``: name -> ``Plugin`` run by ``demjax.plugin_engine``: every module of
  this package that defines ``PLUGIN`` (discovered, so adding an algorithm is
  adding one file).
"""

import importlib
import pkgutil

from demjax.algorithms import demlearn, demlearn_p, fedavg, fedprox, local
from demjax.algorithms.base import Algorithm
from demjax.algorithms.plugin import Plugin
from demjax.errors import check_choice

REGISTRY: dict[str, Algorithm] = {
    m.ALGORITHM.name: m.ALGORITHM
    for m in (demlearn, demlearn_p, fedavg, fedprox, local)
}


def _discover_plugins() -> dict[str, Plugin]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in ("base", "plugin") or info.name in REGISTRY:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        plugin = getattr(module, "PLUGIN", None)
        if isinstance(plugin, Plugin):
            found[plugin.name] = plugin
    return found


PLUGINS: dict[str, Plugin] = _discover_plugins()
ALGORITHMS: tuple[str, ...] = tuple(REGISTRY) + tuple(PLUGINS)


def is_plugin(name: str) -> bool:
    return name in PLUGINS


def get_algorithm(name: str) -> Algorithm:
    """Looks a tree-engine algorithm up by name.

    Raises:
      ConfigError: unknown ``algorithm`` (the message lists the accepted names).
    """
    check_choice("algorithm", name, ALGORITHMS)
    if name in PLUGINS:
        raise ValueError(f"{name!r} is a plug-in: use get_plugin")
    return REGISTRY[name]


def get_plugin(name: str) -> Plugin:
    """Looks a plug-in algorithm up by name.

    Raises:
      ConfigError: unknown ``algorithm``.
    """
    check_choice("algorithm", name, ALGORITHMS)
    return PLUGINS[name]


__all__ = [
    "ALGORITHMS",
    "PLUGINS",
    "REGISTRY",
    "Algorithm",
    "Plugin",
    "get_algorithm",
    "get_plugin",
    "is_plugin",
]
