"""Run configs: the validation entry point (``validate``; the checks of every
field are in ``demjax.config_checks``), the resolved JSON stored in
``config.json`` and the documentation of every field (docs/config.md).

Every error is a ``ConfigError`` whose one-line message names the config field
(the CLI flag is ``--config.<field>``) and the accepted values.
"""

from __future__ import annotations

import json

from demjax import config_checks
from demjax.algorithms import REGISTRY
from demjax.config_checks import (  # noqa: F401  (accepted values, re-exported)
    BACKENDS,
    DATASETS,
    DISTANCES,
    FEATURES,
    LINKAGES,
    TREE_MODES,
    WEIGHTINGS,
    flat_fields,
)


def resolved_mu(config) -> float:
    """``config.mu``, or the algorithm's default when it is None."""
    algo = REGISTRY[config.algorithm]
    return float(algo.default_mu if config.mu is None else config.mu)


def validate(config) -> None:
    """Checks every field of a config: the one validation entry point
    (``demjax.train.run``, ``demjax.continual.run.run`` and so
    ``scripts/run.py`` call it before anything else).

    A config with ``scenario = "continual"`` is a continual-learning config
    (``demjax.continual.config``, checked by ``config_checks.check_continual``);
    any other is a simulation config (``configs/default.py``,
    ``config_checks.check_run``).

    Raises:
      ConfigError: the first bad field, e.g. ``"algorithm='fedsgd' is not valid;
        accepted: demlearn, demlearn_p, fedavg, fedprox, local, ..."``.
    """
    if config.get("scenario") is not None:  # names `scenario` unless "continual"
        config_checks.check_continual(config)
    else:
        config_checks.check_run(config)


def hparams(config) -> dict:
    """The resolved hyper-parameters of ``config.algorithm``."""
    plugin = REGISTRY[config.algorithm]
    group = config.get(config.algorithm) or {}
    return {k: group.get(k, h.default) for k, h in plugin.hparams.items()}


def default_config_json() -> dict:
    """``configs/default.py`` as stored in ``config.json`` (plain JSON values)."""
    from demjax.default_config import get_config

    d = get_config().to_dict()
    d.pop("mu", None)  # resolved per algorithm
    return json.loads(json.dumps(d, default=list))


def to_json(config) -> str:
    """The resolved config as sorted JSON (tuples as lists, ``mu`` resolved)."""
    d = config.to_dict()
    d["mu"] = resolved_mu(config)
    return json.dumps(d, sort_keys=True, indent=2, default=list)


# One line per config field: what it does and the accepted values. The "All fields"
# table of docs/config.md is generated from this (`python -m demjax.config --docs`)
# and a test keeps the two, and the fields of configs/default.py, in sync.
FIELD_DOCS = {
    "seed": "PRNG seed of data split, init, shuffles, masks (int >= 0)",
    "num_replicas": "R independent replicas in one program, seeds seed..seed+R-1 "
    "(int >= 1; docs/running.md)",
    "replica_plan": "phases over replicas (num_replicas > 1): auto (all agents at "
    "once: vmap; blocks / sequential: both timed, the faster cached), vmap, "
    "one_at_a_time (docs/running.md)",
    "replicate_split": "replicas draw their own data split (seed + r); False: all "
    "share the split of seed",
    "dataset": "digits, fashion_mnist, fashion_mnist_tfds, mnist, emnist, cifar10, "
    "cifar100, femnist, shakespeare (LEAF JSON)",
    "data_dir": "IDX / tfds / LEAF / TFF HDF5 data directory; '' = the source's "
    "default",
    "download": "tfds sources: fetch missing data (needs internet)",
    "partition": "pathological (reference), dirichlet, iid, natural (one agent per "
    "writer / role / client: femnist, shakespeare, cifar100 TFF HDF5), file "
    "(partition_file), arrays (train.run(partition=...))",
    "partition_file": "partition='file': .json / .npz split file (docs/data.md)",
    "labels_per_agent": "pathological: labels per agent (1..C)",
    "dirichlet_alpha": "dirichlet: concentration (> 0)",
    "samples_per_agent": "cap on samples per agent; 0 = none",
    "val_fraction": "share of each agent's training rows held out as its "
    "evaluation rows (tuning without the test data; docs/data.md); 0 = the test "
    "split",
    "standardize": "global ((x - mean) / (std + 0.001), the reference), per_pixel, "
    "given (standardize_mean/std), none ([0, 1]); True = global, False = none",
    "standardize_mean": "standardize='given': the mean subtracted (finite)",
    "standardize_std": "standardize='given': the std divided by (finite, > 0)",
    "num_agents": "A, number of agents (>= 2)",
    "model": "mlr, mlp, cnn (paper), cnn4 (FedAvg paper CNN), cnn_cifar, char_rnn "
    "(shakespeare: LSTM widths = hidden)",
    "hidden": "MLP hidden widths, e.g. (100,)",
    "init": "layer init: flax (LeCun normal, zero bias) or torch (PyTorch default: "
    "U(+-1/sqrt(fan_in)) weights and biases)",
    "conv_impl": "CNN convolutions in training: auto (measured), patches (im2col), "
    "xla (lax.conv)",
    "optimizer": "sgd (reference), momentum, or any optax optimizer name",
    "lr": "local learning rate (> 0)",
    "local_epochs": "passes over the agent's data per round (>= 1)",
    "batch_size": "minibatch size B (>= 1)",
    "local_buckets": "buckets of similar step counts, each a vmap (>= 1)",
    "matmul_impl": "dense weight gradient in training: auto (measured), xla, wgrad_t",
    "local_plan": "local training plan: auto (measured, cached), all, sequential, "
    "block:K; capped by free memory",
    "algorithm": "demlearn, demlearn_p, fedavg, fedprox, local, and the others in "
    "docs/algorithms.md",
    "aggregator": "server averaging: mean, median, trimmed_mean, noisy_median",
    "trim_fraction": "trimmed_mean: fraction cut from each end, [0, 0.49]",
    "aggregator_noise": "noisy_median: std of Gaussian noise before the median (>= 0)",
    "num_rounds": "T, rounds (>= 1)",
    "mu": "proximal coefficient; None = algorithm default (0.002 / 0.5 / 0)",
    "alpha": "top-down mixing weight of the parent model, [0, 1]",
    "num_levels": "group levels below the root (paper's K = num_levels + 1)",
    "tau": "regroup every tau rounds; 0 = tree fixed after round 0",
    "tree_mode": "binary (reference top-down splits) or maxclust",
    "level_groups": "maxclust: groups per level, level 1 first, e.g. (16, 4, 2)",
    "distance": "euclidean or cosine",
    "linkage": "average (reference), single, complete, weighted, ward (euclidean)",
    "linkage_backend": "scipy or fastcluster",
    "cluster_features": "weights (reference) or updates (the round's update)",
    "sketch_dim": "random projection of clustering features; 0 = exact",
    "linkage_sample": "linkage on m sampled agents (rest: nearest's group); 0 = all",
    "distance_block": "Gram summed over column blocks of this width; 0 = one matmul",
    "weighting": "group averages weighted by agents (reference) or samples",
    "amplify": "the reference's x amplify_factor group scaling (off by default)",
    "amplify_factor": "amplify scale (> 0), 1.15 in the reference",
    "amplify_rounds": "amplify applies for rounds t < amplify_rounds",
    "network": "decentralized plug-ins' base graph: complete, erdos_renyi, file",
    "network_mode": "static, undirected (pair active per step w.p. r_ij), directed "
    "(each direction active w.p. r_ij)",
    "network_rates": "edge activation rates r ~ U(low, high), 'low,high' in (0, 1]",
    "network_edge_prob": "erdos_renyi: link probability per agent pair, (0, 1]",
    "network_file": "network='file': .npy/.txt 0/1 [A, A] matrix, adj[i, j] = i -> j",
    "network_impl": "mixing: dense ([A, A] matmul) or sparse (edge-list segment_sum)",
    "num_devices": "devices of the 'agents' mesh; 0 = auto (several CPU devices: "
    "one or all, measured), 1 = none",
    "participation": "fraction of agents sampled per round, (0, 1]",
    "dropout": "per-round probability an agent drops out, [0, 1)",
    "stragglers": "fraction of agents doing a random part of their steps, [0, 1]",
    "attack": "Byzantine agents: none, sign_flip, gaussian, scaling, alie, ipm "
    "(messages corrupted at aggregation), label_flip (training labels flipped)",
    "attack_fraction": "floor(fraction * num_agents) Byzantine agents, [0, 1)",
    "attack_redraw": "Byzantine set re-drawn every round (False: fixed for the "
    "run; label_flip needs False)",
    "attack_scale": "sign_flip / scaling multiplier (> 0); None = 1 (sign_flip), "
    "num_agents (scaling)",
    "attack_noise_std": "gaussian: std of the noise replacing the update (> 0)",
    "attack_epsilon": "ipm: Byzantine agents send -epsilon * honest mean update (> 0)",
    "attack_alie_z": "alie: shift z (finite); None = Baruch et al.'s alie_z(A, f)",
    "checkpoint_every": "orbax checkpoint every k rounds and at the end; 0 = off",
    "keep_checkpoints": "newest checkpoints kept (>= 1); a damaged newest one "
    "falls back to the next",
    "tree_snapshot_every": "tree + linkage snapshots every k rounds; 0 = final only",
    "eval_samples": "C-GEN on a seeded subsample of this size; 0 = all",
    "eval_batch": "models evaluated at once; 0 = auto (1 for CNNs, else 8)",
    "eval_every": "evaluate every k rounds (and the last)",
    "progress": "tqdm progress bar (--quiet turns it off)",
    "tensorboard": "also write TensorBoard events (--tensorboard)",
}


def field_docs() -> dict[str, str]:
    """Docs of every config field, plug-in groups as ``<algorithm>.<field>``."""
    docs = dict(FIELD_DOCS)
    for name, plugin in REGISTRY.items():
        for key, hparam in plugin.hparams.items():
            docs[f"{name}.{key}"] = hparam.doc
    return docs


def fields_markdown(config) -> str:
    """The markdown table of every config field: name, default, meaning."""
    docs = field_docs()
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for key, value in sorted(flat_fields(config).items()):
        default = repr(tuple(value) if isinstance(value, list) else value)
        rows.append(f"| `{key}` | `{default}` | {docs.get(key, '?')} |")
    return "\n".join(rows)


CONFIG_DOC = "docs/config.md"
"""The file holding the generated table, relative to the repository root."""


def write_config_table(path: str = CONFIG_DOC) -> None:
    """Rewrites the table between the ``config-table`` markers of ``path``."""
    from demjax.default_config import get_config

    start_tag, end_tag = "<!-- config-table:start -->", "<!-- config-table:end -->"
    with open(path) as f:
        text = f.read()
    a, b = text.index(start_tag) + len(start_tag), text.index(end_tag)
    with open(path, "w") as f:
        f.write(text[:a] + "\n" + fields_markdown(get_config()) + "\n" + text[b:])


if __name__ == "__main__":  # python -m demjax.config [--docs]: print / rewrite
    import sys

    from demjax.default_config import get_config

    # --readme: the former name of --docs (the table lives in docs/config.md).
    if {"--docs", "--readme"} & set(sys.argv[1:]):
        write_config_table(CONFIG_DOC)
    else:
        print(fields_markdown(get_config()))
