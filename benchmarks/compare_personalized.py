"""Every registered algorithm on Fashion-MNIST, two non-IID splits.

Full setup (the default flags): 20 agents, all participating, the 4-layer CNN
(``cnn4``: conv 32@5x5, pool, conv 64@5x5, pool, dense 512, dense 10), batch 10,
1 local epoch, pathological (2 classes per agent) and Dirichlet(0.1) splits, 200
rounds. Every algorithm of ``demjax.algorithms.REGISTRY`` (DemLearn variants,
FedAvg, FedProx, local included) runs through the same round loop with
its paper's default hyper-parameters. Writes
``benchmarks/results/compare_personalized.{json,md,png}``: final C-SPE (mean
personalized test accuracy), C-GEN, Global where it exists, and wall seconds per
round.

Resumable: finished runs are stored at once and skipped on rerun (``--force``).

    python benchmarks/compare_personalized.py                     # full setup
    python benchmarks/compare_personalized.py --model=mlp --num_rounds=100 \\
        --samples_per_agent=300                                   # reduced
    python benchmarks/compare_personalized.py --only=ditto,fedavg --report_only
    python benchmarks/compare_personalized.py --replicas=3    # mean +/- std of 3 seeds
    python benchmarks/compare_personalized.py --quick --replicas=3 --only=fedavg
                                  # smoke: digits, MLR, 2 rounds, results in --workdir

With ``--replicas=R`` every run is R seeds in one program (``config.num_replicas``)
and the tables give mean +/- std over the seeds of the final round and of each
seed's best round (``replicas.json``); the plot shows the mean curves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import (  # noqa: E402
    TRAFFIC_LEGEND,
    add_cpu_devices_flag,
    add_replicas_flag,
    apply_cpu_devices,
    best_rounds,
    difference,
    environment,
    load_results,
    mean_curve,
    mean_std,
    save_results,
    start_anew,
    traffic_cell,
)
from configs import default  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
SPLITS = {
    "pathological": {"partition": "pathological", "labels_per_agent": 2},
    "dirichlet": {"partition": "dirichlet", "dirichlet_alpha": 0.1},
}


def algorithms() -> list[str]:
    from demjax.algorithms import ALGORITHMS

    return list(ALGORITHMS)


def config_for(algorithm: str, split: str, args):
    c = default.get_config()
    c.dataset = "fashion_mnist"
    c.data_dir = args.data_dir
    c.num_agents = 20
    c.model = args.model
    c.batch_size = 10
    c.local_epochs = 1
    c.num_rounds = args.num_rounds
    c.eval_every = args.eval_every
    c.samples_per_agent = args.samples_per_agent
    c.algorithm = algorithm
    c.seed = args.seed
    c.checkpoint_every = 10
    c.tree_snapshot_every = 0
    c.progress = not args.quiet
    c.num_replicas = args.replicas
    for k, v in SPLITS[split].items():
        c[k] = v
    if args.quick:  # smoke run: seconds, embedded data
        c.dataset, c.data_dir, c.model = "digits", "", "mlr"
        c.num_agents, c.num_rounds, c.eval_every = 6, 2, 1
        c.samples_per_agent, c.checkpoint_every = 0, 0
    return c


REFERENCE = "fedavg"  # the baseline every row's C-SPE is compared with


def tuning_record(tuning: dict, key: str) -> dict:
    """What a tuned run stores of ``benchmarks/tune.py``'s ``tuning.json`` for
    ``key`` (``split/algorithm``): the grid, every point's validation C-SPE
    (mean over the tuning seeds, final round) and the chosen point."""
    name = key.split("/")[1]
    return {
        "grid": tuning.get("grids", {}).get(name, {}),
        "seeds": tuning.get("setup", {}).get("seeds"),
        "points": [
            {"params": p["params"], "val_c_spe": p["val_c_spe"]}
            for p in tuning.get("points", {}).get(key, [])
        ],
        "chosen": tuning["chosen"][key]["params"],
        "val_c_spe": tuning["chosen"][key]["val_c_spe"],
    }


def hyper_label(run: dict) -> str:
    """A table cell of a run's hyper-parameters (``paper defaults`` or
    ``lr=0.05, ditto.lam=0.1``)."""
    h = run.get("hyperparameters", "paper defaults")
    if isinstance(h, str):
        return h
    return ", ".join(f"{k}={v:g}" for k, v in h.items())


def replica_table(split: str, rows: list) -> list[str]:
    """Markdown lines of a split's runs with replicas: mean +/- std over the
    seeds of the final round and of each seed's best round (and which round),
    and the final C-SPE's difference to FedAvg's with a noise verdict
    (``benchmarks.common.difference``)."""
    cols = [(m, w) for m in ("c_spe", "c_gen", "global_acc") for w in ("final", "best")]
    names = {"c_spe": "C-SPE", "c_gen": "C-GEN", "global_acc": "Global"}
    head = " | ".join(f"{names[m]} {w}" for m, w in cols)
    reference = dict(rows).get(REFERENCE, {}).get("replicas")
    tuned = any("tuning" in r for _, r in rows)
    lines = [
        "",
        f"## {split}",
        "",
        "Mean +/- std (ddof 1) over the seeds; best = each seed's best evaluated "
        "round (the rounds: C-SPE best rounds, one per seed); vs FedAvg = final "
        "C-SPE minus FedAvg's, beyond noise when larger than two standard errors "
        "of the difference over the seeds.",
        "",
        f"| algorithm | seeds | {head} | C-SPE best rounds | C-SPE vs FedAvg | "
        "MB up / down | s / round | rounds |"
        + (" hyper-parameters (validation C-SPE) |" if tuned else ""),
        "|---|---|"
        + "---|" * len(cols)
        + "---|---|---|---|---|"
        + ("---|" if tuned else ""),
    ]
    for name, r in rows:
        s = r.get("replicas")
        seeds = len(s["seeds"]) if s else 1
        cells = " | ".join(mean_std(s, m, w) for m, w in cols)
        vs = "-" if name == REFERENCE else difference(s, reference, "c_spe")
        lines.append(
            f"| {name} | {seeds} | {cells} | {best_rounds(s, 'c_spe')} | {vs} | "
            f"{traffic_cell(r['final'])} | "
            f"{r['wall_s'] / r['num_rounds']:.2f} | {r['num_rounds']} |"
            + (f" {tuned_cell(r)} |" if tuned else "")
        )
    return lines


def tuned_cell(run: dict) -> str:
    """``lr=0.05 (0.912, best of 9)``: the chosen point, its validation C-SPE and
    the number of grid points it was chosen from."""
    t = run.get("tuning")
    if not t:
        return hyper_label(run)
    return f"{hyper_label(run)} ({t['val_c_spe']:.3f}, best of {len(t['points'])})"


def report(results: dict, out_dir: str) -> None:
    """Markdown table per split and a plot of C-SPE / C-GEN over rounds."""
    runs = results["runs"]
    setup = results.get("setup", {})
    lines = [
        "# Personalized, clustered and robust algorithms on Fashion-MNIST",
        "",
        f"Setup: {json.dumps(setup)}",
        "",
        "Final round, models each agent uses after the round's communication "
        "(`sync`). C-SPE = mean personalized test accuracy (own test data); C-GEN "
        "= agents' models on the pooled test set; Global = the server model. "
        + TRAFFIC_LEGEND,
    ]
    for split in SPLITS:
        rows = [(n.split("/")[1], r) for n, r in runs.items() if n.startswith(split)]
        if not rows:
            continue
        rows.sort(key=lambda kv: -kv[1]["final"]["c_spe"])
        if any("replicas" in r for _, r in rows):
            lines += replica_table(split, rows)
            continue
        lines += [
            "",
            f"## {split}",
            "",
            "| algorithm | C-SPE | C-GEN | Global | MB up / down | s / round "
            "| rounds |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in rows:
            f = r["final"]
            g = "-" if f.get("global_acc") is None else f"{f['global_acc']:.3f}"
            lines.append(
                f"| {name} | {f['c_spe']:.3f} | {f['c_gen']:.3f} | {g} | "
                f"{traffic_cell(f)} | "
                f"{r['wall_s'] / r['num_rounds']:.2f} | {r['num_rounds']} |"
            )
    analysis = results.get("analysis")
    if analysis:
        lines += ["", analysis]
    with open(os.path.join(out_dir, "compare_personalized.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), squeeze=False)
    for row, split in enumerate(SPLITS):
        for col, key in enumerate(("c_spe", "c_gen")):
            ax = axes[row][col]
            for name, r in runs.items():
                if not name.startswith(split):
                    continue
                rounds, values = mean_curve(r["per_round"], key)
                ax.plot(rounds, values, label=name.split("/")[1])
            ax.set_title(f"{split}: {key.upper().replace('_', '-')}")
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "compare_personalized.png"), dpi=90)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma list of algorithms")
    p.add_argument("--splits", default=",".join(SPLITS))
    p.add_argument("--model", default="cnn4")
    p.add_argument("--num_rounds", type=int, default=200)
    p.add_argument("--eval_every", type=int, default=5)
    p.add_argument("--samples_per_agent", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default="")
    p.add_argument("--force", action="store_true")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--tuned",
        default="",
        help="tuning.json of benchmarks/tune.py: run each algorithm with the "
        "hyper-parameters chosen on the validation split (else the papers' defaults)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: digits, MLR, 6 agents, 2 rounds; results in --workdir",
    )
    add_replicas_flag(p)
    add_cpu_devices_flag(p, "; each run records the count")
    p.add_argument("--out_dir", default="", help="default benchmarks/results")
    p.add_argument(
        "--workdir", default=os.path.join(REPO, "runs", "compare_personalized")
    )
    args = p.parse_args(argv)
    if args.replicas < 1:
        sys.exit(f"error: --replicas={args.replicas} is not valid; accepted: >= 1")
    devices = 1 if args.report_only else apply_cpu_devices(args)
    # A smoke run never replaces the stored results.
    args.out_dir = args.out_dir or (
        os.path.join(args.workdir, "quick") if args.quick else RESULTS
    )
    names = [n for n in args.only.split(",") if n] or algorithms()
    splits = [s for s in args.splits.split(",") if s]
    for n in names:
        if n not in algorithms():
            sys.exit(f"error: --only={n!r} is not valid; accepted: {algorithms()}")
    for s in splits:
        if s not in SPLITS:
            sys.exit(f"error: --splits={s!r} is not valid; accepted: {list(SPLITS)}")

    from demjax.train import run

    chosen, tuning = {}, {}
    if args.tuned:
        with open(args.tuned) as f:
            tuning = json.load(f)
        chosen = tuning.get("chosen", {})
        missing = [
            f"{s}/{n}" for s in splits for n in names if f"{s}/{n}" not in chosen
        ]
        if missing and not args.report_only:
            sys.exit(
                f"error: --tuned={args.tuned!r} has no choice for {', '.join(missing)}"
                "; tune them first (benchmarks/tune.py --only=...) or leave them out"
                " of --only"
            )
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "compare_personalized.json")
    results = load_results(path)
    old_setup = dict(results.get("setup", {}))
    results["setup"] = {
        "dataset": "fashion_mnist",
        "num_agents": 20,
        "model": args.model,
        "batch_size": 10,
        "local_epochs": 1,
        "num_rounds": args.num_rounds,
        "samples_per_agent": args.samples_per_agent or "all",
        "eval_every": args.eval_every,
        "seed": args.seed,
        "tuned": bool(args.tuned),
        "replicas": args.replicas,
        **({"quick": True} if args.quick else {}),
        **environment(),
    }
    if args.quick:
        q = config_for(names[0], splits[0] if splits else "pathological", args)
        results["setup"].update(
            dataset=q.dataset, num_agents=q.num_agents, model=q.model,
            num_rounds=q.num_rounds, eval_every=q.eval_every,
        )  # fmt: skip
    same = ("model", "num_rounds", "samples_per_agent", "seed", "replicas", "quick",
            "tuned")  # fmt: skip
    new_setup = results["setup"]
    # Results stored before a field existed ran with its default.
    defaults = {"replicas": 1, "quick": False, "tuned": False}

    def used(setup, k):
        return setup.get(k, defaults.get(k))

    changed = [k for k in same if used(old_setup, k) != used(new_setup, k)]
    stale = results["runs"] and old_setup and changed
    if stale and not (args.force or args.report_only):
        was = ", ".join(f"{k}={used(old_setup, k)!r}" for k in changed)
        sys.exit(
            f"error: stored runs used {was}"
            "; pass the same flags to add runs, or --force to rerun everything"
        )
    if args.report_only and old_setup:
        results["setup"] = old_setup
    if not args.report_only:
        for split in splits:
            for name in names:
                key = f"{split}/{name}"
                if key in results["runs"] and not args.force:
                    print(f"{key}: stored, skipping", file=sys.stderr)
                    continue
                config = config_for(name, split, args)
                params = chosen.get(key, {}).get("params", {})
                if params:
                    from benchmarks.tune import apply

                    apply(config, params)
                t0 = time.perf_counter()
                workdir = os.path.join(
                    args.workdir,
                    "quick" if args.quick else "",
                    "tuned" if args.tuned else "",
                    split,
                    name,
                )  # fmt: skip
                out = run(config, workdir, overwrite=start_anew(workdir, args.force))
                results["runs"][key] = {
                    "final": out["final"]["sync"],
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "num_rounds": int(config.num_rounds),
                    "hyperparameters": params or "paper defaults",
                    **({"tuning": tuning_record(tuning, key)} if args.tuned else {}),
                    # runs may be added later, on other CPUs
                    "cpu_model": new_setup.get("cpu_model"),
                    "cpu_devices": devices,
                    "per_round": out["records"],
                }
                if "replicas" in out:  # mean +/- std over the seeds
                    results["runs"][key]["replicas"] = out["replicas"]
                save_results(path, results)
                print(json.dumps({"run": key, **out["final"]["sync"]}), flush=True)
    save_results(path, results)
    report(results, args.out_dir)


if __name__ == "__main__":
    main()
