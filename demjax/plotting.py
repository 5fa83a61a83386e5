"""Plots of one or several run workdirs (``scripts/plot.py`` is the CLI).

    python scripts/plot.py runs/a runs/b                  # curves -> runs/a/plots/
    python scripts/plot.py runs/a --tree_round=10 --svg   # + dendrogram of round 10
    python scripts/plot.py runs/a --out=docs/img

Writes ``curves.png`` (C-SPE, C-GEN, Global and the top-level G-GEN over rounds, one
line per workdir, at the measurement point ``--point``) and, for a self-organizing
run, ``tree.png``: the dendrogram of a chosen round's clustering with links and
leaves coloured by level-1 group, agent labels coloured by each agent's majority
training label, and the group sizes per level.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.cluster import hierarchy as sch  # noqa: E402

METRICS = (("c_spe", "C-SPE"), ("c_gen", "C-GEN"), ("global_acc", "Global"))


def load_records(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found; accepted: a workdir written by run.py")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def label_of(workdir: str) -> str:
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            c = json.load(f)
        return f"{os.path.basename(os.path.normpath(workdir))} ({c['algorithm']})"
    except (OSError, KeyError, ValueError):
        return os.path.basename(os.path.normpath(workdir))


def plot_curves(workdirs: list[str], point: str, path: str) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for wd in workdirs:
        recs = [r for r in load_records(wd) if r["point"] == point]
        rounds = [r["round"] for r in recs]
        tops = sorted(k for k in recs[0] if k.startswith("g_gen_l")) if recs else []
        keys = (
            [*METRICS, (tops[-1], f"G-GEN top ({tops[-1][-2:]})")] if tops else METRICS
        )
        for ax, (key, _) in zip(axes, keys, strict=False):
            ys = [r.get(key) for r in recs]
            if any(y is not None for y in ys):
                ax.plot(
                    rounds, [np.nan if y is None else y for y in ys], label=label_of(wd)
                )
    titles = [t for _, t in METRICS] + ["G-GEN, top group level"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(f"{title} ({point})")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def find_tree(workdir: str, round_: int | None) -> dict:
    snaps = sorted(glob.glob(os.path.join(workdir, "trees", "round_*.json")))
    if round_ is None:
        path = os.path.join(workdir, "tree_final.json")
    else:
        path = os.path.join(workdir, "trees", f"round_{round_:05d}.json")
        if not os.path.exists(path):
            have = ", ".join(
                os.path.basename(s)[6:11].lstrip("0") or "0" for s in snaps
            )
            sys.exit(f"error: --tree_round={round_} has no snapshot; accepted: {have}")
    with open(path) as f:
        return json.load(f)


def plot_tree(tree: dict, path: str, title: str) -> None:
    z = tree.get("linkage")
    if not z:
        print(
            "no linkage stored (not a self-organizing run): no tree plot",
            file=sys.stderr,
        )
        return
    z = np.asarray(z)
    num_agents = len(tree["agent_parent"])
    group = np.asarray(tree["agent_ancestor"][0])  # level-1 group (-1: attached higher)
    majority = tree.get("agent_majority_label") or [0] * num_agents
    groups = sorted(set(group.tolist()))
    gcolor = {g: plt.cm.tab20(i % 20) for i, g in enumerate(groups)}
    # Leaf set of every merge: a link takes its group's colour if all leaves agree.
    leaves = {i: {i} for i in range(num_agents)}
    for k, (a, b, _, _) in enumerate(z):
        leaves[num_agents + k] = leaves[int(a)] | leaves[int(b)]

    def link_color(k):
        gs = {int(group[i]) for i in leaves[k]}
        return matplotlib.colors.to_hex(gcolor[gs.pop()]) if len(gs) == 1 else "#999999"

    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(16, 5), gridspec_kw={"width_ratios": [4, 1]}
    )
    sch.dendrogram(
        z,
        ax=ax,
        link_color_func=link_color,
        labels=[str(a) for a in range(num_agents)],
        leaf_font_size=7,
    )
    for tick in ax.get_xticklabels():
        a = int(tick.get_text())
        tick.set_color(plt.cm.tab10(majority[a] % 10))
    ax.set_title(f"{title}: dendrogram, round {tree.get('round')} (links: level-1 "
                 "group; labels: agent's majority class)")  # fmt: skip
    ax.set_xlabel("agent")
    ax.set_ylabel("linkage distance")
    levels = len(tree["level_sizes"]) - 1
    sizes = [
        sorted(
            (
                n["num_agents"]
                for n in tree["nodes"]
                if n["level"] == lv and n["num_agents"]
            ),
            reverse=True,
        )
        for lv in range(1, levels + 1)
    ]
    for lv, ss in enumerate(sizes, start=1):
        ax2.scatter([lv] * len(ss), ss, s=30)
        for s in ss:
            ax2.annotate(
                str(s), (lv, s), textcoords="offset points", xytext=(5, 0), fontsize=7
            )
    ax2.set_xticks(range(1, levels + 1))
    ax2.set_xlabel("group level")
    ax2.set_ylabel("agents per group")
    ax2.set_title("group sizes per level")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdirs", nargs="+")
    p.add_argument(
        "--out", default=None, help="output dir (default: first workdir/plots)"
    )
    p.add_argument("--point", default="sync", choices=("sync", "local"))
    p.add_argument("--tree_round", type=int, default=None, help="default: final tree")
    p.add_argument("--svg", action="store_true", help="also write SVG files")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.workdirs[0], "plots")
    os.makedirs(out, exist_ok=True)
    exts = ["png"] + (["svg"] if args.svg else [])
    for ext in exts:
        plot_curves(args.workdirs, args.point, os.path.join(out, f"curves.{ext}"))
        tree = find_tree(args.workdirs[0], args.tree_round)
        plot_tree(tree, os.path.join(out, f"tree.{ext}"), label_of(args.workdirs[0]))
    print(f"wrote {', '.join(sorted(os.listdir(out)))} to {out}")


if __name__ == "__main__":
    main()
