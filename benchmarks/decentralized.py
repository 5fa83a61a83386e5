"""Decentralized personalization over stochastic directed networks.

Terashita & Hara, "Personalized Decentralized Bilevel Optimization over
Stochastic and Directed Networks" (arXiv 2210.02129) on Fashion-MNIST with a
Dirichlet(0.4) split. Algorithms: SGP, PDBO-DA, PDBO-MTL, PDBO-DA&MTL
(``demjax.algorithms.sgp`` / ``pdbo``) on each network, and the network-free
references local and FedAvg (a server). Two regimes (``--regime``), each with its
own results files:

- ``reduced`` (default; ``benchmarks/results/decentralized.{json,md,png}``):
  100 agents, an Erdos-Renyi base graph (``--edge_prob``) under three networks,
  ``static``, stochastic ``undirected`` and stochastic ``directed`` (edge rates
  r ~ U(0.4, 0.8)); PDBO at demjax's defaults (one hyper-gradient step per round,
  outer loss on a held-out 20 % of the training rows).
- ``paper`` (``benchmarks/results/decentralized_regime.{json,md,png}``): PDBO
  in its paper's regime. Network: the complete base graph with stochastic
  directed edge activation (each direction on per step with its own rate
  r ~ U(0.4, 0.8); the paper's stochastic directed network model). Bilevel
  problem (Sec. 3): the outer loss on the agents' training rows
  (``pdbo.val_fraction=0``), the inner SGP run for ``pdbo.outer_every=10``
  rounds between hyper-gradient steps (close to consensus; 10 hyper-gradient
  steps in 100 rounds). HGP (Sec. 4): ``pdbo.hgp_steps=50`` Neumann steps of
  ``pdbo.hgp_alpha=0.005``, a demjax choice: with M = 50 the default alpha =
  lr = 0.05 let the Neumann series diverge in a 10-agent probe (hyper-gradient
  norm 8e10 at the second hyper-gradient step; ``--hgp_alpha=0`` restores it).
  DA / MTL
  personalization (Sec. 5): ``pdbo.outer_lr`` (``--outer_lr``) is the Adam rate
  of every ``lambda_i``, the MTL mixture weights included (they have no rate of
  their own). 8 agents, MLP 784-64-10, ``samples_per_agent=1150``: the split
  keeps 20 % of each agent's samples as its test rows, 134 to 309 per agent on
  seed 0's split; 3 seeds; the stochastic directed network only
  (``--networks`` adds others).

Reports, per run, the final mean test accuracy over agents (each agent's model
on its own test data, fraction correct), the 10th-percentile agent's accuracy,
C-SPE (sample weighted; final and best evaluated round), C-GEN and wall seconds
per round; one JSON line per finished run on stdout. With ``--replicas=R``
(``config.num_replicas``; default 1 for ``reduced``, 3 for ``paper``) every run
is R seeds (``seed`` .. ``seed + R - 1``, one shared data split) in one
program, each accuracy is computed per seed and the tables give mean +/- std
(ddof 1) over the seeds, each seed's best C-SPE round, and whether the best
PDBO variant beats SGP beyond two standard errors. Resumable: finished runs are
stored at once and skipped on rerun; stored runs of another setup (e.g. another
``--replicas``; results stored without the field ran 1) are refused unless
``--force`` (which drops them and reruns every selected run).

    python benchmarks/decentralized.py                          # full setup
    python benchmarks/decentralized.py --hidden=64 --num_rounds=30 \\
        --samples_per_agent=100 --hgp_steps=5 --replicas=3 --force
                        # the stored reduced table, 3 seeds (replaces its runs;
                        # after a stop, the same command without --force resumes)
    python benchmarks/decentralized.py --regime=paper           # paper regime
    python benchmarks/decentralized.py --report_only
    python benchmarks/decentralized.py --quick --only=sgp,pdbo_da,fedavg \\
        --networks=directed      # smoke: digits, 6 agents, 2 rounds, 2 seeds,
                                 # results in --workdir

Wall time, estimated from the per-round times of 3-round runs of each method
(3 seeds; 2-core AMD EPYC without AVX-512 shared with other jobs at load
average 7-9, 2026-12-04): the reduced table with 3 seeds about 2.5 hours
(per round: SGP 4.5 s, PDBO-DA 11.5 s, PDBO-MTL 35 s, PDBO-DA&MTL 37 s; three
networks, 30 rounds); the paper regime about 45 minutes (per round: SGP 1.5 s,
PDBO-DA 1.7 s plus 18 s per hyper-gradient step, PDBO-DA&MTL 6.5 s plus 37 s,
FedAvg and local under 1 s; 100 rounds, 15-45 s of compilation per run).
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
    mean_std,
    save_results,
    traffic_cell,
)
from configs import default  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
NETWORKS = ("directed", "undirected", "static")
# name -> (algorithm, pdbo mode or None)
METHODS = {
    "sgp": ("sgp", None),
    "pdbo_da_mtl": ("pdbo", "da_mtl"),
    "pdbo_mtl": ("pdbo", "mtl"),
    "pdbo_da": ("pdbo", "da"),
}
REFERENCES = {"local": "local", "fedavg": "fedavg"}
LABELS = {
    "sgp": "SGP",
    "pdbo_da": "PDBO-DA",
    "pdbo_mtl": "PDBO-MTL",
    "pdbo_da_mtl": "PDBO-DA&MTL",
    "local": "local",
    "fedavg": "FedAvg",
}
# Results file stem of each regime (benchmarks/results/<stem>.{json,md,png}).
STEMS = {"reduced": "decentralized", "paper": "decentralized_regime"}
# Flag defaults of each regime (a flag given on the command line wins).
REGIMES = {
    "reduced": {
        "num_agents": 100,
        "hidden": 200,
        "num_rounds": 100,
        "eval_every": 10,
        "eval_samples": 1000,
        "samples_per_agent": 0,
        "base": "erdos_renyi",
        "edge_prob": 0.1,
        "networks": ",".join(NETWORKS),
        "hgp_steps": 10,
        "hgp_alpha": 0.0,
        "outer_every": 1,
        "val_fraction": 0.2,
        "outer_lr": 0.05,
        "replicas": 1,
    },
    "paper": {
        "num_agents": 8,
        "hidden": 64,
        "num_rounds": 100,
        "eval_every": 10,
        "eval_samples": 1000,
        "samples_per_agent": 1150,
        "base": "complete",
        "edge_prob": 0.1,
        "networks": "directed",
        "hgp_steps": 50,
        "hgp_alpha": 0.005,
        "outer_every": 10,
        "val_fraction": 0.0,
        "outer_lr": 0.05,
        "replicas": 3,
    },
}
# --quick (smoke run): these replace the regime's defaults (a flag given on the
# command line still wins).
QUICK = {
    "num_agents": 6,
    "hidden": 16,
    "num_rounds": 2,
    "eval_every": 1,
    "eval_samples": 0,
    "samples_per_agent": 0,
    "edge_prob": 0.5,
    "hgp_steps": 2,
    "outer_every": 1,
    "replicas": 2,
}
# Setup fields that must match the stored runs' to add runs to them, and the
# value a field had in results stored before it was recorded.
SAME = ("dataset", "num_agents", "model", "lr", "num_rounds", "eval_every",
        "samples_per_agent", "network_base", "pdbo", "seed", "replicas",
        "quick")  # fmt: skip
SETUP_DEFAULTS = {"replicas": 1, "quick": False, "eval_every": 10}
PDBO_DEFAULTS = {"hgp_alpha": 0.0, "outer_every": 1, "val_fraction": 0.2,
                 "outer_lr": 0.05}  # fmt: skip


def config_for(algorithm: str, net: str | None, mode: str | None, args):
    """The run config of one table row (``args``: the parsed flags, regime
    defaults filled in)."""
    c = default.get_config()
    c.dataset = args.dataset
    c.data_dir = args.data_dir if args.dataset == "fashion_mnist" else ""
    c.num_agents = args.num_agents
    c.partition = "dirichlet"
    c.dirichlet_alpha = 0.4
    c.samples_per_agent = args.samples_per_agent
    c.model = "mlp"
    c.hidden = (args.hidden,)
    c.batch_size = 10
    c.local_epochs = 1
    c.lr = args.lr
    c.num_rounds = args.num_rounds
    c.eval_every = args.eval_every
    c.eval_samples = args.eval_samples
    c.algorithm = algorithm
    c.seed = args.seed
    c.num_replicas = args.replicas
    c.checkpoint_every = 0
    c.tree_snapshot_every = 0
    c.progress = not args.quiet
    if net is not None:
        c.network = args.base
        c.network_edge_prob = args.edge_prob
        c.network_mode = net
        c.network_rates = "0.4,0.8"
    if mode is not None:
        c.pdbo.mode = mode
        c.pdbo.hgp_steps = args.hgp_steps
        c.pdbo.hgp_alpha = args.hgp_alpha
        c.pdbo.outer_every = args.outer_every
        c.pdbo.val_fraction = args.val_fraction
        c.pdbo.outer_lr = args.outer_lr
    return c


def replica_states(state, num_replicas: int) -> list:
    """The final state of each replica: ``train.run``'s ``state`` has leaves
    ``[R, A, ...]`` with ``num_replicas`` R > 1 (one program for all seeds),
    ``[A, ...]`` with R = 1."""
    import jax

    if num_replicas == 1:
        return [state]
    return [jax.tree.map(lambda x, j=j: x[j], state) for j in range(num_replicas)]


def per_agent_accuracy(config, out):
    """Each agent's final model on its own test data, per replica.

    Returns:
      ``(acc, pooled)``: ``acc`` float64 ``[R, A]`` fractions correct (agent a's
      model on agent a's ``n_test[a]`` test rows, replica r's final state),
      ``pooled`` float64 ``[R]`` the same pooled over all test samples (equals
      replica r's final C-SPE). Every replica shares the split of ``seed``
      (``replicate_split=False``, this driver's setting).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from demjax import data, models, train
    from demjax.algorithms.hierarchical import FAMILY

    part_np = data.make_partition(config)
    part = jax.tree.map(jnp.asarray, part_np)
    reps = int(config.num_replicas)
    states = replica_states(out["state"], reps)
    if config.algorithm not in FAMILY:
        _, ctx, rounds = train.build(config, part)
        params = [rounds.personal(s, part, jax.random.PRNGKey(0)) for s in states]
        apply = rounds.eval_apply or ctx.eval_apply_fn
    else:  # the tree family (local, FedAvg): the agents' models are state.params
        model = models.make_model(
            config.model, part_np.num_classes, config.hidden, "xla"
        )
        params = [s.params for s in states]

        def apply(p, x, train, key):
            return model.apply({"params": p}, x, train=False)

    mask = jnp.arange(part.y_test.shape[1])[None, :] < part.n_test[:, None]

    def own(args):
        p, x, y, m = args
        pred = jnp.argmax(apply(p, x, False, None), axis=-1)
        return jnp.sum((pred == y) & m)

    n_test = np.asarray(part_np.n_test)
    acc, pooled = [], []
    for p in params:
        correct = np.asarray(
            jax.lax.map(own, (p, part.x_test, part.y_test, mask), batch_size=8)
        )
        acc.append(correct / np.maximum(n_test, 1))
        pooled.append(np.sum(correct) / np.sum(n_test))
    return np.asarray(acc, np.float64), np.asarray(pooled, np.float64)


def summary(acc) -> dict:
    """``{"mean_acc", "p10_acc"}`` of one replica's per-agent accuracies ``[A]``:
    their mean and 10th percentile (linear interpolation)."""
    import numpy as np

    a = np.asarray(acc)
    return {"mean_acc": float(a.mean()), "p10_acc": float(np.percentile(a, 10))}


def run_record(acc, pooled, out, wall_s: float, num_rounds: int) -> dict:
    """A stored run: ``acc`` ``[R, A]`` and ``pooled`` ``[R]`` of
    ``per_agent_accuracy``; ``mean_acc`` / ``p10_acc`` are the means over the
    replicas, ``acc_replicas`` their per-replica values and ``replicas`` the
    run's ``replicas.json`` summary (both only with R > 1)."""
    per = [summary(a) for a in acc]
    rec = {
        "final": out["final"]["sync"],
        **{k: sum(s[k] for s in per) / len(per) for k in ("mean_acc", "p10_acc")},
        "c_spe_check": [round(float(v), 6) for v in pooled],
        "per_agent_acc": [[round(float(v), 6) for v in a] for a in acc],
        "wall_s": round(wall_s, 1),
        "num_rounds": num_rounds,
        "per_round": out["records"],
    }
    if len(per) == 1:  # one seed: the stored layout of single-seed tables
        rec["c_spe_check"] = rec["c_spe_check"][0]
        rec["per_agent_acc"] = rec["per_agent_acc"][0]
    else:
        rec["acc_replicas"] = {k: [s[k] for s in per] for k in ("mean_acc", "p10_acc")}
    if "replicas" in out:
        rec["replicas"] = out["replicas"]
    return rec


def acc_values(run: dict, key: str) -> list[float]:
    """A run's ``mean_acc`` / ``p10_acc``, one value per replica."""
    if "acc_replicas" in run:
        return list(run["acc_replicas"][key])
    return [run[key]]


def _mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    n = len(values)
    m = sum(values) / n
    sd = (sum((v - m) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return m, sd


def values_mean_std(values) -> str:
    """``"0.812 +/- 0.004"``: mean +/- std (ddof 1) of per-replica values."""
    m, sd = _mean_sd(values)
    return f"{m:.3f} +/- {sd:.3f}"


def values_difference(a, b) -> str:
    """``"+0.012 (beyond noise)"``: mean of ``a`` minus mean of ``b`` (per-replica
    values of two runs), "beyond noise" when larger than two standard errors of
    the difference (``sqrt(s_a^2 / n_a + s_b^2 / n_b)``, ``s`` ddof 1; the rule
    of ``benchmarks.common.difference``), else "within noise"; "-" with fewer
    than two values on either side."""
    if len(a) < 2 or len(b) < 2:
        return "-"
    (ma, sa), (mb, sb) = _mean_sd(a), _mean_sd(b)
    d = ma - mb
    se = (sa**2 / len(a) + sb**2 / len(b)) ** 0.5
    return f"{d:+.3f} ({'beyond noise' if abs(d) > 2 * se else 'within noise'})"


def pdbo_vs_sgp(runs: dict, net: str = "directed") -> str:
    """One sentence: does the best PDBO variant (highest mean accuracy, mean over
    the seeds) beat SGP in mean accuracy on ``net``? With replicas, beating
    means a difference beyond two standard errors (``values_difference``; C-SPE
    by ``benchmarks.common.difference``). Empty until SGP and at least one PDBO
    run are stored."""
    sgp = runs.get(f"{net}/sgp")
    pdbo = {
        n: runs[f"{net}/{n}"] for n in METHODS if n != "sgp" and f"{net}/{n}" in runs
    }
    if sgp is None or not pdbo:
        return ""

    def mean(r, key):
        return _mean_sd(acc_values(r, key))[0]

    best = max(pdbo, key=lambda n: mean(pdbo[n], "mean_acc"))
    b, s = pdbo[best], sgp
    if "replicas" not in b or "replicas" not in s:
        beats = "beats" if b["mean_acc"] > s["mean_acc"] else "does not beat"
        return (
            f"On the stochastic {net} network the best PDBO variant ({LABELS[best]}, "
            f"mean {b['mean_acc']:.3f}, p10 {b['p10_acc']:.3f}) {beats} SGP (mean "
            f"{s['mean_acc']:.3f}, p10 {s['p10_acc']:.3f}) in mean accuracy "
            f"({b['mean_acc'] - s['mean_acc']:+.3f}); p10 difference "
            f"{b['p10_acc'] - s['p10_acc']:+.3f} (one seed, no error bars)."
        )
    diff = {k: values_difference(acc_values(b, k), acc_values(s, k))
            for k in ("mean_acc", "p10_acc")}  # fmt: skip
    d = mean(b, "mean_acc") - mean(s, "mean_acc")
    if "within" in diff["mean_acc"]:
        verdict = "is level with SGP within the noise"
    elif d > 0:
        verdict = "beats SGP beyond the noise"
    else:
        verdict = "does not beat SGP (SGP is better beyond the noise)"
    seeds = min(len(acc_values(b, "mean_acc")), len(acc_values(s, "mean_acc")))
    return (
        f"On the stochastic {net} network the best PDBO variant ({LABELS[best]}, "
        f"mean {values_mean_std(acc_values(b, 'mean_acc'))}, p10 "
        f"{values_mean_std(acc_values(b, 'p10_acc'))}) {verdict} in mean accuracy "
        f"(SGP mean {values_mean_std(acc_values(s, 'mean_acc'))}, p10 "
        f"{values_mean_std(acc_values(s, 'p10_acc'))}): mean accuracy "
        f"{diff['mean_acc']}, p10 {diff['p10_acc']}, final C-SPE "
        f"{difference(b['replicas'], s['replicas'], 'c_spe')} ({seeds} seeds; "
        "beyond noise = more than two standard errors of the difference)."
    )


def report(results: dict, out_dir: str, stem: str = "decentralized") -> None:
    """``<stem>.md`` (a table of every stored run; with replicas mean +/- std over
    the seeds) and ``<stem>.png`` (mean and p10 accuracy per network, std error
    bars) in ``out_dir``."""
    runs = results["runs"]
    setup = results.get("setup", {})
    base = setup.get("network_base", "erdos_renyi")
    lines = [
        "# Decentralized personalization over stochastic directed networks",
        "",
        f"Setup: {json.dumps(setup)}",
        "",
        "Final round. mean = mean over agents of each agent's accuracy on its own "
        "test data; p10 = the 10th-percentile agent's accuracy; C-SPE = the same "
        "pooled over test samples; C-GEN = agents' models on a 1000-sample pooled "
        f"test subsample. {TRAFFIC_LEGEND} "
        f"Networks: {base.split()[0].replace('_', '-').title()} "
        "base graph, static (every edge always on) or stochastic (each edge on "
        "per step with its own rate r ~ U(0.4, 0.8); undirected: per pair, "
        "directed: per direction). local and FedAvg do not use the network "
        "(FedAvg has a server).",
        "",
    ]
    order = [*NETWORKS, "none"]
    names = [*METHODS, *REFERENCES]
    rows = [(net, name, runs[f"{net}/{name}"]) for net in order for name in names
            if f"{net}/{name}" in runs]  # fmt: skip
    replicated = any("replicas" in r for _, _, r in rows)
    if replicated:
        lines += [
            "Mean +/- std (ddof 1) over the seeds; mean and p10 are computed per "
            "seed; C-SPE best = each seed's best evaluated round (best rounds: "
            "one per seed).",
            "",
            "| network | method | seeds | mean acc | p10 acc | C-SPE final | "
            "C-SPE best | C-SPE best rounds | C-GEN final | MB up / down | s / round |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines += [
            "| network | method | mean acc | p10 acc | C-SPE | C-GEN | MB up / down | "
            "s / round |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for net, name, r in rows:
        f = r["final"]
        per_round = f"{r['wall_s'] / r['num_rounds']:.2f}"
        if not replicated:
            lines.append(
                f"| {net} | {LABELS[name]} | {r['mean_acc']:.3f} | "
                f"{r['p10_acc']:.3f} | {f['c_spe']:.3f} | {f['c_gen']:.3f} | "
                f"{traffic_cell(f)} | {per_round} |"
            )
            continue
        s = r.get("replicas")
        cells = [
            values_mean_std(acc_values(r, "mean_acc")),
            values_mean_std(acc_values(r, "p10_acc")),
            mean_std(s, "c_spe", "final"),
            mean_std(s, "c_spe", "best"),
            best_rounds(s, "c_spe"),
            mean_std(s, "c_gen", "final"),
            traffic_cell(f),
        ]
        seeds = len(s["seeds"]) if s else 1
        lines.append(
            f"| {net} | {LABELS[name]} | {seeds} | {' | '.join(cells)} | {per_round} |"
        )
    verdict = pdbo_vs_sgp(runs)
    if verdict:
        lines += ["", verdict]
    analysis = results.get("analysis")
    if analysis:
        lines += ["", analysis]
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(names))
    for col, key in enumerate(("mean_acc", "p10_acc")):
        ax = axes[col]
        for k, name in enumerate(names):
            xs, ys, err = [], [], []
            for j, net in enumerate(order):
                r = runs.get(f"{net}/{name}")
                if r is not None:
                    m, sd = _mean_sd(acc_values(r, key))
                    xs.append(j + k * width)
                    ys.append(m)
                    err.append(sd)
            if xs:
                ax.bar(xs, ys, width, yerr=err if replicated else None,
                       capsize=2, label=LABELS[name])  # fmt: skip
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(order))])
        ax.set_xticklabels(order)
        ax.set_title(key.replace("_", " ") + (" (mean +/- std)" if replicated else ""))
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{stem}.png"), dpi=90)
    plt.close(fig)


def setup_mismatch(old: dict, new: dict) -> str:
    """The ``SAME`` fields in which two setups differ, as ``"replicas=1, ..."``
    (the old values), or "" when they agree. A field missing from a setup had
    its ``SETUP_DEFAULTS`` value (``pdbo``: its ``PDBO_DEFAULTS``)."""

    def used(setup, k):
        v = setup.get(k, SETUP_DEFAULTS.get(k))
        if k == "pdbo" and isinstance(v, dict):
            v = {**PDBO_DEFAULTS, **v}
        return v

    changed = [k for k in SAME if used(old, k) != used(new, k)]
    return ", ".join(f"{k}={used(old, k)!r}" for k in changed)


def setup_of(args) -> dict:
    """The stored setup of a run of the parsed flags (the environment is added
    when runs start)."""
    base = args.base if args.base == "complete" else f"erdos_renyi p={args.edge_prob}"
    return {
        "regime": args.regime,
        "dataset": args.dataset,
        "num_agents": args.num_agents,
        "partition": "dirichlet(0.4)",
        "model": f"mlp {784 if args.dataset == 'fashion_mnist' else 64}-"
        f"{args.hidden}-10",
        "batch_size": 10,
        "local_epochs": 1,
        "lr": args.lr,
        "num_rounds": args.num_rounds,
        "eval_every": args.eval_every,
        "samples_per_agent": args.samples_per_agent or "all",
        "network_base": base,
        "network_rates": "U(0.4, 0.8)",
        "pdbo": {
            "hgp_steps": args.hgp_steps,
            "hgp_alpha": args.hgp_alpha,
            "num_learners": 3,
            "outer_every": args.outer_every,
            "val_fraction": args.val_fraction,
            "outer_lr": args.outer_lr,
        },
        "seed": args.seed,
        "replicas": args.replicas,
        **({"quick": True} if args.quick else {}),
    }


def parse_args(argv=None):
    """The flags; those left unset take the ``--regime``'s ``REGIMES`` defaults
    (and ``QUICK``'s with ``--quick``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regime", default="reduced", choices=list(REGIMES),
                   help="reduced: decentralized.*; paper: PDBO's regime, "
                   "decentralized_regime.*")  # fmt: skip
    p.add_argument("--only", default="", help="comma list of methods")
    p.add_argument("--networks", default=None, help="comma list of network modes")
    p.add_argument("--num_agents", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--num_rounds", type=int, default=None)
    p.add_argument("--eval_every", type=int, default=None)
    p.add_argument("--eval_samples", type=int, default=None)
    p.add_argument("--samples_per_agent", type=int, default=None)
    p.add_argument("--base", default=None, choices=["erdos_renyi", "complete"],
                   help="base graph of the networks (config.network)")  # fmt: skip
    p.add_argument("--edge_prob", type=float, default=None,
                   help="Erdos-Renyi edge probability "
                   "(config.network_edge_prob)")  # fmt: skip
    p.add_argument("--hgp_steps", type=int, default=None, help="pdbo.hgp_steps")
    p.add_argument("--hgp_alpha", type=float, default=None,
                   help="pdbo.hgp_alpha: Neumann step of HGP (0 = --lr)")  # fmt: skip
    p.add_argument(
        "--outer_every", type=int, default=None,
        help="pdbo.outer_every: rounds of SGP between hyper-gradient steps",
    )  # fmt: skip
    p.add_argument(
        "--val_fraction", type=float, default=None,
        help="pdbo.val_fraction: training rows held out for the outer loss "
        "(0 = the outer loss on the training rows)",
    )  # fmt: skip
    p.add_argument(
        "--outer_lr", type=float, default=None,
        help="pdbo.outer_lr: Adam rate of every lambda_i (the class weights and "
        "the MTL mixture weights)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default="")
    p.add_argument("--force", action="store_true",
                   help="rerun every run (also past a setup mismatch)")  # fmt: skip
    p.add_argument("--report_only", action="store_true")
    p.add_argument(
        "--analysis_file", default="", help="text stored as the report's analysis"
    )
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--quick", action="store_true",
        help="smoke run: digits, 6 agents, 2 rounds, 2 seeds; results in --workdir",
    )  # fmt: skip
    add_replicas_flag(p)
    p.set_defaults(replicas=None)
    add_cpu_devices_flag(p)
    p.add_argument("--out_dir", default="", help="default benchmarks/results")
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "decentralized"))
    args = p.parse_args(argv)
    args.dataset = "digits" if args.quick else "fashion_mnist"
    for k, v in {**REGIMES[args.regime], **(QUICK if args.quick else {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick:
        args.workdir = os.path.join(args.workdir, "quick")
    # A smoke run never replaces the stored results.
    args.out_dir = args.out_dir or (args.workdir if args.quick else RESULTS)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replicas < 1:
        sys.exit(f"error: --replicas={args.replicas} is not valid; accepted: >= 1")
    if not args.report_only:
        apply_cpu_devices(args)
    all_names = [*METHODS, *REFERENCES]
    names = [n for n in args.only.split(",") if n] or all_names
    nets = [n for n in args.networks.split(",") if n]
    for n in names:
        if n not in all_names:
            sys.exit(f"error: --only={n!r} is not valid; accepted: {all_names}")
    for n in nets:
        if n not in NETWORKS:
            sys.exit(f"error: --networks={n!r} is not valid; accepted: {NETWORKS}")

    stem = STEMS[args.regime]
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{stem}.json")
    results = load_results(path)
    if args.analysis_file:
        with open(args.analysis_file) as fh:
            results["analysis"] = fh.read().strip()
    old_setup = dict(results.get("setup", {}))
    results["setup"] = setup_of(args)
    was = setup_mismatch(old_setup, results["setup"]) if old_setup else ""
    if results["runs"] and was and not args.report_only:
        if not args.force:
            sys.exit(
                f"error: stored runs in {path} used {was}; pass the same flags to "
                "add runs, or --force to rerun everything"
            )
        # Never a table of two setups: the stored runs (and their analysis) go.
        print(f"{path}: dropping the stored runs of {was}", file=sys.stderr)
        results["runs"] = {}
        if not args.analysis_file:
            results.pop("analysis", None)
    if args.report_only and old_setup:
        results["setup"] = old_setup
        if args.analysis_file:
            save_results(path, results)
        report(results, args.out_dir, stem)
        return

    from demjax.train import run

    results["setup"].update(environment())
    jobs = []
    for net in nets:
        for name in METHODS:
            if name in names:
                jobs.append((net, name))
        if net == "directed":  # the references once, after the key network
            jobs += [("none", n) for n in REFERENCES if n in names]
    if not args.report_only:
        for net, name in jobs:
            key = f"{net}/{name}"
            if key in results["runs"] and not args.force:
                print(f"{key}: stored, skipping", file=sys.stderr)
                continue
            if net == "none":
                config = config_for(REFERENCES[name], None, None, args)
            else:
                algorithm, mode = METHODS[name]
                config = config_for(algorithm, net, mode, args)
            t0 = time.perf_counter()
            sub = [] if args.regime == "reduced" else [stem]
            out = run(config, os.path.join(args.workdir, *sub, net, name),
                      overwrite=True)  # fmt: skip
            wall = time.perf_counter() - t0
            acc, pooled = per_agent_accuracy(config, out)
            rec = run_record(acc, pooled, out, wall, args.num_rounds)
            results["runs"][key] = rec
            save_results(path, results)
            report(results, args.out_dir, stem)
            line = {"run": key, **{k: rec[k] for k in ("mean_acc", "p10_acc")},
                    "c_spe": rec["final"]["c_spe"],
                    "c_spe_check": rec["c_spe_check"]}  # fmt: skip
            print(json.dumps(line), flush=True)
    save_results(path, results)
    report(results, args.out_dir, stem)


if __name__ == "__main__":
    main()
