"""FLOPs of one round of each algorithm on the personalized comparison's setup.

Every jitted phase of one round (``Rounds.phases``: local training, communication,
aggregation; evaluation excluded) is lowered with abstract state, compiled for
this machine's backend and measured by XLA's cost analysis with loop bodies
weighted by their trip counts (``benchmarks/roofline.weighted_cost``). Nothing is
trained, so the figure is known before a run is started: it predicts which rows
of ``compare_personalized.py`` a CPU can afford, and is the same on every CPU.
A ``lax.cond`` (PDBO's hyper-gradient step every ``pdbo.outer_every`` rounds)
counts both branches: the figure is that of a round that takes the step.

Prints one JSON line per algorithm (GFLOP per round, per phase, the ratio to
FedAvg's round and, for FedAvg, the analytical count ``2 x MACs`` forward plus
backward of the model's matmuls/convolutions over the round's training rows)::

    python benchmarks/round_flops.py --algorithms=fedavg,sgp,pdbo
    python benchmarks/round_flops.py --model=mlp --samples_per_agent=300
    python benchmarks/round_flops.py --out=benchmarks/results/cnn4/round_flops.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def config(algorithm: str, args):
    """The comparison's config (``compare_personalized.config_for``, one replica);
    ``--quick``: the embedded digits, 6 agents."""
    from benchmarks import compare_personalized as cp

    ns = argparse.Namespace(
        data_dir=args.data_dir, model=args.model, num_rounds=1, eval_every=1,
        samples_per_agent=args.samples_per_agent, seed=0, quiet=True, replicas=1,
        quick=False,
    )  # fmt: skip
    c = cp.config_for(algorithm, args.split, ns)
    if args.quick:
        c.dataset, c.data_dir, c.num_agents, c.samples_per_agent = "digits", "", 6, 0
    return c


def round_cost(cfg) -> dict:
    """``{"phases": {name: GFLOP}, "round_gflops": GFLOP, "train_rows": int,
    "epoch_slots": int, "input_shape": tuple}`` of one round of ``cfg``
    (abstract state; the partition is built). GFLOP to 4 significant digits."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import roofline
    from demjax import data, local, train

    part = jax.tree.map(jnp.asarray, data.make_partition(cfg))
    _, _, rounds = train.build(cfg, part)
    state = jax.eval_shape(rounds.init, jax.random.PRNGKey(0), part)
    phases = {}
    for i, ph in enumerate(rounds.phases):
        lowered = jax.jit(ph.fn).lower(state, part, jax.random.PRNGKey(1), jnp.int32(0))
        cost = roofline.weighted_cost(lowered.compile())
        phases[ph.name or f"phase{i}"] = cost.flops / 1e9
        state = lowered.out_info[0]  # the next phase's abstract state
    steps = local.steps_per_epoch(part.y_train.shape[1], int(cfg.batch_size))
    return {
        "phases": {k: _sig(v) for k, v in phases.items()},
        "round_gflops": _sig(sum(phases.values())),
        "train_rows": int(np.sum(np.asarray(part.n_train))),
        # Rows one local epoch computes: every agent's steps over whole batches
        # of the largest agent's row count (masked rows are computed too).
        "epoch_slots": int(cfg.num_agents) * steps * int(cfg.batch_size),
        "input_shape": tuple(part.x_train.shape[2:]),
    }


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def analytic_gflops(cfg, cost: dict) -> float | None:
    """FedAvg's training FLOPs by hand: ``train_flops_per_sample`` x the rows a
    local epoch computes when every agent runs the largest agent's steps
    (``epoch_slots``) x local epochs, 10 classes (None for a model without an
    analytical count). Length buckets (``config.local_buckets``) let agents
    with fewer rows run fewer steps, so the compiled count may fall below it
    (down to ``train_rows``)."""
    from benchmarks import roofline

    hidden = tuple(cfg.hidden) if "hidden" in cfg else (100,)
    try:
        macs = roofline.layer_macs(cfg.model, cost["input_shape"], 10, hidden)
    except ValueError:
        return None
    flops = roofline.train_flops_per_sample(macs) * cost["epoch_slots"]
    return _sig(flops * int(cfg.local_epochs) / 1e9)


def main(argv=None) -> list[dict]:
    from benchmarks.compare_personalized import algorithms
    from benchmarks.roofline import environment_record

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algorithms", default="", help="comma list (default: all)")
    p.add_argument("--model", default="cnn4")
    p.add_argument("--split", default="pathological")
    p.add_argument("--samples_per_agent", type=int, default=150)
    p.add_argument("--data_dir", default="")
    p.add_argument("--quick", action="store_true", help="embedded digits, 6 agents")
    p.add_argument("--out", default="", help="also write the JSON lines to this file")
    args = p.parse_args(argv)
    names = [a for a in args.algorithms.split(",") if a] or algorithms()
    unknown = sorted(set(names) - set(algorithms()))
    if unknown:
        raise SystemExit(
            f"--algorithms: unknown {unknown}; accepted: {', '.join(algorithms())}"
        )
    env = environment_record()  # device, versions, date, commit
    records, reference = [], None
    for name in ["fedavg"] + [n for n in names if n != "fedavg"]:
        cfg = config(name, args)
        cost = round_cost(cfg)
        if name == "fedavg":
            reference = cost["round_gflops"]
        rec = {
            "algorithm": name,
            "model": cfg.model,
            "num_agents": int(cfg.num_agents),
            "train_rows": cost["train_rows"],
            "epoch_slots": cost["epoch_slots"],
            "round_gflops": cost["round_gflops"],
            "phases_gflops": cost["phases"],
            "vs_fedavg": _sig(cost["round_gflops"] / reference),
            "cpu_model": env.get("cpu_model"),
            "jax": env.get("jax"),
            "date": env["date"],
            "commit": env["commit"],
        }
        if name == "fedavg":
            rec["analytic_train_gflops"] = analytic_gflops(cfg, cost)
        if name in names:
            print(json.dumps(rec), flush=True)
            records.append(rec)
            if args.out:  # flushed per algorithm: a stopped run keeps its lines
                with open(args.out, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
    return records


if __name__ == "__main__":
    main()
