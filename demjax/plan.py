"""Execution plans of local training, chosen by measurement.

Local training of ``A`` agents has several correct plans that give the same
results to float tolerance and differ only in speed:

- ``all``: one ``vmap`` over every agent (capped by memory);
- ``block:K``: a ``lax.fori_loop`` over blocks of ``K`` agents, each block a
  ``vmap`` that runs all its local steps while its weights are hot in cache;
- ``sequential``: a ``lax.fori_loop`` over agents, one agent after another inside
  one jitted program (no ``vmap``: plain 2-D matmuls, each agent running exactly
  its own number of steps).

Each plan also has variants of the model's kernels with interchangeable
parameters: for convolutional models two convolution implementations,
``patches`` (im2col GEMMs) and ``xla`` (``lax.conv``); for every model two forms
of the dense weight gradient, ``xla`` and ``wgrad_t`` (``models.matmul``: an
explicit transpose that lets XLA:CPU's GEMM library take the weight-gradient
dot, see ``docs/performance.md``).

Which plan is fastest depends on the model, the shapes and the machine: on
XLA:CPU a vmapped dense layer becomes a batched dot that runs several times
below a plain GEMM on some CPUs and not on others; on an accelerator the largest
batch wins. No rule carries over, so ``config.local_plan = "auto"`` times every
candidate on real local steps of the run's own model, optimizer, data shapes and
gradient before round 0, keeps the fastest, and caches the choice in a JSON file
keyed by the model, shapes, device kind, CPU model and library versions, so the
next run with the same key starts at once.

Candidates are timed on equal step counts, on enough agents that one call
lasts at least ``MIN_CALL_S`` (sized from the probe's step time), after an
untimed warm-up call; a vmapped plan's speed is then
scaled by the run's share of real steps among its padded step slots (agents of
a step-count bucket all run the bucket's largest count), which the sequential
plan does not pay.

The search's cost is bounded: it may spend 10% (``SEARCH_FRACTION``) of the
run's local training time estimated from one agent's gradient step. Agents one
after another are timed first with the default kernels (whatever the budget),
then all agents at once (capped by memory), agents one after another with each
other kernel variant, and growing blocks until the budget is spent or growing
the block only makes it slower. Then the finalists (the fastest candidate and
the next two larger block sizes of its series, which a small population
handicaps, and any within 25% timed on the whole population) are timed again
with the run's own shape per agent (samples, epochs, steps), those timed on a
small population on one equal, larger population (on few agents weights and
data stay in cache, and the ranking of block sizes can flip on the whole
population); while the largest block wins there, the block twice its size is
timed too. Each is timed while the budget left pays for it, and when all are,
the choice is made on those timings. Candidates within 2x
of the fastest are then timed again in interleaved rounds (``RETIME_ROUNDS``),
so that load from other processes on a shared machine does not decide between
them. The share of the machine's CPU time that other work took during the search
is measured (``CpuMeter``: ``/proc/stat``, steal time included) and recorded as
``outside_load``; a choice measured while others took more than
``OUTSIDE_LOAD_MAX`` of it is used but not cached, so a busy moment is not
remembered for later runs.

A short run's budget can end the search after two or three candidates (an MLP
of 100 agents x 100 rounds: about 4 s, one compilation costs about 1 s). Such a
search is cached as *incomplete* together with its table, and the next run with
the same key resumes it: it takes the stored timings as they are and spends its
own budget on the candidates not yet timed, until a run finishes the search;
from then on runs take the choice from the cache at once. A researcher running
seeds or a hyper-parameter grid of one workload thus reaches the plan a full
search would choose, each run still within its own budget.

With several CPU devices in one process (``scripts/run.py`` exposes one per
core) and ``num_devices=0``, the device count is a choice too
(``resolve_devices``): the best plan over all agents on one device and the best
plan of one device's agents run on every device at once (``jax.shard_map``)
are searched with half the budget each, then timed against each other, and the
faster is kept and cached. Small per-agent GEMMs keep one device on about one
core, so ``sequential`` gains about the device count from sharding, while all
agents at once already uses every core and gains nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from demjax.errors import ConfigError

PLAN_KINDS = ("auto", "all", "sequential", "block:K")
"""Accepted values of ``config.local_plan`` (K an integer >= 1)."""

CONV_CHOICES = ("auto", "patches", "xla")
"""Accepted values of ``config.conv_impl``."""

MATMUL_CHOICES = ("auto", "xla", "wgrad_t")
"""Accepted values of ``config.matmul_impl``."""

SEARCH_FRACTION = 0.10
"""Largest share of the run's estimated local training time the search spends."""

RETIME_WITHIN = 0.5
"""Candidates at least this fraction of the fastest speed are timed again (on
a 2-core machine shared with other jobs, timings of one candidate have varied
by 2-3x)."""

WHOLE_WITHIN = 0.75
"""A candidate timed on the whole population (all agents, or blocks of the
memory cap) at least this fraction of the fastest speed is a finalist of the
timing at scale whatever its rank: the others were timed with their weights
and data in cache, which has been worth up to 10-20% (MLP, 100 agents:
``all`` 0.91x ``block:8`` on 40 agents x 8 steps, 1.02x on 100 agents x 20;
``docs/performance.md``)."""

RETIME_ROUNDS = 3
"""Interleaved rounds of re-timing of the near-best candidates (at most
``RETIME_MAX`` of them)."""

RETIME_MAX = 3

MIN_CALL_S = 0.05
"""Shortest timed call of a candidate, in seconds: the search times at least
``MIN_CALL_S / (steps x one agent's step time from the probe)`` agents per call
(fewer only when A is smaller), so that a call is long against timer and
scheduler noise."""

TIME_S = 0.25
"""Seconds spent timing a candidate's calls after its warm-up call (at least
two calls, the best counts); re-timing rounds and evaluation candidates spend
``RETIME_S``."""

RETIME_S = 0.1

HOPELESS_BELOW = 0.125
"""A candidate whose untimed warm-up call already runs below this fraction of
the best speed so far is not called again: its warm-up time is its timing. (A
cold first call has run at a third of the warm speed, never at an eighth; the
candidates this drops, e.g. ``lax.conv`` convolutions on a CPU where im2col
runs 10x faster, cost seconds per call.)"""

SCALE_CALLS = 4
"""Calls predicted per candidate timed at scale (``measure_local``: a warm-up
call, a first timed call and at least two more within ``TIME_S``):
``_scale_up``'s cost model. The interleaved re-timing afterwards takes what
budget is left (``_retime_near_best``)."""

RETIME_MAX_BYTES = 256 * 2**20
"""A candidate whose timing data exceed this many bytes is not kept for
re-timing (its data would stay in memory through the rest of the search)."""

OUTSIDE_LOAD_MAX = 0.25
"""A search during which other work (other processes, and CPU time the
hypervisor gave to other machines: ``steal``) took more than this share of the
machine's CPU time is *contended*: its choice is used for the run but not
cached, so the next run measures again."""

_BLOCK_RE = re.compile(r"^block:(\d+)$")


@dataclasses.dataclass(frozen=True)
class LocalPlan:
    """One execution plan of local training.

    Attributes:
      block_size: agents trained at once; 0 = all agents, 1 = sequential.
      conv_impl: ``patches`` or ``xla`` (only matters for convolutional models).
      matmul_impl: ``xla`` or ``wgrad_t`` (``models.matmul``).
    """

    block_size: int
    conv_impl: str = "patches"
    matmul_impl: str = "xla"

    @property
    def name(self) -> str:
        if self.block_size == 0:
            return "all"
        if self.block_size == 1:
            return "sequential"
        return f"block:{self.block_size}"


def parse_plan(value) -> int | None:
    """Block size of a ``config.local_plan`` value (None for ``auto``).

    Returns:
      None for ``auto``; 0 for ``all``; 1 for ``sequential``; K for ``block:K``.

    Raises:
      ConfigError: any other value (the message names ``local_plan``).
    """
    if isinstance(value, str):
        if value == "auto":
            return None
        if value == "all":
            return 0
        if value == "sequential":
            return 1
        m = _BLOCK_RE.match(value)
        if m and int(m.group(1)) >= 1:
            return int(m.group(1))
    raise ConfigError(
        f"local_plan={value!r} is not valid; accepted: auto, all, sequential, "
        "block:K (K an integer >= 1)"
    )


def block_candidates(num_agents: int, cap: int) -> list[int]:
    """Block sizes tried by the search, ascending: 1, 2, 4, ... below ``cap``,
    then ``cap`` itself (``cap`` = the most agents that fit at once, <= A)."""
    out, k = [], 1
    while k < cap:
        out.append(k)
        k *= 2
    out.append(cap)
    return out


# ---------------------------------------------------------------------------
# Cache


def cache_path() -> str:
    """The plan cache file: ``$DEMJAX_CACHE_DIR/plans.json`` (default
    ``~/.cache/demjax``)."""
    root = os.environ.get("DEMJAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "demjax"
    )
    return os.path.join(root, "plans.json")


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` ('' if unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cache_key(fields: dict) -> str:
    """A stable key of the plan-relevant description ``fields`` plus the device
    kind, CPU model and library versions."""
    dev = jax.local_devices()[0]
    full = dict(
        fields,
        backend=jax.default_backend(),
        device_kind=str(getattr(dev, "device_kind", "")),
        local_devices=jax.local_device_count(),
        cpu=cpu_model(),
        jax=jax.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
    text = json.dumps(full, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read_cache() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cache_get(key: str) -> dict | None:
    """The cached entry for ``key`` (``{"plan": {...}, "table": [...]}``) or None.
    An unreadable cache file counts as empty."""
    entry = _read_cache().get(key)
    if not isinstance(entry, dict) or "plan" not in entry:
        return None
    return entry


def cache_put(key: str, entry: dict) -> None:
    """Stores ``entry`` under ``key`` (atomic replace; failures only logged: the
    cache is an optimisation)."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_cache()
        data[key] = entry
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # read-only home, full disk: run without the cache
        logging.warning("could not write the plan cache %s: %s", path, e)


# ---------------------------------------------------------------------------
# Outside load


def _cpu_sample() -> tuple[float, float, float] | None:
    """``(own CPU s, machine busy CPU s, machine total CPU s)`` now: this
    process's user + system time (all threads) and the machine's CPU time
    summed over CPUs from ``/proc/stat`` (busy = user, nice, system, irq,
    softirq and steal; total adds idle and iowait). None where ``/proc/stat``
    is unreadable (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[1:9])
    hz = float(os.sysconf("SC_CLK_TCK"))
    busy = (user + nice + system + irq + softirq + steal) / hz
    total = busy + (idle + iowait) / hz
    t = os.times()
    return t.user + t.system, busy, total


class CpuMeter:
    """The share of the machine's CPU time that other work took since
    construction: ``(machine busy - own) / machine total`` over the span, from
    ``/proc/stat`` and ``os.times`` (in a container ``/proc/stat`` may count
    CPUs the process cannot use, which only makes the share smaller)."""

    def __init__(self):
        self.start = _cpu_sample()

    def outside_share(self) -> float | None:
        """Share in ``[0, 1]`` of the machine's CPU time used by others since
        construction; None when it cannot be measured."""
        end = _cpu_sample()
        if self.start is None or end is None:
            return None
        own, busy, total = (b - a for a, b in zip(self.start, end, strict=True))
        if total <= 0:
            return None
        return float(min(1.0, max(0.0, (busy - own) / total)))


def _cacheable(what: str, share: float | None, chosen: str) -> bool:
    """False (with a warning) when the search ran contended (``share`` above
    ``OUTSIDE_LOAD_MAX``)."""
    if share is None or share <= OUTSIDE_LOAD_MAX:
        return True
    logging.warning(
        "%s search ran while other work used %.0f%% of the machine's CPU time "
        "(more than %.0f%%): %s is used for this run but not cached; the next "
        "run measures again",
        what, 100 * share, 100 * OUTSIDE_LOAD_MAX, chosen,
    )  # fmt: skip
    return False


# ---------------------------------------------------------------------------
# Measurement


def best_time(fn, *args, min_total_s: float = 0.25, max_calls: int = 20) -> float:
    """Best wall time of calls of ``fn(*args)`` (compiled and called once
    before): at least two calls, more until ``min_total_s`` seconds have been
    spent (at most ``max_calls``). The minimum is the estimate least disturbed
    by other work on a shared machine."""
    best, total, calls = float("inf"), 0.0, 0
    while calls < 2 or (total < min_total_s and calls < max_calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        best, total, calls = min(best, dt), total + dt, calls + 1
    return best


def _run_time(compiled, args, units: float, floor: float, min_total_s: float):
    """Seconds per call of ``compiled(*args)``. A first, untimed call pays the
    one-time costs (allocation, page faults of fresh buffers); when it runs
    below ``HOPELESS_BELOW`` of ``floor`` (``units`` per second, the best speed
    so far) its time is the answer; when the second call runs below half of
    ``floor`` that is the answer, else ``best_time``."""
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))  # warm-up: allocation, page faults
    warm_s = time.perf_counter() - t0
    if units / max(warm_s, 1e-9) < HOPELESS_BELOW * floor:
        return warm_s  # far below the best even allowing for a cold call
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first_s = time.perf_counter() - t0
    if units / max(first_s, 1e-9) < 0.5 * floor:
        return first_s  # far below the best so far: not worth more calls
    return min(first_s, best_time(compiled, *args, min_total_s=min_total_s))


class _PastPeak:
    """Tracks the best speed of a series of growing candidates: ``done(speed)``
    is True after two sizes slower than the best by more than 15%."""

    def __init__(self, best: float = 0.0):
        self.best, self.worse = best, 0

    def done(self, speed: float) -> bool:
        if speed > self.best:
            self.best, self.worse = speed, 0
        elif speed < 0.85 * self.best:
            self.worse += 1
        return self.worse >= 2


def _timed_agents(block_size: int, num_agents: int, min_agents: int = 8) -> int:
    """Agents a candidate is timed on: all for ``block_size`` 0, else two
    blocks' worth, at least ``min_agents`` (a whole number of blocks), at most
    A."""
    if block_size == 0:
        return num_agents
    blocks = max(2, -(-max(8, int(min_agents)) // block_size))
    return min(num_agents, blocks * block_size)


def measure_local(
    make_trainer: Callable[[int, str, np.ndarray], Callable],
    init_params: Callable[[str], object],
    tx,
    x: np.ndarray,
    y: np.ndarray,
    *,
    block_size: int,
    conv_impl: str,
    matmul_impl: str = "xla",
    num_agents: int,
    batch_size: int,
    steps: int,
    mu: float,
    floor: float = 0.0,
    min_agents: int = 8,
    samples: int | None = None,
    epochs: int = 1,
    mesh=None,
) -> dict:
    """Times one plan on ``steps`` real local steps per agent.

    The timed program is the engine's own local training
    (``make_trainer(block_size, conv_impl, matmul_impl, n_train, epochs)``)
    for ``m`` agents, each with ``steps * batch_size`` samples and one epoch
    (or, with ``samples``, ``samples`` rows and ``epochs`` epochs, the run's
    own shape: ``steps`` must then be ``epochs * ceil(samples /
    batch_size)``): ``m = num_agents`` for all agents at once, else two
    blocks' worth, at least ``min_agents`` (a whole number of blocks) and at
    most A.

    Args:
      make_trainer: ``(block_size, conv_impl, matmul_impl, n_train int [m],
        local_epochs) -> train`` with
        the signature of ``local.make_train_population``'s result.
      init_params: ``conv_impl -> one agent's params`` (unstacked).
      tx: the agents' optax optimizer.
      x, y: real training rows ``[A', N', ...]`` / ``[A', N']`` to draw from
        (agents and rows are reused cyclically).
      floor: the best speed measured so far (agent-steps/s); a candidate whose
        first warm call runs below half of it is not timed again.
      min_agents: fewest agents timed (the search sizes it so that one call
        lasts at least ``MIN_CALL_S``: a few milliseconds are too short to time
        on a shared machine).
      mesh: None (one device), or a 1-D ``agents`` mesh of D devices (single
        process): the plan then runs on every device at once under
        ``jax.shard_map`` (the engine's sharded local phase), ``num_agents``
        and ``min_agents`` being one device's; the record's ``agents`` are
        one device's, ``agent_steps_per_s`` those of all D devices, and it
        has ``devices`` D.

    Returns:
      dict with ``plan``, ``agents``, ``steps``, ``compile_s``, ``run_s``,
      ``agent_steps_per_s`` and, unless its data exceed ``RETIME_MAX_BYTES``,
      ``_retime`` (a function that times the compiled program again and
      returns its agent-steps/s; ``search`` drops it from the table).
    """
    shards = 1 if mesh is None else int(mesh.devices.size)
    per_shard = _timed_agents(block_size, num_agents, min_agents)
    a = per_shard * shards
    if samples is None:
        n, epochs = steps * batch_size, 1
    else:
        n = int(samples)
        if int(epochs) * -(-n // batch_size) != steps:
            raise ValueError(
                f"steps={steps} is not epochs x ceil(samples / batch_size) = "
                f"{epochs} x ceil({n} / {batch_size})"
            )
    rows = np.arange(a) % x.shape[0]
    cols = np.arange(n) % x.shape[1]
    xs, ys = x[rows][:, cols], y[rows][:, cols]
    one = init_params(conv_impl)
    train = make_trainer(
        block_size, conv_impl, matmul_impl, np.full(per_shard, n), epochs
    )

    def run(one, xs, ys):
        # Population, optimizer state and keys are built inside the one
        # compiled program (no eager op compiles per candidate).
        params = jax.tree.map(
            lambda v: jnp.broadcast_to(v, (per_shard,) + v.shape), one
        )
        opt = jax.vmap(tx.init)(params)
        keys = jax.random.split(jax.random.PRNGKey(0), per_shard)
        ns = jnp.full((per_shard,), n, jnp.int32)
        return train(keys, params, opt, xs, ys, ns, params, jnp.float32(mu))

    args = (one, xs, ys)
    if mesh is not None:  # each device trains its own agents (shard_map)
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from demjax import sharding

        spec = P(sharding.AXIS)
        run = jax.shard_map(
            run, mesh=mesh, in_specs=(P(), spec, spec), out_specs=spec,
            check_vma=False,
        )  # fmt: skip
        args = (
            jax.device_put(one, NamedSharding(mesh, P())),
            jax.device_put(xs, NamedSharding(mesh, spec)),
            jax.device_put(ys, NamedSharding(mesh, spec)),
        )
    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    run_s = _run_time(compiled, args, a * steps, floor, min_total_s=TIME_S)
    plan = LocalPlan(
        block_size if block_size < num_agents else 0, conv_impl, matmul_impl
    )
    extra = {} if mesh is None else {"devices": shards}

    def retime() -> float:  # agent-steps/s of a few more calls
        return a * steps / max(best_time(compiled, *args, min_total_s=RETIME_S), 1e-9)

    rec = {} if xs.nbytes + ys.nbytes > RETIME_MAX_BYTES else {"_retime": retime}
    return rec | {
        "plan": plan.name,
        "conv_impl": conv_impl,
        "matmul_impl": matmul_impl,
        "agents": int(per_shard),
        "steps": int(steps),
        "compile_s": round(compile_s, 4),
        "run_s": round(run_s, 5),
        "agent_steps_per_s": round(a * steps / max(run_s, 1e-9), 2),
    } | extra


REPLICA_MODES = ("auto", "vmap", "one_at_a_time")


def take_replica(tree, r):
    """Replica ``r`` (int or traced index) of a pytree stacked over replicas."""
    return jax.tree.map(lambda v: v[r], tree)


def over_replicas(fn: Callable, part_axis: int | None, one_at_a_time: bool,
                  name: str = "") -> Callable:  # fmt: skip
    """Phase ``fn(state, part, key, t) -> (state, info)`` of one replica as a
    phase of R replicas stacked on axis 0 (``part`` stacked when
    ``part_axis == 0``, shared when None; ``t`` shared).

    ``one_at_a_time=False``: ``jax.vmap`` (the replicas' agents form one batch
    of R x A). ``True``: the replicas run one after another in a
    ``lax.fori_loop`` that updates the stacked state in place, so every
    replica runs exactly its population's plan (a vmapped ``sequential``
    plan turns each agent's plain GEMMs into dots batched over the replicas).
    Both give each replica the result of its own one-replica run. Falls back
    to ``vmap`` (logged) when the phase's output state differs in structure,
    shape or dtype from its input (no in-place update possible).
    """
    vmapped = jax.vmap(fn, in_axes=(0, part_axis, 0, None))
    if not one_at_a_time:
        return vmapped

    def run(state, part, key, t):
        num = jax.tree.leaves(key)[0].shape[0]

        def one(st, r):
            mine = part if part_axis is None else take_replica(part, r)
            return fn(take_replica(st, r), mine, take_replica(key, r), t)

        out_state, out_info = jax.eval_shape(lambda: one(state, 0))
        in_state = jax.eval_shape(lambda: take_replica(state, 0))
        same = jax.tree.structure(out_state) == jax.tree.structure(in_state) and all(
            a.shape == b.shape and a.dtype == b.dtype
            for a, b in zip(
                jax.tree.leaves(out_state), jax.tree.leaves(in_state), strict=True
            )
        )
        if not same:
            logging.info("phase %s: replicas vmapped (its output state is not "
                         "its input's shape)", name)  # fmt: skip
            return vmapped(state, part, key, t)
        info0 = jax.tree.map(lambda s: jnp.zeros((num, *s.shape), s.dtype), out_info)

        def body(r, carry):
            st, info = carry
            new_st, new_info = one(st, r)
            put = lambda stacked, v: stacked.at[r].set(v)  # noqa: E731
            return jax.tree.map(put, st, new_st), jax.tree.map(put, info, new_info)

        return jax.lax.fori_loop(0, num, body, (state, info0))

    return run


def measure_replicas(
    make_trainer: Callable,
    init_params: Callable[[str], object],
    tx,
    x: np.ndarray,
    y: np.ndarray,
    *,
    plan: LocalPlan,
    replicas: int,
    num_agents: int,
    batch_size: int,
    steps: int,
    mu: float,
) -> list[dict]:
    """Times ``plan``'s local training of R = ``replicas`` populations both
    ways ``over_replicas`` runs them: vmapped and one after another.

    Each replica trains two blocks' worth of agents (at least 8, at most A;
    ``measure_local``'s population) for ``steps`` steps on real rows ``x, y``
    (reused cyclically), in one compiled program per mode; the modes are timed
    in interleaved rounds (``RETIME_ROUNDS``), keeping each one's best.

    Returns:
      ``[{"replica_plan", "agents", "replicas", "steps", "compile_s",
      "agent_steps_per_s"}, ...]``, vmap first.
    """
    a = _timed_agents(plan.block_size, num_agents)
    n = steps * batch_size
    rows, cols = np.arange(a) % x.shape[0], np.arange(n) % x.shape[1]
    xs, ys = x[rows][:, cols], y[rows][:, cols]
    one = init_params(plan.conv_impl)
    train = make_trainer(plan.block_size, plan.conv_impl, plan.matmul_impl,
                         np.full(a, n), 1)  # fmt: skip

    def phase(state, part, key, t):
        params, opt = state
        keys = jax.random.split(key, a)
        ns = jnp.full((a,), n, jnp.int32)
        p, o, loss = train(keys, params, opt, part[0], part[1], ns, params,
                           jnp.float32(mu))  # fmt: skip
        return (p, o), {"loss": loss}

    recs, fns = [], []
    for mode in REPLICA_MODES[1:]:
        prog = over_replicas(phase, None, mode == "one_at_a_time")

        def run(one, xs, ys, prog=prog):
            params = jax.tree.map(
                lambda v: jnp.broadcast_to(v, (replicas, a) + v.shape), one
            )
            opt = jax.vmap(jax.vmap(tx.init))(params)
            keys = jax.random.split(jax.random.PRNGKey(0), replicas)
            return prog((params, opt), (xs, ys), keys, jnp.int32(0))

        t0 = time.perf_counter()
        compiled = jax.jit(run).lower(one, xs, ys).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(one, xs, ys))  # warm-up
        fns.append(compiled)
        recs.append({"replica_plan": mode, "agents": a, "replicas": replicas,
                     "steps": steps, "compile_s": round(compile_s, 4)})  # fmt: skip
    best = [float("inf")] * len(fns)
    for _ in range(RETIME_ROUNDS):
        for i, f in enumerate(fns):
            best[i] = min(best[i], best_time(f, one, xs, ys, min_total_s=RETIME_S))
    for r, b in zip(recs, best, strict=True):
        r["agent_steps_per_s"] = round(replicas * a * steps / max(b, 1e-9), 2)
    return recs


def resolve_replicas(
    config,
    plan: LocalPlan,
    *,
    budget_s: float,
    key_fields: dict,
    measure: Callable[[], list[dict]],
) -> dict | None:
    """How the phases of a run with R > 1 replicas run over them
    (``over_replicas``): ``config.replica_plan``, or with ``auto`` measured.

    ``auto``: a plan training every agent at once keeps ``vmap`` (one batch
    of R x A agents, what wins on accelerators); a plan of agent blocks or
    ``sequential`` times both modes (``measure``, i.e. ``measure_replicas``)
    when ``budget_s`` > 0 (the caller passes what is left of the search's
    share after the local plan's search and the two compilations) and keeps
    the faster; the choice is cached like the local plan (keyed by
    ``key_fields``, the plan and R) unless other work took more than
    ``OUTSIDE_LOAD_MAX`` of the machine meanwhile. Without the budget:
    ``vmap``.

    Returns:
      None for R = 1, else ``{"mode", "source", "table"}`` (source ``config``,
      ``rule``, ``cache``, ``measured`` or ``prior``).
    """
    reps = int(getattr(config, "num_replicas", 1))
    if reps == 1:
        return None
    want = str(config.replica_plan)
    if want != "auto":
        return {"mode": want, "source": "config", "table": []}
    if plan.block_size == 0:
        return {"mode": "vmap", "source": "rule", "table": []}
    key = cache_key(dict(key_fields, replicas=reps, plan=plan.name,
                         conv_impl=plan.conv_impl, matmul_impl=plan.matmul_impl,
                         what="replica_plan"))  # fmt: skip
    entry = cache_get(key)
    if entry is not None:
        return {"mode": entry["plan"]["mode"], "source": "cache",
                "table": entry.get("table", [])}  # fmt: skip
    if budget_s <= 0:
        return {"mode": "vmap", "source": "prior", "table": []}
    meter = CpuMeter()
    t0 = time.perf_counter()
    table = measure()
    top = max(table, key=lambda r: r["agent_steps_per_s"])
    share = meter.outside_share()
    out = {"mode": top["replica_plan"], "source": "measured", "table": table,
           "search_s": round(time.perf_counter() - t0, 3)}  # fmt: skip
    if _cacheable("replica plan", share, out["mode"]):
        cache_put(key, {"plan": {"mode": out["mode"]}, "table": table})
    return out


def search(
    measure: Callable[[int, str], dict],
    *,
    num_agents: int,
    cap: int,
    variants: tuple[tuple[str, str], ...],
    budget_s: float,
    at_scale: Callable[..., dict] | None = None,
    scale_steps: int = 0,
    scale_max_agents: int = 0,
    prior: list[dict] | None = None,
) -> tuple[LocalPlan, list[dict], bool]:
    """Measures candidate plans and returns the fastest.

    Order: agents one after another (``sequential``) with the first kernel
    variant, whatever the budget; all agents at once with it (capped by
    memory: ``cap`` agents, which then is ``block:cap``); ``sequential`` with
    each other variant; then, with the first variant, blocks of 2, 4, ...
    agents in ascending order; then, per
    further variant, blocks of 2, 4, ... agents. A series stops when two
    sizes are slower than its best by more than 15% (speed has been unimodal
    in the block size in every case measured); a further variant's series
    counts from the best of all candidates so far, so a variant that stays
    more than 15% below it stops after two sizes, and a variant whose
    ``sequential`` ran below ``HOPELESS_BELOW`` of the best gets no block
    series (``lax.conv`` on a CPU where im2col runs 10x faster: its blocks
    cost 7-8 s each of the paper CNN's 50 s budget). The search stops before a
    measurement that would take it past ``budget_s`` (predicted from the
    previous measurement's cost).
    Then, when ``at_scale`` is given, the finalists (``_scale_up``: the
    fastest candidate and the next two larger block sizes of its series, plus
    those within ``WHOLE_WITHIN`` timed on the whole population) are timed
    again with the run's own shape per agent, those timed on a small
    population on one equal, larger population: on a small population the
    agents' weights and data stay in cache, and the block size that wins there
    lost by 9% on the whole population (MLP, 10,000 agents,
    ``docs/performance.md``). Each
    is timed while the budget left pays for it (compilation plus
    ``SCALE_CALLS`` calls at its first speed, plus ``TIME_S``); while the
    largest block of a series wins at scale, the block twice its size is timed
    too (``_larger_block``); when all are timed, the choice is made among the
    finalists on these timings only.
    Finally, the candidates within ``RETIME_WITHIN`` of the fastest (at most
    ``RETIME_MAX``, and only as many as the budget left pays for, predicted from
    their ``run_s``) are timed again in ``RETIME_ROUNDS`` interleaved rounds
    (records with a ``_retime`` function only), each keeping its best speed.

    A search that its budget stopped is *incomplete*; the next run with the
    same workload resumes it (``prior``): the candidates in the stored table
    are not timed again (their stored records stand in, marked
    ``resumed``), and the run spends its own budget on the candidates after
    them in the order above, so that a short run's search, cut after two or
    three candidates, reaches every candidate over a few runs.

    Args:
      measure: ``(block_size, (conv_impl, matmul_impl), floor) -> record``
        (``measure_local``; ``floor`` the best speed so far).
      num_agents: A.
      cap: most agents that fit at once (``<= A``).
      variants: ``(conv_impl, matmul_impl)`` pairs to try, the first one the
        default.
      budget_s: seconds the search may spend.
      at_scale: ``(block_size, (conv_impl, matmul_impl), agents, floor) ->
        record``: a candidate timed on exactly ``agents`` agents with
        ``scale_steps`` steps each; None: no timing at scale.
      scale_steps: steps per agent of the timings at scale (the run's own).
      scale_max_agents: most agents a timing at scale may hold (its data must
        fit ``RETIME_MAX_BYTES``).
      prior: the table of an incomplete search of the same workload (a
        cached entry's ``table``), or None. Its records timed at scale stand
        in for the same plan and kernels at ``scale_steps`` (the population of
        a timing at scale does not depend on the budget, ``_scale_up``).

    Returns:
      ``(plan, table, complete)``: the fastest plan; every record (with
      ``search_s``, the time spent so far, appended to each; re-timed records
      carry ``first_agent_steps_per_s``, the speed of their first timing;
      records timed at scale carry ``at_scale: True``; records taken from
      ``prior`` carry ``resumed: True`` and their stored ``search_s``);
      ``complete``: False when the budget stopped the search before its last
      candidate or before the last timing at scale it planned.
    """
    t_start = time.perf_counter()
    recs: list[dict] = []
    last_cost = [0.0]
    stored = {
        (r["plan"], r["conv_impl"], r.get("matmul_impl", "xla")): r
        for r in prior or () if not r.get("at_scale")
    }  # fmt: skip
    stored_at_scale = {
        (r["plan"], r["conv_impl"], r.get("matmul_impl", "xla"), int(r["steps"])): r
        for r in prior or () if r.get("at_scale")
    }  # fmt: skip
    cut = [False]  # the budget stopped the search

    def timed(k, impl):
        name = LocalPlan(k if k < num_agents else 0).name
        old = stored.get((name, *impl))
        if old is not None:  # resumed: timed by an earlier run
            old = {x: v for x, v in old.items() if x != "retimed"}
            recs.append(dict(old, resumed=True))
            return old["agent_steps_per_s"]
        t0 = time.perf_counter()
        floor = max((r["agent_steps_per_s"] for r in recs), default=0.0)
        rec = measure(k, impl, floor)
        last_cost[0] = time.perf_counter() - t0
        recs.append(dict(rec, search_s=round(time.perf_counter() - t_start, 3)))
        return rec["agent_steps_per_s"]

    def affordable():
        ok = time.perf_counter() - t_start + last_cost[0] <= budget_s
        cut[0] = cut[0] or not ok
        return ok

    sizes = block_candidates(num_agents, cap)
    peaks = {impl: _PastPeak() for impl in variants}
    # The default variant's sequential (whatever the budget) and all agents at
    # once, then the other variants' sequential, then the block series.
    peaks[variants[0]].done(timed(1, variants[0]))
    if cap > 1 and affordable():
        timed(cap, variants[0])
    for impl in variants[1:]:
        if affordable():
            peaks[impl].done(timed(1, impl))
    for impl in variants:
        if impl != variants[0]:  # measured against the best of every series
            peaks[impl].best = best = max(r["agent_steps_per_s"] for r in recs)
            seq = [
                r for r in recs
                if r["plan"] == "sequential"
                and (r["conv_impl"], r["matmul_impl"]) == impl
            ]  # fmt: skip
            if seq and seq[0]["agent_steps_per_s"] < HOPELESS_BELOW * best:
                continue  # kernels far below the best: no block series
        for k in sizes:
            if k == 1 or (impl == variants[0] and k == cap):
                continue  # measured first
            if not affordable() or peaks[impl].done(timed(k, impl)):
                break
    final = recs
    planned = None
    if at_scale is not None and not cut[0]:
        planned = _scale_up(
            recs, num_agents=num_agents, cap=cap, steps=scale_steps,
            max_agents=scale_max_agents,
        )  # fmt: skip
    if planned is not None:
        todo, kept = planned
        scaled: list[tuple[dict, int]] = []  # (record at scale, its population)
        while todo:
            r, m = todo.pop(0)  # fastest first
            impl = (r["conv_impl"], r["matmul_impl"])
            old = stored_at_scale.get((r["plan"], *impl, int(scale_steps)))
            if old is not None:  # timed at scale by an earlier run
                recs.append(dict(old, resumed=True))
            else:
                calls_s = (
                    m * max(1, int(scale_steps)) / max(r["agent_steps_per_s"], 1e-9)
                )
                cost = float(r.get("compile_s", 0.0)) + TIME_S + SCALE_CALLS * calls_s
                if time.perf_counter() - t_start + cost > budget_s:
                    cut[0] = True  # the next run times the rest
                    break
                speeds = [x["agent_steps_per_s"] for x in kept] + [
                    x["agent_steps_per_s"] for x, _ in scaled
                ]  # fmt: skip
                rec = at_scale(parse_plan(r["plan"]), impl, m, max(speeds, default=0.0))
                # One dict in the table and in the final set (re-timed below).
                spent = round(time.perf_counter() - t_start, 3)
                recs.append(dict(rec, at_scale=True, search_s=spent))
            scaled.append((recs[-1], m))
            if not todo:
                todo = _larger_block(scaled, kept, cap=cap, num_agents=num_agents)
        if not cut[0]:
            final = kept + [x for x, _ in scaled]
        else:  # the small-population choice (timings of one kind)
            final = [r for r in recs if not r.get("at_scale")]
    _retime_near_best(final, budget_s - (time.perf_counter() - t_start))
    top = max(final, key=lambda r: r["agent_steps_per_s"])
    table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in recs]
    return (
        LocalPlan(parse_plan(top["plan"]), top["conv_impl"], top["matmul_impl"]),
        table,
        not cut[0],
    )


def _whole(r: dict, num_agents: int, cap: int) -> bool:
    """Timed on every agent, or in blocks of ``cap`` (the largest that fit)."""
    return int(r["agents"]) >= num_agents or parse_plan(r["plan"]) in (0, cap)


def _scale_up(recs: list[dict], *, num_agents: int, cap: int, steps: int,
              max_agents: int):  # fmt: skip
    """Plans the timing of the finalists at scale.

    On a small population every candidate's weights and data stay in cache,
    which removes what a larger block gains (its weight traffic amortized over
    more agents): the block size that wins there is too small, never too
    large (MLP: ``block:8`` on 32-48 agents, ``block:32`` over 1,000 and
    10,000; ``docs/performance.md``). The finalists are therefore the fastest
    candidate and the next two larger block sizes of its series (same
    kernels, 2x and 4x its block, if timed and within ``RETIME_WITHIN`` of
    it), plus any candidate timed on the whole population (all agents, or
    blocks of ``cap``) within ``WHOLE_WITHIN`` of the fastest: it alone was
    timed out of cache. The finalists timed on a small population are timed
    again on ``m`` agents, ``m`` twice their largest population rounded up to
    a multiple of their block sizes; when that exceeds A or ``max_agents``,
    A itself (when A <= ``max_agents``) or the largest multiple of the block
    sizes that fits, if larger than their populations. The whole-population
    finalists timed on fewer steps than the run's are timed again on their
    own population at the run's ``steps`` (when it fits ``max_agents``).
    ``m`` does not depend on the budget, so that a run resuming the search
    finds the timings at scale of the one before.

    Returns:
      ``(todo, kept)``: ``todo`` a list of ``(finalist, agents)`` to time at
      ``steps``, fastest first; ``kept`` the finalists whose timings stand.
      None when there is nothing to time.
    """
    if not recs:
        return None
    top = max(recs, key=lambda r: r["agent_steps_per_s"])
    best = top["agent_steps_per_s"]
    near = [top]
    k = parse_plan(top["plan"])
    if k and not _whole(top, num_agents, cap):
        impl = (top["conv_impl"], top.get("matmul_impl", "xla"))
        for r in recs:
            kr = parse_plan(r["plan"])
            if (
                kr in (2 * k, 4 * k) and not r.get("at_scale")
                and (r["conv_impl"], r.get("matmul_impl", "xla")) == impl
                and r["agent_steps_per_s"] >= RETIME_WITHIN * best
            ):  # fmt: skip
                near.append(r)
    near += [
        r for r in recs
        if _whole(r, num_agents, cap) and not any(r is x for x in near)
        and not r.get("at_scale") and r["agent_steps_per_s"] >= WHOLE_WITHIN * best
    ]  # fmt: skip
    limit = min(num_agents, int(max_agents))
    steps = max(1, int(steps))
    small = [r for r in near if not _whole(r, num_agents, cap)]
    todo, kept = [], []
    if small:
        unit = max(parse_plan(r["plan"]) for r in small)
        lo = max(int(r["agents"]) for r in small)
        m = -(-max(2 * lo, 2 * unit) // unit) * unit
        if m > limit:
            m = num_agents if limit >= num_agents else (limit // unit) * unit
        if m > lo:
            todo += [(r, m) for r in small]
        else:
            kept += small
    for r in near:
        if not _whole(r, num_agents, cap):
            continue
        if int(r["steps"]) < steps and int(r["agents"]) <= int(max_agents):
            todo.append((r, int(r["agents"])))
        else:
            kept.append(r)
    if not todo:
        return None
    todo.sort(key=lambda t: -t[0]["agent_steps_per_s"])
    return todo, kept


def _larger_block(scaled: list[tuple[dict, int]], kept: list[dict], *, cap: int,
                  num_agents: int) -> list[tuple[dict, int]]:  # fmt: skip
    """The next timing at scale when the largest block of a series won.

    When the fastest of the finalists at scale (``scaled``: ``(record,
    population)``; ``kept``: finalists whose timings stand) is a block timed
    at scale and no larger block of its kernels was, the series may still be
    rising at scale: ``[(block of twice its size, same population)]``, if that
    is below ``cap`` and A and fits the population at least twice; else
    ``[]``. (A larger block timed at scale that lost ends the series; ``all``
    is no block of the series.)
    The returned record is the winner's with the larger plan (its compile time
    and speed predict the timing's cost).
    """
    top, m = max(scaled, key=lambda t: t[0]["agent_steps_per_s"])
    if any(r["agent_steps_per_s"] > top["agent_steps_per_s"] for r in kept):
        return []
    k = parse_plan(top["plan"])
    impl = (top["conv_impl"], top["matmul_impl"])
    if not k or any(
        (r["conv_impl"], r["matmul_impl"]) == impl and parse_plan(r["plan"]) > k
        for r, _ in scaled
    ):
        return []
    if 2 * k >= min(cap, num_agents) or 4 * k > m:
        return []
    return [(dict(top, plan=LocalPlan(2 * k).name), m)]


def retime_cost_s(rec: dict) -> float:
    """Predicted seconds of one re-timing of ``rec`` (``best_time``: at least
    two calls of ``run_s`` each, at least ``RETIME_S``)."""
    return max(float(RETIME_S), 2.0 * float(rec.get("run_s", 0.0)))


def _retime_near_best(recs: list[dict], budget_s: float = float("inf")) -> None:
    """Times the records within ``RETIME_WITHIN`` of the fastest again, in
    ``RETIME_ROUNDS`` interleaved rounds (a rotated order each round), and
    sets each one's ``agent_steps_per_s`` to its best over all its timings.
    The slowest of them are left out until the rounds' predicted cost
    (``retime_cost_s``) fits ``budget_s``; nothing is re-timed when fewer than
    two remain."""
    best = max((r["agent_steps_per_s"] for r in recs), default=0.0)
    near = sorted(
        (r for r in recs
         if "_retime" in r and r["agent_steps_per_s"] >= RETIME_WITHIN * best),
        key=lambda r: -r["agent_steps_per_s"],
    )[:RETIME_MAX]  # fmt: skip
    while near and RETIME_ROUNDS * sum(map(retime_cost_s, near)) > budget_s:
        near.pop()
    if len(near) < 2:
        return
    speeds = {id(r): [r["agent_steps_per_s"]] for r in near}
    for i in range(RETIME_ROUNDS):
        j = i % len(near)
        for r in near[j:] + near[:j]:
            speeds[id(r)].append(float(r["_retime"]()))
    for r in near:
        r["first_agent_steps_per_s"] = r["agent_steps_per_s"]
        r["agent_steps_per_s"] = round(max(speeds[id(r)]), 2)
        r["retimed"] = len(speeds[id(r)]) - 1


def _names(plan: LocalPlan) -> dict:
    return {
        "plan": plan.name,
        "conv_impl": plan.conv_impl,
        "matmul_impl": plan.matmul_impl,
    }


def resolve(
    config,
    *,
    num_agents: int,
    cap: int,
    probe: dict,
    has_conv: bool,
    make_trainer: Callable[[int, str, np.ndarray], Callable],
    init_params: Callable[[str], object],
    tx,
    mu: float,
    x: np.ndarray,
    y: np.ndarray,
    n_train: np.ndarray,
    key_fields: dict,
    multi_device: bool = False,
    shard_mapped: bool = True,
    budget_share: float = 1.0,
    mesh=None,
) -> tuple[LocalPlan, dict]:
    """The local-training plan of a run: explicit, cached or measured.

    Args:
      config: validated run config (``local_plan``, ``conv_impl``,
        ``batch_size``, ``local_epochs``, ``num_rounds``, ``num_replicas``).
      num_agents: A.
      cap: most agents whose training fits in memory at once (``<= A``).
      probe: ``compile_s`` and ``run_s`` of one agent's compiled gradient step
        (``memory.probe_step``): the run's local training is estimated as
        ``run_s`` x its agent-steps (of every replica), and the search may spend
        ``SEARCH_FRACTION`` of that; when even one candidate (about two such
        compilations) would cost more, the plan is all agents at once
        (capped by memory) without a search (``source='prior'``).
      has_conv: the model has convolutions (``conv_impl`` matters).
      make_trainer, init_params, tx, mu: see ``measure_local``.
      x, y: host training rows of (some of) the agents, ``[A', N_max, ...]``.
      n_train: host int ``[A]`` training samples per agent.
      key_fields: what else identifies the workload in the cache key (model,
        shapes, optimizer, algorithm's gradient, ...).
      multi_device: the population is sharded over several devices (part of
        the cache key); in a multi-process job ``auto`` trains each device's
        agents at once without a search.
      shard_mapped: with ``multi_device``, each device runs the plan on its
        own agents under ``shard_map`` (the engine's local phase,
        ``Context.trainer``), so any plan is searched; False (local training
        left to XLA's partitioner, where blocks would slice across devices):
        ``auto`` trains each device's agents at once without a search.
      budget_share: the share of the search budget this search may spend
        (``resolve_devices`` runs two searches, each with half).
      mesh: with ``multi_device`` and ``shard_mapped`` in a single process,
        the ``agents`` mesh: every candidate is then timed as the D-device
        ``shard_map`` program (``measure_local``'s ``mesh``; one device
        timing one shard's plan misranks them: a ``sequential`` loop gains
        more from a core of its own than blocks do), ``num_agents`` and
        ``cap`` being one device's.

    Returns:
      ``(plan, info)``; ``info`` has ``plan``, ``conv_impl``, ``source``
      (``config``, ``cache``, ``measured``, ``resumed`` (an incomplete cached
      search continued, ``search``'s ``prior``), ``prior`` or
      ``multi_device``), ``cap``, ``budget_s`` and the timing ``table`` (list
      of records, empty unless measured or cached); when measured or resumed
      also ``complete`` (False: the budget cut the search; the next run with
      the same cache key resumes it) and ``search_runs`` (runs that have
      spent their budget on this search so far); ``replicas``: how the
      phases run over ``num_replicas`` > 1 replicas (``resolve_replicas``,
      None for one), timed within what is left of the search's share after
      the local plan's search and the two compilations.
    """
    from demjax import sharding

    plan, info = _resolve_local(
        config,
        num_agents=num_agents, cap=cap, probe=probe, has_conv=has_conv,
        make_trainer=make_trainer, init_params=init_params, tx=tx, mu=mu, x=x,
        y=y, n_train=n_train, key_fields=key_fields, multi_device=multi_device,
        shard_mapped=shard_mapped, budget_share=budget_share, mesh=mesh,
    )  # fmt: skip
    per_round = _steps_per_round(config, n_train)
    budget = (
        budget_share * _search_budget(config, per_round, probe)
        - float(info.get("search_s", 0.0))
        - 4.0 * float(probe["compile_s"])
    )
    if multi_device or sharding.multiprocess():
        budget = 0.0  # every device / process must run one program: no timing
    batch_size = int(config.batch_size)
    info["replicas"] = resolve_replicas(
        config, plan, budget_s=budget,
        key_fields=dict(key_fields, num_agents=num_agents, cap=info["cap"],
                        batch_size=batch_size),
        measure=lambda: measure_replicas(
            make_trainer, init_params, tx, x, y, plan=plan,
            replicas=int(config.num_replicas), num_agents=num_agents,
            batch_size=batch_size, steps=_timed_steps(per_round),
            mu=float(mu),
        ),
    )  # fmt: skip
    return plan, info


def _search_record(plan: LocalPlan, info: dict, devices: int) -> dict | None:
    """The fastest record of ``plan`` in its search's table (with
    ``devices``), or None when the search timed no such record."""
    recs = [
        r for r in info.get("table", [])
        if (r["plan"], r["conv_impl"], r.get("matmul_impl", "xla"))
        == (plan.name, plan.conv_impl, plan.matmul_impl)
    ]  # fmt: skip
    if not recs:
        return None
    return dict(max(recs, key=lambda r: r["agent_steps_per_s"]), devices=devices)


def resolve_devices(
    config,
    *,
    mesh,
    one: tuple[LocalPlan, dict],
    sharded: tuple[LocalPlan, dict],
    num_agents: int,
    probe: dict,
    make_trainer: Callable,
    init_params: Callable[[str], object],
    tx,
    mu: float,
    x: np.ndarray,
    y: np.ndarray,
    n_train: np.ndarray,
    key_fields: dict,
) -> tuple[LocalPlan, dict]:
    """Local training on one device or sharded over the D devices of
    ``mesh``, whichever measures faster.

    With one JAX CPU device per core (``scripts/run.py --cpu_devices``), a
    plan whose per-agent dots keep one core busy (``sequential``, small
    blocks) runs about D times faster sharded (each device trains its own
    agents under ``shard_map``), while all agents at once gains nothing from
    sharding: its batched dots already use every core
    (``docs/performance.md``, section 8). Both winners of the plan search
    (``one``: the best plan over all A agents on one device; ``sharded``: the
    best plan of one device's A / D agents) are timed here on ``steps`` real
    local steps, the sharded one as the D-device ``shard_map`` program, and
    both are timed again in interleaved rounds (``_retime_near_best``, within
    the budget left) so that both sides see the same machine. The choice is
    cached like the plans. When the search budget (``SEARCH_FRACTION`` of the
    run's estimated local training, less what the two searches spent) cannot
    pay for the two compilations, the searches' own records of the two
    winners decide (the sharded search timed the D-device program too), and
    without them (a search too short to time anything) the run keeps one
    device.

    Args:
      mesh: the single-process 1-D ``agents`` mesh (D >= 2 devices).
      one, sharded: ``resolve``'s ``(plan, info)`` of the two searches.
      num_agents: A (divisible by D).
      probe, make_trainer, init_params, tx, mu, x, y, n_train, key_fields:
        as ``resolve``.

    Returns:
      ``(plan, info)``: the chosen side's ``resolve`` result, its ``info``
      with ``devices``: ``{"chosen": 1 or D, "source": "measured", "cache",
      "searches" (the two searches' records, no budget left to time them
      again) or "prior" (nothing timed: one device),
      "table": [the two records, agent-steps/s of all agents,
      "devices" 1 or D], "outside_load", "searches": {"1": ..., "D": ...}
      (each search's timing table)}``.
    """
    d = int(mesh.devices.size)
    (p1, i1), (pd, i_d) = one, sharded
    per_round = _steps_per_round(config, n_train)
    steps = _timed_steps(per_round)
    batch_size = int(config.batch_size)
    step_s = max(float(probe["run_s"]), 1e-9)
    min_agents = int(np.ceil(MIN_CALL_S / (steps * step_s)))
    fields = dict(
        key_fields, num_agents=num_agents, choice="devices", devices=d,
        plans=[p1.name, p1.conv_impl, p1.matmul_impl, pd.name, pd.conv_impl,
               pd.matmul_impl],
        steps=steps, batch_size=batch_size,
    )  # fmt: skip
    key = cache_key(fields)
    entry = cache_get(key)
    spent = float(i1.get("search_s", 0.0)) + float(i_d.get("search_s", 0.0))
    left = _search_budget(config, per_round, probe) - spent
    if entry is not None:
        chosen, table, load = int(entry["chosen"]), entry["table"], entry["load"]
        source = "cache"
    elif left < 4.0 * float(probe["compile_s"]):
        # No budget left for two more compilations: the searches' own timings
        # of the two winners (the sharded search timed the D-device program),
        # else one device (the results of a one-device process).
        table = [_search_record(p1, i1, 1), _search_record(pd, i_d, d)]
        if None in table:
            chosen, table, load, source = 1, [], None, "prior"
        else:
            faster = table[1]["agent_steps_per_s"] > table[0]["agent_steps_per_s"]
            chosen, load, source = (d if faster else 1), None, "searches"
    else:

        def measure(plan: LocalPlan, sharded_: bool) -> dict:
            k = num_agents // d if sharded_ else num_agents
            rec = measure_local(
                make_trainer, init_params, tx, x, y,
                block_size=plan.block_size if plan.block_size < k else 0,
                conv_impl=plan.conv_impl, matmul_impl=plan.matmul_impl,
                num_agents=k, batch_size=batch_size, steps=steps, mu=float(mu),
                min_agents=min(k, min_agents), mesh=mesh if sharded_ else None,
            )  # fmt: skip
            return dict(rec, devices=d if sharded_ else 1)

        meter = CpuMeter()
        t0 = time.perf_counter()
        recs = [measure(p1, False), measure(pd, True)]
        _retime_near_best(recs, left - (time.perf_counter() - t0))
        table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in recs]
        faster = table[1]["agent_steps_per_s"] > table[0]["agent_steps_per_s"]
        chosen = d if faster else 1
        share = meter.outside_share()
        load = None if share is None else round(share, 3)
        source = "measured"
        if _cacheable("device choice", share, f"{chosen} device(s)"):
            side = pd if chosen == d else p1
            cache_put(
                key,
                {"chosen": chosen, "plan": dataclasses.asdict(side), "table": table,
                 "load": load, "fields": fields},
            )  # fmt: skip
    plan, info = (pd, i_d) if chosen == d else (p1, i1)
    return plan, dict(
        info,
        devices={"chosen": chosen, "source": source, "table": table,
                 "outside_load": load,
                 "searches": {"1": i1.get("table", []),
                              str(d): i_d.get("table", [])}},
    )  # fmt: skip


def _steps_per_round(config, n_train) -> np.ndarray:
    """Local steps of each agent in one round: int64 ``[A]``."""
    batch_size, epochs = int(config.batch_size), int(config.local_epochs)
    return epochs * np.ceil(np.asarray(n_train) / batch_size).astype(np.int64)


def _timed_steps(per_round: np.ndarray) -> int:
    """Local steps per agent of a timed candidate: the run's most steps in a
    round, at most 8 (the per-step speed is what is compared)."""
    return int(max(1, min(8, int(per_round.max()))))


def _search_budget(config, per_round: np.ndarray, probe: dict) -> float:
    """``SEARCH_FRACTION`` of the run's local training estimated from one
    agent's gradient step (``probe["run_s"]``): every agent-step of every
    round of every replica (each replica trains its own population)."""
    return (
        SEARCH_FRACTION
        * float(per_round.sum())
        * int(config.num_rounds)
        * int(getattr(config, "num_replicas", 1))
        * float(probe["run_s"])
    )


def _resolve_local(
    config,
    *,
    num_agents: int,
    cap: int,
    probe: dict,
    has_conv: bool,
    make_trainer: Callable[[int, str, np.ndarray], Callable],
    init_params: Callable[[str], object],
    tx,
    mu: float,
    x: np.ndarray,
    y: np.ndarray,
    n_train: np.ndarray,
    key_fields: dict,
    multi_device: bool = False,
    shard_mapped: bool = True,
    budget_share: float = 1.0,
    mesh=None,
) -> tuple[LocalPlan, dict]:
    """``resolve``'s local-training plan (without ``replicas``)."""
    from demjax import sharding

    block = parse_plan(config.local_plan)
    convs = (
        (config.conv_impl,)
        if config.conv_impl != "auto"
        else (("patches", "xla") if has_conv else ("patches",))
    )
    matmuls = (
        (config.matmul_impl,) if config.matmul_impl != "auto" else ("xla", "wgrad_t")
    )
    impls = tuple((c, m) for c in convs for m in matmuls)
    cap = max(1, min(int(cap), num_agents))
    info = {"cap": cap, "table": []}
    if block is not None:
        want = num_agents if block == 0 else min(block, num_agents)
        if want > cap:
            logging.warning(
                "local_plan=%r trains %d agents at once but only %d fit in free "
                "memory: using block:%d",
                config.local_plan, want, cap, cap,
            )  # fmt: skip
            want = cap
        block = 0 if want >= num_agents else want
    source = "config"
    if block is None and (
        sharding.multiprocess() or (multi_device and not shard_mapped)
    ):
        # Timings differ between processes and every process must compile the
        # same program: no measurement in a multi-process job; each device
        # trains its agents at once (without shard_map, blocks would slice
        # across devices).
        block = 0 if cap >= num_agents else cap
        source = "multi_device"
    if sharding.multiprocess():
        impls = impls[:1]
    if len(impls) == 1 and block is not None:
        plan = LocalPlan(block, *impls[0])
        return plan, dict(info, **_names(plan), source=source)
    batch_size = int(config.batch_size)
    epochs = int(config.local_epochs)
    per_round = _steps_per_round(config, n_train)
    steps = _timed_steps(per_round)
    fields = dict(
        key_fields,
        num_agents=num_agents,
        cap=cap,
        batch_size=batch_size,
        impls=[list(v) for v in impls],
        block=block,
        steps=steps,
        multi_device=multi_device,
    )
    if mesh is not None:  # timed as the D-device shard_map program
        fields["timed_devices"] = int(mesh.devices.size)
    key = cache_key(fields)
    entry = cache_get(key)
    prior = None
    if entry is not None and (entry.get("complete", True) or block is not None):
        p = entry["plan"]
        plan = LocalPlan(
            int(p["block_size"]), str(p["conv_impl"]), str(p.get("matmul_impl", "xla"))
        )
        return plan, dict(info, **_names(plan), source="cache",
                          table=entry.get("table", []))  # fmt: skip
    if entry is not None:  # an incomplete search: this run resumes it
        prior = list(entry.get("table", []))

    budget = budget_share * _search_budget(config, per_round, probe)
    info["budget_s"] = round(budget, 3)
    if budget < 2.0 * float(probe["compile_s"]) * len(impls):
        # Too short a run to pay for a search: the simplest plan.
        plan = LocalPlan(
            (block or 0) if block is not None else (0 if cap >= num_agents else cap),
            *impls[0],
        )
        return plan, dict(info, **_names(plan), source="prior")
    # Vmapped plans run every agent of a step-count bucket for the bucket's
    # largest step count; the sequential plan runs each agent's own steps. The
    # timed programs use equal step counts, so vmapped speeds are scaled by the
    # run's share of real steps among the padded step slots.
    from demjax.local import plan_buckets

    buckets = plan_buckets(per_round, int(getattr(config, "local_buckets", 1)))
    slots = sum(len(b) * int(per_round[b].max()) for b in buckets)
    fill = float(per_round.sum()) / max(slots, 1)

    step_s = max(float(probe["run_s"]), 1e-9)  # one agent's gradient step
    min_agents = int(min(cap, np.ceil(MIN_CALL_S / (steps * step_s))))

    # Timings at scale (``search``): the run's own shape per agent (its largest
    # sample count, its epochs, so its steps), on populations whose data fit
    # RETIME_MAX_BYTES.
    scale_steps = int(max(1, per_round.max()))
    scale_samples = int(np.max(n_train))
    row_bytes = x[0, 0].nbytes + y[0, 0].nbytes
    scale_max_agents = RETIME_MAX_BYTES // max(1, scale_samples * row_bytes)

    def measure(k, impl, floor=0.0, agents=None, at_scale=False):
        rec = measure_local(
            make_trainer, init_params, tx, x, y,
            block_size=0 if k >= num_agents else k, conv_impl=impl[0],
            matmul_impl=impl[1],
            num_agents=num_agents, batch_size=batch_size,
            steps=scale_steps if at_scale else steps, mu=mu,
            floor=floor / max(fill, 1e-9) if k != 1 else floor,
            min_agents=agents or min_agents,
            samples=scale_samples if at_scale else None,
            epochs=epochs if at_scale else 1, mesh=mesh,
        )  # fmt: skip
        if k != 1 and fill < 1.0:
            rec["timed_agent_steps_per_s"] = rec["agent_steps_per_s"]
            rec["step_fill"] = round(fill, 4)
            rec["agent_steps_per_s"] = round(rec["agent_steps_per_s"] * fill, 2)
            if "_retime" in rec:
                retime = rec["_retime"]
                rec["_retime"] = lambda: retime() * fill
        return rec

    t0 = time.perf_counter()
    meter = CpuMeter()
    complete = True
    if block is not None:  # explicit plan, conv implementation measured
        recs = [dict(measure(block or num_agents, i)) for i in impls]
        _retime_near_best(recs)
        table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in recs]
        top = max(table, key=lambda r: r["agent_steps_per_s"])
        plan = LocalPlan(block, top["conv_impl"], top["matmul_impl"])
    else:
        plan, table, complete = search(
            measure, num_agents=num_agents, cap=cap, variants=impls,
            budget_s=budget,
            at_scale=lambda k, impl, m, floor: measure(k, impl, floor, m, True),
            scale_steps=scale_steps, scale_max_agents=int(scale_max_agents),
            prior=prior,
        )  # fmt: skip
    search_s = time.perf_counter() - t0
    share = meter.outside_share()
    load = None if share is None else round(share, 3)
    runs = int(entry.get("search_runs", 1)) + 1 if prior is not None else 1
    if table and _cacheable("local plan", share, plan.name):
        cache_put(
            key,
            {"plan": dataclasses.asdict(plan), "table": table, "fields": fields,
             "search_s": round(search_s, 3), "outside_load": load,
             "complete": complete, "search_runs": runs},
        )  # fmt: skip
    return plan, dict(info, **_names(plan),
                      source="measured" if prior is None else "resumed",
                      table=table, search_s=round(search_s, 3),
                      outside_load=load, complete=complete,
                      search_runs=runs)  # fmt: skip


EVAL_BATCHES = (1, 2, 4, 8, 16, 32)
"""Models evaluated at once (``lax.map`` ``batch_size``) tried by the search."""


def resolve_eval(
    config,
    *,
    num_agents: int,
    has_conv: bool,
    make_eval: Callable[[int, str], Callable],
    one_params,
    x: np.ndarray,
    y: np.ndarray,
    num_evals: int,
    key_fields: dict,
    probe: dict,
    batch_size: int,
) -> tuple[int, str, dict]:
    """The evaluation plan: models evaluated at once and conv implementation.

    ``config.eval_batch > 0`` fixes the batch; 0 (default) measures: for each
    candidate batch ``k`` (``EVAL_BATCHES``, at most A) and, for CNNs, each
    conv implementation, ``make_eval(k, impl)(models [m, ...], x, y)`` is timed
    on ``m = min(A, 2k)`` copies of ``one_params`` and the evaluation set
    (``x, y``: the run's own C-GEN set), keeping the most models per second.
    The search stops after two sizes slower than the best by > 15%, or once it
    spent ``SEARCH_FRACTION`` of the run's estimated evaluation time
    (``num_evals`` evaluations of A models, from the first candidate's speed),
    and its result is cached like the local plan's. When the whole run's
    evaluation, estimated from ``probe`` (one agent's gradient step on
    ``batch_size`` samples, about three forward passes), is too short to pay
    for two compilations, the prior is used without a search: 1 model at a
    time for CNNs (whose activations are large), else 8.

    Returns:
      ``(eval_batch, conv_impl, info)``.
    """
    impls = ("xla", "patches") if has_conv else ("xla",)
    fixed = int(config.eval_batch)
    cands = [k for k in EVAL_BATCHES if k < num_agents] + (
        [num_agents] if num_agents <= EVAL_BATCHES[-1] else []
    )
    if fixed > 0:
        cands = [fixed]
    if len(cands) == 1 and len(impls) == 1:
        return cands[0], impls[0], {"eval_batch": cands[0], "conv_impl": impls[0],
                                    "source": "config"}  # fmt: skip
    from demjax import sharding

    est = num_evals * num_agents * x.shape[0] * probe["run_s"] / (3 * batch_size)
    if sharding.multiprocess() or SEARCH_FRACTION * est < 2 * probe["compile_s"]:
        k = cands[0] if fixed > 0 else min(1 if has_conv else 8, num_agents)
        return k, impls[0], {"eval_batch": k, "conv_impl": impls[0],
                             "source": "prior"}  # fmt: skip
    fields = dict(key_fields, what="eval", num_agents=num_agents, cands=cands,
                  impls=list(impls), samples=int(x.shape[0]))  # fmt: skip
    key = cache_key(fields)
    entry = cache_get(key)
    if entry is not None:
        p = entry["plan"]
        return int(p["eval_batch"]), str(p["conv_impl"]), {
            "eval_batch": int(p["eval_batch"]), "conv_impl": str(p["conv_impl"]),
            "source": "cache", "table": entry.get("table", []),
        }  # fmt: skip
    t_start = time.perf_counter()
    meter = CpuMeter()
    table: list[dict] = []
    budget = None
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    for impl in impls:
        peak = _PastPeak()
        for k in cands:
            if budget is not None and time.perf_counter() - t_start > budget:
                break
            m = min(num_agents, 2 * k)
            fn = make_eval(k, impl)
            models_m = jax.tree.map(
                lambda v, m=m: jnp.broadcast_to(v, (m,) + v.shape), one_params
            )
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(models_m, xs, ys).compile()
            compile_s = time.perf_counter() - t0
            top = max((r["models_per_s"] for r in table), default=0.0)
            run_s = _run_time(
                compiled, (models_m, xs, ys), m, top, min_total_s=RETIME_S
            )
            speed = m / max(run_s, 1e-9)
            table.append({
                "eval_batch": k, "conv_impl": impl, "models": m,
                "compile_s": round(compile_s, 4), "run_s": round(run_s, 5),
                "models_per_s": round(speed, 2),
                "search_s": round(time.perf_counter() - t_start, 3),
            })  # fmt: skip
            if budget is None:
                budget = SEARCH_FRACTION * num_evals * num_agents / speed
            if peak.done(speed):
                break
        if budget is not None and time.perf_counter() - t_start > budget:
            break
    top = max(table, key=lambda r: r["models_per_s"])
    chosen = {"eval_batch": top["eval_batch"], "conv_impl": top["conv_impl"]}
    search_s = round(time.perf_counter() - t_start, 3)
    share = meter.outside_share()
    load = None if share is None else round(share, 3)
    if len(table) > 1 and _cacheable(
        "evaluation plan", share, f"eval_batch={top['eval_batch']}"
    ):
        cache_put(key, {"plan": chosen, "table": table, "fields": fields,
                        "search_s": search_s, "outside_load": load})  # fmt: skip
    return top["eval_batch"], top["conv_impl"], dict(
        chosen, source="measured", table=table, search_s=search_s,
        outside_load=load,
    )  # fmt: skip
