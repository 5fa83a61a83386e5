"""Data: sources (whole data sets) and partitions (agents' private splits).

``make_partition(config)`` is the one-call entry point: it loads
``config.dataset`` with ``load_source`` and deals it out with ``partition``.
``eval_subsample`` picks a fixed subset of the pooled test set for cheap
periodic evaluation.
"""

from __future__ import annotations

import numpy as np

from demjax.data.partition import PARTITIONS, partition
from demjax.data.sources import SOURCES, load_source, read_idx
from demjax.errors import ConfigError, check_choice
from demjax.types import Partition

__all__ = [
    "PARTITIONS",
    "SOURCES",
    "eval_subsample",
    "load_source",
    "make_partition",
    "partition",
    "read_idx",
]

_MISSING = object()


def _field(config, name: str, default=_MISSING):
    try:
        return getattr(config, name)
    except (AttributeError, KeyError):
        if default is _MISSING:
            raise ConfigError(
                f"{name} is missing from the config; accepted: see "
                "demjax.data.make_partition"
            ) from None
        return default


def make_partition(config) -> Partition:
    """Loads ``config.dataset`` and partitions it among ``config.num_agents``.

    Fields read (an ``ml_collections.ConfigDict`` or any attribute object):
    ``dataset`` (one of ``SOURCES``), ``num_agents`` (required); ``data_dir``
    (None or "" for the source's default), ``partition`` (one of
    ``PARTITIONS``, default ``pathological``), ``seed`` (0),
    ``labels_per_agent`` (2), ``dirichlet_alpha`` (0.5), ``samples_per_agent``
    (0 or None: no limit), ``standardize`` (True), ``download`` (True; tfds
    sources only). The partition method is checked before any data is loaded.

    Returns:
      The ``Partition`` (numpy arrays; see ``demjax.data.partition``).

    Raises:
      ConfigError: a missing or invalid field (the message names it).
      DataNotFoundError: the data set is not available offline.
    """
    dataset = _field(config, "dataset")
    method = _field(config, "partition", "pathological")
    check_choice("dataset", dataset, SOURCES)
    check_choice("partition", method, PARTITIONS)
    samples_per_agent = _field(config, "samples_per_agent", None) or None
    x, y, num_classes = load_source(
        dataset,
        data_dir=_field(config, "data_dir", None) or None,
        standardize=bool(_field(config, "standardize", True)),
        download=bool(_field(config, "download", True)),
    )
    return partition(
        x,
        y,
        num_classes,
        num_agents=_field(config, "num_agents"),
        method=method,
        seed=int(_field(config, "seed", 0)),
        labels_per_agent=_field(config, "labels_per_agent", 2),
        dirichlet_alpha=float(_field(config, "dirichlet_alpha", 0.5)),
        samples_per_agent=samples_per_agent,
        dataset_name=dataset,
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
