"""Decentralized personalization over stochastic directed networks.

Terashita & Hara (arXiv 2210.02129) setup on Fashion-MNIST: 100 agents,
Dirichlet(0.4) split, a small model; three communication networks over an
Erdos-Renyi base graph (``--edge_prob``): ``static``, stochastic ``undirected``
and stochastic ``directed`` (edge rates r ~ U(0.4, 0.8)). Algorithms: SGP,
PDBO-DA, PDBO-MTL, PDBO-DA&MTL (``demjax.algorithms.sgp`` / ``pdbo``) on each
network, and the network-free references local and FedAvg (a server).

Reports, per run, the final mean test accuracy over agents (each agent's model
on its own test data), the 10th-percentile agent's accuracy, C-SPE (sample
weighted), C-GEN and seconds per round into
``benchmarks/results/decentralized.{json,md,png}``; one JSON line per finished
run on stdout. Resumable: finished runs are stored at once and skipped on rerun
(``--force`` reruns).

    python benchmarks/decentralized.py                          # full setup
    python benchmarks/decentralized.py --hidden=64 --num_rounds=30 \\
        --samples_per_agent=100                                 # reduced
    python benchmarks/decentralized.py --report_only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import environment, load_results, save_results  # noqa: E402
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


def config_for(algorithm: str, net: str | None, mode: str | None, args):
    c = default.get_config()
    c.dataset = "fashion_mnist"
    c.data_dir = args.data_dir
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
    c.checkpoint_every = 0
    c.tree_snapshot_every = 0
    c.progress = not args.quiet
    if net is not None:
        c.network = "erdos_renyi"
        c.network_edge_prob = args.edge_prob
        c.network_mode = net
        c.network_rates = "0.4,0.8"
    if mode is not None:
        c.pdbo.mode = mode
        c.pdbo.hgp_steps = args.hgp_steps
    return c


def per_agent_accuracy(config, out) -> tuple[list[float], float]:
    """Each agent's final model on its own test data (fraction correct), and the
    same pooled over test samples (must equal the run's final C-SPE)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from demjax import data, models, train
    from demjax.algorithms.hierarchical import FAMILY

    part_np = data.make_partition(config)
    part = jax.tree.map(jnp.asarray, part_np)
    state = out["state"]
    if config.algorithm not in FAMILY:
        _, ctx, rounds = train.build(config, part)
        params = rounds.personal(state, part, jax.random.PRNGKey(0))
        apply = rounds.eval_apply or ctx.eval_apply_fn
    else:
        model = models.make_model(
            config.model, part_np.num_classes, config.hidden, "xla"
        )
        params = state.params

        def apply(p, x, train, key):
            return model.apply({"params": p}, x, train=False)

    mask = jnp.arange(part.y_test.shape[1])[None, :] < part.n_test[:, None]

    def own(args):
        p, x, y, m = args
        pred = jnp.argmax(apply(p, x, False, None), axis=-1)
        return jnp.sum((pred == y) & m)

    correct = jax.lax.map(own, (params, part.x_test, part.y_test, mask), batch_size=8)
    n_test = np.asarray(part_np.n_test)
    acc = np.asarray(correct) / np.maximum(n_test, 1)
    pooled = float(np.sum(correct) / np.sum(n_test))
    return [round(float(a), 6) for a in acc], round(pooled, 6)


def summary(acc: list[float]) -> dict:
    import numpy as np

    a = np.asarray(acc)
    return {"mean_acc": float(a.mean()), "p10_acc": float(np.percentile(a, 10))}


def pdbo_vs_sgp(runs: dict, net: str = "directed") -> str:
    """One sentence: does the best PDBO variant beat SGP in mean accuracy on
    ``net``? Empty until SGP and at least one PDBO run are stored."""
    sgp = runs.get(f"{net}/sgp")
    pdbo = {
        n: runs[f"{net}/{n}"] for n in METHODS if n != "sgp" and f"{net}/{n}" in runs
    }
    if sgp is None or not pdbo:
        return ""
    best = max(pdbo, key=lambda n: pdbo[n]["mean_acc"])
    b, s = pdbo[best], sgp
    beats = "beats" if b["mean_acc"] > s["mean_acc"] else "does not beat"
    return (
        f"On the stochastic {net} network the best PDBO variant ({LABELS[best]}, "
        f"mean {b['mean_acc']:.3f}, p10 {b['p10_acc']:.3f}) {beats} SGP (mean "
        f"{s['mean_acc']:.3f}, p10 {s['p10_acc']:.3f}) in mean accuracy "
        f"({b['mean_acc'] - s['mean_acc']:+.3f}); p10 difference "
        f"{b['p10_acc'] - s['p10_acc']:+.3f} (one seed, no error bars)."
    )


def report(results: dict, out_dir: str) -> None:
    runs = results["runs"]
    setup = results.get("setup", {})
    lines = [
        "# Decentralized personalization over stochastic directed networks",
        "",
        f"Setup: {json.dumps(setup)}",
        "",
        "Final round. mean = mean over agents of each agent's accuracy on its own "
        "test data; p10 = the 10th-percentile agent's accuracy; C-SPE = the same "
        "pooled over test samples; C-GEN = agents' models on a 1000-sample pooled "
        "test subsample. Networks: Erdos-Renyi base graph, static (every edge "
        "always on) or stochastic (each edge on per step with its own rate "
        "r ~ U(0.4, 0.8); undirected: per pair, directed: per direction). local "
        "and FedAvg do not use the network (FedAvg has a server).",
        "",
        "| network | method | mean acc | p10 acc | C-SPE | C-GEN | s / round |",
        "|---|---|---|---|---|---|---|",
    ]
    order = [*NETWORKS, "none"]
    names = [*METHODS, *REFERENCES]
    for net in order:
        for name in names:
            r = runs.get(f"{net}/{name}")
            if r is None:
                continue
            f = r["final"]
            lines.append(
                f"| {net} | {LABELS[name]} | {r['mean_acc']:.3f} | "
                f"{r['p10_acc']:.3f} | {f['c_spe']:.3f} | {f['c_gen']:.3f} | "
                f"{r['wall_s'] / r['num_rounds']:.2f} |"
            )
    verdict = pdbo_vs_sgp(runs)
    if verdict:
        lines += ["", verdict]
    analysis = results.get("analysis")
    if analysis:
        lines += ["", analysis]
    with open(os.path.join(out_dir, "decentralized.md"), "w") as fh:
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
            xs, ys = [], []
            for j, net in enumerate(order):
                r = runs.get(f"{net}/{name}")
                if r is not None:
                    xs.append(j + k * width)
                    ys.append(r[key])
            if xs:
                ax.bar(xs, ys, width, label=LABELS[name])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(order))])
        ax.set_xticklabels(order)
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "decentralized.png"), dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma list of methods")
    p.add_argument("--networks", default=",".join(NETWORKS))
    p.add_argument("--num_agents", type=int, default=100)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--num_rounds", type=int, default=100)
    p.add_argument("--eval_every", type=int, default=10)
    p.add_argument("--eval_samples", type=int, default=1000)
    p.add_argument("--samples_per_agent", type=int, default=0)
    p.add_argument("--edge_prob", type=float, default=0.1)
    p.add_argument("--hgp_steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default="")
    p.add_argument("--force", action="store_true")
    p.add_argument("--report_only", action="store_true")
    p.add_argument(
        "--analysis_file", default="", help="text stored as the report's analysis"
    )
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out_dir", default=RESULTS)
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "decentralized"))
    args = p.parse_args()
    all_names = [*METHODS, *REFERENCES]
    names = [n for n in args.only.split(",") if n] or all_names
    nets = [n for n in args.networks.split(",") if n]
    for n in names:
        if n not in all_names:
            sys.exit(f"error: --only={n!r} is not valid; accepted: {all_names}")
    for n in nets:
        if n not in NETWORKS:
            sys.exit(f"error: --networks={n!r} is not valid; accepted: {NETWORKS}")

    from demjax.train import run

    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "decentralized.json")
    results = load_results(path)
    if args.analysis_file:
        with open(args.analysis_file) as fh:
            results["analysis"] = fh.read().strip()
    results["setup"] = {
        "dataset": "fashion_mnist",
        "num_agents": args.num_agents,
        "partition": "dirichlet(0.4)",
        "model": f"mlp 784-{args.hidden}-10",
        "batch_size": 10,
        "local_epochs": 1,
        "lr": args.lr,
        "num_rounds": args.num_rounds,
        "samples_per_agent": args.samples_per_agent or "all",
        "network_base": f"erdos_renyi p={args.edge_prob}",
        "network_rates": "U(0.4, 0.8)",
        "pdbo": {"hgp_steps": args.hgp_steps, "num_learners": 3},
        "seed": args.seed,
        **environment(),
    }
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
            out = run(config, os.path.join(args.workdir, net, name), overwrite=True)
            wall = time.perf_counter() - t0
            acc, c_spe_check = per_agent_accuracy(config, out)
            final = out["final"]["sync"]
            results["runs"][key] = {
                "final": final,
                **summary(acc),
                "c_spe_check": c_spe_check,
                "per_agent_acc": acc,
                "wall_s": round(wall, 1),
                "num_rounds": args.num_rounds,
                "per_round": out["records"],
            }
            save_results(path, results)
            report(results, args.out_dir)
            line = {"run": key, **summary(acc), "c_spe": final["c_spe"]}
            line["c_spe_check"] = c_spe_check
            print(json.dumps(line), flush=True)
    save_results(path, results)
    report(results, args.out_dir)


if __name__ == "__main__":
    main()
