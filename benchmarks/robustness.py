"""Robust aggregation against Byzantine agents on Fashion-MNIST.

Accuracy of FedAvg with the aggregators ``mean``, ``median``, ``trimmed_mean``
and ``noisy_median``, and of DemLearn (group means), under every attack of
``demjax.attacks`` (``sign_flip``, ``gaussian``, ``scaling``, ``alie``, ``ipm``,
``label_flip``) with 0 / 10 / 20 / 30 % Byzantine agents (a fixed set per
replica), over several replicas (seeds: initialization, shuffles, Byzantine
set; one data split): final Global accuracy (the global model on the pooled test
set) and, for DemLearn, C-SPE (the agents' own models on their own test sets),
mean and standard deviation over the replicas, at the final round and at each
replica's best round (every round is evaluated).

Setup (small on purpose): 20 agents, Dirichlet(1.0) label split capped at 200
samples per agent, MLP 784-32-10, 10 rounds of 1 local epoch (batch 20, lr
0.05); DemLearn with 2 group levels, alpha 0.7, tau 1.

How it runs: compilation, not training, is most of a small run's time, so

- FedAvg is one jitted program per (aggregator, attack) that runs every
  replica (``lax.map`` over (fraction, seed); the Byzantine mask and ALIE's z
  are inputs) with the library's pieces: ``local.make_train_population``,
  ``attacks.corrupt`` / ``flip_labels``, ``robust.aggregate`` (the round of
  ``demjax/algorithms/fedavg.py``: every agent trains from the global model,
  the server aggregates the sample-weighted messages);
- DemLearn runs through ``demjax.train.run`` (the wiring of ``config.attack``),
  one run per case, in ``--jobs`` worker processes sharing JAX's persistent
  compilation cache.

Writes ``benchmarks/results/robustness.{json,md}`` (resumable: stored runs are
skipped unless ``--force``) and prints one JSON line per run::

    nice -n 10 python benchmarks/robustness.py [--seeds=3] [--jobs=2] [--quick]

``--quick``: digits, 6 agents, 2 rounds, one seed, two methods and two attacks
(FedAvg with the median and DemLearn: a smoke test of both paths, written to
``--out_dir``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import environment, load_results, save_results  # noqa: E402
from configs import default  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")

# name -> config overrides of the defended method.
METHODS = {
    "fedavg_mean": {"algorithm": "fedavg", "aggregator": "mean"},
    "fedavg_median": {"algorithm": "fedavg", "aggregator": "median"},
    "fedavg_trimmed_mean": {
        "algorithm": "fedavg",
        "aggregator": "trimmed_mean",
        "trim_fraction": 0.3,
    },
    "fedavg_noisy_median": {
        "algorithm": "fedavg",
        "aggregator": "noisy_median",
        "aggregator_noise": 0.01,
    },
    "demlearn_mean": {"algorithm": "demlearn", "aggregator": "mean"},
}
ATTACKS = ("sign_flip", "gaussian", "scaling", "alie", "ipm", "label_flip")
FRACTIONS = (0.0, 0.1, 0.2, 0.3)


def base_config(quick: bool):
    c = default.get_config()
    c.progress = False
    c.checkpoint_every = 0
    c.tree_snapshot_every = 0
    c.local_plan = "all"
    c.local_buckets = 1  # one vmap: compiles fastest (compilation dominates here)
    c.eval_batch = 8
    if quick:
        c.dataset, c.num_agents, c.num_rounds = "digits", 6, 2
        c.model, c.local_epochs = "mlr", 1
        c.num_levels = 1
    else:
        c.dataset = "fashion_mnist"
        c.num_agents, c.num_rounds = 20, 10
        c.model, c.hidden = "mlp", (32,)
        c.local_epochs, c.batch_size, c.lr = 1, 20, 0.05
        c.samples_per_agent = 200
        c.num_levels = 2
    c.partition, c.dirichlet_alpha = "dirichlet", 1.0
    c.eval_every = 1  # every round: the tables give the best round too
    return c


def run_key(method: str, attack: str, fraction: float, seed: int) -> str:
    return f"{method}|{attack}|{fraction:.2f}|{seed}"


def cases(quick: bool, seeds: int) -> list[tuple[str, str, float, int]]:
    """Every (method, attack, fraction, seed); fraction 0 once per method
    (attack ``none``)."""
    methods = ("fedavg_median", "demlearn_mean") if quick else tuple(METHODS)
    attacks = ("sign_flip", "label_flip") if quick else ATTACKS
    fractions = (0.0, 0.2) if quick else FRACTIONS
    out = []
    for seed in range(1 if quick else seeds):
        for m in methods:
            out.append((m, "none", 0.0, seed))
            for a in attacks:
                out.extend((m, a, f, seed) for f in fractions if f > 0)
    return out


def use_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache, shared by the workers: the runs of one
    seed differ only in their aggregation program (the local phase and the
    evaluation compile once per data shape)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


_SPLIT: dict = {}


def shared_split(quick: bool):
    """The data split of every replica (``base_config``'s seed 0), built once
    per process."""
    if quick not in _SPLIT:
        from demjax import data

        _SPLIT[quick] = data.make_split(base_config(quick), None)
    return _SPLIT[quick]


def one_run(method: str, attack: str, fraction: float, seed: int, quick: bool) -> dict:
    """One case through ``demjax.train.run`` (the ``config.attack`` wiring) on
    the shared split."""
    from demjax.train import run

    c = base_config(quick)
    for k, v in METHODS[method].items():
        c[k] = v
    c.seed = seed
    c.partition = "arrays"
    c.attack, c.attack_fraction = attack, fraction
    split = shared_split(quick)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as wd:
        out = run(c, wd, overwrite=True, partition=split)
    final = out["final"]["sync"]
    sync = sorted(
        (r for r in out["records"] if r["point"] == "sync"), key=lambda r: r["round"]
    )
    return {
        "method": method,
        "attack": attack,
        "fraction": fraction,
        "seed": seed,
        "global_acc": final["global_acc"],
        "c_spe": final["c_spe"],
        "curve": {
            "round": [int(r["round"]) for r in sync],
            "global_acc": [round(float(r["global_acc"]), 6) for r in sync],
            "c_spe": [round(float(r["c_spe"]), 6) for r in sync],
        },
        "wall_s": round(time.perf_counter() - t0, 2),
        "via": "train.run",
    }


def fedavg_batch(method: str, attack: str, replicas: list, quick: bool) -> list:
    """Every replica ``(fraction, seed)`` of FedAvg with ``method``'s aggregator
    under ``attack`` in one jitted program (``lax.map`` over replicas, ``lax.scan``
    over rounds).

    Returns one record per replica (``wall_s``: the batch's seconds, compilation
    included, divided by the number of replicas).
    """
    import jax
    import jax.numpy as jnp

    from demjax import attacks, local, metrics, models, pytrees, robust

    c = base_config(quick)
    for k, v in METHODS[method].items():
        c[k] = v
    part = jax.tree.map(jnp.asarray, shared_split(quick).partition)
    num_agents, num_classes = part.num_agents, part.num_classes
    n_train = np.asarray(part.n_train)
    model = models.make_model(c.model, num_classes, c.hidden)
    apply_fn = models.make_apply(model)
    eval_fn = models.make_eval_apply(model)
    tx = local.make_optimizer(c.optimizer, c.lr)
    train = local.make_train_population(
        apply_fn, tx, batch_size=int(c.batch_size),
        local_epochs=int(c.local_epochs), n_train=n_train, num_buckets=1,
    )  # fmt: skip
    weight = jnp.asarray(n_train, jnp.float32)
    scale = float(num_agents) if attack == "scaling" else 1.0

    def replica(part, args):
        key, bad, z = args
        k_init, k_run = jax.random.split(key)
        y_train = attacks.flip_labels(part.y_train, bad, num_classes) if (
            attack == "label_flip") else part.y_train  # fmt: skip
        w = models.init_params(k_init, model, part.input_shape)

        def round_fn(w, t):
            k_train, k_att, k_agg = jax.random.split(jax.random.fold_in(k_run, t), 3)
            w0 = pytrees.stack(w, num_agents)
            opt = jax.vmap(tx.init)(w0)
            w_k, _, _ = train(
                jax.random.split(k_train, num_agents), w0, opt, part.x_train,
                y_train, part.n_train, w0, jnp.float32(0.0),
            )  # fmt: skip
            sent = attacks.corrupt(
                k_att, w_k, w, bad, attack, scale=scale, noise_std=1.0,
                epsilon=0.1, z=z,
            )  # fmt: skip
            new = robust.aggregate(
                sent, weight, kind=c.aggregator, trim_fraction=c.trim_fraction,
                noise_scale=c.aggregator_noise, key=k_agg,
            )  # fmt: skip
            new = pytrees.keep_if_finite(new, w)
            g = jax.tree.map(lambda p: p[None], new)
            hits = metrics.correct_matrix(eval_fn, g, part.x_all, part.y_all, 1)
            acc = jnp.mean(hits)
            return new, acc

        # Global accuracy after every round's aggregation (the ``sync`` point).
        _, accs = jax.lax.scan(round_fn, w, jnp.arange(int(c.num_rounds)))
        return accs

    # The data is an argument (a closed-over array would be constant-folded).
    run_all = jax.jit(lambda part, args: jax.lax.map(lambda a: replica(part, a), args))
    keys = jnp.stack(
        [jax.random.PRNGKey(seed) for _, seed in replicas]
    )  # fmt: skip
    bad = jnp.asarray(
        np.stack([attacks.byzantine_set(seed, num_agents, f) for f, seed in replicas])
    )
    z = jnp.asarray(
        [attacks.alie_z(num_agents, attacks.num_byzantine(num_agents, f))
         for f, _ in replicas], jnp.float32,
    )  # fmt: skip
    t0 = time.perf_counter()
    accs = np.asarray(jax.device_get(run_all(part, (keys, bad, z))))  # [n, rounds]
    wall = (time.perf_counter() - t0) / len(replicas)
    out = []
    for (f, seed), acc in zip(replicas, accs, strict=True):
        curve = [round(float(a), 6) for a in acc]
        out.append({
            "method": method,
            "attack": attack,
            "fraction": f,
            "seed": seed,
            "global_acc": curve[-1],
            "c_spe": curve[-1],
            "curve": {"round": list(range(len(curve))), "global_acc": curve,
                      "c_spe": curve},
            "wall_s": round(wall, 2),
            "via": "batched",
        })  # fmt: skip
    return out


def best_of(curve: dict, metric: str) -> tuple[float, int]:
    """``(value, round)`` of a run's best evaluated round of ``metric`` (the
    first such round on ties)."""
    values = curve[metric]
    i = max(range(len(values)), key=lambda j: (values[j], -j))
    return float(values[i]), int(curve["round"][i])


def summarize(runs: dict) -> dict:
    """``{(method, attack, fraction): {metric: (mean, std, n)}}`` over seeds
    (std: sample standard deviation, ddof 1; 0 for one seed), for the final
    round (``global_acc``, ``c_spe``) and each seed's best evaluated round
    (``global_acc_best``, ``c_spe_best``: ``(mean, std, n, rounds)``, rounds in
    seed order; absent when a seed's run has no per-round ``curve``)."""
    groups: dict = {}
    for r in runs.values():
        key = (r["method"], r["attack"], float(r["fraction"]))
        groups.setdefault(key, []).append(r)
    out = {}
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        stats = {}
        for m in ("global_acc", "c_spe"):
            stats[m] = _stats([r[m] for r in rs])
            if all("curve" in r for r in rs):
                best = [best_of(r["curve"], m) for r in rs]
                stats[m + "_best"] = _stats([v for v, _ in best]) + (
                    [t for _, t in best],
                )
        out[key] = stats
    return out


def _stats(values) -> tuple[float, float, int]:
    v = np.array(values, np.float64)
    std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return float(np.mean(v)), std, len(v)


def _cell(stats: dict | None, metric: str) -> str:
    if stats is None or metric not in stats:
        return "-"
    mean, std, _, *rounds = stats[metric]
    cell = f"{mean:.3f} ± {std:.3f}"
    if rounds:  # a best-round cell: the rounds of the seeds' best
        cell += " (" + "/".join(str(t) for t in rounds[0]) + ")"
    return cell


def table(summary: dict, metric: str, methods, attacks, fractions) -> list[str]:
    """Markdown rows: one per (method, attack), one column per fraction (the 0 %
    column is the method's clean run, attack ``none``)."""
    head = "| method | attack | " + " | ".join(f"{f:.0%}" for f in fractions) + " |"
    lines = [head, "|---|---|" + "---|" * len(fractions)]
    for m in methods:
        for a in attacks:
            cells = [
                _cell(summary.get((m, "none" if f == 0 else a, float(f))), metric)
                for f in fractions
            ]
            lines.append(f"| {m} | {a} | " + " | ".join(cells) + " |")
    return lines


def write_md(results: dict, path: str, analysis: str = "") -> None:
    runs = results["runs"]
    summary = summarize(runs)
    methods = [m for m in METHODS if any(k[0] == m for k in summary)]
    attacks = [a for a in ATTACKS if any(k[1] == a for k in summary)]
    fractions = sorted({k[2] for k in summary} | {0.0})
    env = results.get("environment", {})
    seeds = sorted({r["seed"] for r in runs.values()})
    lines = [
        "# Robust aggregation under Byzantine attacks (Fashion-MNIST)"
        if not results.get("quick")
        else "# Robust aggregation under Byzantine attacks (quick smoke run)",
        "",
        f"Date {results.get('date', '?')}, commit {results.get('commit', '?')}, "
        f"CPU {env.get('cpu_model', '?')}, jax {env.get('jax', '?')}; "
        f"seeds {seeds}; {len(runs)} runs, "
        f"{sum(r['wall_s'] for r in runs.values()) / 60:.1f} min in total.",
        "",
        results.get("setup", ""),
        "",
        "Final-round Global accuracy (the global model on the pooled test set), "
        "mean ± std over the seeds; columns: fraction of Byzantine agents (0 %: "
        "the clean run).",
        "",
        *table(summary, "global_acc", methods, attacks, fractions),
        "",
        "C-SPE of DemLearn (each agent's own model on its own test set, the "
        "Byzantine agents included; their own models are honest except under "
        "label_flip):",
        "",
        *table(
            summary,
            "c_spe",
            [m for m in methods if m.startswith("demlearn")],
            attacks,
            fractions,
        ),
    ]
    if any(k.endswith("_best") for st in summary.values() for k in st):
        demlearn = [m for m in methods if m.startswith("demlearn")]
        lines += [
            "",
            "Best round (every round is evaluated): mean ± std over the seeds of "
            "each seed's best Global accuracy, the rounds of those bests in "
            "brackets (seed order; rounds from 0); runs stored without per-round "
            "records: -.",
            "",
            *table(summary, "global_acc_best", methods, attacks, fractions),
            "",
            "Best round of DemLearn's C-SPE:",
            "",
            *table(summary, "c_spe_best", demlearn, attacks, fractions),
        ]
    if analysis:
        lines += ["", "## Analysis", "", analysis]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


SETUP = (
    "Setup: {agents} agents, Dirichlet({alpha}) label split"
    "{cap}, {model}, {rounds} rounds of {epochs} local epoch(s), batch "
    "{batch}, lr {lr}; trimmed_mean trims 30 % at each end, noisy_median adds "
    "N(0, 0.01^2) before the median; DemLearn: {levels} group levels, alpha "
    "{alpha_mix}, tau 1, group means. Attacks with their defaults: sign_flip "
    "(scale 1), gaussian (std 1), scaling (x num_agents), alie (Baruch et al.'s "
    "z), ipm (epsilon 0.1), label_flip (y -> 9 - y); a fixed Byzantine set per "
    "seed."
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--out_dir", default=RESULTS)
    p.add_argument("--analysis", default="", help="markdown file appended to md")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # "i/k"
    # A worker started by hand next to the others: the cases in reverse order.
    p.add_argument("--reverse", action="store_true", help=argparse.SUPPRESS)
    # A FedAvg helper started by hand: the batches from the end, into a part file.
    p.add_argument("--fedavg_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "robustness.json")
    results = {"runs": {}} if args.force else load_results(path)
    env = environment()
    print(json.dumps({"environment": env}), flush=True)
    c = base_config(args.quick)
    results.update(
        environment=env,
        quick=args.quick,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        commit=subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
            text=True,
        ).stdout.strip() or "?",
        setup=SETUP.format(
            agents=c.num_agents, alpha=c.dirichlet_alpha,
            cap=f" capped at {c.samples_per_agent} training samples per agent"
            if c.samples_per_agent else "",
            model=c.model if c.model != "mlp" else f"MLP {c.hidden}",
            rounds=c.num_rounds, epochs=c.local_epochs, batch=c.batch_size,
            lr=c.lr, levels=c.num_levels, alpha_mix=c.alpha,
        ),
    )  # fmt: skip
    analysis = ""
    if args.analysis:
        with open(args.analysis) as fh:
            analysis = fh.read().strip()
    todo = [
        case
        for case in cases(args.quick, args.seeds)
        if run_key(*case) not in results["runs"]
    ]
    by_run = [case for case in todo if not case[0].startswith("fedavg")]
    jobs = max(0, min(args.jobs, len(by_run)))  # 0: FedAvg only, no workers
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f"--worker={i}/{jobs}",
             f"--seeds={args.seeds}", f"--out_dir={args.out_dir}"]
            + (["--quick"] if args.quick else []) + (["--force"] if args.force else [])
        )
        for i in range(jobs)
    ]  # fmt: skip
    md_path = os.path.join(args.out_dir, "robustness.md")
    # FedAvg here, batched, while the workers run the train.run cases.
    batches: dict = {}
    for method, attack, fraction, seed in todo:
        if method.startswith("fedavg"):
            batches.setdefault((method, attack), []).append((fraction, seed))
    order = list(batches.items())
    if args.fedavg_worker:  # a helper next to the main process: from the end
        order = order[::-1]
        path = os.path.join(args.out_dir, "robustness.partf.json")
        results = load_results(path)
    for (method, attack), replicas in order:
        done = stored_runs(args.out_dir, args.force)
        if all(run_key(method, attack, f, sd) in done for f, sd in replicas):
            continue  # done by a helper
        for rec in fedavg_batch(method, attack, replicas, args.quick):
            results["runs"][run_key(method, attack, rec["fraction"], rec["seed"])] = rec
            print(json.dumps(rec), flush=True)
        save_results(path, results)
        if not args.fedavg_worker:
            write_md(results, md_path, analysis)
    if args.fedavg_worker:
        return
    codes = [pr.wait() for pr in procs]
    for part in glob.glob(os.path.join(args.out_dir, "robustness.part*.json")):
        results["runs"].update(load_results(part)["runs"])
        os.remove(part)
    save_results(path, results)
    write_md(results, md_path, analysis)
    if any(codes):
        sys.exit(f"error: worker exit codes {codes}; finished runs are saved")


def stored_runs(out_dir: str, force: bool) -> dict:
    """The runs stored by this invocation's processes (the workers' and the
    FedAvg helper's part files) and, unless ``force``, by earlier invocations
    (``robustness.json``; with ``--force`` its runs are the ones being
    replaced, never a reason to skip)."""
    paths = glob.glob(os.path.join(out_dir, "robustness.part*.json"))
    if not force:
        paths.append(os.path.join(out_dir, "robustness.json"))
    done = {}
    for p in paths:
        done.update(load_results(p)["runs"])
    return done


def worker(args) -> None:
    """Runs the cases ``i, i + k, ...`` not yet stored; saves them to
    ``robustness.part{i}.json`` after every run (resumable)."""
    i, k = (int(v) for v in args.worker.split("/"))
    use_compilation_cache(os.path.join(tempfile.gettempdir(), "demjax_robustness_xla"))
    done = (
        {}
        if args.force
        else load_results(os.path.join(args.out_dir, "robustness.json"))["runs"]
    )
    name = f"robustness.part{i}{'r' if args.reverse else ''}.json"
    part_path = os.path.join(args.out_dir, name)
    part = load_results(part_path)
    todo = [
        c
        for c in cases(args.quick, args.seeds)
        if run_key(*c) not in done and not c[0].startswith("fedavg")
    ][i::k]
    for case in reversed(todo) if args.reverse else todo:
        key = run_key(*case)
        others = glob.glob(os.path.join(args.out_dir, "robustness.part*.json"))
        if any(key in load_results(o)["runs"] for o in others):
            continue  # done by this or another worker
        part["runs"][key] = one_run(*case, args.quick)
        print(json.dumps(part["runs"][key]), flush=True)
        save_results(part_path, part)


if __name__ == "__main__":
    main()
