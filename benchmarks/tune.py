"""The tuning protocol of the comparison tables: a small grid per algorithm,
chosen on a validation split of the agents' training data (never the test data).

Protocol (the same for every algorithm of a table):

1. The setup of ``benchmarks/compare_personalized.py`` (its ``config_for``: the
   split, model, batch, rounds), with ``val_fraction = 0.2``: every agent holds
   out a seeded 20 % of its training rows and the run evaluates on them; the
   test rows are not in the run (``demjax.data.validation``).
2. A grid over the learning rate and the method's main hyper-parameter(s)
   (``GRIDS``; algorithms without an entry get the learning-rate grid only),
   every point run with ``--seeds`` seeds (the replicas of one run,
   ``num_replicas``: one compilation per point).
3. The choice: the grid point with the highest validation C-SPE at the final
   round, mean over seeds (ties: the first in grid order). The best round's
   validation C-SPE is stored too.

Writes ``benchmarks/results/tuning.json`` (setup, grids, every point's
validation scores per seed, the choice per split and algorithm) and
``tuning.md``; ``compare_personalized.py --tuned=benchmarks/results/tuning.json``
runs the chosen settings on the test split. Resumable: stored points are
skipped (``--force`` reruns).

    python benchmarks/tune.py --only=ditto,perfedavg --splits=pathological
    python benchmarks/tune.py --model=mlp --num_rounds=50 --samples_per_agent=300
    python benchmarks/tune.py --model=cnn4 --num_rounds=30 --samples_per_agent=150 \
        --lr_grid=0.005,0.01,0.02,0.05 --out_dir=benchmarks/results/cnn4
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import compare_personalized as cp  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_cpu_devices_flag,
    apply_cpu_devices,
    environment,
    load_results,
    save_results,
)

LR_GRID = (0.02, 0.05, 0.1)
LR_WIDE = (0.01,) + LR_GRID + (0.2,)
# field -> values; "group.field" is the hyper-parameter --config.group.field.
# Axes whose first choice fell on an edge of a smaller grid were extended
# past it (Per-FedAvg alpha/beta, pFedMe lr/lambda, FedProto lr/lambda, Ditto
# lambda, FedProx lr/mu, DemLearn lr/alpha; the learning rates of pFedHN up to
# 0.5, of MOON and SGP up to 0.2, of SCAFFOLD, FedDyn and FedGen down to 0.01,
# of PDBO to 0.005, and of the methods tuned on the learning rate alone both
# ways, LR_WIDE); stored points of the smaller grid are reused.
GRIDS = {
    "demlearn": {"lr": (0.01,) + LR_GRID, "alpha": (0.1, 0.3, 0.5, 0.7, 0.9)},
    "demlearn_p": {"lr": (0.01,) + LR_GRID, "alpha": (0.1, 0.3, 0.5, 0.7, 0.9)},
    "fedprox": {"lr": LR_GRID + (0.2,), "mu": (0.001, 0.01, 0.1, 1.0)},
    "ditto": {"lr": LR_GRID, "ditto.lam": (0.001, 0.01, 0.1, 1.0)},
    "pfedme": {"lr": LR_GRID + (0.2,), "pfedme.lam": (0.5, 1.0, 5.0, 15.0)},
    "perfedavg": {
        "perfedavg.alpha": (0.001, 0.01, 0.05, 0.1, 0.2),
        "perfedavg.beta": (0.001, 0.01, 0.05, 0.1),
    },
    "fedamp": {
        "lr": LR_GRID,
        "fedamp.alpha_k": (1e3, 1e4),
        "fedamp.sigma": (0.1, 1.0),
    },
    "fedproto": {
        "lr": (0.01,) + LR_GRID + (0.2,),
        "fedproto.lam": (0.001, 0.01, 0.1, 1.0, 10.0),
    },
    "cfl": {"lr": LR_GRID, "cfl.eps1": (0.2, 0.4), "cfl.eps2": (0.8, 1.6)},
    "local": {"lr": LR_WIDE},
    "pfedhn": {"lr": LR_GRID + (0.2, 0.5)},
    "moon": {"lr": LR_GRID + (0.2,)},
    "sgp": {"lr": LR_GRID + (0.2,)},
    "scaffold": {"lr": (0.01,) + LR_GRID},
    "feddyn": {"lr": (0.01,) + LR_GRID},
    "fedgen": {"lr": (0.01,) + LR_GRID},
    "pdbo": {"lr": (0.005, 0.01) + LR_GRID},
    "apfl": {"lr": LR_WIDE},
    "fedbabu": {"lr": LR_WIDE},
    "fedbn": {"lr": LR_WIDE},
    "fedgkt": {"lr": LR_WIDE},
    "fedper": {"lr": LR_WIDE},
    "fedrep": {"lr": LR_WIDE},
    "fetchsgd": {"lr": LR_WIDE},
    "ifca": {"lr": LR_WIDE},
    "lg_fedavg": {"lr": LR_WIDE},
}
VAL_FRACTION = 0.2


def grid_of(algorithm: str, lr: tuple | None = None) -> dict:
    """``field -> values`` of ``algorithm``'s grid (the learning rate by default);
    ``lr`` (``--lr_grid``) replaces the learning-rate axis of a grid that has one
    (for a model whose stable step sizes lie elsewhere)."""
    grid = dict(GRIDS.get(algorithm, {"lr": LR_GRID}))
    if lr and "lr" in grid:
        grid["lr"] = tuple(lr)
    return grid


def parse_lr_grid(text: str) -> tuple:
    """``--lr_grid`` ("0.005,0.01") as a tuple of floats; () for "".

    Raises:
      ValueError: a value that is not a finite number > 0 (the message names the
        flag and the accepted values).
    """
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            value = float(item)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"--lr_grid={text!r} is not valid; accepted: a comma list of "
                "finite numbers > 0"
            )
        out.append(value)
    return tuple(out)


def points(grid: dict) -> list[dict]:
    """Every combination of ``grid``, in grid order."""
    names = list(grid)
    return [dict(zip(names, v, strict=True)) for v in itertools.product(*grid.values())]


def apply(config, params: dict) -> None:
    """Sets ``params`` (``field`` or ``group.field``) on ``config``.

    Raises:
      KeyError: a field the config does not have.
    """
    for name, value in params.items():
        node = config
        *groups, field = name.split(".")
        for g in groups:
            node = node[g]
        if field not in node:
            raise KeyError(f"{name}: not a config field")
        node[field] = value


def label(params: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in params.items())


def choose(scored: list[dict]) -> dict:
    """The point with the highest mean final validation C-SPE (first on ties)."""
    best = max(range(len(scored)), key=lambda i: (scored[i]["val_c_spe"], -i))
    return scored[best]


def at_edge(grid: dict, params: dict) -> list[str]:
    """The hyper-parameters whose chosen value is the smallest or largest value
    of its grid axis (axes of at least two values), e.g.
    ``["perfedavg.beta=max"]``: the optimum may lie outside the grid (extend the
    axis before trusting the comparison)."""
    out = []
    for name, values in grid.items():
        values = sorted(values)
        if len(values) < 2 or name not in params:
            continue
        if params[name] == values[0]:
            out.append(f"{name}=min")
        elif params[name] == values[-1]:
            out.append(f"{name}=max")
    return out


def report(results: dict, out_dir: str) -> None:
    lines = [
        "# Tuning: hyper-parameters chosen on a validation split",
        "",
        f"Setup: {json.dumps(results.get('setup', {}))}",
        "",
        f"Each agent holds out {VAL_FRACTION:.0%} of its training rows; the score is "
        "the validation C-SPE at the final round, mean over seeds (best round in "
        "brackets). The test split is never used here.",
        "",
        "| split | algorithm | chosen | val C-SPE final | val C-SPE best | points | "
        "at the grid's edge |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, entry in sorted(results.get("chosen", {}).items()):
        split, name = key.split("/")
        edge = at_edge(results.get("grids", {}).get(name, {}), entry["params"])
        lines.append(
            f"| {split} | {name} | {label(entry['params'])} | "
            f"{entry['val_c_spe']:.3f} | {entry['val_c_spe_best']:.3f} | "
            f"{len(results['points'].get(key, []))} | {', '.join(edge) or '-'} |"
        )
    lines += [
        "",
        "A choice at the smallest or largest value of a grid axis (last column) may "
        "have its optimum outside the grid: extend that axis before trusting the "
        "comparison.",
    ]
    with open(os.path.join(out_dir, "tuning.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma list of algorithms")
    p.add_argument("--splits", default=",".join(cp.SPLITS))
    p.add_argument("--model", default="cnn4")
    p.add_argument("--num_rounds", type=int, default=100)
    p.add_argument("--eval_every", type=int, default=10)
    p.add_argument("--samples_per_agent", type=int, default=0)
    p.add_argument("--seeds", type=int, default=2, help="seeds per grid point")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--num_agents", type=int, default=20)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data_dir", default="")
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out_dir", default=cp.RESULTS)
    p.add_argument(
        "--lr_grid",
        default="",
        help="comma list replacing every grid's learning-rate axis (e.g. for the "
        "CNN: 0.005,0.01,0.02,0.05); default: GRIDS",
    )
    add_cpu_devices_flag(p)
    args = p.parse_args(argv)
    try:
        lr_grid = parse_lr_grid(args.lr_grid)
    except ValueError as e:
        sys.exit(f"error: {e}")
    known = cp.algorithms()
    names = [n for n in args.only.split(",") if n] or known
    splits = [s for s in args.splits.split(",") if s]
    for n in names:
        if n not in known:
            sys.exit(f"error: --only={n!r} is not valid; accepted: {known}")
    for s in splits:
        if s not in cp.SPLITS:
            sys.exit(f"error: --splits={s!r} is not valid; accepted: {list(cp.SPLITS)}")
    if args.seeds < 1:
        sys.exit(f"error: --seeds={args.seeds} is not valid; accepted: an integer >= 1")
    apply_cpu_devices(args)

    from demjax.train import run

    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "tuning.json")
    results = load_results(path)
    results.pop("runs", None)
    setup = {
        "dataset": args.dataset,
        "num_agents": args.num_agents,
        "model": args.model,
        "num_rounds": args.num_rounds,
        "samples_per_agent": args.samples_per_agent or "all",
        "val_fraction": VAL_FRACTION,
        "seeds": list(range(args.seed, args.seed + args.seeds)),
        "selection": "max mean validation C-SPE at the final round",
    }
    if results.get("setup", {}).get("model") not in (None, args.model) or (
        results.get("setup", {}).get("num_rounds") not in (None, args.num_rounds)
    ):
        if not args.force:
            sys.exit("error: stored points used another setup; pass --force to rerun")
        results = {}
    results["setup"] = {**setup, **environment()}
    results.setdefault("grids", {})
    results.setdefault("points", {})
    results.setdefault("chosen", {})
    for split in splits:
        for name in names:
            key = f"{split}/{name}"
            grid = grid_of(name, lr_grid)
            results["grids"][name] = {k: list(v) for k, v in grid.items()}
            stored = {label(s["params"]): s for s in results["points"].get(key, [])}
            scored = []
            for params in points(grid):
                if label(params) in stored and not args.force:
                    scored.append(stored[label(params)])
                    continue
                t0 = time.perf_counter()
                # The seeds are the replicas of one run (one compilation).
                c = cp.config_for(name, split, _run_args(args, args.seed))
                c.dataset, c.num_agents = args.dataset, args.num_agents
                c.val_fraction = VAL_FRACTION
                c.checkpoint_every = 0
                c.num_replicas = args.seeds
                apply(c, params)
                with tempfile.TemporaryDirectory() as tmp:
                    out = run(c, tmp, overwrite=True)
                finals, bests = [], []
                for r in range(args.seeds):
                    sync = [
                        x for x in out["records"]
                        if x["point"] == "sync" and x.get("replica", 0) == r
                    ]  # fmt: skip
                    finals.append(sync[-1]["c_spe"])
                    bests.append(max(x["c_spe"] for x in sync))
                entry = {
                    "params": params,
                    "val_c_spe": statistics.fmean(finals),
                    "val_c_spe_best": statistics.fmean(bests),
                    "val_c_spe_per_seed": finals,
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
                scored.append(entry)
                # Stored points not reached yet stay in the file (a grid grown
                # by new values runs them first).
                done = {label(e["params"]) for e in scored}
                results["points"][key] = scored + [
                    e for k, e in stored.items() if k not in done
                ]
                save_results(path, results)
                print(json.dumps({"point": key, **entry}), flush=True)
            results["points"][key] = scored
            results["chosen"][key] = choose(scored)
            save_results(path, results)
    report(results, args.out_dir)


def _run_args(args, seed: int):
    """The ``compare_personalized.config_for`` arguments of one tuning run."""
    return argparse.Namespace(
        data_dir=args.data_dir,
        model=args.model,
        num_rounds=args.num_rounds,
        eval_every=args.eval_every,
        samples_per_agent=args.samples_per_agent,
        seed=seed,
        quiet=args.quiet,
        replicas=1,
        quick=False,
    )


if __name__ == "__main__":
    main()
