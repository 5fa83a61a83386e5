"""DemLearn ablations on Fashion-MNIST, cheap model (MLP 784-100-10).

Rows: alpha in {0.5, 0.6, 0.7, 0.8}; tau in {1, 5, fixed}; 2 vs 3 group levels;
Euclidean vs cosine; weights vs updates as clustering features; amplify on/off;
PyTorch's default layer initialization (``init="torch"``) with amplify off and on.
Every row is DemLearn-P (mu 0.002) on the reference split with one field changed
from the base (alpha 0.7, tau 1, 3 levels, euclidean, weights, amplify off).

Writes ``benchmarks/results/ablations_fmnist.{json,md}``; resumable like
``paper_fmnist.py`` (stored rows are skipped unless ``--force``)::

    python benchmarks/ablations_fmnist.py [--num_rounds=100] [--only=alpha_0.5,tau_5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

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


def config_for(overrides: dict, num_rounds: int):
    c = fmnist_paper.get_config()
    c.model = "mlp"
    c.hidden = (100,)
    c.num_rounds = num_rounds
    c.eval_every = max(1, num_rounds // 20)
    c.progress = False
    for k, v in overrides.items():
        c[k] = v
    return c


def write_md(results: dict, path: str) -> None:
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
    for name, r in results["rows"].items():
        f = r["final"]
        lines.append(
            f"| {name} | {json.dumps(r['overrides'])} | {r['num_rounds']} | "
            f"{f['c_spe']:.3f} | {f['c_gen']:.3f} | {f['global_acc']:.3f} | "
            f"{r['wall_s']:.0f} |"
        )
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="")
    p.add_argument("--num_rounds", type=int, default=100)
    p.add_argument("--force", action="store_true")
    p.add_argument("--out_dir", default=RESULTS)
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "ablations_fmnist"))
    args = p.parse_args()

    from demjax.train import run

    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "ablations_fmnist.json")
    results = {"rows": {}}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    names = [n for n in args.only.split(",") if n] or list(ROWS)
    for n in names:
        if n not in ROWS:
            sys.exit(f"error: --only={n!r} is not valid; accepted: {', '.join(ROWS)}")
    for name in names:
        if name in results["rows"] and not args.force:
            continue
        t0 = time.perf_counter()
        out = run(
            config_for(ROWS[name], args.num_rounds),
            os.path.join(args.workdir, name),
            overwrite=args.force,
        )
        results["rows"][name] = {
            "overrides": ROWS[name],
            "num_rounds": args.num_rounds,
            "final": out["final"]["sync"],
            "final_local": out["final"]["local"],
            "wall_s": round(time.perf_counter() - t0, 1),
            "date": time.strftime("%Y-%m-%d"),
            "per_round": out["records"],
        }
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)
        print(json.dumps({"row": name, **results["rows"][name]["final"]}), flush=True)
        write_md(results, os.path.join(args.out_dir, "ablations_fmnist.md"))


if __name__ == "__main__":
    main()
