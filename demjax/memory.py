"""Memory estimates that choose how many agents train at once.

A round holds the stacked population (parameters, optimizer state, data:
``[A, ...]`` each; training updates them in place block by block) and the group
models, plus the temporaries of the agents training at once (activations,
gradients, updates, and the block's copies of their parameters, proximal
anchors and data). ``choose_block_size`` measures one
agent's step temporaries with XLA's own ``memory_analysis`` of the compiled step
and picks the largest block of agents that fits in half the free memory.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from demjax.errors import ConfigError


def available_bytes() -> int:
    """Free memory of this process's first device: accelerator ``bytes_limit -
    bytes_in_use``, or the host's ``MemAvailable`` (Linux) for CPU."""
    dev = jax.local_devices()[0]
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements it
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def step_temp_bytes(step_fn, *args) -> int:
    """Temporary bytes XLA allocates for one call of ``step_fn(*args)``."""
    return probe_step(step_fn, *args)["temp_bytes"]


def probe_step(step_fn, *args, run: bool = False) -> dict:
    """Compiles ``step_fn(*args)`` (``args`` may be abstract) and reports its
    temporary bytes (XLA's ``memory_analysis``) and compile time; with ``run``
    (concrete ``args``) also the best of two calls' wall time.

    Returns:
      dict with ``temp_bytes`` (int), ``compile_s`` and, with ``run``, ``run_s``
      (float seconds).
    """
    t0 = time.perf_counter()
    compiled = jax.jit(step_fn).lower(*args).compile()
    out = {"compile_s": time.perf_counter() - t0}
    analysis = compiled.memory_analysis()
    out["temp_bytes"] = (
        0 if analysis is None else int(getattr(analysis, "temp_size_in_bytes", 0))
    )
    if run:
        from demjax.plan import best_time

        jax.block_until_ready(compiled(*args))
        out["run_s"] = best_time(compiled, *args, min_total_s=0.05)
    return out


def choose_block_size(
    *,
    num_agents: int,
    state_bytes_per_agent: int,
    step_bytes_per_agent: int,
    fixed_bytes: int = 0,
    available: int | None = None,
    fraction: float = 0.5,
) -> int:
    """Largest number of agents to train at once.

    Args:
      num_agents: A.
      state_bytes_per_agent: resident bytes per agent (params, optimizer state,
        updated copies, data).
      step_bytes_per_agent: temporaries of one training agent (its step, and its
        block's copies of its params, anchor, optimizer state and data).
      fixed_bytes: resident bytes that do not scale with the agents trained at
        once (e.g. the group models).
      available: free bytes (default ``available_bytes()``).
      fraction: share of the free memory the round may use.

    Returns:
      0 when the whole population fits at once (no blocking), else the block size.

    Raises:
      ConfigError: the population's resident state alone, or one agent's step on
        top of it, does not fit (the message gives the numbers and the fields to
        change: ``num_agents``, ``model``, ``batch_size``).
    """
    budget = int(fraction * (available_bytes() if available is None else available))
    resident = num_agents * state_bytes_per_agent + fixed_bytes
    room = budget - resident
    gib = 2.0**30
    if room < step_bytes_per_agent:
        raise ConfigError(
            f"num_agents={num_agents} does not fit: the population needs "
            f"{resident / gib:.2f} GiB resident plus {step_bytes_per_agent / gib:.3f} "
            f"GiB per training agent, {budget / gib:.2f} GiB usable; accepted: fewer "
            "agents, a smaller model or batch_size, or more devices"
        )
    block = room // max(step_bytes_per_agent, 1)
    return 0 if block >= num_agents else int(block)
