"""Bring-your-own splits: split files, ready arrays, and the ``Split`` record.

A **split file** gives, per agent, a name and the indices of its train and test
samples into the data set of ``config.dataset`` (run with
``--config.partition=file --config.partition_file=PATH``). Two encodings:

JSON (``.json``)::

    {"format": "demjax-split", "version": 1,
     "dataset": "fashion_mnist",          # optional; must match config.dataset
     "index": "files",                    # "files" (default) or "pool"
     "agents": [{"name": "alice", "train": [0, 17, 4], "test": [3, 9]},
                {"name": "bob",   "train": [5, 6],     "test": [0]}]}

NPZ (``.npz``, ``numpy.savez``; no pickles): ``names`` str ``[A]``,
``train`` int ``[sum of n_train]`` and ``train_counts`` int ``[A]`` (agent a's
train indices are the a-th run of ``train_counts[a]`` entries), ``test`` and
``test_counts`` likewise, optional 0-d str arrays ``index`` and ``dataset``.

``index="files"``: train indices point into the data set's train split (for
Fashion-MNIST the ``train-*-idx*-ubyte`` files, 0..59999) and test indices into
its test split (``t10k-*``, 0..9999); a data set with one split only (digits,
1797 samples) has both index that split. ``index="pool"``: both point into the
pool, the train split followed by the test split (Fashion-MNIST 0..69999), so an
agent's train samples may come from either split; ``scripts/export_split.py``
writes this form, since the built-in partitioners deal out the pool. Every agent
needs a unique non-empty name and at least one train and one test index; indices
may repeat and train and test may overlap (the file is used as written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
import zlib

import numpy as np

from demjax.data.files import read_bytes
from demjax.data.partition import stack_partition
from demjax.errors import ConfigError, DataFileError
from demjax.types import Partition

SPLIT_FORMAT = "demjax-split"
SPLIT_VERSION = 1
INDEX_MODES = ("files", "pool")
"""Accepted values of a split file's ``index``."""


@dataclasses.dataclass(frozen=True)
class Split:
    """A partition with the names and provenance of its agents.

    Attributes:
      partition: the stacked ``Partition`` (numpy arrays, A agents).
      names: the A agent names, in agent order.
      indices: A pairs ``(train_idx, test_idx)`` of int64 pool indices, or None
        when the data came as arrays (``partition_from_arrays`` of lists).
      num_train: pool rows ``[0, num_train)`` are the data set's train split.
      info: provenance for the dataset card (``dataset``, ``partition``,
        ``sources``, ``standardize``).
    """

    partition: Partition
    names: tuple[str, ...]
    indices: tuple | None = None
    num_train: int | None = None
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def num_agents(self) -> int:
        return self.partition.num_agents


@dataclasses.dataclass(frozen=True)
class SplitFile:
    """A split file as read: names, per-agent int64 index arrays, metadata."""

    path: str
    names: tuple[str, ...]
    train: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]
    index: str = "files"
    dataset: str | None = None


def _err(path, msg: str) -> DataFileError:
    return DataFileError(f"partition_file={str(path)!r}: {msg}")


def read_split_file(path: str | os.PathLike) -> SplitFile:
    """Reads and checks the structure of a JSON or NPZ split file.

    Index ranges depend on the data set and are checked by ``split_from_file``.

    Raises:
      DataFileError: (a ``ConfigError``) missing or unreadable file, unknown
        extension, corrupt JSON / NPZ, wrong structure, fewer than 2 agents, an
        empty or duplicate agent name, an agent without train or test indices,
        non-integer or negative indices; the one-line message names the file
        (field ``partition_file``) and the agent.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _err(
            path, "no such file; accepted: a .json or .npz split file (docs/data.md)"
        )
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        names, train, test, index, dataset = _read_json(path)
    elif ext == ".npz":
        names, train, test, index, dataset = _read_npz(path)
    else:
        raise _err(path, f"unknown extension {ext!r}; accepted: .json, .npz")
    if index not in INDEX_MODES:
        raise _err(path, f"index={index!r} is not valid; accepted: files, pool")
    if dataset is not None and not isinstance(dataset, str):
        raise _err(path, f"dataset={dataset!r} is not valid; accepted: a string")
    if len(names) < 2:
        raise _err(path, f"{len(names)} agents; accepted: at least 2")
    seen = set()
    for a, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise _err(
                path, f"agent {a} has name {name!r}; accepted: a non-empty string"
            )
        if name in seen:
            raise _err(path, f"duplicate agent name {name!r}; accepted: unique names")
        seen.add(name)
    checked = {"train": [], "test": []}
    for kind, lists in (("train", train), ("test", test)):
        for name, idx in zip(names, lists, strict=True):
            checked[kind].append(_int_indices(path, name, kind, idx))
    return SplitFile(
        path=path,
        names=tuple(names),
        train=tuple(checked["train"]),
        test=tuple(checked["test"]),
        index=index,
        dataset=dataset,
    )


def _int_indices(path, name, kind, idx) -> np.ndarray:
    if isinstance(idx, np.ndarray):
        ok = idx.ndim == 1 and (idx.dtype.kind in "iu" or idx.size == 0)
        arr = idx
    else:
        ok = isinstance(idx, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in idx
        )
        arr = np.asarray(idx, dtype=object) if ok else None
    if not ok:
        raise _err(
            path, f"agent {name!r} {kind} is not a list of integers; accepted: "
            "sample indices"
        )  # fmt: skip
    if len(arr) == 0:
        raise _err(
            path, f"agent {name!r} has no {kind} samples; accepted: at least 1 "
            "train and 1 test index per agent"
        )  # fmt: skip
    if min(int(i) for i in arr) < 0:
        raise _err(path, f"agent {name!r} has a negative {kind} index")
    try:
        return np.asarray([int(i) for i in arr], dtype=np.int64)
    except OverflowError:
        raise _err(path, f"agent {name!r} has a {kind} index beyond int64") from None


def _read_json(path):
    raw = read_bytes(path)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _err(path, f"not valid JSON ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("agents"), list):
        raise _err(
            path, "not a split file; accepted: a JSON object with an 'agents' list "
            "(docs/data.md)"
        )  # fmt: skip
    fmt = doc.get("format", SPLIT_FORMAT)
    if fmt != SPLIT_FORMAT or doc.get("version", SPLIT_VERSION) != SPLIT_VERSION:
        raise _err(
            path, f"format={fmt!r} version={doc.get('version')!r}; accepted: "
            f"{SPLIT_FORMAT!r} version {SPLIT_VERSION}"
        )  # fmt: skip
    names, train, test = [], [], []
    for a, agent in enumerate(doc["agents"]):
        if not isinstance(agent, dict) or not {"train", "test"} <= set(agent):
            raise _err(
                path, f"agent {a} is not an object with 'train' and 'test' lists"
            )
        names.append(agent.get("name", f"agent_{a}"))
        train.append(agent["train"])
        test.append(agent["test"])
    return names, train, test, doc.get("index", "files"), doc.get("dataset")


def _read_npz(path):
    def scalar(z, key):
        if key not in z.files:
            return None
        v = z[key]
        if v.ndim != 0 or v.dtype.kind != "U":
            raise _err(path, f"{key} is not a 0-d string array")
        return str(v)

    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"names", "train", "train_counts", "test", "test_counts"}
            missing -= set(z.files)
            if missing:
                raise _err(
                    path, f"missing arrays {sorted(missing)}; accepted: names, "
                    "train, train_counts, test, test_counts (docs/data.md)"
                )  # fmt: skip
            arrays = {k: z[k] for k in z.files}
            index = scalar(z, "index") or "files"
            dataset = scalar(z, "dataset")
    except DataFileError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile,
            zlib.error, NotImplementedError, RuntimeError) as e:  # fmt: skip
        raise _err(path, f"not a valid .npz file ({type(e).__name__}: "
                   f"{' '.join(str(e).split())[:160]})") from None  # fmt: skip
    names = arrays["names"]
    if names.ndim != 1 or names.dtype.kind != "U":
        raise _err(path, "names is not a 1-d string array")
    out = []
    for kind in ("train", "test"):
        flat, counts = arrays[kind], arrays[f"{kind}_counts"]
        if flat.ndim != 1 or (flat.size and flat.dtype.kind not in "iu"):
            raise _err(path, f"{kind} is not a 1-d integer array")
        if (
            counts.shape != names.shape
            or (counts.size and counts.dtype.kind not in "iu")
            or (counts.size and counts.min() < 0)
            or int(counts.sum()) != flat.shape[0]
        ):
            raise _err(
                path, f"{kind}_counts must be [A] non-negative integers summing to "
                f"len({kind})"
            )  # fmt: skip
        out.append(np.split(flat.astype(np.int64), np.cumsum(counts)[:-1]))
    return [str(n) for n in names], out[0], out[1], index, dataset


def write_split_file(
    path: str | os.PathLike,
    names,
    train,
    test,
    index: str = "pool",
    dataset: str | None = None,
) -> None:
    """Writes a split file (JSON or NPZ by the extension of ``path``).

    Args:
      path: ``.json`` or ``.npz``.
      names: A agent names.
      train, test: A int index arrays each.
      index: ``"files"`` or ``"pool"`` (see the module docstring).
      dataset: the data set the indices point into.

    Raises:
      ConfigError: an unknown extension or ``index``.
    """
    path = os.fspath(path)
    if index not in INDEX_MODES:
        raise ConfigError(f"index={index!r} is not valid; accepted: files, pool")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        doc = {"format": SPLIT_FORMAT, "version": SPLIT_VERSION}
        if dataset:
            doc["dataset"] = dataset
        doc["index"] = index
        doc["agents"] = [
            {
                "name": str(n),
                "train": [int(i) for i in tr],
                "test": [int(i) for i in te],
            }
            for n, tr, te in zip(names, train, test, strict=True)
        ]
        with open(path, "w") as f:
            json.dump(doc, f)
            f.write("\n")
    elif ext == ".npz":
        extra = {"dataset": np.array(dataset)} if dataset else {}
        with open(path, "wb") as f:
            np.savez(
                f,
                names=np.array([str(n) for n in names]),
                train=np.concatenate([np.asarray(t, np.int64) for t in train]),
                train_counts=np.array([len(t) for t in train], np.int64),
                test=np.concatenate([np.asarray(t, np.int64) for t in test]),
                test_counts=np.array([len(t) for t in test], np.int64),
                index=np.array(index),
                **extra,
            )
    else:
        raise ConfigError(f"{path}: unknown extension {ext!r}; accepted: .json, .npz")


def pool_indices(sf: SplitFile, num_train: int, pool_size: int, dataset: str):
    """A file's indices as pool indices, range-checked.

    Args:
      sf: the split file.
      num_train: rows of the pool from the train split (``pool_size`` when the
        data set has one split).
      pool_size: N, rows of the pool.
      dataset: the data set's name (for the messages).

    Returns:
      A pairs ``(train_idx, test_idx)`` of int64 pool indices.

    Raises:
      DataFileError: an index out of range (names the agent and the range).
    """
    one_split = num_train == pool_size
    if sf.index == "pool":
        ranges = {"train": (0, pool_size), "test": (0, pool_size)}
        where = {"train": f"the pool of {dataset}", "test": f"the pool of {dataset}"}
    else:
        test_n = pool_size if one_split else pool_size - num_train
        ranges = {"train": (0, num_train), "test": (0 if one_split else num_train,
                                                     test_n)}  # fmt: skip
        where = {
            "train": f"the train split of {dataset}",
            "test": f"the {'only' if one_split else 'test'} split of {dataset}",
        }
    out = []
    for name, tr, te in zip(sf.names, sf.train, sf.test, strict=True):
        pair = []
        for kind, idx in (("train", tr), ("test", te)):
            offset, n = ranges[kind]
            bad = idx[idx >= n]
            if bad.size:
                raise _err(
                    sf.path, f"agent {name!r} {kind} index {int(bad[0])} is out of "
                    f"range; accepted: 0..{n - 1} ({where[kind]}, index={sf.index!r})"
                )  # fmt: skip
            pair.append(idx + offset)
        out.append(tuple(pair))
    return out


def arrays_info() -> dict:
    """The dataset card's ``info`` of data given as arrays (no source files)."""
    return {
        "dataset": "arrays",
        "partition": "arrays",
        "sources": [],
        "standardize": {"mode": "as given"},
    }


def partition_from_arrays(
    x_train,
    y_train,
    x_test,
    y_test,
    *,
    train_idx=None,
    test_idx=None,
    num_classes: int | None = None,
    names=None,
) -> Split:
    """A ready ``Split`` from your own arrays (for ``config.partition="arrays"``).

    Two forms:

    - lists: ``x_train`` a sequence of A float arrays ``[n_train_a, *F]``,
      ``y_train`` A int arrays ``[n_train_a]``, ``x_test`` / ``y_test`` the same
      with ``n_test_a`` rows (``train_idx`` / ``test_idx`` None);
    - one array plus indices: ``x_train`` float ``[N, *F]``, ``y_train`` int
      ``[N]``, ``x_test`` float ``[M, *F]``, ``y_test`` int ``[M]``, and
      ``train_idx`` / ``test_idx`` sequences of A int index arrays into them.

    The inputs are used as given (cast to float32 / int32; ``config.standardize``
    is not applied). Pass the result to
    ``demjax.train.run(config, workdir, partition=...)`` with
    ``config.partition="arrays"`` and ``config.num_agents=A``.

    Args:
      x_train, y_train, x_test, y_test: as above.
      train_idx, test_idx: the index form's per-agent indices (both or neither).
      num_classes: C; default ``max label + 1``.
      names: A agent names (default ``agent_0`` ...).

    Returns:
      A ``Split`` whose ``partition`` has ``x_train`` float32
      ``[A, N_train_max, *F]`` and the other ``Partition`` fields.

    Raises:
      ConfigError: mismatched shapes, fewer than 2 agents, an agent without
        train or test samples, an index out of range, a label outside
        ``0..num_classes-1``, duplicate names; the message names the argument.
    """
    if (train_idx is None) != (test_idx is None):
        raise ConfigError(
            "train_idx and test_idx: give both (index form) or neither (lists form)"
        )
    if train_idx is None:
        xs = [list(x_train), list(x_test)]
        ys = [list(y_train), list(y_test)]
        num_agents = len(xs[0])
        for arg, seq in (("y_train", ys[0]), ("x_test", xs[1]), ("y_test", ys[1])):
            if len(seq) != num_agents:
                raise ConfigError(
                    f"{arg} has {len(seq)} agents and x_train {num_agents}; "
                    "accepted: one array per agent in each"
                )
        train_idx, test_idx, offset = [], [], 0
        for kind, out in ((0, train_idx), (1, test_idx)):
            for a in range(num_agents):
                n = np.shape(ys[kind][a])[0] if np.ndim(ys[kind][a]) else -1
                out.append(np.arange(offset, offset + max(n, 0)))
                offset += max(n, 0)
        x_parts = [np.asarray(v) for v in xs[0] + xs[1]]
        y_parts = [np.asarray(v) for v in ys[0] + ys[1]]
        for arg, parts in (("x", x_parts), ("y", y_parts)):
            shapes = {p.shape[1:] for p in parts}
            if len(shapes) != 1 or any(p.ndim < 1 for p in parts):
                raise ConfigError(
                    f"{arg}_train / {arg}_test arrays have shapes "
                    f"{sorted({p.shape for p in parts})}; accepted: [n_a, *F] with "
                    "one F for all agents (labels [n_a])"
                )
        for p, q in zip(x_parts, y_parts, strict=True):
            if p.shape[0] != q.shape[0]:
                raise ConfigError(
                    f"x and y of an agent have {p.shape[0]} and {q.shape[0]} rows; "
                    "accepted: the same number"
                )
        x_pool = np.concatenate(x_parts)
        y_pool = np.concatenate(y_parts)
        num_train = sum(p.shape[0] for p in x_parts[:num_agents])
    else:
        x_tr, y_tr = np.asarray(x_train), np.asarray(y_train)
        x_te, y_te = np.asarray(x_test), np.asarray(y_test)
        for arg, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
            if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise ConfigError(
                    f"x_{arg} has shape {x.shape} and y_{arg} {y.shape}; accepted: "
                    "[N, *F] and [N] with the same N"
                )
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise ConfigError(
                f"x_train rows {x_tr.shape[1:]} and x_test rows {x_te.shape[1:]} "
                "differ; accepted: the same feature shape"
            )
        num_agents = len(train_idx)
        if len(test_idx) != num_agents:
            raise ConfigError(
                f"test_idx has {len(test_idx)} agents and train_idx {num_agents}; "
                "accepted: the same number"
            )
        num_train = x_tr.shape[0]
        x_pool = np.concatenate([x_tr, x_te])
        y_pool = np.concatenate([y_tr, y_te])
        tr_list, te_list = [], []
        for kind, lists, n, off, out in (
            ("train_idx", train_idx, x_tr.shape[0], 0, tr_list),
            ("test_idx", test_idx, x_te.shape[0], num_train, te_list),
        ):
            for a, idx in enumerate(lists):
                idx = np.asarray(idx)
                if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
                    raise ConfigError(
                        f"{kind}[{a}] is not a 1-d integer array; accepted: indices"
                    )
                if idx.size and (idx.min() < 0 or idx.max() >= n):
                    raise ConfigError(
                        f"{kind}[{a}] has an index out of range; accepted: 0..{n - 1}"
                    )
                out.append(idx.astype(np.int64) + off)
        train_idx, test_idx = tr_list, te_list
    if num_agents < 2:
        raise ConfigError(
            f"partition_from_arrays got {num_agents} agents; accepted: at least 2"
        )
    for a in range(num_agents):
        if len(train_idx[a]) == 0 or len(test_idx[a]) == 0:
            raise ConfigError(
                f"agent {a} has {len(train_idx[a])} train and {len(test_idx[a])} test "
                "samples; accepted: at least 1 of each"
            )
    if y_pool.dtype.kind not in "iu":
        raise ConfigError(f"y has dtype {y_pool.dtype}; accepted: integer labels")
    top = int(y_pool.max()) + 1 if y_pool.size else 1
    num_classes = top if num_classes is None else int(num_classes)
    if y_pool.min() < 0 or top > num_classes:
        raise ConfigError(
            f"labels in [{int(y_pool.min())}, {top - 1}]; accepted: "
            f"0..{num_classes - 1} (num_classes={num_classes})"
        )
    names = tuple(f"agent_{a}" for a in range(num_agents)) if names is None else (
        tuple(str(n) for n in names))  # fmt: skip
    if len(names) != num_agents or len(set(names)) != num_agents:
        raise ConfigError(
            f"names has {len(names)} entries ({len(set(names))} distinct); accepted: "
            f"{num_agents} distinct names"
        )
    splits = list(zip(train_idx, test_idx, strict=True))
    part = stack_partition(x_pool.astype(np.float32), y_pool, splits, num_classes)
    return Split(
        partition=part,
        names=names,
        indices=tuple(splits),
        num_train=int(num_train),
        info=arrays_info(),
    )
