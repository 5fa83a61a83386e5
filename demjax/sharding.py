"""Sharding the agent axis over devices: one mesh axis named ``agents``.

Every stacked per-agent array (data ``[A, ...]``, parameters and optimizer state
``[A, ...]``) is split along its leading axis over the devices of a 1-D
``jax.sharding.Mesh``; group models ``[N, ...]``, the pooled test set and the tree
are replicated. The jitted round phases are unchanged: XLA propagates the input
shardings, the vmapped local training runs shard-locally, and the
``segment_sum`` aggregation over agents becomes a per-device partial sum plus an
all-reduce. Tested on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(results equal the single-device run within float tolerance).
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from demjax.errors import ConfigError
from demjax.types import Partition

AXIS = "agents"


def make_mesh(num_devices: int, num_agents: int) -> Mesh | None:
    """A 1-D mesh over the first ``num_devices`` devices, or None for one device.

    Args:
      num_devices: devices to use; 0 = auto (the most devices that divide A, a
        note on stderr when that is not all of them), 1 = no sharding.
      num_agents: A, which must be divisible by the device count.

    Raises:
      ConfigError: ``num_devices`` exceeds the available devices, or A is not
        divisible by it (field ``num_devices`` / ``num_agents``).
    """
    available = jax.device_count()
    if num_devices == 0:  # auto: the most devices that divide A evenly
        n = max(d for d in range(1, available + 1) if num_agents % d == 0)
        if n < available:
            logging.info(
                "sharding %d agents over %d of %d devices (num_agents must be "
                "divisible; set num_devices to choose)",
                num_agents,
                n,
                available,
            )
    else:
        n = int(num_devices)
    if n < 0 or n > available:
        raise ConfigError(
            f"num_devices={num_devices!r} is not valid; "
            f"accepted: 0 (auto) or 1..{available}"
        )
    if n <= 1:
        return None
    if num_agents % n:
        raise ConfigError(
            f"num_agents={num_agents} is not divisible by the {n} devices of the "
            f"'{AXIS}' mesh; accepted: a multiple of {n}, or num_devices=1"
        )
    return Mesh(np.asarray(jax.devices()[:n]), (AXIS,))


def agent_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``agents``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_agents(tree, mesh: Mesh):
    """Places every leaf of a stacked pytree (leaves ``[A, ...]``) on the mesh."""
    return jax.device_put(tree, agent_sharding(mesh))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))


def shard_partition(part: Partition, mesh: Mesh) -> Partition:
    """Per-agent arrays sharded over ``agents``; the pooled test set replicated."""
    per_agent = ("x_train", "y_train", "n_train", "x_test", "y_test", "n_test")
    pooled = ("x_all", "y_all", "owner_all")
    return part.replace(
        **{k: shard_agents(getattr(part, k), mesh) for k in per_agent},
        **{k: replicate(getattr(part, k), mesh) for k in pooled},
    )
