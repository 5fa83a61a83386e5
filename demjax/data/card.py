"""The dataset card: ``data.json`` beside ``config.json`` in every workdir.

It says which data a run used, so two runs can be checked to use the same:

- ``dataset``, ``partition``, ``num_agents``, ``num_classes``, ``input_shape``;
- ``samples_per_agent``: ``train`` / ``test`` ``{min, median, max, total}``;
- ``classes_per_agent``: distinct labels of each agent's train and test samples,
  ``{min, median, max}``;
- ``label_histogram``: samples per class over all agents' ``train`` and
  ``test`` samples, with ``min_class`` / ``max_class`` counts;
- ``agents``: per agent ``name``, ``n_train``, ``n_test``, ``classes``;
- ``sources``: the files read, each ``{path, bytes, sha256}`` (or the library
  that holds the data, e.g. scikit-learn's digits or tfds), and the split file;
- ``standardize``: the mode and the statistics used;
- ``partition_sha256``: SHA-256 of the partition as trained on (each agent's
  real train and test rows and labels, float32 / int32, in agent order): equal
  digests mean the same per-agent data, to the sample.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

CARD_FILE = "data.json"


def file_entry(path: str) -> dict:
    """``{path, bytes, sha256}`` of a file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {
        "path": os.path.abspath(path),
        "bytes": os.path.getsize(path),
        "sha256": h.hexdigest(),
    }


def partition_digest(part) -> str:
    """SHA-256 of every agent's real train / test rows and labels, in order."""
    h = hashlib.sha256()
    n_train, n_test = np.asarray(part.n_train), np.asarray(part.n_test)
    for a in range(n_train.shape[0]):
        for x, y, n in (
            (part.x_train, part.y_train, n_train[a]),
            (part.x_test, part.y_test, n_test[a]),
        ):
            h.update(np.int64(n).tobytes())
            h.update(np.ascontiguousarray(np.asarray(x[a, :n], np.float32)).tobytes())
            h.update(np.ascontiguousarray(np.asarray(y[a, :n], np.int32)).tobytes())
    return h.hexdigest()


def _summary(values) -> dict:
    v = np.asarray(values)
    return {
        "min": int(v.min()),
        "median": float(np.median(v)),
        "max": int(v.max()),
        "total": int(v.sum()),
    }


def data_card(split) -> dict:
    """The dataset card of a ``demjax.data.Split`` (a JSON-ready dict)."""
    part = split.partition
    c = int(part.num_classes)
    n_train, n_test = np.asarray(part.n_train), np.asarray(part.n_test)
    agents, classes = [], []
    hist = {"train": np.zeros(c, np.int64), "test": np.zeros(c, np.int64)}
    for a, name in enumerate(split.names):
        tr = np.asarray(part.y_train[a, : n_train[a]])
        te = np.asarray(part.y_test[a, : n_test[a]])
        hist["train"] += np.bincount(tr, minlength=c)
        hist["test"] += np.bincount(te, minlength=c)
        k = int(np.unique(np.concatenate([tr, te])).size)
        classes.append(k)
        agents.append(
            {
                "name": name,
                "n_train": int(n_train[a]),
                "n_test": int(n_test[a]),
                "classes": k,
            }  # fmt: skip
        )
    info = split.info
    card = {
        "dataset": info.get("dataset"),
        "partition": info.get("partition"),
        "num_agents": part.num_agents,
        "num_classes": c,
        "input_shape": list(part.input_shape),
        "samples_per_agent": {"train": _summary(n_train), "test": _summary(n_test)},
        "classes_per_agent": {
            k: v for k, v in _summary(classes).items() if k != "total"
        },
        "label_histogram": {
            kind: {
                "counts": h.tolist(),
                "min_class": int(h.min()),
                "max_class": int(h.max()),
            }  # fmt: skip
            for kind, h in hist.items()
        },
        "standardize": info.get("standardize"),
        "sources": info.get("sources", []),
        "partition_sha256": partition_digest(part),
        "agents": agents,
    }
    return card


def write_card(workdir: str, split) -> str:
    """Writes ``<workdir>/data.json`` (atomically) and returns its path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CARD_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data_card(split), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path
