"""Exporting a run's split to a split file (``scripts/export_split.py``).

``export_split`` rebuilds the data of a run (its ``config.json``, checked against
its dataset card ``data.json``) or of a config, and writes the agents' sample
indices in the split-file format of ``demjax.data.split`` (docs/data.md).
"""

from __future__ import annotations

import json
import os

import ml_collections

from demjax.data import card, make_split
from demjax.data.split import Split, write_split_file
from demjax.default_config import get_config
from demjax.errors import ConfigError

# Config fields that decide a run's data (the rest of config.json is not needed).
DATA_FIELDS = (
    "dataset", "data_dir", "download", "partition", "partition_file", "seed",
    "labels_per_agent", "dirichlet_alpha", "samples_per_agent", "standardize",
    "standardize_mean", "standardize_std", "num_agents",
)  # fmt: skip


def config_from_workdir(workdir: str):
    """The data fields of a run's ``config.json`` as a ``ConfigDict``.

    Raises:
      ConfigError: ``config.json`` missing or not a JSON object (names it).
    """
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"workdir={workdir!r}: cannot read {path} ({type(e).__name__}); "
            "accepted: the workdir of a run"
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError(f"workdir={workdir!r}: {path} is not a JSON object")
    base = get_config()
    c = ml_collections.ConfigDict({k: base[k] for k in DATA_FIELDS})
    with c.ignore_type():
        for k in DATA_FIELDS:
            if k in saved:
                c[k] = saved[k]
    return c


def export_split(out: str, config=None, workdir: str | None = None) -> Split:
    """Writes the split of a run (``workdir``) or of a ``config`` to ``out``.

    The split is rebuilt with ``demjax.data.make_split``; for a ``workdir`` it
    is checked against the run's dataset card (``data.json``,
    ``partition_sha256``). The file gives pool indices (``index="pool"``) and the
    agent names.

    Args:
      out: ``.json`` or ``.npz`` path.
      config: a run config (exclusive with ``workdir``).
      workdir: a run's workdir (its ``config.json`` and ``data.json``).

    Returns:
      The ``Split`` written.

    Raises:
      ConfigError: neither or both of ``config`` / ``workdir``; a
        ``partition='arrays'`` run (its data are not in files) or a ``natural``
        one (the data set's own split, rerun by its config); data that differ
        from the run's card; the errors of ``make_split``.
    """
    if (config is None) == (workdir is None):
        raise ConfigError("give one of workdir (a run's split) or config")
    if workdir is not None:
        config = config_from_workdir(workdir)
    if config.partition == "arrays":
        raise ConfigError(
            "partition='arrays' runs take their data from Python; accepted: save "
            "the arrays given to demjax.data.partition_from_arrays"
        )
    if config.partition == "natural":
        raise ConfigError(
            "partition='natural' splits are the data set's own (writers, roles, "
            "clients): rerun them with the same dataset, data_dir, num_agents and "
            "seed; accepted: pathological, dirichlet, iid, file"
        )
    split = make_split(config)
    if workdir is not None:
        card_path = os.path.join(workdir, card.CARD_FILE)
        try:
            with open(card_path) as f:
                want = json.load(f).get("partition_sha256")
        except (OSError, ValueError, AttributeError):
            want = None
        got = card.partition_digest(split.partition)
        if want and want != got:
            raise ConfigError(
                f"workdir={workdir!r}: the data rebuilt from its config.json differ "
                f"from the run's ({card_path}: partition_sha256 {want[:12]}..., "
                f"rebuilt {got[:12]}...); did the data files change?"
            )
    write_split_file(
        out,
        split.names,
        [tr for tr, _ in split.indices],
        [te for _, te in split.indices],
        index="pool",
        dataset=config.dataset,
    )
    return split
