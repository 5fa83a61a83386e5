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
import jax.numpy as jnp
import numpy as np

from demjax import local, models, sharding
from demjax.errors import ConfigError
from demjax.pytrees import tree_bytes  # re-exported: memory estimates use it


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


def memory_cap(config, partition, model, tx, *, donate: bool,
               num_group_models: int) -> tuple[int, dict]:  # fmt: skip
    """Most agents trained at once so a round fits in half the free memory
    (A when all fit); in a multi-process job the smallest over processes.

    Counts the stacked population (params and optimizer state: one copy with
    ``donate``, else three and two), the data, ``num_group_models`` group
    models (three copies), and per training agent twice one step's XLA
    temporaries plus its block's copies of params, optimizer state and data.

    With ``config.num_replicas`` R > 1 every replica may train its block at once
    (the round's programs vmapped over the replica axis; with replicas one after
    another, ``plan.over_replicas``, the estimate is conservative): the population,
    group models and per-agent step temporaries count R times, the data R
    times with ``replicate_split`` (else once, shared); ``cap`` is then the
    block of agents per replica.

    Returns:
      ``(cap, probe)``: ``cap`` in ``[1, A]``; ``probe`` the compile time and
      wall time of one agent's gradient step (``memory.probe_step``), which
      size the plan search's budget (``demjax.plan``).

    Raises:
      ConfigError: not even one agent's training fits.
    """
    c = config
    reps = int(c.get("num_replicas", 1) or 1)
    data_reps = reps if c.get("replicate_split", False) else 1
    shape = tuple(partition.input_shape)
    params = jax.eval_shape(
        lambda k: models.init_params(k, model, shape), jax.random.PRNGKey(0)
    )
    opt = jax.eval_shape(tx.init, params)

    def row_bytes(*fields):  # bytes of one agent's rows of these fields
        return sum(
            int(np.prod(getattr(partition, k).shape[1:]))
            * getattr(partition, k).dtype.itemsize
            for k in fields
        )

    data = row_bytes("x_train", "y_train", "x_test", "y_test")
    # Resident for the whole round: the agents' params and optimizer state
    # (trained and mixed in place with donation; without it the local and
    # the mixed results are new copies next to the inputs) and their data.
    # Anchors are gathered per block, never stacked [A, ...].
    copies = 1 if donate else 3
    state = (
        reps * copies * tree_bytes(params)
        + reps * (1 if donate else 2) * tree_bytes(opt)
        + data_reps * data
    )
    # Group models: this round's, the previous round's and the mixed ones.
    groups = reps * 3 * num_group_models * tree_bytes(params)
    x = jax.ShapeDtypeStruct((c.batch_size, *shape), jnp.float32)
    y = jax.ShapeDtypeStruct((c.batch_size,), jnp.int32)

    def step(p, xb, yb, key):
        def loss(p):
            logits = model.apply({"params": p}, xb, train=True, rngs={"dropout": key})
            return local.masked_cross_entropy(logits, yb, jnp.ones_like(yb, bool))

        return jax.grad(loss)(p)

    # Per training agent: twice one step's XLA temporaries, the block's
    # copies of its params (input, anchor, start, scan carry x2, trained,
    # picked) and optimizer state (input, scan carry x2, picked), and its
    # training data sliced out for the block.
    train_data = row_bytes("x_train", "y_train")
    concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (params, x, y))
    probe = probe_step(step, *concrete, jax.random.PRNGKey(0), run=True)
    step_bytes = reps * (
        2 * probe["temp_bytes"]
        + 7 * tree_bytes(params)
        + 4 * tree_bytes(opt)
        + train_data
    )
    block = choose_block_size(
        num_agents=partition.num_agents,
        state_bytes_per_agent=state,
        step_bytes_per_agent=step_bytes,
        fixed_bytes=groups,
    )
    if sharding.multiprocess():
        # Free memory differs between processes, the compiled program must
        # not: every process takes the smallest block (0 = all agents).
        from jax.experimental import multihost_utils

        sizes = multihost_utils.process_allgather(
            np.int32(block or partition.num_agents)
        )
        block = int(np.min(sizes))
    return block or partition.num_agents, probe
