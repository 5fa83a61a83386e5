"""Every check of a config field, run by ``demjax.config.validate``.

Two kinds of config go through here: the simulation's (``configs/default.py``,
run by ``demjax.train.run``) and the continual-learning scenario's
(``demjax.continual.config``, ``scenario="continual"``, run by
``demjax.continual.run.run``). ``check_run`` and ``check_continual`` check every
field of each before any data is loaded or any array is built; the modules that
read the values afterwards trust them. Every error is a ``ConfigError`` whose
one-line message names the field (the CLI flag is ``--config.<field>``) and the
accepted values.

Checks that need the data or a file's contents (too many agents for a data set,
a split file's agent count, an adjacency matrix's shape) are made where those are
read, and name the field too.
"""

from __future__ import annotations

import math
import os

from demjax import attacks, cluster, network, plan, robust
from demjax.algorithms import ALGORITHMS, REGISTRY
from demjax.continual import config as continual
from demjax.data.partition import CONFIG_PARTITIONS as PARTITIONS
from demjax.data.sources import (
    LEAF_SOURCES,
    NATURAL_SOURCES,
    SOURCES,
    standardize_mode,
)
from demjax.errors import ConfigError, check_choice
from demjax.local import make_optimizer
from demjax.models import CONV_IMPLS, INITS, MODELS

# Accepted values, each defined once by the module that implements them.
DATASETS = SOURCES
DISTANCES = cluster.METRICS
LINKAGES = cluster.LINKAGE_METHODS
TREE_MODES = cluster.TREE_MODES
FEATURES = cluster.FEATURE_KINDS
BACKENDS = cluster.LINKAGE_BACKENDS
WEIGHTINGS = ("agents", "samples")

_MISSING = object()


# --------------------------------------------------------------------------------------
# One field
# --------------------------------------------------------------------------------------


def field(config, name: str, default=_MISSING):
    """``config.<name>`` of a ConfigDict or any attribute object; ``default``
    when the field is absent.

    Raises:
      ConfigError: the field is absent and has no default.
    """
    try:
        return getattr(config, name)
    except (AttributeError, KeyError):
        if default is _MISSING:
            raise ConfigError(
                f"{name} is missing from the config; accepted: a config with the "
                "fields of configs/default.py (docs/config.md)"
            ) from None
        return default


def int_at_least(config, name: str, low: int) -> None:
    """An integer (not a bool) >= ``low``."""
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(
            f"{name}={value!r} is not valid; accepted: an integer >= {low}"
        )


def float_in(config, name: str, low: float, high: float = math.inf) -> None:
    """A finite number in ``[low, high]`` (``[low, inf)`` without ``high``)."""
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} is not valid; accepted: a number")
    if not (math.isfinite(value) and low <= value <= high):
        span = f"[{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ConfigError(
            f"{name}={value!r} is not valid; accepted: a finite number {span}"
        )


def number_in(config, name: str, low: float, high: float, low_open=False) -> None:
    """A finite number in ``[low, high]`` (``(low, ...`` with ``low_open``;
    ``..., inf)`` for ``high = inf``)."""
    v = config[name]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not (low < v if low_open else low <= v) or not v <= high:
        lo = "(" if low_open else "["
        hi = ")" if high == math.inf else "]"
        raise ConfigError(
            f"{name}={v!r} is not valid; accepted: a finite number in "
            f"{lo}{low}, {high}{hi}"
        )


def positive(config, name: str) -> None:
    """A finite number > 0."""
    value = config[name]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value < math.inf
    ):
        raise ConfigError(
            f"{name}={value!r} is not valid; accepted: a finite float > 0"
        )


def boolean(config, name: str) -> None:
    if not isinstance(config[name], bool):
        raise ConfigError(
            f"{name}={config[name]!r} is not valid; accepted: True or False"
        )


def widths(config, name: str, example: str) -> None:
    """A non-empty tuple (or list) of positive integers, e.g. ``hidden``."""
    value = config[name]
    if not (
        isinstance(value, (tuple, list))
        and len(value) >= 1
        and all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in value
        )
    ):
        raise ConfigError(
            f"{name}={value!r} is not valid; accepted: a non-empty tuple of positive "
            f"integers, e.g. {example}"
        )


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


def all_floats_finite(config) -> None:
    """Every float field, plug-in groups included, is finite (none is +-inf/NaN)."""
    for name, value in flat_fields(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"{name}={value!r} is not valid; accepted: a finite number"
            )


# --------------------------------------------------------------------------------------
# Groups of fields of the simulation's config
# --------------------------------------------------------------------------------------


def check_data(config) -> None:
    """The data fields: ``num_agents``, ``dataset``, ``partition``,
    ``partition_file``, the
    dataset / partition / model combinations and ``standardize*``. Works on any
    attribute object (``demjax.data.make_split`` takes one); an absent field has
    ``make_split``'s default.

    Raises:
      ConfigError: the first bad field.
    """
    dataset = field(config, "dataset")
    method = field(config, "partition", "pathological")
    num_agents = field(config, "num_agents")
    if (
        isinstance(num_agents, bool)
        or not isinstance(num_agents, int)
        or (num_agents < 2)
    ):
        raise ConfigError(
            f"num_agents={num_agents!r} is not valid; accepted: an integer >= 2"
        )
    check_choice("dataset", dataset, SOURCES)
    check_choice("partition", method, PARTITIONS)
    path = field(config, "partition_file", "")
    if not isinstance(path, str):
        raise ConfigError(
            f"partition_file={path!r} is not valid; accepted: a path string"
        )
    if method == "file" and not path:
        raise ConfigError(
            "partition_file='' is not valid with partition='file'; accepted: the "
            "path of a .json or .npz split file (docs/data.md)"
        )
    if method == "file" and not os.path.isfile(path):
        raise ConfigError(
            f"partition_file={path!r}: no such file; accepted: a .json or .npz "
            "split file (docs/data.md)"
        )
    if method != "file" and path:
        raise ConfigError(
            f"partition_file={path!r} is set but partition={method!r}; accepted: "
            "partition='file' with it, or partition_file=''"
        )
    if method == "natural" and dataset not in NATURAL_SOURCES:
        raise ConfigError(
            f"partition='natural' is not valid for dataset={dataset!r}; accepted: "
            "dataset='femnist' (one agent per writer), 'shakespeare' (per role), "
            "'cifar100' (TFF's Pachinko split, one agent per client)"
        )
    if dataset in LEAF_SOURCES and method not in ("natural", "file"):
        raise ConfigError(
            f"partition={method!r} is not valid for dataset={dataset!r}; accepted: "
            "natural (one agent per writer / role), file"
        )
    model = field(config, "model", None)
    if (dataset == "shakespeare") != (model == "char_rnn") and model is not None:
        raise ConfigError(
            f"model={model!r} is not valid for dataset={dataset!r}; accepted: "
            "model='char_rnn' with dataset='shakespeare' (character ids), the image "
            "models with the image data sets"
        )
    standardize = field(config, "standardize", True)
    mode = standardize_mode(standardize)  # names the field and its values
    if dataset == "shakespeare" and mode != "none":
        raise ConfigError(
            f"standardize={standardize!r} is not valid for dataset='shakespeare' "
            "(character ids); accepted: none"
        )
    for name in ("standardize_mean", "standardize_std"):
        value = field(config, name, 0.0 if name.endswith("mean") else 1.0)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ConfigError(
                f"{name}={value!r} is not valid; accepted: a finite float"
            )
    std = field(config, "standardize_std", 1.0)
    if mode == "given" and not std > 0:
        raise ConfigError(
            f"standardize_std={std!r} is not valid for standardize='given'; "
            "accepted: a finite float > 0"
        )


def check_network(config) -> None:
    """The ``network*`` fields (the adjacency file itself is read, and its shape
    checked, by ``demjax.network.from_config``).

    Raises:
      ConfigError: the first bad field.
    """
    check_choice("network", config.network, network.NETWORKS)
    check_choice("network_mode", config.network_mode, network.NETWORK_MODES)
    check_choice("network_impl", config.network_impl, network.NETWORK_IMPLS)
    network.parse_rates(config.network_rates)  # names network_rates
    p = config.network_edge_prob
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ConfigError(
            f"network_edge_prob={p!r} is not valid; accepted: a probability in (0, 1]"
        )
    if not isinstance(config.network_file, str):
        raise ConfigError(
            f"network_file={config.network_file!r} is not valid; accepted: a path "
            "to an .npy or .txt 0/1 adjacency matrix ('' unless network='file')"
        )
    if config.network == "file" and not config.network_file:
        raise ConfigError(
            "network_file='' is not valid for network='file'; accepted: a path to "
            "an .npy or .txt 0/1 [A, A] adjacency matrix"
        )


def check_plan(config) -> None:
    """``local_plan``, ``conv_impl``, ``matmul_impl`` and ``replica_plan``
    (``demjax.plan``).

    Raises:
      ConfigError: the first bad field.
    """
    plan.parse_plan(config.local_plan)  # names local_plan
    check_choice("conv_impl", config.conv_impl, plan.CONV_CHOICES)
    check_choice("matmul_impl", config.matmul_impl, plan.MATMUL_CHOICES)
    check_choice("replica_plan", config.replica_plan, plan.REPLICA_MODES)


def check_cluster(config) -> None:
    """The regrouping fields read by ``demjax.cluster.build_tree`` (the level
    structure a self-organizing algorithm needs is its own check).

    Raises:
      ConfigError: the first bad field.
    """
    check_choice("distance", config.distance, DISTANCES)
    check_choice("linkage", config.linkage, LINKAGES)
    check_choice("tree_mode", config.tree_mode, TREE_MODES)
    check_choice("cluster_features", config.cluster_features, FEATURES)
    check_choice("weighting", config.weighting, WEIGHTINGS)
    check_choice("linkage_backend", config.linkage_backend, BACKENDS)
    if config.linkage == "ward" and config.distance != "euclidean":
        raise ConfigError(
            "linkage='ward' needs distance='euclidean' "
            f"(got distance={config.distance!r})"
        )
    int_at_least(config, "num_levels", 0)
    int_at_least(config, "sketch_dim", 0)
    int_at_least(config, "distance_block", 0)
    int_at_least(config, "linkage_sample", 0)
    if config.linkage_sample == 1 or config.linkage_sample > config.num_agents:
        raise ConfigError(
            f"linkage_sample={config.linkage_sample!r} is not valid; accepted: 0 "
            f"(exact) or an integer in [2, num_agents={config.num_agents}]"
        )


def check_hparams(config) -> None:
    """Every algorithm's hyper-parameter group (``--config.<algorithm>.<field>``),
    checked against the algorithm's ``HParam`` declarations."""
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


def check_run(config) -> None:
    """Every field of a simulation config (``configs/default.py``), then the
    algorithm's own check (``Algorithm.check``: fields only it reads).

    Raises:
      ConfigError: the first bad field, e.g. ``"algorithm='fedsgd' is not valid;
        accepted: demlearn, demlearn_p, fedavg, fedprox, local, ..."``.
    """
    check_choice("algorithm", config.algorithm, ALGORITHMS)
    check_choice("aggregator", config.aggregator, robust.AGGREGATORS)
    check_hparams(config)
    check_network(config)
    check_data(config)
    check_choice("model", config.model, MODELS)
    check_choice("init", config.init, INITS)
    check_plan(config)
    make_optimizer(config.optimizer, config.lr)  # checks optimizer and lr
    check_cluster(config)
    int_at_least(config, "num_rounds", 1)
    int_at_least(config, "local_epochs", 1)
    int_at_least(config, "batch_size", 1)
    int_at_least(config, "labels_per_agent", 1)
    int_at_least(config, "tau", 0)
    int_at_least(config, "eval_samples", 0)
    int_at_least(config, "eval_batch", 0)
    int_at_least(config, "eval_every", 1)
    int_at_least(config, "local_buckets", 1)
    int_at_least(config, "num_devices", 0)
    int_at_least(config, "checkpoint_every", 0)
    int_at_least(config, "keep_checkpoints", 1)
    int_at_least(config, "tree_snapshot_every", 0)
    int_at_least(config, "samples_per_agent", 0)
    int_at_least(config, "seed", 0)
    int_at_least(config, "num_replicas", 1)
    int_at_least(config, "amplify_rounds", 0)
    bools = ("progress", "amplify", "download", "tensorboard", "replicate_split")
    for name in bools:
        boolean(config, name)
    if not isinstance(config.data_dir, str):
        raise ConfigError(
            f"data_dir={config.data_dir!r} is not valid; accepted: a path string "
            "('' = the dataset's default)"
        )
    widths(config, "hidden", "(100,)")
    positive(config, "amplify_factor")
    float_in(config, "alpha", 0.0, 1.0)
    float_in(config, "dropout", 0.0, 1.0)
    float_in(config, "stragglers", 0.0, 1.0)
    float_in(config, "participation", 0.0, 1.0)
    if config.participation <= 0 or config.dropout >= 1:
        raise ConfigError(
            f"participation={config.participation!r}, dropout={config.dropout!r} "
            "leave no agent training; accepted: participation in (0, 1], dropout "
            "in [0, 1)"
        )
    positive(config, "lr")
    positive(config, "dirichlet_alpha")
    float_in(config, "trim_fraction", 0.0, 0.49)
    float_in(config, "aggregator_noise", 0.0)
    float_in(config, "val_fraction", 0.0, 1.0)
    if config.val_fraction == 1.0:
        raise ConfigError(
            f"val_fraction={config.val_fraction!r} is not valid; accepted: a number "
            "in [0, 1)"
        )
    if config.mu is not None:
        float_in(config, "mu", 0.0)
    attacks.check_config(
        config, REGISTRY[config.algorithm].attackable, config.algorithm
    )
    all_floats_finite(config)  # fields without a check of their own
    algo = REGISTRY[config.algorithm]
    if algo.check is not None:
        algo.check(config)


# --------------------------------------------------------------------------------------
# The continual-learning scenario's config
# --------------------------------------------------------------------------------------


def check_proxy(config) -> None:
    """The proxy-data fields of a continual config: ``proxy``, ``proxy_noise``,
    ``proxy_image``, ``crop_min_scale``, ``proxy_jitter``, and with
    ``proxy="dataset"`` ``proxy_dataset`` (a data set other than the scenario's
    ``dataset``) and ``proxy_dataset_size``. ``demjax.continual.proxy.make_proxy``
    runs it too: it takes a config.

    Raises:
      ConfigError: the first bad field.
    """
    check_choice("proxy", config.proxy, continual.PROXIES)
    check_choice("proxy_noise", config.proxy_noise, continual.NOISES)
    check_choice("proxy_image", config.proxy_image, continual.PROXY_IMAGES)
    number_in(config, "crop_min_scale", 0.0, 1.0, low_open=True)
    number_in(config, "proxy_jitter", 0.0, 0.99)
    int_at_least(config, "proxy_dataset_size", 0)
    if config.proxy != "dataset":
        return
    check_choice("proxy_dataset", config.proxy_dataset, SOURCES)
    if continual.same_dataset(config.proxy_dataset, config.dataset):
        raise ConfigError(
            f"proxy_dataset={config.proxy_dataset!r} is the scenario's own data "
            f"set (dataset={config.dataset!r}); accepted: another data set, e.g. "
            "'digits' for fashion_mnist"
        )


def check_continual(config) -> None:
    """Every field of a continual-learning config (``demjax.continual.config``).

    Raises:
      ConfigError: the first bad field, naming it and the accepted values.
    """
    check_choice("scenario", config.scenario, ("continual",))
    check_choice("method", config.method, continual.METHODS)
    check_choice("dataset", config.dataset, continual.DATASETS)
    check_choice("class_order", config.class_order, continual.CLASS_ORDERS)
    check_choice("model", config.model, MODELS)
    check_choice("conv_impl", config.conv_impl, CONV_IMPLS)
    check_choice("init", config.init, INITS)
    check_choice("agent_head", config.agent_head, continual.AGENT_HEADS)
    check_proxy(config)
    check_choice("student_init", config.student_init, continual.STUDENT_INITS)
    check_choice("projector_init", config.projector_init, continual.PROJECTOR_INITS)
    check_choice("student_logits", config.student_logits, continual.STUDENT_LOGITS)
    check_choice(
        "average_weighting", config.average_weighting, continual.AVG_WEIGHTINGS
    )
    make_optimizer(config.optimizer, config.lr)
    for name in ("num_tasks", "classes_per_task", "agents_per_task", "test_per_class"):
        int_at_least(config, name, 1)
    for name in ("local_epochs", "batch_size", "consolidation_steps", "proxy_batch"):
        int_at_least(config, name, 1)
    for name in ("samples_per_agent", "seed"):
        int_at_least(config, name, 0)
    number_in(config, "alpha", 0.0, math.inf)
    number_in(config, "consolidation_lr", 0.0, math.inf, low_open=True)
    for name in ("standardize", "download", "forward_transfer", "progress"):
        boolean(config, name)
    boolean(config, "tensorboard")
    widths(config, "hidden", "(128,)")
