"""Raw data sources: a whole data set as one pool of images and labels.

Every source returns the train and test splits of the original data set
concatenated (train first) into one pool, as the reference DemLearn code does;
``demjax.data.partition`` then deals that pool out to the agents, each of which
makes its own train/test split.

Sources:

- ``digits``: scikit-learn's 8x8 handwritten digits (1797 samples, 10 classes).
  Ships with scikit-learn: always available, no files, no network.
- ``fashion_mnist``: Fashion-MNIST (70000 samples, 28x28x1, 10 classes) read
  from the four IDX files in ``data_dir`` (default
  ``/usr/share/datasets/fashion-mnist``, the Debian package
  ``dataset-fashion-mnist``), gzipped or not.
- ``fashion_mnist_tfds``, ``mnist``, ``emnist``, ``cifar10``: through
  tensorflow-datasets (``pip install 'demjax[tfds]'``), from ``data_dir`` (tfds'
  default ``~/tensorflow_datasets`` when None) and downloaded there if missing
  and ``download`` is true. ``emnist`` is the tfds config ``emnist/balanced``
  (131600 samples, 28x28x1, 47 balanced classes of digits and letters); its
  images are transposed back to upright. ``cifar100`` is tfds ``cifar100``
  (60000 samples, 32x32x3, the 100 fine labels).
- ``femnist``: FEMNIST from LEAF's JSON shards in ``data_dir`` (62 classes,
  one writer per sample group; ``demjax.data.leaf``).
- ``shakespeare``: LEAF's Shakespeare JSON shards in ``data_dir``: 80-character
  windows as character ids ``[N, 80]`` and the next character (81 classes),
  one speaking role per sample group (``demjax.data.leaf``).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import zlib

import numpy as np

from demjax.data.files import Pool, one_line, read_bytes
from demjax.errors import ConfigError, DataFileError, DataNotFoundError, check_choice

SOURCES = (
    "digits",
    "fashion_mnist",
    "fashion_mnist_tfds",
    "mnist",
    "emnist",
    "cifar10",
    "cifar100",
    "femnist",
    "shakespeare",
)
"""Accepted values of ``config.dataset``."""
LEAF_SOURCES = ("femnist", "shakespeare")
"""Sources read from LEAF JSON shards: ``partition`` natural or file only."""
NATURAL_SOURCES = (*LEAF_SOURCES, "cifar100")
"""Sources with a natural split (one agent per writer / role / client)."""

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# demjax name -> tensorflow-datasets name (with config).
TFDS_NAMES = {
    "fashion_mnist_tfds": "fashion_mnist",
    "mnist": "mnist",
    "emnist": "emnist/balanced",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
}

# IDX type code (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_STD_EPS = 0.001
_TFDS_BATCH = 8192


STANDARDIZE = ("global", "per_pixel", "given", "none")
"""Accepted string values of ``config.standardize`` (True = global, False = none)."""


def load_pool(name: str, data_dir: str | None = None, download: bool = True) -> Pool:
    """Loads a whole data set (train split then test split) as one ``Pool``.

    Args: as ``load_source`` (without ``standardize``).

    Raises:
      ConfigError: unknown ``name``.
      DataFileError: a data file is unreadable or malformed (names the file).
      DataNotFoundError: the data are missing; the message says how to get them.
    """
    check_choice("dataset", name, SOURCES)
    data_dir = data_dir or None
    if name == "digits":
        x, y, num_classes = _load_digits()
        return Pool(x, y, num_classes, num_train=y.shape[0])
    if name == "fashion_mnist":
        return _load_fashion_mnist(data_dir)
    if name in ("femnist", "shakespeare"):
        from demjax.data import leaf

        loader = leaf.load_femnist if name == "femnist" else leaf.load_shakespeare
        return loader(data_dir)
    return _load_tfds(name, data_dir, download)


def load_source(
    name: str,
    data_dir: str | None = None,
    standardize: bool | str = True,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Loads a whole data set (train then test split) as one pool.

    Pixels are first scaled to [0, 1], then standardized by ``standardize``
    (see ``standardize_pool``): True or ``"global"`` is the reference DemLearn
    code's ``(x - mean) / (std + 0.001)`` with the scalar mean and standard
    deviation over all pixels of the pool.

    Args:
      name: one of ``SOURCES``.
      data_dir: where the files are; None or "" means the source's default
        (``/usr/share/datasets/fashion-mnist`` for ``fashion_mnist``, tfds'
        default for the tfds sources; unused for ``digits``).
      standardize: True / ``"global"``, ``"per_pixel"``, or False / ``"none"``
        (``"given"`` needs ``standardize_pool``'s mean and std).
      download: for the tfds sources, let tfds download the data if it is not
        in ``data_dir``.

    Returns:
      ``(x, y, num_classes)``: x float32 ``[N, H, W, C]``, y int32 ``[N]`` in
      ``[0, num_classes)``, and the number of classes C.

    Raises:
      ConfigError: unknown ``name`` or ``standardize``.
      DataFileError: a data file is unreadable or malformed (names the file).
      DataNotFoundError: the files are missing, tensorflow-datasets is not
        installed, or tfds could not load or fetch the data; the message says
        how to get it.
    """
    check_choice("dataset", name, SOURCES)
    mode = standardize_mode(standardize)
    pool = load_pool(name, data_dir, download)
    x, _ = standardize_pool(pool.x, mode)
    return x, pool.y, pool.num_classes


def standardize_mode(value) -> str:
    """``config.standardize`` as one of ``STANDARDIZE`` (True: global, False: none;
    also their strings, as ``--config.standardize=False`` gives).

    Raises:
      ConfigError: any other value (field ``standardize``).
    """
    if value is True or value in ("True", "true"):
        return "global"
    if value is False or value in ("False", "false"):
        return "none"
    if isinstance(value, str) and value in STANDARDIZE:
        return value
    raise ConfigError(
        f"standardize={value!r} is not valid; accepted: global, per_pixel, given "
        "(with standardize_mean, standardize_std), none, True (global), False (none)"
    )


def standardize_pool(
    x: np.ndarray, mode: str, mean: float | None = None, std: float | None = None
) -> tuple[np.ndarray, dict]:
    """Standardizes the pool's inputs.

    Modes: ``global``: ``(x - m) / (s + 0.001)`` with the scalar mean m and
    standard deviation s of every element (the reference DemLearn code);
    ``per_pixel``: the same with m, s ``[*F]`` per input position (over the N
    samples); ``given``: ``(x - mean) / std`` with the given scalars; ``none``:
    x unchanged.

    Args:
      x: float ``[N, *F]``.
      mode: one of ``STANDARDIZE``.
      mean, std: the scalars of ``given`` (std > 0).

    Returns:
      ``(x, stats)``: float32 ``[N, *F]`` and ``{"mode", "mean", "std"}`` with
      the statistics used (floats; lists of ``[*F]`` nested lists for
      ``per_pixel``; None for ``none``).

    Raises:
      ConfigError: an unknown ``mode``, or ``given`` without a finite mean and a
        finite std > 0 (fields ``standardize_mean`` / ``standardize_std``).
    """
    check_choice("standardize", mode, STANDARDIZE)
    x = np.asarray(x, dtype=np.float32)
    if mode == "none":
        return x, {"mode": mode, "mean": None, "std": None}
    if mode == "global":
        out, m, s = _global_stats(x)
        return out, {"mode": mode, "mean": m, "std": s}
    if mode == "per_pixel":
        m = x.mean(axis=0, dtype=np.float64)
        s = x.std(axis=0, dtype=np.float64)
        out = ((x - m.astype(np.float32)) / (s + _STD_EPS).astype(np.float32)).astype(
            np.float32, copy=False
        )
        return out, {"mode": mode, "mean": m.tolist(), "std": s.tolist()}
    if mean is None or not math.isfinite(mean):
        raise ConfigError(
            f"standardize_mean={mean!r} is not valid for standardize='given'; "
            "accepted: a finite float"
        )
    if std is None or not (math.isfinite(std) and std > 0):
        raise ConfigError(
            f"standardize_std={std!r} is not valid for standardize='given'; "
            "accepted: a finite float > 0"
        )
    out = ((x - np.float32(mean)) / np.float32(std)).astype(np.float32, copy=False)
    return out, {"mode": mode, "mean": float(mean), "std": float(std)}


def _global_stats(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(dtype=np.float64)
    var = np.float64(0.0)
    flat = x.reshape(-1)
    chunk = 1 << 24
    for start in range(0, flat.size, chunk):
        d = flat[start : start + chunk].astype(np.float64) - mean
        var += np.dot(d, d)
    std = np.sqrt(var / max(flat.size, 1))
    out = (x - np.float32(mean)) / np.float32(std + _STD_EPS)
    return out.astype(np.float32, copy=False), float(mean), float(std)


def standardize_global(x: np.ndarray) -> np.ndarray:
    """Returns float32 ``(x - mean) / (std + 0.001)`` with scalar mean and std.

    The statistics are computed in float64 over every element of ``x``.
    """
    return _global_stats(x)[0]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (the MNIST / Fashion-MNIST format), gzipped or not.

    Format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, then
    each dimension as a big-endian uint32, then the data in big-endian
    row-major order. Gzip is detected from the file's first two bytes.

    Args:
      path: the file.

    Returns:
      The array, in native byte order, with the stored shape.

    Raises:
      DataFileError: (a ``ConfigError``) the file cannot be read, is a corrupt
        or truncated gzip file, or is not a valid IDX file (bad magic number,
        unknown type code, or data size not matching the dimensions); the
        one-line message names the file.
    """
    raw = read_bytes(path)
    if raw[:2] == b"\x1f\x8b":
        raw = gunzip(path, raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(
            f"{path} is not an IDX file: magic number {raw[:4].hex()!r}; "
            "accepted: 0000 then a type code (08, 09, 0b, 0c, 0d, 0e) and ndim"
        )
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFileError(f"{path} is not an IDX file: truncated header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = math.prod(shape)  # Python ints: no overflow on corrupt headers.
    if len(raw) - header != count * dtype.itemsize:
        raise DataFileError(
            f"{path} is not a valid IDX file: dims {shape} need "
            f"{count * dtype.itemsize} data bytes, found {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def gunzip(path: str | os.PathLike, raw: bytes) -> bytes:
    """Decompresses the gzip bytes ``raw`` read from ``path``.

    Raises:
      DataFileError: a truncated or corrupt gzip stream (bad header, bad
        deflate data, CRC or length mismatch); the message names the file.
    """
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise DataFileError(
            f"{path} is not a valid gzip file (truncated or corrupt): {one_line(e)}"
        ) from None


def _load_digits() -> tuple[np.ndarray, np.ndarray, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0))[..., None]
    y = digits.target.astype(np.int32)
    return x, y, 10


def _find_idx(data_dir: str, stem: str) -> str | None:
    for path in (os.path.join(data_dir, stem + ".gz"), os.path.join(data_dir, stem)):
        if os.path.isfile(path):
            return path
    return None


def _fashion_missing(data_dir: str, path: str, what: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"dataset=fashion_mnist: {what} {path} (data_dir={data_dir!r}); get it "
        "with `apt-get install dataset-fashion-mnist` (installs "
        f"{DEFAULT_FASHION_MNIST_DIR}) or `pip install 'demjax[tfds]'` and "
        "dataset=fashion_mnist_tfds"
    )


def _load_fashion_mnist(data_dir: str | None) -> Pool:
    data_dir = data_dir or DEFAULT_FASHION_MNIST_DIR
    if not os.path.isdir(data_dir):
        raise _fashion_missing(data_dir, data_dir, "no such directory")
    arrays = []
    for stem in FASHION_MNIST_FILES:
        path = _find_idx(data_dir, stem)
        if path is None:
            missing = os.path.join(data_dir, stem + ".gz")
            raise _fashion_missing(data_dir, missing, "missing file")
        arrays.append((path, read_idx(path)))
    (p_xtr, x_tr), (p_ytr, y_tr), (p_xte, x_te), (p_yte, y_te) = arrays
    pairs = (((p_xtr, x_tr), (p_ytr, y_tr)), ((p_xte, x_te), (p_yte, y_te)))
    for (px, xs), (py, ys) in pairs:
        if xs.ndim != 3 or ys.ndim != 1 or xs.shape[0] != ys.shape[0]:
            raise DataFileError(
                f"dataset=fashion_mnist: {px} has shape {xs.shape} and {py} has "
                f"shape {ys.shape}; expected [N, H, W] images and [N] labels"
            )
    x = np.concatenate([x_tr, x_te]).astype(np.float32) / np.float32(255.0)
    y = np.concatenate([y_tr, y_te]).astype(np.int32)
    if y.size and (y.min() < 0 or y.max() >= 10):
        raise DataFileError(
            f"dataset=fashion_mnist: labels in {p_ytr} or {p_yte} are outside 0..9"
        )
    files = (p_xtr, p_ytr, p_xte, p_yte)
    return Pool(x[..., None], y, 10, num_train=int(y_tr.shape[0]), files=files)


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _load_tfds(name: str, data_dir: str | None, download: bool) -> Pool:
    tfds_name = TFDS_NAMES[name]
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataNotFoundError(
            f"dataset={name} needs tensorflow-datasets, which is not installed: "
            f"pip install 'demjax[tfds]' ({one_line(e)})"
        ) from e
    if not _tensorflow_available():
        raise DataNotFoundError(
            f"dataset={name} needs tensorflow for tensorflow-datasets, which is "
            "not installed: pip install 'demjax[tfds]'"
        )
    where = f"data_dir={data_dir!r}" if data_dir else "data_dir=None (tfds default)"
    try:
        (ds_train, ds_test), info = tfds.load(
            tfds_name,
            split=["train", "test"],
            as_supervised=True,
            data_dir=data_dir,
            download=download,
            with_info=True,
        )
        xs, ys, num_train = [], [], 0
        for ds in (ds_train, ds_test):
            for xb, yb in tfds.as_numpy(ds.batch(_TFDS_BATCH)):
                xs.append(np.asarray(xb))
                ys.append(np.asarray(yb))
            num_train = num_train or sum(b.shape[0] for b in ys)
        num_classes = int(info.features["label"].num_classes)
    except Exception as e:  # tfds raises many unrelated types; report them all.
        how = "could not be downloaded" if download else "download=False"
        raise DataNotFoundError(
            f"dataset={name} (tfds {tfds_name!r}) is not available in {where} and "
            f"{how}; prepare it there with tfds or pass data_dir: {one_line(e)}"
        ) from e
    x = np.concatenate(xs).astype(np.float32) / np.float32(255.0)
    y = np.concatenate(ys).astype(np.int32)
    if x.ndim == 3:
        x = x[..., None]
    if name == "emnist":
        # tfds keeps EMNIST's transposed storage; swap H and W to make it upright.
        x = np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    return Pool(x, y, num_classes, num_train=int(num_train))
