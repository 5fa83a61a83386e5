"""Accelerator projection: one DemLearn round on an NVIDIA H100 SXM and a TPU v5e.

No accelerator is needed: every jitted phase of a round (``Simulator.local_phase``,
the regrouping's feature/sketch and distance programs, ``aggregate_phase``,
``mix_phase``, ``evaluate``) is lowered with abstract inputs
(``jax.ShapeDtypeStruct``, so nothing of 100,000 agents is allocated) and compiled
for this machine's CPU backend; XLA's ``cost_analysis`` gives its FLOPs and bytes
accessed, and a roofline turns them into seconds:

    time(phase) = max(compute time, bytes accessed / memory bandwidth)

summed over the phases of a round (``evaluate`` runs twice: after local training
and after synchronization). Compute time splits the FLOPs by unit: dot products at
default precision on the matrix units (TF32 tensor cores on the H100, one bf16
pass on the TPU's MXU, JAX's defaults there), ``Precision.HIGHEST`` dot products
(distances, sketch) as true float32 (H100 CUDA cores; six bf16 passes on the TPU),
and all other FLOPs on the vector units.

Loop correction. XLA's cost analysis counts the body of a while loop (``lax.scan``,
``fori_loop``, ``lax.map``) once, not once per iteration: local training is a
``fori_loop`` over agent blocks around a ``scan`` over SGD steps, so the raw
numbers miss a factor of blocks x steps. ``weighted_cost`` splits the compiled
HLO module into its loop bodies (each re-parsed as a module of its own and
analysed by XLA's ``HloCostAnalysis``) and multiplies each by the loop's
``known_trip_count``, recursively. ``tests/test_roofline.py`` checks it against
hand-computed FLOP counts; the output also compares every phase with an
analytical count (2 x MACs of the model's matmuls/convolutions).

Runs in a few minutes (lowering and compiling only, no training)::

    python benchmarks/roofline.py                  # all sizes
    python benchmarks/roofline.py --only=mlp:1000  # one (model:agents)

Prints one JSON line per model x agents x phase and one per round total, and
writes ``benchmarks/results/roofline.json`` and ``roofline.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
RESULTS = os.path.join(REPO, "benchmarks", "results")

# --------------------------------------------------------------------------------------
# Devices: published peaks
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Device:
    """Peak rates of one accelerator (FLOP/s, bytes/s, bytes).

    ``matmul``: float32 dot products at JAX's default precision; ``matmul_highest``:
    at ``Precision.HIGHEST``; ``vector``: every other FLOP (elementwise,
    reductions, transcendentals).
    """

    name: str
    matmul: float
    matmul_highest: float
    vector: float
    bandwidth: float
    memory: float
    notes: str


DEVICES = {
    "h100": Device(
        name="NVIDIA H100 SXM",
        matmul=495e12,
        matmul_highest=67e12,
        vector=67e12,
        bandwidth=3.35e12,
        memory=80e9,
        notes=(
            "default-precision float32 dots as TF32 on tensor cores (495 TFLOP/s "
            "dense, JAX's default on Ampere/Hopper); Precision.HIGHEST dots and all "
            "other FLOPs at the FP32 non-tensor peak (67 TFLOP/s); HBM3 3.35 TB/s; "
            "80 GB"
        ),
    ),
    "tpu_v5e": Device(
        name="TPU v5e",
        matmul=197e12,
        matmul_highest=197e12 / 6,
        vector=197e12 / 32,
        bandwidth=819e9,
        memory=16e9,
        notes=(
            "default-precision float32 dots as one bf16 pass on the MXU (197 "
            "TFLOP/s, JAX's default on TPU); Precision.HIGHEST dots as six bf16 "
            "passes (32.8 TFLOP/s); other FLOPs on the vector unit, whose float32 "
            "rate is not published: assumed 1/32 of the MXU peak (6.2 TFLOP/s); "
            "HBM 819 GB/s; 16 GB"
        ),
    ),
}
EFFICIENCIES = (1.0, 0.5, 0.3)  # ideal roofline and two pessimistic lines
D2H_BANDWIDTH = 25e9  # bytes/s assumed for the distance matrix's copy to the host
# The compiled programs are analysed, never run: LLVM's optimization of the CPU
# code leaves the optimized HLO (and so its cost analysis) unchanged and takes
# half the compile time.
FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}
H100_LAUNCH_S = 5e-6  # seconds per kernel (launch + gap) assumed for the launch floor

# --------------------------------------------------------------------------------------
# Trip-count-weighted XLA cost analysis
# --------------------------------------------------------------------------------------

_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s")
_REF = re.compile(
    r"\b(?:calls|to_apply|condition|body|true_computation|false_computation)"
    r"=%([\w.\-]+)"
)
_REF_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_SHAPE = r"[a-z]\w*\[([\d,]*)\](?:\{[^}]*\})?"
_DOT = re.compile(
    r"=\s*" + _SHAPE + r"\s+dot\(\s*" + _SHAPE + r"\s+%[\w.\-]+,\s*" + _SHAPE
)
_CONV = re.compile(
    r"=\s*" + _SHAPE + r"\s+convolution\(\s*" + _SHAPE + r"\s+%[\w.\-]+,\s*" + _SHAPE
)
_KEYS = ("flops", "transcendentals", "bytes accessed")
_OPCODE = re.compile(
    r"=\s*(?:\([^=]*?\)|[a-z]\w*\[[\d,]*\](?:\{[^}]*\})?)\s+([a-z][\w\-]*)\("
)
# Instructions that launch no kernel of their own.
_FREE_OPS = {
    "parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while",
    "conditional", "call", "after-all", "opt-barrier", "partition-id",
    "replica-id", "iota",
}  # fmt: skip


def _dims(s: str) -> list[int]:
    return [int(d) for d in s.split(",") if d]


def hlo_text(compiled) -> str:
    """Parsable text of a compiled executable's (optimized) HLO module: operand
    shapes and large constants printed, metadata left out."""
    from jaxlib import _hlo

    opts = _hlo.HloPrintOptions()
    opts.print_metadata = False
    opts.print_operand_shape = True
    opts.print_large_constants = True
    modules = compiled.runtime_executable().hlo_modules()
    if len(modules) != 1:
        raise ValueError(f"expected one HLO module, got {len(modules)}")
    return modules[0].to_string(opts)


def _computations(text: str) -> tuple[dict[str, list[str]], list[str], str]:
    comps: dict[str, list[str]] = {}
    order: list[str] = []
    cur, entry = None, None
    for line in text.splitlines():
        if cur is None:
            m = _HEADER.match(line)
            if m and line.rstrip().endswith("{"):
                cur = m.group(2)
                order.append(cur)
                comps[cur] = [line]
                if m.group(1):
                    entry = cur
        else:
            comps[cur].append(line)
            if line.startswith("}"):
                cur = None
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, order, entry


def _refs(lines: list[str]) -> list[str]:
    out = []
    for line in lines[1:]:
        out += _REF.findall(line)
        for group in _REF_LIST.findall(line):
            out += [s.strip().lstrip("%") for s in group.split(",") if s.strip()]
    return out


def _whiles(lines: list[str]) -> list[tuple[str, str, int | None]]:
    out = []
    for line in lines[1:]:
        if " while(" not in line:
            continue
        body = re.search(r"\bbody=%([\w.\-]+)", line).group(1)
        cond = re.search(r"\bcondition=%([\w.\-]+)", line).group(1)
        trip = _TRIP.search(line)
        out.append((body, cond, int(trip.group(1)) if trip else None))
    return out


def _conv_flops(line: str) -> float:
    """2 x MACs of an HLO convolution, counting (as XLA's cost analysis does) only
    the kernel taps that fall inside the input, not those on its padding."""
    m = _CONV.search(line)
    out, lhs, rhs = _dims(m.group(1)), _dims(m.group(2)), _dims(m.group(3))
    lab = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line)
    l_lab, r_lab, o_lab = lab.groups()
    win = re.search(r"window=\{([^}]*)\}", line)
    attrs = dict(kv.split("=", 1) for kv in win.group(1).split()) if win else {}
    spatial = [ch for ch in r_lab if ch.isdigit()]

    def field(name, default):
        if name not in attrs:
            return [default] * len(spatial)
        return attrs[name].split("x")

    pads = [p.split("_") for p in field("pad", "0_0")]
    strides = [int(x) for x in field("stride", "1")]
    if "lhs_dilate" in attrs or "rhs_dilate" in attrs:  # full taps
        taps = [rhs[r_lab.index(ch)] * out[o_lab.index(ch)] for ch in spatial]
    else:
        taps = []
        for i, ch in enumerate(spatial):
            size, k = lhs[l_lab.index(ch)], rhs[r_lab.index(ch)]
            lo, n_out = int(pads[i][0]), out[o_lab.index(ch)]
            taps.append(
                sum(
                    sum(0 <= o * strides[i] + j - lo < size for j in range(k))
                    for o in range(n_out)
                )
            )
    per_tap = math.prod(rhs) / rhs[r_lab.index("o")]
    for ch in spatial:
        per_tap /= rhs[r_lab.index(ch)]
    rest = math.prod(out)
    for ch in spatial:
        rest /= out[o_lab.index(ch)]
    return 2.0 * rest * math.prod(taps) * per_tap


def _dot_flops(lines: list[str]) -> tuple[float, float]:
    """(default-precision, HIGHEST-precision) dot/convolution FLOPs of one
    execution of a computation: 2 x output elements x contracted size."""
    default = highest = 0.0
    for line in lines[1:]:
        if " dot(" in line:
            m = _DOT.search(line)
            out, lhs = _dims(m.group(1)), _dims(m.group(2))
            contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
            k = math.prod(lhs[i] for i in _dims(contract.group(1))) if contract else 1
            f = 2.0 * math.prod(out) * k
        elif " convolution(" in line:
            f = _conv_flops(line)
        else:
            continue
        if "operand_precision={highest" in line:
            highest += f
        else:
            default += f
    return default, highest


@dataclasses.dataclass
class Cost:
    """A program's cost with every loop body counted trip-count times."""

    flops: float
    transcendentals: float
    bytes: float
    dot_flops: float  # default precision
    dot_flops_highest: float
    raw_flops: float  # XLA's cost_analysis as is (loop bodies counted once)
    raw_bytes: float
    loops: int  # while loops found
    unknown_trip_loops: int  # loops without known_trip_count (counted once)
    kernels: float = 0.0  # top-level instructions executed (loop-weighted)


def weighted_cost(compiled) -> Cost:
    """XLA's cost analysis of ``compiled`` with loop bodies weighted by trip count.

    Each while body (and condition) is re-parsed as an HLO module of its own, with
    every computation it calls, and analysed by the backend's ``HloCostAnalysis``;
    ``full(c) = once(c) + sum over the loops w directly in c of
    trip(w) * full(body(w)) - once(body(w))`` (conditions: ``trip + 1`` times).
    Dot and convolution FLOPs are counted from the HLO text with the same weights
    (each computation's multiplicity = product of the trip counts above it).
    """
    from jax._src import xla_bridge
    from jax._src.lib import xla_client
    from jaxlib import _hlo

    text = hlo_text(compiled)
    comps, order, entry = _computations(text)
    client = xla_bridge.get_backend()
    cache: dict[str, dict] = {}

    def reachable(root):
        seen, stack = set(), [root]
        while stack:
            c = stack.pop()
            if c not in seen:
                seen.add(c)
                stack += _refs(comps[c])
        return seen

    def once(root):
        if root not in cache:
            keep = reachable(root)
            parts = ["HloModule sub"]
            for name in order:
                if name in keep:
                    lines = list(comps[name])
                    head = re.sub(r"^ENTRY\s+", "", lines[0])
                    lines[0] = "ENTRY " + head if name == root else head
                    parts.append("\n".join(lines))
            module = _hlo.hlo_module_from_text("\n\n".join(parts))
            res = xla_client._xla.hlo_module_cost_analysis(client, module)
            cache[root] = {k: float(res.get(k, 0.0)) for k in _KEYS}
        return cache[root]

    def direct_whiles(root):
        out, seen, stack = [], set(), [root]
        while stack:
            c = stack.pop()
            if c in seen:
                continue
            seen.add(c)
            ws = _whiles(comps[c])
            out += ws
            inner = {b for b, _, _ in ws} | {d for _, d, _ in ws}
            stack += [r for r in _refs(comps[c]) if r not in inner]
        return out

    def full(root):
        total = dict(once(root))
        for body, cond, trip in direct_whiles(root):
            n = 1 if trip is None else trip
            fb, ob, fc, oc = full(body), once(body), full(cond), once(cond)
            for k in total:
                total[k] += n * fb[k] - ob[k] + (n + 1) * fc[k] - oc[k]
        return total

    # Multiplicity of every computation (callees are printed before callers).
    mult = dict.fromkeys(order, 0.0)
    mult[entry] = 1.0
    loops = unknown = 0
    for name in reversed(order):
        if not mult[name]:
            continue
        ws = _whiles(comps[name])
        loops += len(ws)
        unknown += sum(t is None for _, _, t in ws)
        trips = {b: (t or 1) for b, _, t in ws}
        trips.update({d: (t or 1) + 1 for _, d, t in ws})
        for ref in _refs(comps[name]):
            mult[ref] += mult[name] * trips.get(ref, 1)
    # Kernel-level computations: the entry, loop bodies and conditions, branches
    # (fusion bodies and reducers run inside their caller's kernel).
    top = {entry}
    for name in order:
        for line in comps[name][1:]:
            top.update(
                re.findall(
                    r"\b(?:body|condition|true_computation|false_computation)"
                    r"=%([\w.\-]+)", line,
                )
            )  # fmt: skip
            for group in re.findall(r"\bbranch_computations=\{([^}]*)\}", line):
                top.update(x.strip().lstrip("%") for x in group.split(","))
    kernels = 0.0
    for name in top:
        ops = sum(
            1
            for line in comps[name][1:]
            if (op := _OPCODE.search(line)) and op.group(1) not in _FREE_OPS
        )
        kernels += mult.get(name, 0.0) * ops
    dot = [0.0, 0.0]
    for name, m in mult.items():
        if m:
            d, h = _dot_flops(comps[name])
            dot[0] += m * d
            dot[1] += m * h
    tot = full(entry)
    raw = compiled.cost_analysis()
    raw = raw[0] if isinstance(raw, (list, tuple)) else raw
    return Cost(
        flops=tot["flops"],
        transcendentals=tot["transcendentals"],
        bytes=tot["bytes accessed"],
        dot_flops=dot[0],
        dot_flops_highest=dot[1],
        raw_flops=float(raw.get("flops", 0.0)),
        raw_bytes=float(raw.get("bytes accessed", 0.0)),
        loops=loops,
        unknown_trip_loops=unknown,
        kernels=kernels,
    )


def peak_bytes(compiled) -> dict:
    """XLA's buffer sizes of a compiled program (CPU buffer assignment)."""
    m = compiled.memory_analysis()
    get = lambda k: int(getattr(m, k, 0) or 0)  # noqa: E731
    return {
        "argument": get("argument_size_in_bytes"),
        "output": get("output_size_in_bytes"),
        "alias": get("alias_size_in_bytes"),
        "temp": get("temp_size_in_bytes"),
    }


def compute_seconds(cost: Cost, dev: Device) -> float:
    """Arithmetic time of one execution on ``dev`` at peak (no memory traffic)."""
    other = max(cost.flops - cost.dot_flops - cost.dot_flops_highest, 0.0)
    return (
        cost.dot_flops / dev.matmul
        + cost.dot_flops_highest / dev.matmul_highest
        + (other + cost.transcendentals) / dev.vector
    )


def roofline_seconds(cost: Cost, dev: Device) -> tuple[float, str]:
    """``(seconds, 'compute' | 'memory')`` of one execution on ``dev``."""
    compute = compute_seconds(cost, dev)
    memory = cost.bytes / dev.bandwidth
    return max(compute, memory), "compute" if compute >= memory else "memory"


# --------------------------------------------------------------------------------------
# Analytical FLOP counts
# --------------------------------------------------------------------------------------


def layer_macs(model: str, input_shape, num_classes: int, hidden=(100,)) -> list[int]:
    """Multiply-accumulates per sample of each matmul/convolution, input first."""
    h, w, c = input_shape
    if model == "mlr":
        return [h * w * c * num_classes]
    if model == "mlp":
        dims = [h * w * c, *hidden, num_classes]
        return [a * b for a, b in zip(dims[:-1], dims[1:], strict=False)]
    # cnn / cnn4: conv 32@5x5 SAME, pool 2, conv k@5x5 (k = 32 / 64), pool 2, 512, C
    second = {"cnn": 32, "cnn4": 64}.get(model)
    if second:
        return [
            h * w * 25 * c * 32,
            (h // 2) * (w // 2) * 25 * 32 * second,
            (h // 4) * (w // 4) * second * 512,
            512 * num_classes,
        ]
    raise ValueError(f"no analytical count for model={model!r}")


def train_flops_per_sample(macs: list[int]) -> int:
    """Forward (2 x MACs) plus backward: weight gradients of every layer and input
    gradients of every layer but the first (2 x MACs each)."""
    return 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])


# --------------------------------------------------------------------------------------
# Setups
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """One projected configuration: a run config and its per-agent data sizes."""

    model: str
    num_agents: int
    config: object
    n_train: object  # host int32 [A]
    n_test: object  # host int32 [A]
    pooled_test: int  # M of part.x_all (group metrics)
    eval_samples: int  # C-GEN samples (x_gen)
    input_shape: tuple = (28, 28, 1)
    num_classes: int = 10
    note: str = ""


def mlp_setup(num_agents: int) -> Setup:
    """``benchmarks/scaling.py``'s MLP round as its README table ran it: 40 training
    samples and 2 test samples per agent, 20 SGD steps of batch 20 (10 epochs), C-GEN
    on 2,000 pooled samples, maxclust tree of ~10 agents per level-1 group,
    sketch_dim 256, exact linkage up to 10,000 agents and a 2,000-agent linkage
    sample above."""
    import numpy as np

    from configs import default
    from demjax.cluster import fastcluster_available

    a = num_agents
    c = default.get_config()
    c.num_agents, c.model, c.hidden = a, "mlp", (100,)
    c.batch_size, c.local_epochs, c.algorithm = 20, 10, "demlearn"
    c.tree_mode = "maxclust"
    sample = 2000 if a > 10_000 else 0
    base = sample or a
    c.level_groups = tuple(g for g in (max(2, base // 10), max(2, base // 100), 2))
    c.num_levels, c.sketch_dim, c.linkage_sample = len(c.level_groups), 256, sample
    c.local_buckets, c.num_devices = 1, 1
    c.linkage_backend = "fastcluster" if fastcluster_available() else "scipy"
    m = min(2000, 2 * a)
    return Setup(
        model="mlp",
        num_agents=a,
        config=c,
        n_train=np.full((a,), 40, np.int32),
        n_test=np.full((a,), 2, np.int32),
        pooled_test=m,
        eval_samples=m,
        note="scaling.py setup (--samples=40 --sketch_dim=256"
        + (", --linkage_sample=2000" if sample else "")
        + ")",
    )


def paper_split_sizes() -> tuple:
    """Per-agent train/test counts of the paper's 50-agent Fashion-MNIST split
    (``configs/fmnist_paper.py``); the fallback (no data installed) is the split's
    recorded summary: 22-176 training and 6-45 test samples, 969 pooled."""
    import numpy as np

    from configs import fmnist_paper
    from demjax import data

    try:
        part = data.make_partition(fmnist_paper.get_config())
        return np.asarray(part.n_train), np.asarray(part.n_test), "measured"
    except Exception:  # noqa: BLE001 - data not installed: a recorded copy
        n_train = np.array(
            [22, 23, 25, 27, 28, 28, 35, 36, 37, 39, 40, 40, 42, 43, 44, 48, 51,
             52, 52, 52, 52, 54, 54, 59, 60, 61, 62, 72, 74, 76, 77, 83, 83, 92,
             92, 93, 99, 107, 108, 114, 117, 123, 128, 132, 139, 141, 156, 160,
             169, 176], np.int32)  # fmt: skip
        n_test = np.maximum(6, np.round(n_train * 969 / 3777)).astype(np.int32)
        return n_train, n_test, "recorded"


def cnn_setup(num_agents: int, sizes) -> Setup:
    """The paper's CNN round (``configs/fmnist_paper.py``: DemLearn-P, batch 10, 2
    local epochs, binary tree of 3 group levels, exact distances on all 834,922
    weights, scipy linkage). 50 agents: the paper split's own sizes; more agents:
    the split's per-agent counts repeated (the Fashion-MNIST pool cannot serve
    thousands of agents) and C-GEN on a 2,000-sample subsample of the pooled test
    set (``eval_samples=2000``)."""
    import numpy as np

    from configs import fmnist_paper

    n_train50, n_test50, how = sizes
    reps = -(-num_agents // len(n_train50))
    n_train = np.tile(n_train50, reps)[:num_agents]
    n_test = np.tile(n_test50, reps)[:num_agents]
    c = fmnist_paper.get_config()
    c.num_agents, c.num_devices = num_agents, 1
    pooled = int(n_test.sum())
    c.eval_samples = 0 if num_agents <= len(n_train50) else 2000
    return Setup(
        model="cnn",
        num_agents=num_agents,
        config=c,
        n_train=n_train,
        n_test=n_test,
        pooled_test=pooled,
        eval_samples=pooled if c.eval_samples == 0 else min(pooled, c.eval_samples),
        note=f"paper split sizes ({how})"
        + ("" if num_agents <= len(n_train50) else ", repeated; C-GEN on 2,000"),
    )


# --------------------------------------------------------------------------------------
# Lowering the phases
# --------------------------------------------------------------------------------------


def _sds(shape, dtype):
    import jax

    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype)


def abstract_partition(s: Setup, host_counts: bool):
    """A ``Partition`` of ``ShapeDtypeStruct`` leaves (``n_train``/``n_test`` as
    host arrays when ``host_counts``, for the ``Simulator``'s static plans)."""
    import jax.numpy as jnp

    from demjax.types import Partition

    a, feat = s.num_agents, s.input_shape
    nt, ne = int(s.n_train.max()), int(s.n_test.max())
    return Partition(
        x_train=_sds((a, nt, *feat), jnp.float32),
        y_train=_sds((a, nt), jnp.int32),
        n_train=s.n_train if host_counts else _sds((a,), jnp.int32),
        x_test=_sds((a, ne, *feat), jnp.float32),
        y_test=_sds((a, ne), jnp.int32),
        n_test=s.n_test if host_counts else _sds((a,), jnp.int32),
        x_all=_sds((s.pooled_test, *feat), jnp.float32),
        y_all=_sds((s.pooled_test,), jnp.int32),
        owner_all=_sds((s.pooled_test,), jnp.int32),
        num_classes=s.num_classes,
    )


def engine_block(sim, part, capacity: float):
    """The agent block the engine picks on an accelerator with ``capacity`` bytes
    free (``Simulator._auto_block_size`` off CPU: half the free memory); ``None``
    when the population's resident state alone does not fit."""
    import jax

    from demjax import memory
    from demjax.errors import ConfigError

    with (
        mock.patch.object(memory, "available_bytes", lambda: int(capacity)),
        mock.patch.object(jax, "default_backend", lambda: "gpu"),
    ):
        try:
            block = sim._auto_block_size(part)
        except ConfigError:
            return None
    return block or sim.num_agents


def lower_phases(s: Setup, block: int, only=None) -> tuple[dict, object]:
    """Lowers and compiles every device program of one round (or the phases in
    ``only``).

    Returns ``({phase: (compiled, calls per round, compile seconds)}, sim)``.
    """
    import jax
    import jax.numpy as jnp

    from demjax import cluster
    from demjax.algorithms.hierarchical import simulator
    from demjax.types import GroupTree

    c = s.config
    c.local_plan = "all" if int(block) <= 0 else f"block:{int(block)}"
    c.conv_impl, c.matmul_impl = "patches", "xla"
    sim = simulator(c, abstract_partition(s, True), donate=True)
    part = abstract_partition(s, False)
    a = s.num_agents
    key = _sds((2,), jnp.uint32)
    state = jax.eval_shape(sim.init, key, part)
    n = int(sum(sim.level_sizes))
    tree = GroupTree(
        agent_parent=_sds((a,), jnp.int32),
        node_parent=_sds((n,), jnp.int32),
        agent_ancestor=_sds((len(sim.level_sizes), a), jnp.int32),
        level_sizes=sim.level_sizes,
    )
    f32, vec_f, vec_b = _sds((), jnp.float32), _sds((a,), jnp.float32), _sds((a,), bool)
    feat = s.input_shape
    x_gen = _sds((s.eval_samples, *feat), jnp.float32)
    y_gen = _sds((s.eval_samples,), jnp.int32)
    params, nodes = state.params, state.node_params
    num_params = sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(params))

    progs = {
        "local": (
            sim.jitted["local_phase"],
            (params, state.opt_state, nodes, part, tree, f32, key),
            {},
            1,
        ),
    }
    k, m = int(c.sketch_dim), int(c.linkage_sample)
    dist_rows = m or a
    if 0 < k < num_params:
        progs["sketch"] = (
            cluster._sketch_params_jit, (key, params),
            {"sketch_dim": k, "block_size": 4096}, 1,
        )  # fmt: skip
        dist_dim = k
    else:
        progs["flatten"] = (cluster._flatten_jit, (jax.tree.leaves(params),), {}, 1)
        dist_dim = num_params
    progs["distance"] = (
        cluster._pairwise_distances_jit,
        (_sds((dist_rows, dist_dim), jnp.float32),),
        {"metric": c.distance, "block_size": int(c.distance_block)},
        1,
    )
    if m:
        progs["nearest"] = (
            cluster._nearest_jit,
            (_sds((a, dist_dim), jnp.float32), _sds((m, dist_dim), jnp.float32)),
            {"metric": c.distance, "block": int(min(4096, a))},
            1,
        )
    progs["aggregate"] = (
        sim.jitted["aggregate_phase"],
        (params, tree, vec_f, vec_b, vec_b, f32, nodes, key),
        {},
        1,
    )
    progs["mix"] = (
        sim.jitted["mix_phase"], (nodes, params, tree, f32, vec_b), {}, 1
    )  # fmt: skip
    progs["evaluate"] = (
        sim.jitted["evaluate"],
        (params, nodes, _sds((n,), jnp.float32), tree, part, x_gen, y_gen),
        {},
        2,
    )
    out = {}
    for name, (fn, args, kwargs, calls) in progs.items():
        if only is not None and name not in only:
            continue
        t = time.perf_counter()
        compiled = fn.lower(*args, **kwargs).compile(FAST_COMPILE)
        out[name] = (compiled, calls, time.perf_counter() - t)
    return out, sim


def analytic_flops(s: Setup, sim, phase: str, d: int) -> float:
    """The phase's dominant arithmetic counted by hand (one call); ``d``
    parameters per agent."""
    import numpy as np

    from demjax import local

    c = s.config
    macs = layer_macs(s.model, s.input_shape, s.num_classes, tuple(c.hidden))
    fwd = 2 * sum(macs)
    a = s.num_agents
    n_nodes = int(sum(sim.level_sizes))
    if phase == "local":
        b, e = int(c.batch_size), int(c.local_epochs)
        steps = e * np.ceil(s.n_train / b).astype(np.int64)
        total = 0
        for idx in local.plan_buckets(steps, int(c.local_buckets)):
            cap = int(s.n_train[idx].max())
            bsz = min(sim.block_size, len(idx)) if sim.block_size else len(idx)
            slots = -(-len(idx) // bsz) * bsz  # the shifted last block reruns rows
            total += slots * e * local.steps_per_epoch(cap, b)
        return float(total * b * train_flops_per_sample(macs))
    if phase == "sketch":
        return 2.0 * a * d * int(c.sketch_dim)
    if phase == "flatten":
        return 0.0
    if phase == "distance":
        rows = int(c.linkage_sample) or a
        dim = int(c.sketch_dim) if 0 < int(c.sketch_dim) < d else d
        return 2.0 * rows * rows * dim + 3.0 * rows * dim  # Gram + centring
    if phase == "nearest":
        return 2.0 * a * int(c.linkage_sample) * int(c.sketch_dim)
    if phase == "aggregate":
        return 2.0 * a * d  # weighted segment sum
    if phase == "mix":
        return 3.0 * a * d  # (1 - alpha) p + alpha parent
    if phase == "evaluate":
        samples = a * s.eval_samples + a * int(s.n_test.max())
        samples += n_nodes * s.pooled_test
        return float(fwd * samples)
    raise ValueError(phase)


def host_linkage_seconds(s: Setup) -> float:
    """Host-side linkage + tree building, timed on this CPU on a random distance
    matrix of the round's size (its cost does not depend on the model)."""
    import numpy as np

    from demjax import cluster

    c = s.config
    n = int(c.linkage_sample) or s.num_agents
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, 16)).astype(np.float32)
    dist = np.asarray(cluster.pairwise_distances(feats, c.distance))
    best = float("inf")
    for _ in range(3 if n <= 2000 else 1):  # best of 3 where it is cheap
        t = time.perf_counter()
        z = cluster.linkage(dist, c.linkage, c.linkage_backend)
        if c.tree_mode == "binary":
            cluster.tree_from_linkage(z, n, int(c.num_levels))
        else:
            cluster.tree_from_linkage_maxclust(z, n, tuple(c.level_groups))
        best = min(best, time.perf_counter() - t)
    return best


# --------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------


def project(s: Setup, measure_host: bool = True) -> tuple[list[dict], dict]:
    """Phase records and the round total of one (model, agents) setup."""
    import jax

    from demjax import memory
    from demjax.algorithms.hierarchical import simulator

    c = s.config
    c.local_plan, c.conv_impl, c.matmul_impl = "block:1", "patches", "xla"
    probe = simulator(c, abstract_partition(s, True), donate=True)
    part_h = abstract_partition(s, True)
    blocks = {k: engine_block(probe, part_h, d.memory) for k, d in DEVICES.items()}
    # Local training is lowered with the H100's block (FLOPs do not depend on it;
    # per-step bytes scale with the agents, not the block); where the engine's
    # rule finds no room in half the memory, with its block for all of it.
    block = (
        blocks["h100"]
        or engine_block(probe, part_h, 2 * DEVICES["h100"].memory)
        or min(s.num_agents, 64)
    )
    progs, sim = lower_phases(s, block)
    state = jax.eval_shape(
        probe.init, _sds((2,), jax.numpy.uint32), abstract_partition(s, False)
    )
    num_params = sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(state.params))
    base = {"model": s.model, "num_agents": s.num_agents}
    records, total = [], {k: 0.0 for k in ("flops", "bytes", "raw_flops")}
    total.update(analytic=0.0, **{f"{k}_s": 0.0 for k in DEVICES})
    total.update({f"{k}_compute_s": 0.0 for k in DEVICES}, kernels=0.0)
    extra_bytes = 0
    for phase, (compiled, calls, compile_s) in progs.items():
        cost = weighted_cost(compiled)
        ana = analytic_flops(s, sim, phase, num_params)
        rec = dict(base, phase=phase, calls=calls)
        rec.update(
            flops=cost.flops,
            flops_xla_raw=cost.raw_flops,
            loop_factor=round(cost.flops / max(cost.raw_flops, 1.0), 2),
            flops_analytic=ana,
            flops_ratio=round(cost.flops / ana, 4) if ana else None,
            dot_flops=cost.dot_flops,
            dot_flops_highest=cost.dot_flops_highest,
            transcendentals=cost.transcendentals,
            bytes=cost.bytes,
            bytes_xla_raw=cost.raw_bytes,
            intensity=round(cost.flops / max(cost.bytes, 1.0), 2),
            loops=cost.loops,
            unknown_trip_loops=cost.unknown_trip_loops,
            kernels=cost.kernels * calls,
            h100_launch_floor_s=cost.kernels * calls * H100_LAUNCH_S,
            compile_s=round(compile_s, 2),
        )
        for key, dev in DEVICES.items():
            sec, bound = roofline_seconds(cost, dev)
            rec[f"{key}_s"] = sec * calls
            rec[f"{key}_bound"] = bound
            total[f"{key}_s"] += sec * calls
            total[f"{key}_compute_s"] += compute_seconds(cost, dev) * calls
        mem = peak_bytes(compiled)
        new_bytes = mem["output"] - mem["alias"] + mem["temp"]
        if phase in ("distance", "nearest"):  # inputs: the features, not resident
            new_bytes += mem["argument"]
        extra_bytes = max(extra_bytes, new_bytes)
        rec["memory"] = mem
        total["flops"] += cost.flops * calls
        total["bytes"] += cost.bytes * calls
        total["raw_flops"] += cost.raw_flops * calls
        total["analytic"] += ana * calls
        total["kernels"] += cost.kernels * calls
        records.append(rec)
    # Resident between phases: the population, its data, group models, C-GEN set.
    resident = (
        memory.tree_bytes(state)  # params, optimizer state, group models
        + 2 * memory.tree_bytes(state.node_params)  # last round's and mixed groups
        + memory.tree_bytes(abstract_partition(s, False))
        + s.eval_samples * math.prod(s.input_shape) * 4
    )
    peak = resident + extra_bytes
    host_s = host_linkage_seconds(s) if measure_host else None
    n_tree = int(c.linkage_sample) or s.num_agents
    d2h_s = n_tree * n_tree * 4 / D2H_BANDWIDTH
    rt = dict(base, phase="round")
    rt.update(
        note=s.note,
        agent_block_lowered=int(sim.block_size),
        flops=total["flops"],
        flops_xla_raw=total["raw_flops"],
        flops_analytic=total["analytic"],
        flops_ratio=round(total["flops"] / total["analytic"], 4),
        bytes=total["bytes"],
        kernels=total["kernels"],
        h100_launch_floor_s=total["kernels"] * H100_LAUNCH_S,
        resident_bytes=int(resident),
        peak_bytes=int(peak),
        host_linkage_s=None if host_s is None else round(host_s, 4),
        distance_d2h_s=round(d2h_s, 5),
        eval_samples=s.eval_samples,
        pooled_test=s.pooled_test,
        n_train_max=int(s.n_train.max()),
        n_test_max=int(s.n_test.max()),
        local_steps_max=int(c.local_epochs)
        * int(math.ceil(int(s.n_train.max()) / int(c.batch_size))),
    )
    for key, dev in DEVICES.items():
        t = total[f"{key}_s"]
        for eff in EFFICIENCIES:
            tag = "" if eff == 1.0 else f"_at{int(eff * 100)}"
            rt[f"{key}_s{tag}"] = t / eff
        rt[f"{key}_compute_s"] = total[f"{key}_compute_s"]
        rt[f"{key}_fits"] = peak <= dev.memory
        rt[f"{key}_devices_needed"] = int(math.ceil(peak / dev.memory))
        rt[f"{key}_engine_block"] = blocks[key]
        rt[f"{key}_engine_blocks"] = (
            None if blocks[key] is None else -(-s.num_agents // blocks[key])
        )
    return records, rt


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _commit() -> str:
    """Short hash of HEAD, ``-dirty`` when tracked files other than the results
    differ from it."""

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = [x for x in changed if "benchmarks/results/" not in x]
    return head + ("-dirty" if dirty else "")


def _t(sec: float) -> str:
    if sec >= 100:
        return f"{sec:,.0f} s"
    if sec >= 1:
        return f"{sec:.2f} s"
    return f"{sec * 1e3:.1f} ms"


def _g(x: float) -> str:
    return f"{x / 1e9:,.1f}" if x < 1e14 else f"{x / 1e12:,.0f}k"


ASSUMPTIONS = [
    "Roofline per phase: time = max(compute, bytes accessed / HBM bandwidth), summed "
    "over the phases of a round; compute = default-precision dot FLOPs / matrix "
    "peak + HIGHEST-precision dot FLOPs / float32 matrix peak + other FLOPs "
    "(and transcendentals) / vector peak. Ideal = the roofline itself; the 50% and "
    "30% columns divide it by an achieved fraction of peak (small per-agent GEMMs "
    "rarely exceed that).",
    "FLOPs and bytes come from XLA's cost analysis of the programs compiled for "
    "the CPU backend, with every while-loop body weighted by its trip count "
    "(XLA counts a loop body once). The GPU and TPU compilers fuse differently, "
    "so their bytes accessed (and the elementwise FLOPs) may differ; dot FLOPs are "
    "the same.",
    "Bytes accessed assume nothing stays in on-chip memory between fused kernels: "
    "every SGD step re-reads its block's weights from HBM (on an H100 a block's "
    "weights can stay in its 50 MB L2, so memory-bound steps may run faster).",
    "Each round regroups (tau = 1) and evaluates at both points (eval_every = 1): "
    "local training, clustering features, distances, aggregation, mixing, and "
    "two evaluations (C-SPE, C-GEN, G-SPE/G-GEN of every group, Global).",
    "The host-side linkage (scipy / fastcluster) is not projected: its time "
    "measured on this CPU is reported beside the device total (host column), plus "
    f"the distance matrix's device-to-host copy at an assumed {D2H_BANDWIDTH / 1e9:.0f}"
    " GB/s.",
    "Memory: resident = the population (params, optimizer state), its data, "
    "this and the last round's group models and the C-GEN set; peak = resident + "
    "the largest phase's new outputs and temporaries (XLA's CPU buffer "
    "assignment; for the distance phases also their input features, e.g. the "
    "[A, D] flattened weights). 'devices' = ceil(peak / capacity): the agents "
    "would be sharded over that many devices (or streamed from host memory), which the "
    "single-device times above ignore. 'blocks' = the engine's own agent-block "
    "rule (the round in half the free memory) on that device; '-' = the rule finds "
    "no room.",
    "One device, no communication; the roofline has no kernel-launch or "
    "host-dispatch overhead (the launch floor column estimates the former).",
]


def summary_lines(records: list[dict], totals: list[dict]) -> list[str]:
    """Findings computed from the records (bounds, memory, host, launches)."""
    out = []
    local = [r for r in records if r["phase"] == "local"]
    shares = [
        r["h100_s"] / t["h100_s"]
        for r in local
        for t in totals
        if (t["model"], t["num_agents"]) == (r["model"], r["num_agents"])
    ]
    bounds = {r[f"{k}_bound"] for r in local for k in DEVICES}
    speed = [t["tpu_v5e_s"] / t["h100_s"] for t in totals]
    bw = DEVICES["h100"].bandwidth / DEVICES["tpu_v5e"].bandwidth
    out.append(
        f"- Local training is {min(shares):.0%}-{max(shares):.0%} of the projected "
        "H100 round, "
        + (
            "memory-bound on both devices"
            if bounds == {"memory"}
            else "bound by " + " and ".join(sorted(bounds))
        )
        + f" at {min(r['intensity'] for r in local):.1f}-"
        f"{max(r['intensity'] for r in local):.1f} FLOP per byte accessed (every "
        "SGD step reads and writes its agents' weights, as XLA:CPU fuses it). A "
        f"v5e round takes {min(speed):.1f}-{max(speed):.1f}x an H100 round "
        f"(HBM bandwidth ratio {bw:.1f}x)."
    )
    host = [t for t in totals if (t["host_linkage_s"] or 0) > t["h100_s"]]
    if host:
        out.append(
            "- The host-side linkage, measured on this CPU, takes longer than the "
            "projected H100 round at "
            + ", ".join(
                f"{t['model']} x {t['num_agents']:,} ({_t(t['host_linkage_s'])} vs "
                f"{_t(t['h100_s'])})"
                for t in host
            )
            + ": with exact linkage the accelerator would wait on the host; "
            "`linkage_sample` bounds it (100,000 MLP agents with 2,000 sampled)."
        )
    nofit = [t for t in totals if not t["h100_fits"]]
    for t in nofit:
        dist = next(
            (
                r for r in records
                if (r["model"], r["num_agents"]) == (t["model"], t["num_agents"])
                and r["phase"] == "distance"
            ),
            None,
        )  # fmt: skip
        extra = ""
        if dist is not None:
            extra = (
                " The exact distances on all weights hold the flattened [A, D] "
                "features and a centred copy of them "
                f"({(dist['memory']['argument'] + dist['memory']['temp']) / 1e9:.0f} "
                "GB) next to the population; `sketch_dim` (features [A, k], "
                "sketched leaf by leaf) avoids both, `distance_block` (the Gram "
                "matrix over column blocks) the centred copy."
            )
        out.append(
            f"- {t['model']} x {t['num_agents']:,} peaks at "
            f"{t['peak_bytes'] / 1e9:.0f} GB, over one H100's 80 GB." + extra
        )
    launch = [t for t in totals if t["h100_launch_floor_s"] > t["h100_s"]]
    if launch:
        out.append(
            "- Kernel launches bound the H100 round before the roofline at "
            + ", ".join(
                f"{t['model']} x {t['num_agents']:,} ({_t(t['h100_launch_floor_s'])}"
                f" vs {_t(t['h100_s'])})"
                for t in launch
            )
            + ": per-agent models this small give short kernels, and "
            "the SGD-step and evaluation loops run them one loop iteration at a "
            "time."
        )
    return out


def write_report(records: list[dict], totals: list[dict], env: dict, path: str):
    lines = [
        "# Accelerator projection of one DemLearn round (roofline)",
        "",
        f"Generated by `benchmarks/roofline.py` on {env['date']} (commit "
        f"{env['commit']}, {env['cpu_model']}, jax {env['jax']}, load average "
        f"{env.get('loadavg_1min', '?')} from other jobs when it started). No "
        "accelerator "
        "was used: every phase of a round was lowered with abstract inputs and "
        "compiled for the CPU backend; XLA's FLOPs and bytes accessed (loop bodies "
        "weighted by their trip counts) were turned into times with each device's "
        "published peaks.",
        "",
        "## Projected round time",
        "",
        "| model | agents | H100 ideal | H100 50% | H100 30% | H100 compute only "
        "| H100 launch floor | v5e ideal | v5e 50% | v5e 30% | v5e compute only "
        "| largest phase (H100) "
        "| host linkage (this CPU) | H100 fits (devices, blocks) "
        "| v5e fits (devices, blocks) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in totals:
        phases = [
            x for x in records
            if (x["model"], x["num_agents"]) == (r["model"], r["num_agents"])
        ]  # fmt: skip
        big = max(phases, key=lambda x: x["h100_s"])
        share = big["h100_s"] / r["h100_s"]

        def fit(k, r=r):
            blocks = r[f"{k}_engine_blocks"]
            return (
                f"{'yes' if r[f'{k}_fits'] else 'no'} "
                f"({r[f'{k}_devices_needed']}, {'-' if blocks is None else blocks})"
            )

        host = r["host_linkage_s"]
        lines.append(
            f"| {r['model']} | {r['num_agents']:,} | "
            f"{_t(r['h100_s'])} | {_t(r['h100_s_at50'])} | {_t(r['h100_s_at30'])} | "
            f"{_t(r['h100_compute_s'])} | {_t(r['h100_launch_floor_s'])} | "
            f"{_t(r['tpu_v5e_s'])} | {_t(r['tpu_v5e_s_at50'])} | "
            f"{_t(r['tpu_v5e_s_at30'])} | {_t(r['tpu_v5e_compute_s'])} | "
            f"{big['phase']} ({share:.0%}, {big['h100_bound']}-bound) | "
            f"{'-' if host is None else _t(host)} | "
            f"{fit('h100')} | {fit('tpu_v5e')} |"
        )
    lines += [
        "",
        "Ideal = the roofline at the published peaks; 50% / 30% = at that "
        "fraction of peak; compute only = the arithmetic at peak with no memory "
        "traffic (a lower bound if the accelerator's compiler keeps far more on "
        "chip than XLA:CPU's fusion does); launch floor = kernels executed "
        f"(loop-weighted top-level HLO instructions) x {H100_LAUNCH_S * 1e6:.0f} us, "
        "the time small kernels cannot go below on a GPU without CUDA graphs "
        "(not added to the roofline; where it exceeds it, the round is "
        "launch-bound). The host linkage runs on the host CPU "
        "and is not in the device times. fits = the round's peak memory fits one "
        "device; devices = devices whose memory it needs; blocks = agent blocks "
        "the engine's rule trains per round on one device ('-': the rule finds no "
        "room for the resident population in half the memory).",
    ]
    lines += (
        ["", "## Summary", ""]
        + summary_lines(records, totals)
        + [
            "",
            "## Phases (ideal roofline, one round)",
            "",
            "| model | agents | phase | calls | GFLOP (loop-weighted) | GFLOP XLA raw "
            "| GFLOP analytic | ratio | GB accessed | FLOP/byte | H100 | bound | v5e "
            "| bound | kernels |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    )
    for r in records:
        ratio = "-" if r["flops_ratio"] is None else f"{r['flops_ratio']:.3f}"
        lines.append(
            f"| {r['model']} | {r['num_agents']:,} | {r['phase']} | {r['calls']} | "
            f"{_g(r['flops'])} | {_g(r['flops_xla_raw'])} | "
            f"{_g(r['flops_analytic'])} | {ratio} | {r['bytes'] / 1e9:,.2f} | "
            f"{r['intensity']} | {_t(r['h100_s'])} | {r['h100_bound']} | "
            f"{_t(r['tpu_v5e_s'])} | {r['tpu_v5e_bound']} | {r['kernels']:,.0f} |"
        )
    lines += [
        "",
        "GFLOP and GB are per call; times include the calls per round. 'raw' is "
        "XLA's `cost_analysis()` as is (each loop body once); 'ratio' = "
        "loop-weighted / analytic.",
        "",
        "## FLOP cross-check (round totals)",
        "",
        "| model | agents | loop-weighted GFLOP | XLA raw GFLOP | analytic GFLOP "
        "| weighted / analytic | weighted / raw |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in totals:
        lines.append(
            f"| {r['model']} | {r['num_agents']:,} | {_g(r['flops'])} | "
            f"{_g(r['flops_xla_raw'])} | {_g(r['flops_analytic'])} | "
            f"{r['flops_ratio']:.3f} | "
            f"{r['flops'] / max(r['flops_xla_raw'], 1):,.0f} |"
        )
    lines += [
        "",
        "Analytic counts: local training = agent-step slots actually computed "
        "(bucketed step counts, padded last minibatches and the shifted last "
        "agent block included) x batch x (forward 2 MACs + weight gradients 2 MACs "
        "+ input gradients 2 MACs of every layer but the first); evaluation = "
        "forward passes (A x C-GEN samples + A x own test capacity + groups x "
        "pooled test set); distances = 2 A^2 D Gram (D = sketch_dim when "
        "sketching); sketch = 2 A D k; aggregation 2 A D; mixing 3 A D. XLA's "
        "count adds the elementwise work (activations, softmax, SGD and proximal "
        "updates, masks), so ratios a little above 1 are expected for GEMM-heavy "
        "phases; the elementwise-only phases (aggregation, mixing) differ more. "
        "The CNN's evaluation runs `lax.conv` (training runs im2col patches "
        "and GEMMs), for which XLA counts only the kernel taps inside the image, "
        "not those on the 'SAME' padding (5x5 kernels: 92% of the taps at 28x28, "
        "84% at 14x14), hence its ratio of 0.87.",
        "",
        "## Assumptions",
        "",
    ]
    for dev in DEVICES.values():
        lines.append(f"- {dev.name}: {dev.notes}.")
    lines += [f"- {a}" for a in ASSUMPTIONS]
    lines += ["", "## Setups", ""]
    for r in totals:
        lines.append(
            f"- {r['model']} x {r['num_agents']:,}: {r['note']}; training samples per "
            f"agent up to {r['n_train_max']} ({r['local_steps_max']} SGD steps at "
            f"most), own test up to {r['n_test_max']}, pooled test {r['pooled_test']:,}"
            f", C-GEN on {r['eval_samples']:,}; local training lowered with blocks of "
            f"{r['agent_block_lowered']:,} agents; resident "
            f"{r['resident_bytes'] / 1e9:.1f} GB, peak {r['peak_bytes'] / 1e9:.1f} GB."
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def environment_record() -> dict:
    from benchmarks.common import environment

    env = environment()
    env["date"] = datetime.date.today().isoformat()
    env["commit"] = _commit()
    env["loadavg_1min"] = round(os.getloadavg()[0], 2)  # other jobs on this CPU
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mlp_agents", default="1000,10000,100000")
    p.add_argument("--cnn_agents", default="50,1000,10000")
    p.add_argument("--only", default="", help="model:agents[,model:agents...]")
    p.add_argument("--no_host", action="store_true", help="skip timing the linkage")
    p.add_argument("--out", default=RESULTS)
    p.add_argument(
        "--report", action="store_true",
        help="rewrite roofline.md from the stored roofline.json only",
    )  # fmt: skip
    args = p.parse_args()
    if args.report:
        with open(os.path.join(args.out, "roofline.json")) as f:
            stored = json.load(f)
        write_report(
            stored["phases"], stored["rounds"], stored["environment"],
            os.path.join(args.out, "roofline.md"),
        )  # fmt: skip
        return
    env = environment_record()
    print(json.dumps({"environment": env}), flush=True)
    plan = [("mlp", int(a)) for a in args.mlp_agents.split(",") if a]
    plan += [("cnn", int(a)) for a in args.cnn_agents.split(",") if a]
    if args.only:
        want = {(m, int(a)) for m, a in (x.split(":") for x in args.only.split(","))}
        plan = [x for x in plan if x in want]
    sizes = paper_split_sizes() if any(m == "cnn" for m, _ in plan) else None
    records, totals = [], []
    for model, a in plan:
        t = time.perf_counter()
        s = mlp_setup(a) if model == "mlp" else cnn_setup(a, sizes)
        recs, total = project(s, measure_host=not args.no_host)
        total["wall_s"] = round(time.perf_counter() - t, 1)
        for r in recs + [total]:
            print(json.dumps(r), flush=True)
        records += recs
        totals.append(total)
    os.makedirs(args.out, exist_ok=True)
    out = {
        "environment": env,
        "devices": {k: dataclasses.asdict(d) for k, d in DEVICES.items()},
        "efficiencies": list(EFFICIENCIES),
        "assumptions": ASSUMPTIONS,
        "phases": records,
        "rounds": totals,
    }
    from benchmarks.common import save_results

    save_results(os.path.join(args.out, "roofline.json"), out)
    write_report(records, totals, env, os.path.join(args.out, "roofline.md"))


if __name__ == "__main__":
    main()
