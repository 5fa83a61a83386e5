"""Config validation in one place, before any array is built.

Every error is a ``ConfigError`` whose one-line message names the config field
(the CLI flag is ``--config.<field>``) and the accepted values.
"""

from __future__ import annotations

import json
import math

from demjax import attacks, cluster, data, network, plan, robust
from demjax.algorithms import ALGORITHMS, REGISTRY
from demjax.data import PARTITIONS, SOURCES
from demjax.errors import ConfigError, check_choice
from demjax.local import make_optimizer
from demjax.models import INITS, MODELS

# Accepted values, each defined once by the module that implements them.
DATASETS = SOURCES
DISTANCES = cluster.METRICS
LINKAGES = cluster.LINKAGE_METHODS
TREE_MODES = cluster.TREE_MODES
FEATURES = cluster.FEATURE_KINDS
BACKENDS = cluster.LINKAGE_BACKENDS
WEIGHTINGS = ("agents", "samples")


def _int_at_least(config, field: str, low: int) -> None:
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(
            f"{field}={value!r} is not valid; accepted: an integer >= {low}"
        )


def _float_in(config, field: str, low: float, high: float = math.inf) -> None:
    """A finite number in ``[low, high]`` (``[low, inf)`` without ``high``)."""
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{field}={value!r} is not valid; accepted: a number")
    if not (math.isfinite(value) and low <= value <= high):
        span = f"[{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ConfigError(
            f"{field}={value!r} is not valid; accepted: a finite number {span}"
        )


def _positive(config, field: str) -> None:
    """A finite number > 0."""
    value = config[field]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value < math.inf
    ):
        raise ConfigError(
            f"{field}={value!r} is not valid; accepted: a finite float > 0"
        )


def _all_floats_finite(config) -> None:
    """Every float field, plug-in groups included, is finite (none is +-inf/NaN)."""
    for field, value in flat_fields(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"{field}={value!r} is not valid; accepted: a finite number"
            )


def resolved_mu(config) -> float:
    """``config.mu``, or the algorithm's default when it is None."""
    algo = REGISTRY[config.algorithm]
    return float(algo.default_mu if config.mu is None else config.mu)


def validate(config) -> None:
    """Checks every field of a run config.

    Raises:
      ConfigError: the first bad field, e.g. ``"algorithm='fedsgd' is not valid;
        accepted: demlearn, demlearn_p, fedavg, fedprox, local"``.
    """
    check_choice("algorithm", config.algorithm, ALGORITHMS)
    check_choice("aggregator", config.aggregator, robust.AGGREGATORS)
    _validate_hparams(config)
    network.validate_config(config)
    check_choice("dataset", config.dataset, DATASETS)
    check_choice("partition", config.partition, PARTITIONS)
    data.check_config(config)  # partition_file, standardize (demjax.data)
    check_choice("distance", config.distance, DISTANCES)
    check_choice("linkage", config.linkage, LINKAGES)
    check_choice("tree_mode", config.tree_mode, TREE_MODES)
    check_choice("cluster_features", config.cluster_features, FEATURES)
    check_choice("weighting", config.weighting, WEIGHTINGS)
    check_choice("linkage_backend", config.linkage_backend, BACKENDS)
    check_choice("model", config.model, MODELS)
    check_choice("init", config.init, INITS)
    plan.check_config(config)  # local_plan, conv_impl
    make_optimizer(config.optimizer, config.lr)  # checks optimizer and lr
    if config.linkage == "ward" and config.distance != "euclidean":
        raise ConfigError(
            "linkage='ward' needs distance='euclidean' "
            f"(got distance={config.distance!r})"
        )
    _int_at_least(config, "num_agents", 2)
    _int_at_least(config, "num_rounds", 1)
    _int_at_least(config, "local_epochs", 1)
    _int_at_least(config, "batch_size", 1)
    _int_at_least(config, "labels_per_agent", 1)
    _int_at_least(config, "num_levels", 0)
    _int_at_least(config, "tau", 0)
    _int_at_least(config, "eval_samples", 0)
    _int_at_least(config, "eval_batch", 0)
    _int_at_least(config, "eval_every", 1)
    _int_at_least(config, "local_buckets", 1)
    _int_at_least(config, "sketch_dim", 0)
    _int_at_least(config, "linkage_sample", 0)
    if config.linkage_sample == 1 or config.linkage_sample > config.num_agents:
        raise ConfigError(
            f"linkage_sample={config.linkage_sample!r} is not valid; accepted: 0 "
            f"(exact) or an integer in [2, num_agents={config.num_agents}]"
        )
    _int_at_least(config, "distance_block", 0)
    _int_at_least(config, "num_devices", 0)
    _int_at_least(config, "checkpoint_every", 0)
    _int_at_least(config, "keep_checkpoints", 1)
    _int_at_least(config, "tree_snapshot_every", 0)
    _int_at_least(config, "samples_per_agent", 0)
    _int_at_least(config, "seed", 0)
    _int_at_least(config, "amplify_rounds", 0)
    for field in ("progress", "amplify", "download", "tensorboard"):
        if not isinstance(config[field], bool):
            raise ConfigError(
                f"{field}={config[field]!r} is not valid; accepted: True or False"
            )
    if not isinstance(config.data_dir, str):
        raise ConfigError(
            f"data_dir={config.data_dir!r} is not valid; accepted: a path string "
            "('' = the dataset's default)"
        )
    hidden = config.hidden
    if not (
        isinstance(hidden, (tuple, list))
        and len(hidden) >= 1
        and all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
        )
    ):
        raise ConfigError(
            f"hidden={hidden!r} is not valid; accepted: a non-empty tuple of positive "
            "integers, e.g. (100,)"
        )
    _positive(config, "amplify_factor")
    _float_in(config, "alpha", 0.0, 1.0)
    _float_in(config, "dropout", 0.0, 1.0)
    _float_in(config, "stragglers", 0.0, 1.0)
    _float_in(config, "participation", 0.0, 1.0)
    if config.participation <= 0 or config.dropout >= 1:
        raise ConfigError(
            f"participation={config.participation!r}, dropout={config.dropout!r} "
            "leave no agent training; accepted: participation in (0, 1], dropout "
            "in [0, 1)"
        )
    _positive(config, "lr")
    _positive(config, "dirichlet_alpha")
    _float_in(config, "trim_fraction", 0.0, 0.49)
    _float_in(config, "aggregator_noise", 0.0)
    if config.mu is not None:
        _float_in(config, "mu", 0.0)
    attacks.check_config(
        config, REGISTRY[config.algorithm].attackable, config.algorithm
    )
    _all_floats_finite(config)  # fields without a check of their own
    algo = REGISTRY[config.algorithm]
    if algo.check is not None:
        algo.check(config)


def _validate_hparams(config) -> None:
    """Every algorithm's hyper-parameter group (``--config.<algorithm>.<field>``)."""
    for name, plugin in REGISTRY.items():
        if not plugin.hparams:
            continue
        group = config.get(name)
        if group is None:
            raise ConfigError(
                f"{name} hyper-parameters are missing from the config; accepted: a "
                f"config built from configs/default.py (fields "
                f"{', '.join(plugin.hparams)})"
            )
        unknown = sorted(set(group.keys()) - set(plugin.hparams))
        if unknown:
            raise ConfigError(
                f"{name}.{unknown[0]} is not a field of {name}; accepted: "
                f"{', '.join(plugin.hparams)}"
            )
        for key, hparam in plugin.hparams.items():
            hparam.check(f"{name}.{key}", group.get(key, hparam.default))


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
    "num_devices": "devices of the 'agents' mesh; 0 = auto, 1 = none",
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


def flat_fields(config) -> dict:
    """Config fields flattened (groups as ``<group>.<field>``) -> value."""
    out = {}
    for key in config.keys():
        value = config[key]
        if hasattr(value, "keys"):
            for sub in value.keys():
                out[f"{key}.{sub}"] = value[sub]
        else:
            out[key] = value
    return out


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
