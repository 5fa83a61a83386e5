"""Scaling benchmark: one DemLearn round at growing ``num_agents``.

For each (model, num_agents) a fresh subprocess (so peak RSS is per size) builds
random Fashion-MNIST-shaped data (28x28x1, 10 classes; speed only: every agent
holds ``steps * batch`` samples so it does exactly ``steps`` SGD steps of batch
``batch`` per round), then times, after a warm-up round:

- ``compile_s``: first local-training call minus a steady one;
- ``local_s``: local training per round (median of ``--repeats``);
- ``agent_steps_per_s``, achieved ``gflops`` and ``gemm_fraction`` = achieved over
  a float32 4096x4096 GEMM measured in the same process;
- ``distance_s``, ``linkage_s`` (regrouping, optional ``--sketch_dim``),
  ``sync_s`` (bottom-up + top-down), ``eval_s`` (C-GEN on ``--eval_samples``),
  ``round_s`` (their sum), ``peak_rss_gb``.

Prints one JSON line per size and writes ``benchmarks/results/scaling.json`` and
``scaling.png``::

    python benchmarks/scaling.py                           # full sweep (long)
    python benchmarks/scaling.py --agents=100,1000 --models=mlp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
RESULTS = os.path.join(REPO, "benchmarks", "results")


def gemm_gflops(n: int = 4096, repeats: int = 3) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def log_phase(phase: str) -> None:
    """Phase name and peak RSS so far to stderr: a run killed by the OOM killer
    (return code -9, no traceback) still shows in its record how far it got."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"phase {phase}: peak RSS {peak:.2f} GB", file=sys.stderr, flush=True)


def flops_per_agent_step(model: str, batch: int, hidden: int = 100) -> float:
    """Forward + backward (3x forward) dense-layer flops of one SGD step."""
    d = 784
    macs = d * 10 if model == "mlr" else d * hidden + hidden * 10
    return 3 * 2 * batch * macs


def one_size(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import cpu_model
    from configs import default
    from demjax.algorithms.hierarchical import simulator
    from demjax.engine import placeholder_tree
    from demjax.types import Partition

    a, steps, batch = args.num_agents, args.steps, args.batch
    n = args.samples or steps * batch
    if (steps * batch) % n:
        raise SystemExit(f"--samples={n} must divide steps * batch = {steps * batch}")
    epochs = steps * batch // n
    rng = np.random.default_rng(0)
    x = rng.normal(size=(a, n, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=(a, n)).astype(np.int32)
    counts = np.full((a,), n, np.int32)
    m = min(args.eval_samples, a * 2)
    part = Partition(
        x_train=x, y_train=y, n_train=counts,
        x_test=x[:, :2], y_test=y[:, :2], n_test=np.full((a,), 2, np.int32),
        x_all=x[:, :2].reshape(-1, 28, 28, 1)[:m], y_all=y[:, :2].reshape(-1)[:m],
        owner_all=np.repeat(np.arange(a, dtype=np.int32), 2)[:m], num_classes=10,
    )  # fmt: skip
    del x
    c = default.get_config()
    c.num_agents, c.model, c.hidden = a, args.model, (100,)
    c.batch_size, c.local_epochs, c.algorithm = batch, epochs, "demlearn"
    c.tree_mode = "maxclust"
    # ~10 agents per level-1 group (of the sampled agents with --linkage_sample)
    base = args.linkage_sample if 0 < args.linkage_sample < a else a
    c.level_groups = tuple(
        g for g in (max(2, base // 10), max(2, base // 100), 2) if g <= base
    )
    c.num_levels, c.sketch_dim = len(c.level_groups), args.sketch_dim
    c.linkage_sample = args.linkage_sample if 0 < args.linkage_sample < a else 0
    c.local_buckets, c.local_plan = 1, args.local_plan
    c.linkage_backend = args.linkage_backend
    c.num_devices = 1
    part = jax.tree.map(jnp.asarray, part)
    # In place, as demjax.train.run runs it (buffer donation): every phase
    # consumes the population it updates, so rounds are chained state to state.
    sim = simulator(c, part, donate=True)
    state = sim.init(jax.random.PRNGKey(0), part)
    tree = jax.tree.map(jnp.asarray, placeholder_tree(a, sim.level_sizes))
    weight = sim.agent_weight(part)
    mu, key = jnp.float32(0.0), jax.random.PRNGKey(1)

    def local(state, r):
        out = sim.local_phase(state, part, tree, mu, jax.random.fold_in(key, r))
        jax.block_until_ready(out)
        return out

    log_phase("init")
    t = time.perf_counter()
    out = local(state, 0)
    log_phase("local (compile)")
    first = time.perf_counter() - t
    state = state.replace(params=out[0], opt_state=out[1])
    local_times = []
    for r in range(args.repeats):
        t = time.perf_counter()
        out = local(state, r + 1)
        local_times.append(time.perf_counter() - t)
        state = state.replace(params=out[0], opt_state=out[1])
    params_local, active, diverged = out[0], out[3], out[4]
    log_phase("local")
    sim.build_tree(params_local, None, jax.random.PRNGKey(2))  # compile
    new_tree, info = sim.build_tree(params_local, None, jax.random.PRNGKey(3))
    info.pop("linkage")
    new_tree = jax.tree.map(jnp.asarray, new_tree)
    log_phase("cluster")

    def sync(params):
        nodes, node_w = sim.aggregate_phase(
            params, new_tree, weight, active, diverged, jnp.float32(1.0),
            state.node_params,
        )  # fmt: skip
        nodes_sync, params_sync = sim.mix_phase(
            nodes, params, new_tree, jnp.float32(0.7), active
        )
        jax.block_until_ready(params_sync)
        return node_w, nodes_sync, params_sync

    node_w, nodes_sync, params_sync = sync(params_local)  # compile
    t = time.perf_counter()
    node_w, nodes_sync, params_sync = sync(params_sync)
    sync_s = time.perf_counter() - t
    log_phase("sync")
    ev = lambda: sim.evaluate(  # noqa: E731
        params_sync, nodes_sync, node_w, new_tree, part, part.x_all, part.y_all
    )
    jax.block_until_ready(ev())
    t = time.perf_counter()
    jax.block_until_ready(ev())
    eval_s = time.perf_counter() - t
    log_phase("eval")

    local_s = statistics.median(local_times)
    agent_steps = a * steps
    gflops = agent_steps * flops_per_agent_step(args.model, batch) / local_s / 1e9
    peak = gemm_gflops()
    rec = {
        "model": args.model,
        "num_agents": a,
        "steps": steps,
        "batch": batch,
        "samples_per_agent": n,
        "agent_block": sim.block_size,
        "local_plan": sim.plan_info["plan"],
        "conv_impl": sim.plan_info["conv_impl"],
        "plan_source": sim.plan_info["source"],
        "compile_s": round(first - local_s, 3),
        "local_s": round(local_s, 4),
        "agent_steps_per_s": round(agent_steps / local_s, 1),
        "gflops": round(gflops, 2),
        "gemm_gflops": round(peak, 1),
        "gemm_fraction": round(gflops / peak, 4),
        "sketch_dim": args.sketch_dim,
        "sketch_s": round(info.get("sketch_s", 0.0), 4),
        "distance_s": round(info["distance_s"], 4),
        "linkage_s": round(info["linkage_s"], 4),
        "linkage_sample": c.linkage_sample,
        "linkage_backend": c.linkage_backend,
        "assign_s": round(info.get("assign_s", 0.0), 4),
        "sync_s": round(sync_s, 4),
        "eval_s": round(eval_s, 4),
        "eval_samples": int(part.y_all.shape[0]),
        "round_s": round(
            local_s
            + info.get("sketch_s", 0.0)
            + info["distance_s"]
            + info["linkage_s"]
            + info.get("assign_s", 0.0)
            + sync_s
            + eval_s,
            4,
        ),  # fmt: skip
        "peak_rss_gb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3
        ),
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "machine": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
    }
    return rec


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model in sorted({r["model"] for r in records}):
        rs = sorted(
            (r for r in records if r["model"] == model), key=lambda r: r["num_agents"]
        )
        xs = [r["num_agents"] for r in rs]
        axes[0].plot(xs, [r["round_s"] for r in rs], "o-", label=f"{model} round")
        axes[0].plot(xs, [r["local_s"] for r in rs], "x--", label=f"{model} local")
        axes[1].plot(xs, [r["agent_steps_per_s"] for r in rs], "o-", label=model)
    for ax, title in zip(axes, ("seconds per round", "agent-steps / s"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("agents")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def record_key(r: dict) -> tuple:
    """A stored record's identity: a rerun of the same size and tag replaces it."""
    return (r["model"], r["num_agents"], r.get("tag", ""))


def main() -> None:
    from demjax.cluster import fastcluster_available

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", default="100,1000,5000,10000")
    p.add_argument("--models", default="mlp,mlr")
    p.add_argument("--mlr_extra", default="100000", help="extra sizes for MLR only")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument(
        "--samples",
        type=int,
        default=0,
        help="samples per agent (divides steps*batch; epochs = steps*batch/samples); "
        "0 = steps*batch, one epoch. Bounds the data's memory at 10k+ agents.",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval_samples", type=int, default=2000)
    p.add_argument("--sketch_dim", type=int, default=0)
    p.add_argument(
        "--local_plan", default="auto",
        help="auto (measured), all, sequential or block:K",
    )  # fmt: skip
    p.add_argument(
        "--linkage_sample",
        type=int,
        default=0,
        help="linkage on this many sampled agents (config linkage_sample); 0 = all",
    )
    p.add_argument(
        "--linkage_backend",
        default="fastcluster" if fastcluster_available() else "scipy",
        choices=("scipy", "fastcluster"),
        help="config linkage_backend (default: fastcluster when installed)",
    )
    p.add_argument(
        "--tag",
        default="",
        help="label of a non-default variant (e.g. eval500_block1000): stored "
        "beside the untagged record of the same size instead of replacing it; "
        "the plot shows untagged records only",
    )
    p.add_argument("--out", default=os.path.join(RESULTS, "scaling.json"))
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--num_agents", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RECORD" + json.dumps(one_size(args)), flush=True)
        return

    # Sizes measured earlier (other runs of this script) are kept unless remeasured.
    records = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            records = json.load(f)
    for model in args.models.split(","):
        sizes = [int(s) for s in args.agents.split(",") if s]
        if model == "mlr":
            sizes += [int(s) for s in args.mlr_extra.split(",") if s]
        for a in sizes:
            cmd = [
                sys.executable, __file__, "--one", f"--num_agents={a}",
                f"--model={model}", f"--steps={args.steps}", f"--batch={args.batch}",
                f"--repeats={args.repeats}", f"--eval_samples={args.eval_samples}",
                f"--sketch_dim={args.sketch_dim}", f"--local_plan={args.local_plan}",
                f"--samples={args.samples}", f"--linkage_sample={args.linkage_sample}",
                f"--linkage_backend={args.linkage_backend}",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RECORD")]
            if proc.returncode or not line:
                phases = [x for x in proc.stderr.splitlines() if x.startswith("phase")]
                rec = {"model": model, "num_agents": a, "returncode": proc.returncode,
                       "phases": phases, "error": proc.stderr[-500:]}  # fmt: skip
                if proc.returncode == -9:
                    rec["error"] = (
                        "killed by SIGKILL (the OOM killer when memory "
                        "runs out) after: " + (phases or ["start"])[-1]
                    )
            else:
                rec = json.loads(line[0][len("RECORD") :])
            if args.tag:
                rec["tag"] = args.tag
            print(json.dumps(rec), flush=True)
            records = [r for r in records if record_key(r) != record_key(rec)]
            records = sorted(records + [rec], key=record_key)
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)
    ok = [r for r in records if "error" not in r and not r.get("tag")]
    if ok:
        plot(ok, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
