"""DemLearn ablations on Fashion-MNIST, cheap model (MLP 784-100-10).

Rows: alpha in {0.5, 0.6, 0.7, 0.8}; tau in {1, 5, fixed}; 2 vs 3 group levels;
Euclidean vs cosine; weights vs updates as clustering features; amplify on/off;
PyTorch's default layer initialization (``init="torch"``) with amplify off and on.
Every row is DemLearn-P (mu 0.002) on the reference split with one field changed
from the base (alpha 0.7, tau 1, 3 levels, euclidean, weights, amplify off).

Writes ``benchmarks/results/ablations_fmnist.{json,md}``; resumable like
``paper_fmnist.py`` (stored rows are skipped unless ``--force``)::

    python benchmarks/ablations_fmnist.py [--num_rounds=100] [--only=alpha_0.5,tau_5]
    python benchmarks/ablations_fmnist.py --report_only     # rebuild the .md
    python benchmarks/ablations_fmnist.py --replicas=3      # 3 seeds per row
    python benchmarks/ablations_fmnist.py --quick --replicas=2 --only=base,alpha_0.5
                    # smoke: digits, MLR, 6 agents, 2 rounds; WORKDIR/quick

Several seeds per row (``--replicas=R``: seeds 0 .. R-1 in one program,
``config.num_replicas``; one data split, the seeds vary initialization and batch
order) are stored under ``replica_rows`` with their flags under
``replica_setup``, never among the single-seed ``rows``; adding rows with other
``--replicas`` / ``--num_rounds`` / ``--quick`` than the stored ones is refused
unless ``--force``. Their table gives each row's final and best (each seed's
best evaluated round, and those rounds) C-SPE / C-GEN / Global after
synchronization as mean +/- std (ddof 1) over the seeds, and each row's final
minus the ``base`` row's with the two-standard-error verdict of
``benchmarks.common.difference`` ("beyond noise" / "within noise").

Wall time of ``--replicas=3`` (12 rows, 100 rounds, evaluated every 5 rounds)
on a 2-core AMD EPYC without AVX-512, from a 2-round ``--replicas=3 --only=base``
measurement (2026-12-04, commit 2f2a785, cores shared with other jobs at load
average 9): round 0 72 s (compilation), then per round 2.1 s of local training
and 0.7 s of clustering and mixing, and 3.3 s per evaluation at both points:
72 + 99 x 2.8 + 20 x 3.3 = ~410 s per row, ~1.4 h for the 12 rows. That
measurement had about 0.6 of the 2 cores (59 s of CPU time in 103 s), so an
idle machine should take less; the stored single-seed rows took 82-114 s each
(2026-11-22) and 318-450 s on shared cores (2026-12-04), three times that is
0.8-4.5 h for 12 rows: allow 4.5 h when the cores are shared.
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
    add_cpu_devices_flag,
    add_replicas_flag,
    adopt_replica_setup,
    apply_cpu_devices,
    best_rounds,
    cpu_model,
    difference,
    load_results,
    mean_std,
    save_results,
    start_anew,
)
from configs import fmnist_paper  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")

ROWS = {
    "base": {},
    "alpha_0.5": {"alpha": 0.5},
    "alpha_0.6": {"alpha": 0.6},
    "alpha_0.8": {"alpha": 0.8},
    "tau_5": {"tau": 5},
    "tau_fixed": {"tau": 0},
    "levels_2": {"num_levels": 2},
    "cosine": {"distance": "cosine"},
    "updates": {"cluster_features": "updates"},
    "amplify": {"amplify": True},
    "torch_init": {"init": "torch"},
    "amplify_torch_init": {"amplify": True, "init": "torch"},
}


def config_for(overrides: dict, num_rounds: int, replicas: int = 1,
               quick: bool = False):  # fmt: skip
    """A row's config: ``configs/fmnist_paper.py`` with the MLP 784-100-10,
    evaluated every ``num_rounds // 20`` rounds, and ``overrides``;
    ``replicas`` seeds 0 .. R-1 in one program (one data split); ``quick``: the
    smoke setup (digits, MLR, 6 agents, 2 rounds, evaluated every round)."""
    c = fmnist_paper.get_config()
    c.model = "mlp"
    c.hidden = (100,)
    c.num_rounds = num_rounds
    c.eval_every = max(1, num_rounds // 20)
    c.progress = False
    c.num_replicas = replicas
    if quick:  # seconds, embedded data
        c.dataset, c.data_dir, c.model = "digits", "", "mlr"
        c.num_agents, c.num_rounds, c.eval_every = 6, 2, 1
        c.samples_per_agent, c.checkpoint_every = 0, 0
    for k, v in overrides.items():
        c[k] = v
    return c


BASE = "base"  # the row every other row is compared with
METRICS = {"c_spe": "C-SPE", "c_gen": "C-GEN", "global_acc": "Global"}


def replica_table(rows: dict) -> list[str]:
    """Markdown lines of the rows with several seeds (``replica_rows``): mean
    +/- std over the seeds of the final round and of each seed's best round (and
    those rounds) after synchronization, and each row's final minus the base
    row's with the two-standard-error noise verdict
    (``benchmarks.common.difference``)."""
    base = rows.get(BASE, {})
    finals = " | ".join(f"{n} final | {n} best" for n in METRICS.values())
    versus = " | ".join(f"{n} vs base" for n in METRICS.values())
    lines = [
        "",
        "## Several seeds per row",
        "",
        "Mean +/- std (ddof 1) over the seeds (initialization and batch order; one "
        "data split), after synchronization; final = the last round, best = each "
        "seed's best evaluated round, with those rounds (one per seed); vs base = "
        "final minus the base row's, beyond noise when larger than two standard "
        "errors of the difference over the seeds.",
        "",
        f"| row | change | seeds | rounds | {finals} | {versus} | wall s |",
        "|---|---|---|---|" + "---|" * (3 * len(METRICS)) + "---|",
    ]
    for name, r in rows.items():
        s = r["replicas"]
        cells = []
        for m in METRICS:
            best = mean_std(s, m, "best")
            if best != "-":
                best += f" ({best_rounds(s, m)})"
            cells += [mean_std(s, m, "final"), best]
        comparable = name != BASE and base.get("num_rounds") == r["num_rounds"]
        vs = [
            difference(s, base.get("replicas"), m) if comparable else "-"
            for m in METRICS
        ]
        lines.append(
            f"| {name} | {json.dumps(r['overrides'])} | {len(s['seeds'])} | "
            f"{r['num_rounds']} | {' | '.join(cells)} | {' | '.join(vs)} | "
            f"{r['wall_s']:.0f} |"
        )
    return lines


def write_md(results: dict, path: str) -> None:
    """The single-seed table (``rows``) and, when stored, the table of the rows
    with several seeds (``replica_rows``)."""
    lines = [
        "# DemLearn-P ablations on Fashion-MNIST (MLP 784-100-10)",
        "",
        "Base: alpha 0.7, tau 1, 3 group levels, Euclidean distance on weights, "
        "amplify off, mu 0.002; 50 agents, pathological 2 labels per agent. Final "
        "round, after synchronization.",
        "",
        "| row | change | rounds | C-SPE | C-GEN | Global | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.get("rows", {}).items():
        f = r["final"]
        lines.append(
            f"| {name} | {json.dumps(r['overrides'])} | {r['num_rounds']} | "
            f"{f['c_spe']:.3f} | {f['c_gen']:.3f} | {f['global_acc']:.3f} | "
            f"{r['wall_s']:.0f} |"
        )
    if results.get("replica_rows"):
        lines += replica_table(results["replica_rows"])
        if results.get("replica_setup", {}).get("quick"):
            lines += ["", "Smoke setup (`--quick`): digits, MLR, 6 agents, 2 rounds."]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--num_rounds", type=int, default=100)
    p.add_argument("--force", action="store_true", help="rerun rows already stored")
    p.add_argument("--report_only", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: digits, MLR, 6 agents, 2 rounds; results in WORKDIR/quick",
    )
    add_replicas_flag(p)
    add_cpu_devices_flag(p)
    p.add_argument("--out_dir", default="", help="default benchmarks/results")
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "ablations_fmnist"))
    args = p.parse_args(argv)
    if args.replicas < 1:
        sys.exit(f"error: --replicas={args.replicas} is not valid; accepted: >= 1")
    if not args.report_only:
        apply_cpu_devices(args)
    # A smoke run never replaces the stored results.
    args.out_dir = args.out_dir or (
        os.path.join(args.workdir, "quick") if args.quick else RESULTS
    )

    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "ablations_fmnist.json")
    md = os.path.join(args.out_dir, "ablations_fmnist.md")
    results = load_results(path)
    if not results.get("runs"):  # load_results' empty default
        results.pop("runs", None)
    results.setdefault("rows", {})
    names = [n for n in args.only.split(",") if n] or list(ROWS)
    for n in names:
        if n not in ROWS:
            sys.exit(f"error: --only={n!r} is not valid; accepted: {', '.join(ROWS)}")
    # Several seeds per row: stored under "replica_rows" (never mixed into the
    # single-seed "rows"), all with one setup unless --force.
    seeded = args.replicas > 1
    section = "replica_rows" if seeded else "rows"
    if seeded and not args.report_only:
        probe = config_for({}, args.num_rounds, args.replicas, args.quick)
        adopt_replica_setup(results, "replica_rows", probe, args.replicas, args.quick,
                            args.force)  # fmt: skip
    if args.report_only:
        write_md(results, md)
        return

    from demjax.train import run

    for name in names:
        if name in results.get(section, {}) and not args.force:
            print(f"{name}: stored, skipping (--force to rerun)", file=sys.stderr)
            continue
        config = config_for(ROWS[name], args.num_rounds, args.replicas, args.quick)
        t0 = time.perf_counter()
        workdir = os.path.join(
            args.workdir,
            "quick" if args.quick else "",
            name + (f"_seeds{args.replicas}" if seeded else ""),
        )
        out = run(config, workdir, overwrite=start_anew(workdir, args.force))
        entry = {
            "overrides": ROWS[name],
            "num_rounds": int(config.num_rounds),
            "final": out["final"]["sync"],  # with seeds: mean over them
            "final_local": out["final"]["local"],
            "wall_s": round(time.perf_counter() - t0, 1),
            "date": time.strftime("%Y-%m-%d"),
            "per_round": out["records"],
        }
        if seeded:
            entry.update(replicas=out["replicas"], eval_every=int(config.eval_every),
                         cpu_model=cpu_model())  # fmt: skip
        results.setdefault(section, {})[name] = entry
        save_results(path, results)
        print(json.dumps({"row": name, **entry["final"]}), flush=True)
        write_md(results, md)


if __name__ == "__main__":
    main()
