"""Sharding the agent axis over devices: one mesh axis named ``agents``.

Every stacked per-agent array (data ``[A, ...]``, parameters and optimizer state
``[A, ...]``) is split along its leading axis over the devices of a 1-D
``jax.sharding.Mesh``; group models ``[N, ...]``, the pooled test set and the tree
are replicated. The engine's local training and C-SPE / C-GEN evaluation run
under ``jax.shard_map`` (``demjax.engine``, ``demjax.metrics``: each device runs
the local plan on its own agents); elsewhere XLA propagates the input shardings
and the ``segment_sum`` aggregation over agents becomes a per-device partial sum
plus an all-reduce. ``set_cpu_devices`` exposes one CPU device per core, so one
process trains on every core of a CPU. Tested on CPU with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (results equal the
single-device run within float tolerance).

Multi-process jobs (``jax.distributed.initialize``, see ``demjax.multihost``): the
mesh then spans the devices of every process, so no process holds every shard.
Every process builds the same host (NumPy) data deterministically, and
:func:`place` builds each global array from it with
``jax.make_array_from_callback`` (each process fills only its own shards, no
cross-process traffic and no equality check of the whole data set, which
``jax.device_put`` of a NumPy array would do). Whatever goes back to the host
(clustering distances, metrics) goes through :func:`to_host`, which gathers a
sharded array across processes. In a single process both are the plain
``jax.device_put`` / ``jax.device_get``.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from demjax.errors import ConfigError
from demjax.types import Partition

log = logging.getLogger(__name__)
AXIS = "agents"


def set_cpu_devices(count: int) -> int:
    """Exposes ``count`` CPU devices to JAX (``jax_num_cpu_devices``), so that
    the ``agents`` mesh (``num_devices`` 0 = auto) can spread agents over the
    cores of one CPU: each device's program runs on its own thread, and local
    training under ``shard_map`` then uses several cores where one device's
    small per-agent GEMMs keep about one core busy (``docs/performance.md``,
    section 8). Must run before JAX runs anything.

    Args:
      count: devices; 0 = one per CPU core available to this process
        (``os.sched_getaffinity``).

    Returns:
      The number of CPU devices set.

    Raises:
      ConfigError: ``count`` < 0, or JAX's backends are already initialized
        with another CPU device count (flag ``--cpu_devices``).
    """
    import os

    if int(count) < 0:
        raise ConfigError(
            f"--cpu_devices={count} is not valid; accepted: 0 (one per CPU core) "
            "or >= 1"
        )
    n = int(count) or len(os.sched_getaffinity(0))
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX's backends are initialized already
        have = len(jax.devices("cpu"))
        if have != n:
            raise ConfigError(
                f"--cpu_devices={count} ({n} devices) comes after JAX started with "
                f"{have} CPU device(s); accepted: set it before any JAX operation "
                "(or XLA_FLAGS=--xla_force_host_platform_device_count)"
            ) from None
    return n


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
    if jax.process_count() > 1:
        return _multiprocess_mesh(num_devices, num_agents, available)
    if num_devices == 0:  # auto: the most devices that divide A evenly
        n = max(d for d in range(1, available + 1) if num_agents % d == 0)
        if n < available:
            log.info(
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


def _multiprocess_mesh(num_devices: int, num_agents: int, available: int) -> Mesh:
    """The mesh of a multi-process job: every device of every process.

    A mesh over a subset would leave some process without a shard (or with a
    different share of the population than its peers), so ``num_devices`` must be
    0 (auto) or the global device count.

    Raises:
      ConfigError: other ``num_devices``, or A not divisible by the device count.
    """
    procs = jax.process_count()
    if int(num_devices) not in (0, available):
        raise ConfigError(
            f"num_devices={num_devices!r} is not valid in a {procs}-process job; "
            f"accepted: 0 (auto) or {available} (a multi-process run shards the "
            "agents over every device of every process)"
        )
    if num_agents % available:
        raise ConfigError(
            f"num_agents={num_agents} is not divisible by the {available} devices "
            f"of the {procs}-process '{AXIS}' mesh; accepted: a multiple of "
            f"{available}"
        )
    # jax.devices() lists every process's devices, grouped by process: each
    # process holds a contiguous block of agents.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (AXIS,))


def multiprocess() -> bool:
    """True in a job of several JAX processes (``jax.distributed.initialize``)."""
    return jax.process_count() > 1


def place(x, sharding: NamedSharding):
    """One array on ``sharding``; in a multi-process job from host data.

    Args:
      x: a NumPy array, or a jax.Array (a process-local one, or a global one
        already placed on this mesh). In a multi-process job every process must
        pass the same values (they are not checked).
      sharding: where the result lives.

    Returns:
      A jax.Array with ``sharding``. Single process: ``jax.device_put(x,
      sharding)``. Multi-process: a global array built by
      ``jax.make_array_from_callback`` from ``np.asarray(x)`` (each process fills
      its own shards), or ``jax.device_put`` resharding of an array already
      spread over the mesh's processes.
    """
    if not multiprocess() or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    # As jnp.asarray: float64/int64 become 32-bit unless x64 is enabled.
    host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
    return jax.make_array_from_callback(
        host.shape, sharding, lambda index: host[index], dtype=host.dtype
    )


def to_host(tree):
    """Fetches a pytree of arrays to NumPy, wherever its shards live.

    Single process: ``jax.device_get(tree)``. Multi-process: a replicated leaf is
    read from a local copy; a leaf sharded over other processes' devices is
    gathered with ``multihost_utils.process_allgather(tiled=True)``, a
    collective that every process must call at the same point of the program
    (as every ``jax.jit`` call in a multi-process job). Returns the same shapes
    and dtypes as ``jax.device_get``.
    """
    if not multiprocess():
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return jax.device_get(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def agent_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``agents``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_agents(tree, mesh: Mesh):
    """Places every leaf of a stacked pytree (leaves ``[A, ...]``) on the mesh,
    split along the leading axis (:func:`place`)."""
    s = agent_sharding(mesh)
    return jax.tree.map(lambda x: place(x, s), tree)


def replicate(tree, mesh: Mesh):
    """Every leaf of ``tree`` whole on every device of the mesh (:func:`place`)."""
    s = replicated(mesh)
    return jax.tree.map(lambda x: place(x, s), tree)


def shard_partition(part: Partition, mesh: Mesh) -> Partition:
    """Per-agent arrays sharded over ``agents``; the pooled test set replicated.

    ``part`` may hold NumPy or jax arrays (NumPy avoids a device copy per process
    in a multi-process job)."""
    per_agent = ("x_train", "y_train", "n_train", "x_test", "y_test", "n_test")
    pooled = ("x_all", "y_all", "owner_all")
    return part.replace(
        **{k: shard_agents(getattr(part, k), mesh) for k in per_agent},
        **{k: replicate(getattr(part, k), mesh) for k in pooled},
    )
