"""Every data-file reader turns a damaged file into one line naming the file.

Hypothesis damages valid files of each format (IDX, gzipped IDX, split JSON, split
NPZ, LEAF JSON shard, TFF HDF5): truncated at any byte, one bit flipped anywhere, or swapped
for a file of another format. Each read either succeeds (a flipped pixel is still a
valid file) or raises ``DataFileError`` (a ``ConfigError``, exit 2 from
scripts/run.py) whose message is one line naming the damaged file; any other
exception fails the test.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demjax.data import leaf, read_idx, read_split_file, write_split_file
from demjax.errors import ConfigError

FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=list(HealthCheck)
)


def _idx(array: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, array.ndim])
    head += b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.astype(">u1").tobytes()


def _split_bytes(ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "json":
        doc = {"format": "demjax-split", "version": 1, "index": "files",
               "agents": [{"name": "a", "train": [0, 3], "test": [1]},
                          {"name": "b", "train": [2], "test": [0, 2]}]}  # fmt: skip
        return json.dumps(doc).encode()
    np.savez(buf, names=np.array(["a", "b"]), train=np.array([0, 3, 2]),
             train_counts=np.array([2, 1]), test=np.array([1, 0, 2]),
             test_counts=np.array([1, 2]), index=np.array("files"))  # fmt: skip
    return buf.getvalue()


def _leaf_bytes() -> bytes:
    rng = np.random.default_rng(0)
    users = ["w0", "w1"]
    doc = {"users": users, "num_samples": [2, 3],
           "user_data": {u: {"x": rng.random((n, 784)).round(3).tolist(),
                             "y": rng.integers(0, 62, n).tolist()}
                         for u, n in zip(users, (2, 3), strict=True)}}  # fmt: skip
    return json.dumps(doc).encode()


def _h5_bytes() -> bytes:
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        for c, n in (("c0", 3), ("c1", 2)):
            f[f"examples/{c}/pixels"] = np.full((n, 28, 28), 0.5, np.float32)
            f[f"examples/{c}/label"] = np.arange(n)
    return buf.getvalue()


IMAGES = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
VALID = {
    "idx": _idx(IMAGES),
    "idx.gz": gzip.compress(_idx(IMAGES)),
    "json": _split_bytes("json"),
    "npz": _split_bytes("npz"),
    "leaf": _leaf_bytes(),
}
if importlib.util.find_spec("h5py"):  # TFF's HDF5 layout (h5py comes with tfds)
    VALID["h5"] = _h5_bytes()
NAMES = {"idx.gz": "f.gz", "leaf": "all_data_0.json", "h5": "fed_emnist_train.h5"}


def _damage(kind: str, how: str, pos: float, bit: int, other: str) -> bytes:
    raw = VALID[kind]
    i = min(int(pos * len(raw)), len(raw) - 1)
    if how == "truncate":
        return raw[:i]
    if how == "flip":
        return raw[:i] + bytes([raw[i] ^ (1 << bit)]) + raw[i + 1 :]
    return VALID[other]  # a file of another format under this name


damage = st.tuples(
    st.sampled_from(["truncate", "flip", "swap"]),
    st.floats(0.0, 1.0, exclude_max=True),
    st.integers(0, 7),
    st.sampled_from(sorted(VALID)),
)


def _read(kind: str, path, tmp_path):
    if kind.startswith("idx"):
        return read_idx(path)
    if kind in ("json", "npz"):
        return read_split_file(path)
    if kind == "h5":
        return leaf.load_tff_h5(str(tmp_path), "femnist")
    return leaf.load_femnist(str(tmp_path))


def _check(kind, raw, tmp_path, name):
    tmp_path = tmp_path / kind  # one folder per format (LEAF reads all *.json)
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_bytes(raw)
    try:
        _read(kind, path, tmp_path)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg, msg
        assert str(path) in msg or str(tmp_path) in msg, msg


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_files_read(kind, tmp_path):
    name = NAMES.get(kind, f"f.{kind}")
    (tmp_path / name).write_bytes(VALID[kind])
    out = _read(kind, tmp_path / name, tmp_path)
    if kind.startswith("idx"):
        np.testing.assert_array_equal(out, IMAGES)
    elif kind in ("leaf", "h5"):
        assert len(out.group_names) == 2 and out.x.shape == (5, 28, 28, 1)
    else:
        assert out.names == ("a", "b")


@pytest.mark.parametrize("kind", sorted(VALID))
@FUZZ
@given(case=damage)
def test_damaged_files_give_one_line_errors(kind, case, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    name = NAMES.get(kind, f"f.{kind}")
    _check(kind, _damage(kind, *case), tmp_path, name)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_give_one_line_errors(raw, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bytes")
    for kind in VALID:
        name = NAMES.get(kind, f"f.{kind}")
        body = (b"\x1f\x8b" + raw) if kind == "idx.gz" else raw
        _check(kind, body, tmp_path, name)


def test_wrong_json_types_in_leaf_and_split_files(tmp_path):
    """Well-formed JSON of the wrong shape: each field of the wrong type."""
    leaf_docs = [
        [], {"users": "w0", "user_data": {}}, {"users": ["w0"], "user_data": {"w0": 1}},
        {"users": ["w0"], "user_data": {"w0": {"x": [[0.5] * 784], "y": [1, 2]}}},
        {"users": ["w0"], "user_data": {"w0": {"x": [[0.5] * 783], "y": [1]}}},
        {"users": ["w0"], "user_data": {"w0": {"x": [["a"] * 784], "y": [1]}}},
        {"users": ["w0"], "user_data": {"w0": {"x": [[0.5] * 784], "y": [62]}}},
        {"users": ["w0"], "user_data": {"w0": {"x": [[0.5] * 784], "y": [1.5]}}},
        {"users": ["w0"], "user_data": {"w0": {"x": [[0.5] * 784], "y": [10**30]}}},
        {"users": ["w0"], "user_data": {"w0": {"x": [[float("nan")] * 784],
                                               "y": [1]}}},
    ]  # fmt: skip
    for doc in leaf_docs:
        path = tmp_path / "all_data_0.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(ConfigError) as err:
            leaf.load_femnist(str(tmp_path))
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    split_docs = [
        {"agents": [{"name": 3, "train": [0], "test": [0]}] * 2},
        {"agents": [{"name": "a", "train": [10**30], "test": [0]},
                    {"name": "b", "train": [0], "test": [0]}]},
        {"agents": [{"name": "a", "train": [True], "test": [0]},
                    {"name": "b", "train": [0], "test": [0]}]},
        {"agents": [{"name": "a", "train": "0", "test": [0]},
                    {"name": "b", "train": [0], "test": [0]}]},
        {"agents": [], "dataset": 3},
        {"agents": [], "version": 2},
    ]  # fmt: skip
    for doc in split_docs:
        path = tmp_path / "s.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(ConfigError) as err:
            read_split_file(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    # A directory or an unreadable name where a file is expected.
    with pytest.raises(ConfigError, match="cannot be read"):
        read_idx(tmp_path)
    write_split_file(tmp_path / "ok.npz", ["a", "b"], [[0], [1]], [[0], [1]])
    assert read_split_file(tmp_path / "ok.npz").index == "pool"
