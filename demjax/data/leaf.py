"""FEMNIST and Shakespeare from LEAF's JSON shards: one agent per writer / role.

LEAF (Caldas et al., "LEAF: A Benchmark for Federated Settings", arXiv
1812.01097) stores FEMNIST as JSON shards, each an object::

    {"users": ["f0000_14", ...],
     "num_samples": [154, ...],
     "user_data": {"f0000_14": {"x": [[784 floats in [0, 1]], ...],
                                "y": [label in 0..61, ...]}, ...}}

``data_dir`` holds either LEAF's split output (``train/*.json`` and
``test/*.json``; a writer's train samples come from the train shards and its
test samples from the test shards) or the unsplit shards (``all_data_*.json``
directly in ``data_dir`` or in ``data_dir/all_data``), in which case each
writer's samples are shuffled (seeded) and split 80/20 like the other
partitions. A writer found in only one of the train and test shards is split
80/20 as well. Writers with fewer than 2 samples are left out.

Images are 28x28x1 float32 as stored (LEAF's values, in [0, 1]); labels are
0-9 digits, 10-35 upper-case and 36-61 lower-case letters.

Shakespeare (LEAF ``data/shakespeare``): the same shard structure, one user per
speaking role; each sample's ``x`` is an 80-character string and ``y`` the next
character. Characters map to ids by ``SHAKESPEARE_VOCAB`` (LEAF's 80 letters, id
= position) and every other character to the id 80 (out of vocabulary): x is
float32 ``[n, 80]`` of character ids (exact in float32), y int32 ``[n]`` in
``0..80`` (81 classes); the metric is next-character accuracy.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from demjax.data.files import Pool, read_bytes
from demjax.errors import ConfigError, DataFileError, DataNotFoundError

FEMNIST_CLASSES = 62
FEMNIST_SHAPE = (28, 28, 1)
_PIXELS = 28 * 28

SHAKESPEARE_VOCAB = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
"""LEAF's Shakespeare characters (``ALL_LETTERS``); id = position, others 80."""
SHAKESPEARE_CLASSES = len(SHAKESPEARE_VOCAB) + 1
SHAKESPEARE_SEQ = 80
_CHAR_ID = {c: i for i, c in enumerate(SHAKESPEARE_VOCAB)}


def char_ids(text: str) -> list[int]:
    """Character ids of ``text`` (``SHAKESPEARE_VOCAB`` positions, others 80)."""
    oov = len(SHAKESPEARE_VOCAB)
    return [_CHAR_ID.get(c, oov) for c in text]


def femnist_files(
    data_dir: str | None, name: str = "femnist"
) -> tuple[list[str], list[str]]:
    """The train and test shard paths under ``data_dir`` (sorted).

    Returns:
      ``(train, test)``; ``test`` is empty for unsplit shards (``train`` then
      holds every shard).

    Raises:
      DataNotFoundError: no ``data_dir`` or no ``.json`` shard in it.
    """
    if not data_dir:
        raise DataNotFoundError(
            f"dataset={name} needs data_dir, the folder of LEAF's {name} JSON "
            "shards (train/ and test/, or all_data_*.json); build them with LEAF's "
            f"data/{name}/preprocess.sh (https://github.com/TalwalkarLab/leaf)"
        )
    if not os.path.isdir(data_dir):
        raise DataNotFoundError(
            f"dataset={name}: data_dir={data_dir!r} is not a directory; accepted: "
            f"the folder of LEAF's {name} JSON shards"
        )

    def shards(d):
        return sorted(glob.glob(os.path.join(d, "*.json")))

    train, test = (shards(os.path.join(data_dir, s)) for s in ("train", "test"))
    if train and test:
        return train, test
    flat = shards(data_dir) or shards(os.path.join(data_dir, "all_data"))
    if not flat:
        raise DataNotFoundError(
            f"dataset={name}: no LEAF JSON shard in data_dir={data_dir!r}; accepted: "
            "train/*.json and test/*.json, or all_data_*.json"
        )
    return flat, []


def read_leaf_shard(path: str) -> dict[str, tuple[list, list]]:
    """One LEAF JSON shard as ``{user: (x rows, y labels)}`` (lists, unchecked
    beyond the structure; ``load_femnist`` checks the values).

    Raises:
      DataFileError: unreadable, not UTF-8 JSON, or not LEAF's structure
        (``users`` list of strings, ``user_data`` with ``x`` and ``y`` lists of
        one length per user); the one-line message names the file.
    """
    raw = read_bytes(path)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        msg = " ".join(str(e).split())[:200]
        raise DataFileError(f"{path} is not valid JSON: {msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("user_data"), dict):
        raise DataFileError(
            f"{path} is not a LEAF shard: accepted: a JSON object with 'users' "
            "and 'user_data'"
        )
    users = doc.get("users", list(doc["user_data"]))
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise DataFileError(f"{path}: 'users' is not a list of strings")
    out = {}
    for u in users:
        data = doc["user_data"].get(u)
        if not isinstance(data, dict):
            raise DataFileError(f"{path}: user {u!r} has no entry in 'user_data'")
        xs, ys = data.get("x"), data.get("y")
        if not (isinstance(xs, list) and isinstance(ys, list) and len(xs) == len(ys)):
            raise DataFileError(
                f"{path}: user {u!r} needs 'x' and 'y' lists of the same length"
            )
        if u in out:
            raise DataFileError(f"{path}: user {u!r} is listed twice")
        out[u] = (xs, ys)
    return out


def sample_owners(
    counts: dict[str, int],
    k: int | None,
    seed: int,
    dataset: str,
    data_dir,
    what: str,
) -> list[str]:
    """The owners (writers, clients) with at least 2 samples, sorted; with ``k``
    a seeded uniform sample of ``k`` of them (sorted).

    Raises:
      ConfigError: fewer than ``k`` such owners (field ``num_agents``).
    """
    eligible = sorted(u for u, n in counts.items() if n >= 2)
    if k is None:
        return eligible
    if len(eligible) < k:
        raise ConfigError(
            f"num_agents={k} is too many for dataset={dataset} in "
            f"data_dir={data_dir!r}: it has {len(eligible)} {what} with at "
            f"least 2 samples; accepted: at most {len(eligible)}"
        )
    pick = np.random.default_rng(seed).choice(len(eligible), k, replace=False)
    return sorted(eligible[i] for i in pick)


def _arrays(path: str, user: str, xs: list, ys: list) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[n, 28, 28, 1]`` and int32 ``[n]`` of one user, checked."""
    if not xs:
        return np.zeros((0, *FEMNIST_SHAPE), np.float32), np.zeros(0, np.int32)
    try:
        x = np.asarray(xs, dtype=np.float32)
        y = np.asarray(ys)
    except (ValueError, TypeError, OverflowError):
        x = y = None
    if x is None or x.ndim != 2 or x.shape[1] != _PIXELS:
        raise DataFileError(
            f"{path}: user {user!r} 'x' is not a list of {_PIXELS}-number rows"
        )
    if not np.isfinite(x).all():
        raise DataFileError(f"{path}: user {user!r} 'x' has non-finite values")
    if (
        y.ndim != 1
        or y.dtype.kind not in "iu"
        or (y.size and (y.min() < 0 or y.max() >= FEMNIST_CLASSES))
    ):
        raise DataFileError(
            f"{path}: user {user!r} 'y' is not a list of integer labels in "
            f"0..{FEMNIST_CLASSES - 1}"
        )
    return x.reshape(-1, *FEMNIST_SHAPE), y.astype(np.int32)


def _text_arrays(
    path: str, user: str, xs: list, ys: list
) -> tuple[np.ndarray, np.ndarray]:
    """Shakespeare: float32 ``[n, 80]`` and int32 ``[n]`` character ids, checked."""
    ok = all(isinstance(t, str) and len(t) == SHAKESPEARE_SEQ for t in xs)
    if not ok:
        raise DataFileError(
            f"{path}: user {user!r} 'x' is not a list of {SHAKESPEARE_SEQ}-character "
            "strings"
        )
    if not all(isinstance(t, str) and len(t) == 1 for t in ys):
        raise DataFileError(f"{path}: user {user!r} 'y' is not a list of characters")
    if not xs:
        return np.zeros((0, SHAKESPEARE_SEQ), np.float32), np.zeros(0, np.int32)
    x = np.array([char_ids(t) for t in xs], dtype=np.float32)
    y = np.array(char_ids("".join(ys)), dtype=np.int32)
    return x, y


def load_shakespeare(
    data_dir: str | None, num_writers: int | None = None, seed: int = 0
) -> Pool:
    """Shakespeare roles from LEAF's JSON shards, as ``load_femnist`` does writers.

    Returns:
      A ``Pool``: x float32 ``[N, 80]`` character ids, y int32 ``[N]`` the next
      character's id, 81 classes (``SHAKESPEARE_VOCAB`` and out-of-vocabulary),
      ``groups`` / ``group_names`` the roles.

    Raises:
      As ``load_femnist``.
    """
    return load_femnist(data_dir, num_writers, seed, _kind="shakespeare")


def load_femnist(
    data_dir: str | None,
    num_writers: int | None = None,
    seed: int = 0,
    _kind: str = "femnist",
) -> Pool:
    """FEMNIST writers from LEAF's JSON shards, as a ``Pool`` with groups.

    Args:
      data_dir: the shard folder (see the module docstring).
      num_writers: k, how many writers to keep, drawn uniformly without
        replacement by ``np.random.default_rng(seed)`` from the eligible writers
        (at least 2 samples) in sorted name order; None keeps all. Only the
        chosen writers' samples are converted to arrays.
      seed: the draw's seed.

    Returns:
      A ``Pool``: x float32 ``[N, 28, 28, 1]``, y int32 ``[N]``, 62 classes,
      rows of the train shards first (``num_train`` of them; N when unsplit),
      ``groups`` int32 ``[N]`` the writer of each row (index into
      ``group_names``, the chosen writers in sorted order), ``files`` the shards.

    Raises:
      DataNotFoundError: no shards in ``data_dir``.
      DataFileError: a malformed shard (names the file and the user).
      ConfigError: fewer eligible writers than ``num_writers`` (field
        ``num_agents``).
    """
    train_files, test_files = femnist_files(data_dir, _kind)
    convert = _arrays if _kind == "femnist" else _text_arrays
    counts: dict[str, int] = {}
    if num_writers is not None:  # First pass: who is there (structure only).
        for path in train_files + test_files:
            for u, (_, ys) in read_leaf_shard(path).items():
                counts[u] = counts.get(u, 0) + len(ys)
        keep = set(sample_owners(counts, num_writers, seed, _kind, data_dir, "writers"))
    else:
        keep = None
    parts = {0: {}, 1: {}}  # split -> user -> list of (x, y)
    for split, files in ((0, train_files), (1, test_files)):
        for path in files:
            for u, (xs, ys) in read_leaf_shard(path).items():
                if keep is not None and u not in keep:
                    continue
                parts[split].setdefault(u, []).append(convert(path, u, xs, ys))
    names = sorted(set(parts[0]) | set(parts[1]))
    if keep is None:
        sizes = {
            u: sum(a[1].shape[0] for s in (0, 1) for a in parts[s].get(u, []))
            for u in names
        }
        names = [u for u in names if sizes[u] >= 2]
    if len(names) < 2:
        raise DataFileError(
            f"dataset={_kind}: the shards in {data_dir} hold {len(names)} writers "
            "with at least 2 samples; accepted: at least 2"
        )
    index = {u: i for i, u in enumerate(names)}
    xs, ys, gs, num_train = [], [], [], 0
    for split in (0, 1):
        for u in names:
            for x, y in parts[split].get(u, []):
                xs.append(x)
                ys.append(y)
                gs.append(np.full(y.shape[0], index[u], np.int32))
        if split == 0:
            num_train = sum(y.shape[0] for y in ys)
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    return Pool(
        x=x,
        y=y,
        num_classes=FEMNIST_CLASSES if _kind == "femnist" else SHAKESPEARE_CLASSES,
        num_train=num_train if test_files else y.shape[0],
        files=tuple(train_files + test_files),
        groups=np.concatenate(gs),
        group_names=tuple(names),
    )


def natural_splits(
    pool: Pool, seed: int, train_fraction: float = 0.8, cap: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One agent per group (writer): its train and test rows of the pool.

    A group with rows on both sides of ``pool.num_train`` keeps that split;
    otherwise its rows are shuffled by ``np.random.default_rng(seed)`` (groups
    in order) and split into the first ``max(1, int(train_fraction * n))`` for
    training and the rest for testing. ``cap`` keeps each agent's first
    ``int(train_fraction * cap)`` train and remaining test rows.

    Returns:
      A pairs ``(train_idx, test_idx)`` of int64 pool indices, groups in order.
    """
    if pool.groups is None:
        raise ConfigError(
            "partition='natural' needs a dataset with natural owners; accepted: "
            "dataset='femnist' or 'shakespeare'"
        )
    rng = np.random.default_rng(seed)
    order = np.argsort(pool.groups, kind="stable")
    bounds = np.searchsorted(pool.groups[order], np.arange(len(pool.group_names) + 1))
    splits = []
    for g in range(len(pool.group_names)):
        rows = order[bounds[g] : bounds[g + 1]].astype(np.int64)
        tr, te = rows[rows < pool.num_train], rows[rows >= pool.num_train]
        if tr.size == 0 or te.size == 0:
            rows = rows[rng.permutation(rows.size)]
            n_tr = max(1, int(train_fraction * rows.size))
            tr, te = rows[:n_tr], rows[n_tr:]
        if cap:
            n_tr = max(1, int(train_fraction * cap))
            tr, te = tr[:n_tr], te[: max(1, cap - n_tr)]
        splits.append((tr, te))
    return splits


# TFF's HDF5 layouts (tff.simulation.datasets; FedJAX reads the same files):
# <data_dir>/<stem>_train.h5 (and _test.h5), groups examples/<client id>/<field>.
TFF_H5 = {
    "femnist": ("fed_emnist", "pixels", "label", (28, 28), FEMNIST_CLASSES),
    "cifar100": ("fed_cifar100", "image", "label", (32, 32, 3), 100),
}


def tff_h5_files(data_dir: str | None, dataset: str) -> tuple[str, str | None] | None:
    """``(train, test or None)`` paths of TFF's HDF5 files in ``data_dir``, or None."""
    stem = TFF_H5[dataset][0]
    if not data_dir:
        return None
    train = os.path.join(data_dir, f"{stem}_train.h5")
    test = os.path.join(data_dir, f"{stem}_test.h5")
    if not os.path.isfile(train):
        return None
    return train, (test if os.path.isfile(test) else None)


def _h5_clients(path: str, x_key: str, y_key: str):
    """``(h5 file, {client: (x dataset, y dataset)})``, structure checked."""
    try:
        import h5py
    except ImportError:
        raise DataNotFoundError(
            f"{path} needs h5py to be read: pip install h5py"
        ) from None
    try:
        f = h5py.File(path, "r")
        examples = f["examples"]
        clients = {}
        for c in examples:
            g = examples[c]
            xd, yd = g[x_key], g[y_key]
            n = int(yd.shape[0]) if len(yd.shape) == 1 else 0
            clients[str(c)] = (xd, yd, n)
    except Exception as e:  # h5py raises OSError, KeyError, ValueError, ...
        msg = " ".join(str(e).split())[:160]
        raise DataFileError(
            f"{path} is not a TFF HDF5 file with examples/<client>/{x_key} and "
            f"{y_key}: {type(e).__name__}: {msg}"
        ) from None
    return f, clients


def _h5_arrays(path, client, xd, yd, shape, num_classes):
    try:
        x = np.asarray(xd[()])
        y = np.asarray(yd[()])
    except Exception as e:
        raise DataFileError(
            f"{path}: client {client!r} cannot be read: {type(e).__name__}"
        ) from None
    if x.shape[1:] != shape or y.shape != (x.shape[0],) or y.dtype.kind not in "iu":
        raise DataFileError(
            f"{path}: client {client!r} has x {x.shape} {x.dtype}, y {y.shape} "
            f"{y.dtype}; accepted: x [n, {', '.join(map(str, shape))}], integer y [n]"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataFileError(
            f"{path}: client {client!r} has labels outside 0..{num_classes - 1}"
        )
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataFileError(f"{path}: client {client!r} has non-finite inputs")
    return x.reshape(x.shape[0], *shape, 1) if len(shape) == 2 else x, y.astype(
        np.int32
    )


def load_tff_h5(
    data_dir: str | None, dataset: str, num_clients: int | None = None, seed: int = 0
) -> Pool:
    """Clients of TFF's HDF5 files (``fed_emnist_*.h5`` for ``femnist``, 62
    classes; ``fed_cifar100_*.h5``, the Pachinko split, for ``cifar100``), as a
    ``Pool`` with one group per client.

    A client found in both files (EMNIST) keeps the files' train / test split.
    The Pachinko split's test clients are other people than its train clients, so
    for ``cifar100`` only the train file's 500 clients are agents (each split
    80/20 by ``natural_splits``). Clients with fewer than 2 samples are left out;
    ``num_clients`` of the rest are drawn as ``load_femnist`` draws writers, and
    only their samples are read.

    Raises:
      DataNotFoundError: h5py missing or no ``<stem>_train.h5`` in ``data_dir``.
      DataFileError: a malformed file (names it, and the client).
      ConfigError: fewer eligible clients than ``num_clients`` (``num_agents``).
    """
    stem, x_key, y_key, shape, num_classes = TFF_H5[dataset]
    files = tff_h5_files(data_dir, dataset)
    if files is None:
        raise DataNotFoundError(
            f"dataset={dataset} partition='natural': no {stem}_train.h5 in "
            f"data_dir={data_dir!r}; accepted: TFF's HDF5 files there"
        )
    train_path, test_path = files
    if dataset == "cifar100":
        test_path = None
    opened = [_h5_clients(train_path, x_key, y_key)]
    if test_path:
        opened.append(_h5_clients(test_path, x_key, y_key))
    try:
        counts: dict[str, int] = {}
        for _, clients in opened:
            for c, (_, _, n) in clients.items():
                counts[c] = counts.get(c, 0) + n
        eligible = sample_owners(
            counts, num_clients, seed, dataset, data_dir, "clients"
        )
        if len(eligible) < 2:
            raise DataFileError(
                f"{train_path} holds {len(eligible)} clients with at least 2 "
                "samples; accepted: at least 2"
            )
        index = {c: i for i, c in enumerate(eligible)}
        xs, ys, gs, num_train = [], [], [], 0
        for k, ((_, clients), path) in enumerate(
            zip(opened, (train_path, test_path), strict=False)
        ):
            for c in eligible:
                if c in clients:
                    xd, yd, _ = clients[c]
                    x, y = _h5_arrays(path, c, xd, yd, shape, num_classes)
                    xs.append(x)
                    ys.append(y)
                    gs.append(np.full(y.shape[0], index[c], np.int32))
            if k == 0:
                num_train = sum(y.shape[0] for y in ys)
    finally:
        for f, _ in opened:
            f.close()
    y = np.concatenate(ys)
    return Pool(
        x=np.concatenate(xs),
        y=y,
        num_classes=num_classes,
        num_train=num_train if test_path else y.shape[0],
        files=tuple(p for p in (train_path, test_path) if p),
        groups=np.concatenate(gs),
        group_names=tuple(eligible),
    )
