"""Data: sources (whole data sets) and partitions (agents' private splits).

``make_split(config)`` is the one-call entry point: it loads
``config.dataset`` (``load_pool``), standardizes it (``standardize_pool``) and
deals it out (``partition_indices``), or reads a split file
(``demjax.data.split``) or takes ready arrays (``partition_from_arrays``); its
``Split`` carries the stacked ``Partition``, the agent names and the provenance
written to ``data.json`` (``demjax.data.card``). ``make_partition(config)`` is
its ``Partition``.
``eval_subsample`` picks a fixed subset of the pooled test set for cheap
periodic evaluation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from demjax.data import card, leaf, validation
from demjax.data.card import data_card, write_card
from demjax.data.partition import (
    CONFIG_PARTITIONS,
    partition,
    partition_indices,
    stack_partition,
)
from demjax.data.partition import PARTITIONS as POOL_PARTITIONS
from demjax.data.sources import (
    LEAF_SOURCES,
    NATURAL_SOURCES,
    SOURCES,
    STANDARDIZE,
    TFDS_NAMES,
    Pool,
    load_pool,
    load_source,
    read_idx,
    standardize_mode,
    standardize_pool,
)
from demjax.data.split import (
    Split,
    SplitFile,
    arrays_info,
    partition_from_arrays,
    pool_indices,
    read_split_file,
    write_split_file,
)
from demjax.errors import ConfigError
from demjax.types import Partition

PARTITIONS = CONFIG_PARTITIONS
"""Accepted values of ``config.partition``."""

__all__ = [
    "LEAF_SOURCES",
    "NATURAL_SOURCES",
    "PARTITIONS",
    "POOL_PARTITIONS",
    "SOURCES",
    "STANDARDIZE",
    "Pool",
    "Split",
    "SplitFile",
    "as_split",
    "data_card",
    "eval_subsample",
    "load_pool",
    "load_source",
    "make_partition",
    "make_split",
    "partition",
    "partition_from_arrays",
    "partition_indices",
    "read_idx",
    "read_split_file",
    "stack_partition",
    "standardize_pool",
    "write_card",
    "write_split_file",
]


def _field(config, name: str, *default):
    """``config.<name>`` of a ConfigDict or any attribute object, ``default`` if
    absent (``demjax.config_checks.field``)."""
    from demjax.config_checks import field  # imported here: no import cycle

    return field(config, name, *default)


def make_partition(config) -> Partition:
    """Loads ``config.dataset`` and partitions it: ``make_split(config).partition``.

    Returns:
      The ``Partition`` (numpy arrays; see ``demjax.data.partition``).

    Raises:
      As ``make_split``.
    """
    return make_split(config).partition


def make_split(config, partition=None) -> Split:
    """The agents' data of a run, with names and provenance.

    Fields read (an ``ml_collections.ConfigDict`` or any attribute object):
    ``dataset`` (one of ``SOURCES``), ``num_agents`` (required); ``data_dir``
    (None or "" for the source's default), ``partition`` (one of
    ``PARTITIONS``, default ``pathological``), ``partition_file`` (``file``),
    ``seed`` (0), ``labels_per_agent`` (2), ``dirichlet_alpha`` (0.5),
    ``samples_per_agent`` (0 or None: no limit), ``standardize`` (True; see
    ``standardize_pool``), ``standardize_mean`` / ``standardize_std``
    (``given``), ``download`` (True; tfds sources only).

    Partitions: ``pathological`` / ``dirichlet`` / ``iid`` deal the pool out
    (``partition_indices``); ``natural`` gives one agent per writer (FEMNIST;
    ``num_agents`` writers sampled with ``seed``); ``file`` reads
    ``partition_file`` (``demjax.data.split``); ``arrays`` takes ``partition``.

    Args:
      config: the run config.
      partition: for ``partition="arrays"`` only: a ``Split`` (from
        ``partition_from_arrays``) or a ``Partition``.

    Returns:
      A ``Split``; its ``partition`` holds numpy arrays of A = ``num_agents``.

    Raises:
      ConfigError: a missing or invalid field (the message names it), or
        ``num_agents`` different from the split's number of agents.
      DataFileError: a data or split file is unreadable or malformed.
      DataNotFoundError: the data set is not available offline.
    """
    from demjax.config_checks import check_data

    check_data(config)  # the config's data fields (also run by config.validate)
    dataset = _field(config, "dataset")
    method = _field(config, "partition", "pathological")
    num_agents = _field(config, "num_agents")
    if method == "arrays" or partition is not None:
        if partition is None:
            raise ConfigError(
                "partition='arrays' needs a ready partition; accepted: "
                "demjax.train.run(config, workdir, partition="
                "demjax.data.partition_from_arrays(...))"
            )
        if method != "arrays":
            raise ConfigError(
                f"partition={method!r} but a ready partition was passed; accepted: "
                "partition='arrays' with it"
            )
        split = as_split(partition)
        _check_count(num_agents, split.num_agents, "the given partition")
        return _validation(split, config)
    seed = int(_field(config, "seed", 0))
    data_dir = _field(config, "data_dir", None) or None
    if method == "natural":
        if dataset == "cifar100" or (
            dataset == "femnist" and leaf.tff_h5_files(data_dir, dataset)
        ):
            pool = leaf.load_tff_h5(data_dir, dataset, num_agents, seed)
        elif dataset == "femnist":
            pool = leaf.load_femnist(data_dir, num_writers=num_agents, seed=seed)
        else:
            pool = leaf.load_shakespeare(data_dir, num_writers=num_agents, seed=seed)
    else:
        pool = load_pool(
            dataset, data_dir=data_dir, download=bool(_field(config, "download", True))
        )
    x, stats = standardize_pool(
        pool.x,
        standardize_mode(_field(config, "standardize", True)),
        _field(config, "standardize_mean", None),
        _field(config, "standardize_std", None),
    )
    sources = [card.file_entry(f) for f in pool.files] or [pool_origin(dataset)]
    samples_per_agent = _field(config, "samples_per_agent", None) or None
    if method == "file":
        path = _field(config, "partition_file")
        sf = read_split_file(path)
        if sf.dataset is not None and sf.dataset != dataset:
            raise ConfigError(
                f"partition_file={path!r} is a split of dataset={sf.dataset!r}, not "
                f"dataset={dataset!r}; accepted: --config.dataset={sf.dataset}"
            )
        _check_count(num_agents, len(sf.names), f"partition_file={path!r}")
        splits = pool_indices(sf, pool.num_train, pool.y.shape[0], dataset)
        names = sf.names
        sources.append(card.file_entry(path))
    elif method == "natural":
        splits = leaf.natural_splits(pool, seed, cap=samples_per_agent)
        names = pool.group_names
    else:
        splits = partition_indices(
            x,
            pool.y,
            pool.num_classes,
            num_agents=num_agents,
            method=method,
            seed=seed,
            labels_per_agent=_field(config, "labels_per_agent", 2),
            dirichlet_alpha=float(_field(config, "dirichlet_alpha", 0.5)),
            samples_per_agent=samples_per_agent,
            dataset_name=dataset,
        )
        names = tuple(f"agent_{a}" for a in range(len(splits)))
    val_fraction = float(_field(config, "val_fraction", 0.0))
    splits = validation.hold_out_indices(splits, val_fraction, seed)
    part = stack_partition(x, pool.y, splits, pool.num_classes)
    if stats["mode"] == "per_pixel":  # [*F] arrays: their range in the card
        stats = {
            "mode": "per_pixel",
            **{
                k: {"min": float(np.min(stats[k])), "max": float(np.max(stats[k]))}
                for k in ("mean", "std")
            },  # fmt: skip
        }
    return Split(
        partition=part,
        names=tuple(names),
        indices=tuple(splits),
        num_train=int(pool.num_train),
        info={
            "dataset": dataset,
            "partition": method,
            "sources": sources,
            "standardize": stats,
            **_validation_info(val_fraction, seed),
        },  # fmt: skip
    )


def _validation_info(fraction: float, seed: int) -> dict:
    if fraction == 0.0:
        return {}
    return {
        "validation": {
            "val_fraction": fraction,
            "seed": seed,
            "note": "test pairs are held-out training rows; the test split is unused",
        }
    }


def _validation(split: Split, config) -> Split:
    """``split`` with held-out training rows as its evaluation rows
    (``config.val_fraction``; ``demjax.data.validation``)."""
    fraction = float(_field(config, "val_fraction", 0.0))
    if fraction == 0.0:
        return split
    seed = int(_field(config, "seed", 0))
    indices = split.indices
    if indices is not None:
        indices = tuple(validation.hold_out_indices(indices, fraction, seed))
    return dataclasses.replace(
        split,
        partition=validation.hold_out(split.partition, fraction, seed),
        indices=indices,
        info={**split.info, **_validation_info(fraction, seed)},
    )


def pool_origin(dataset: str) -> dict:
    """Where a data set without files of its own comes from (dataset card)."""
    if dataset == "digits":
        import sklearn

        return {"library": f"scikit-learn {sklearn.__version__}",
                "loader": "sklearn.datasets.load_digits"}  # fmt: skip
    return {"library": "tensorflow-datasets", "name": TFDS_NAMES.get(dataset, dataset)}


def as_split(partition) -> Split:
    """A ``Split`` from a ``Split`` or a bare ``Partition`` (agents named
    ``agent_0`` ...).

    Raises:
      ConfigError: anything else.
    """
    if isinstance(partition, Split):
        return partition
    if isinstance(partition, Partition):
        part = jax_free(partition)
        return Split(
            partition=part,
            names=tuple(f"agent_{a}" for a in range(part.num_agents)),
            info=arrays_info(),
        )
    raise ConfigError(
        f"partition={type(partition).__name__} is not valid; accepted: a "
        "demjax.data.Split (partition_from_arrays) or a demjax.types.Partition"
    )


def jax_free(part: Partition) -> Partition:
    """The partition with numpy arrays (device arrays copied to the host)."""
    import jax

    return jax.tree.map(np.asarray, part)


def _check_count(num_agents, actual: int, what: str) -> None:
    if num_agents != actual:
        raise ConfigError(
            f"num_agents={num_agents!r} does not match {what}, which has {actual} "
            f"agents; accepted: --config.num_agents={actual}"
        )


def eval_subsample(part: Partition, eval_samples: int, seed: int) -> np.ndarray:
    """A fixed, seeded subset of the pooled test set.

    Args:
      part: the partition; its pooled test set has M samples.
      eval_samples: S, how many to keep; ``<= 0`` or ``>= M`` keeps all.
      seed: seed of ``np.random.default_rng``.

    Returns:
      int32 ``[S]`` sorted, distinct indices into ``part.x_all`` / ``y_all`` /
      ``owner_all`` (``arange(M)`` when keeping all).
    """
    m = int(np.shape(part.y_all)[0])
    if eval_samples <= 0 or eval_samples >= m:
        return np.arange(m, dtype=np.int32)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(m, int(eval_samples), replace=False)).astype(np.int32)
