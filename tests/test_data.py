"""Tests of demjax.data: sources (IDX parser, loaders) and partitions."""

from __future__ import annotations

import gzip
import os
import struct
import sys
import types

import numpy as np
import pytest

from demjax.data import (
    PARTITIONS,
    POOL_PARTITIONS,
    SOURCES,
    eval_subsample,
    load_source,
    make_partition,
    partition,
    read_idx,
)
from demjax.data import sources as sources_mod
from demjax.errors import ConfigError, DataNotFoundError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------
# Helpers


def _idx_bytes(array: np.ndarray, code: int, be_dtype: str) -> bytes:
    """An IDX file written by hand with struct (independent of read_idx)."""
    header = bytes([0, 0, code, array.ndim])
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(be_dtype).tobytes()


def _coded_pool(num_classes: int, per_class, shape=(2, 2, 1), seed: int = 1):
    """x whose first pixel is the sample's index (unique row identity), and y."""
    per_class = np.broadcast_to(np.asarray(per_class), (num_classes,))
    y = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    y = np.random.default_rng(seed).permutation(y)
    n = y.shape[0]
    x = np.zeros((n, *shape), dtype=np.float32)
    x.reshape(n, -1)[:, 0] = np.arange(n) + 1  # +1 so that no real row is zero.
    x.reshape(n, -1)[:, 1:] = (np.arange(n) % 7)[:, None] + 1
    return x, y


def _ids(x_rows: np.ndarray) -> np.ndarray:
    """Sample index of each coded row (inverse of _coded_pool)."""
    return x_rows.reshape(x_rows.shape[0], -1)[:, 0].astype(np.int64) - 1


def _agent_ids(part, a):
    tr = _ids(part.x_train[a, : part.n_train[a]])
    te = _ids(part.x_test[a, : part.n_test[a]])
    return tr, te


def _check_structure(part, x, y):
    """Invariants every partition must satisfy; returns all used sample ids."""
    num_agents = part.n_train.shape[0]
    assert part.x_train.dtype == np.float32 and part.x_test.dtype == np.float32
    for arr in (part.y_train, part.n_train, part.y_test, part.n_test):
        assert arr.dtype == np.int32
    assert part.y_all.dtype == np.int32 and part.owner_all.dtype == np.int32
    assert part.x_train.shape[:2] == part.y_train.shape
    assert part.x_test.shape[:2] == part.y_test.shape
    assert part.x_train.shape[2:] == x.shape[1:] == part.x_all.shape[1:]
    assert part.x_train.shape[1] == part.n_train.max()
    assert part.x_test.shape[1] == part.n_test.max()
    assert (part.n_train >= 1).all() and (part.n_test >= 1).all()
    used = []
    for a in range(num_agents):
        ntr, nte = int(part.n_train[a]), int(part.n_test[a])
        assert ntr == int(0.8 * (ntr + nte))
        # Padding rows are zero, real rows (coded from 1) are not.
        assert not part.x_train[a, ntr:].any() and not part.y_train[a, ntr:].any()
        assert not part.x_test[a, nte:].any() and not part.y_test[a, nte:].any()
        tr, te = _agent_ids(part, a)
        np.testing.assert_array_equal(part.y_train[a, :ntr], y[tr])
        np.testing.assert_array_equal(part.y_test[a, :nte], y[te])
        np.testing.assert_array_equal(part.x_train[a, :ntr], x[tr])
        np.testing.assert_array_equal(part.x_test[a, :nte], x[te])
        used.extend([tr, te])
    used = np.concatenate(used)
    assert np.unique(used).shape[0] == used.shape[0], "a sample is used twice"
    # Pooled set = concatenation of the agents' real test samples, in order.
    pooled_x = np.concatenate(
        [part.x_test[a, : part.n_test[a]] for a in range(num_agents)]
    )
    np.testing.assert_array_equal(part.x_all, pooled_x)
    np.testing.assert_array_equal(part.y_all, y[_ids(pooled_x)])
    np.testing.assert_array_equal(
        part.owner_all, np.repeat(np.arange(num_agents), part.n_test)
    )
    assert part.num_classes > y.max()
    return used


def _pathological_reference(y, num_classes, num_agents, k, base, frac, seed):
    """Per-agent sample ids of the documented pathological algorithm, loop by loop.

    Written from the docstring of ``demjax.data.partition.partition``: label
    pools shuffled in label order, then lognormal slot weights, first pass,
    second pass, then each agent's samples shuffled (cap and split not applied).
    """
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in range(num_classes)]
    w = rng.lognormal(0.0, 1.0, size=(num_agents, k))
    slots_of = {c: [] for c in range(num_classes)}
    for u in range(num_agents):
        for j in range(k):
            slots_of[(u + j) % num_classes].append((u, j))
    got = {(u, j): [] for u in range(num_agents) for j in range(k)}
    for c in range(num_classes):
        b = min(base, len(pools[c]) // max(len(slots_of[c]), 1))
        for s in sorted(slots_of[c]):
            got[s] += [pools[c].pop(0) for _ in range(b)]
    for c in range(num_classes):
        remaining = len(pools[c])
        total_w = sum(w[s] for s in slots_of[c])
        for s in sorted(slots_of[c]):
            extra = int(frac * remaining * w[s] / total_w)
            got[s] += [pools[c].pop(0) for _ in range(extra)]
    out = []
    for u in range(num_agents):
        ids = np.array([i for j in range(k) for i in got[(u, j)]], dtype=np.int64)
        out.append(ids[rng.permutation(ids.shape[0])])
    return out


# ----------------------------------------------------------------------------
# Sources


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    ints = rng.integers(-(2**20), 2**20, size=(2, 3), dtype=np.int32)
    floats = rng.normal(size=(7,)).astype(np.float32)
    cases = [
        ("img", images, 0x08, ">u1"),
        ("lbl", labels, 0x08, ">u1"),
        ("int", ints, 0x0C, ">i4"),
        ("flt", floats, 0x0D, ">f4"),
    ]
    for stem, arr, code, be in cases:
        data = _idx_bytes(arr, code, be)
        path = tmp_path / (stem + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
        out = read_idx(path)
        assert out.shape == arr.shape
        assert out.dtype.isnative
        np.testing.assert_array_equal(out, arr)
    # Big-endian dims: 300 > 255 only parses right if the 4 bytes are read >u4.
    wide = (np.arange(300) % 256).astype(np.uint8).reshape(1, 300)
    (tmp_path / "wide").write_bytes(_idx_bytes(wide, 0x08, ">u1"))
    assert read_idx(tmp_path / "wide").shape == (1, 300)


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ConfigError, match="magic"):
        read_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ConfigError, match="10"):
        read_idx(short)


def _write_fashion(tmp_path, gz: bool, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n_train + n_test, 28, 28), dtype=np.uint8)
    lbls = rng.integers(0, 10, size=(n_train + n_test,), dtype=np.uint8)
    files = {
        "train-images-idx3-ubyte": imgs[:n_train],
        "train-labels-idx1-ubyte": lbls[:n_train],
        "t10k-images-idx3-ubyte": imgs[n_train:],
        "t10k-labels-idx1-ubyte": lbls[n_train:],
    }
    for stem, arr in files.items():
        data = _idx_bytes(arr, 0x08, ">u1")
        if gz:
            (tmp_path / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (tmp_path / stem).write_bytes(data)
    return imgs, lbls


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_files(tmp_path, gz):
    imgs, lbls = _write_fashion(tmp_path, gz)
    x, y, c = load_source("fashion_mnist", data_dir=str(tmp_path), standardize=False)
    assert c == 10
    assert x.shape == (10, 28, 28, 1) and x.dtype == np.float32
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, lbls)  # Train first, then test.
    np.testing.assert_allclose(x[..., 0], imgs / 255.0, rtol=1e-6)
    xs, _, _ = load_source("fashion_mnist", data_dir=str(tmp_path))
    ref = imgs.astype(np.float64) / 255.0
    ref = (ref - ref.mean()) / (ref.std() + 0.001)
    np.testing.assert_allclose(xs[..., 0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="no " + FASHION_DIR)
def test_fashion_mnist_installed():
    x, y, c = load_source("fashion_mnist", standardize=False)
    assert x.shape == (70000, 28, 28, 1) and x.dtype == np.float32
    assert y.shape == (70000,) and y.dtype == np.int32 and c == 10
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 7000))
    assert x.min() == 0.0 and x.max() == 1.0


def test_fashion_mnist_missing(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as info:
        load_source("fashion_mnist", data_dir=str(missing))
    msg = str(info.value)
    assert str(missing) in msg and "dataset-fashion-mnist" in msg
    assert "fashion_mnist_tfds" in msg and "\n" not in msg
    # Directory present, a file absent.
    _write_fashion(tmp_path, gz=True)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataNotFoundError) as info:
        load_source("fashion_mnist", data_dir=str(tmp_path))
    assert "t10k-labels-idx1-ubyte" in str(info.value)
    assert "dataset-fashion-mnist" in str(info.value)


def test_digits():
    from sklearn.datasets import load_digits

    x, y, c = load_source("digits", standardize=False)
    ref = load_digits()
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32 and c == 10
    np.testing.assert_allclose(x[..., 0], ref.images / 16.0, rtol=1e-6)
    np.testing.assert_array_equal(y, ref.target)
    xs, ys, _ = load_source("digits")
    ref_s = ref.images / 16.0
    ref_s = (ref_s - ref_s.mean()) / (ref_s.std() + 0.001)
    np.testing.assert_allclose(xs[..., 0], ref_s, rtol=1e-5, atol=1e-5)
    assert ys.dtype == np.int32


def test_unknown_source():
    with pytest.raises(ConfigError, match="dataset=.*accepted: digits, fashion"):
        load_source("imagenet")


def test_tfds_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DataNotFoundError, match=r"pip install 'demjax\[tfds\]'"):
        load_source("mnist")


def test_tfds_load_failure_is_data_not_found(monkeypatch, tmp_path):
    """A tfds exception becomes one line naming data_dir (fake tfds module)."""

    def fake_load(*args, **kwargs):
        raise RuntimeError("Dataset mnist not found in\n/somewhere; download=False")

    fake = types.ModuleType("tensorflow_datasets")
    fake.load = fake_load
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    monkeypatch.setattr(sources_mod, "_tensorflow_available", lambda: True)
    with pytest.raises(DataNotFoundError) as info:
        load_source("mnist", data_dir=str(tmp_path), download=False)
    msg = str(info.value)
    assert str(tmp_path) in msg and "\n" not in msg and "mnist" in msg


def test_tfds_mock_mnist():
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")
    with tfds.testing.mock_data(num_examples=6):
        x, y, c = load_source("mnist", download=False, standardize=False)
    assert c == 10
    assert x.shape == (12, 28, 28, 1) and x.dtype == np.float32  # train + test
    assert y.shape == (12,) and y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert ((0 <= y) & (y < 10)).all()


# ----------------------------------------------------------------------------
# Partitions


def test_pathological_labels_counts_and_reference():
    num_classes, num_agents, k = 5, 7, 2
    x, y = _coded_pool(num_classes, [60, 45, 80, 30, 52])
    part = partition(x, y, num_classes, num_agents, seed=3, labels_per_agent=k)
    used = _check_structure(part, x, y)
    for a in range(num_agents):
        tr, te = _agent_ids(part, a)
        labels = set(y[np.concatenate([tr, te])].tolist())
        assert labels == {(a + j) % num_classes for j in range(k)}
    ref = _pathological_reference(y, num_classes, num_agents, k, 10, 0.055, seed=3)
    for a in range(num_agents):
        tr, te = _agent_ids(part, a)
        np.testing.assert_array_equal(np.concatenate([tr, te]), ref[a])
    assert used.shape[0] == sum(r.shape[0] for r in ref)


def test_pathological_second_pass_and_determinism():
    num_classes, num_agents = 4, 6
    x, y = _coded_pool(num_classes, 500)
    kwargs = dict(labels_per_agent=2, pool_fraction=0.5, base_per_label=3)
    p0 = partition(x, y, num_classes, num_agents, seed=0, **kwargs)
    p0b = partition(x, y, num_classes, num_agents, seed=0, **kwargs)
    p1 = partition(x, y, num_classes, num_agents, seed=1, **kwargs)
    for field in ("x_train", "y_train", "n_train", "x_test", "n_test", "owner_all"):
        np.testing.assert_array_equal(getattr(p0, field), getattr(p0b, field))
    assert not np.array_equal(p0.n_train, p1.n_train)
    used = _check_structure(p0, x, y)
    # 3 slots per label: 9 base samples, then about half the remaining 491.
    per_label = np.bincount(y[used], minlength=num_classes)
    assert ((per_label >= 9 + 245 - 3) & (per_label <= 9 + 246)).all()
    assert ((p0.n_train + p0.n_test) >= 2 * 3).all()
    ref = _pathological_reference(y, num_classes, num_agents, 2, 3, 0.5, seed=0)
    np.testing.assert_array_equal(p0.n_train + p0.n_test, [r.shape[0] for r in ref])


def test_pathological_cap_and_small_pools():
    x, y = _coded_pool(3, [5, 40, 40])
    # Label 0 has 5 samples for 4 slots: each slot takes 1 in the first pass.
    part = partition(x, y, 3, 4, labels_per_agent=2, seed=0, samples_per_agent=6)
    _check_structure(part, x, y)
    assert (part.n_train + part.n_test <= 6).all()


def test_too_many_agents_message():
    x, y = _coded_pool(4, 10)  # 40 samples, 10 per label.
    with pytest.raises(ConfigError) as info:
        partition(x, y, 4, 500, labels_per_agent=1, dataset_name="toy")
    msg = str(info.value)
    assert msg.startswith("num_agents=500 is too many for dataset toy")
    # One label per agent, 2 samples each: 5 agents per label fit.
    assert "at most 20 agents" in msg
    part = partition(x, y, 4, 20, labels_per_agent=1)
    assert (part.n_train == 1).all() and (part.n_test == 1).all()
    with pytest.raises(ConfigError, match="num_agents=21 .* at most 20 agents"):
        partition(x, y, 4, 21, labels_per_agent=1)
    for method in ("dirichlet", "iid"):
        with pytest.raises(ConfigError, match="num_agents=21 .* at most 20 agents"):
            partition(x, y, 4, 21, method=method)
        part = partition(x, y, 4, 20, method=method)
        _check_structure(part, x, y)


def test_dirichlet():
    num_classes, num_agents = 6, 9
    x, y = _coded_pool(num_classes, 70)
    p0 = partition(x, y, num_classes, num_agents, method="dirichlet", seed=5)
    used = _check_structure(p0, x, y)
    assert np.array_equal(np.sort(used), np.arange(y.shape[0]))  # Full coverage.
    p0b = partition(x, y, num_classes, num_agents, method="dirichlet", seed=5)
    p1 = partition(x, y, num_classes, num_agents, method="dirichlet", seed=6)
    np.testing.assert_array_equal(p0.x_train, p0b.x_train)
    assert not np.array_equal(p0.n_train, p1.n_train)
    # Small alpha: agents are label-skewed (most own few classes in bulk).
    skewed = partition(
        x, y, num_classes, num_agents, method="dirichlet", dirichlet_alpha=0.05
    )
    _check_structure(skewed, x, y)
    top = []
    for a in range(num_agents):
        labels = np.concatenate(
            [
                skewed.y_train[a, : skewed.n_train[a]],
                skewed.y_test[a, : skewed.n_test[a]],
            ]
        )
        top.append(np.bincount(labels).max() / labels.shape[0])
    assert np.median(top) > 0.5
    # Budget: samples_per_agent * A samples overall.
    small = partition(
        x, y, num_classes, num_agents, method="dirichlet", samples_per_agent=10
    )
    used = _check_structure(small, x, y)
    assert used.shape[0] == 10 * num_agents


def test_dirichlet_fixup_gives_every_agent_samples():
    # Tiny alpha with nearly as many agents as the data allows forces the fix-up.
    x, y = _coded_pool(2, 20)
    part = partition(x, y, 2, 20, method="dirichlet", dirichlet_alpha=0.01, seed=0)
    used = _check_structure(part, x, y)
    assert used.shape[0] == 40


def test_iid():
    x, y = _coded_pool(3, [31, 33, 39])  # 103 samples.
    part = partition(x, y, 3, 10, method="iid", seed=2)
    used = _check_structure(part, x, y)
    assert ((part.n_train == 8) & (part.n_test == 2)).all()
    assert used.shape[0] == 100
    again = partition(x, y, 3, 10, method="iid", seed=2)
    other = partition(x, y, 3, 10, method="iid", seed=3)
    np.testing.assert_array_equal(part.x_all, again.x_all)
    assert not np.array_equal(part.x_all, other.x_all)
    capped = partition(x, y, 3, 10, method="iid", samples_per_agent=5)
    _check_structure(capped, x, y)
    assert ((capped.n_train == 4) & (capped.n_test == 1)).all()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(method="shards"), "partition"),
        (dict(num_agents=1), "num_agents"),
        (dict(labels_per_agent=0), "labels_per_agent"),
        (dict(labels_per_agent=5), "labels_per_agent"),
        (dict(method="dirichlet", dirichlet_alpha=0.0), "dirichlet_alpha"),
        (dict(samples_per_agent=-1), "samples_per_agent"),
        (dict(samples_per_agent=1), "samples_per_agent"),
        (dict(train_fraction=1.0), "train_fraction"),
        (dict(pool_fraction=1.5), "pool_fraction"),
    ],
)
def test_bad_inputs(kwargs, field):
    x, y = _coded_pool(4, 20)
    args = dict(num_agents=4)
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        partition(x, y, 4, **args)
    msg = str(info.value)
    assert msg.startswith(field + "=") and "\n" not in msg
    assert "accepted" in msg


def test_unknown_partition_lists_accepted():
    x, y = _coded_pool(2, 10)
    with pytest.raises(ConfigError, match="accepted: " + ", ".join(POOL_PARTITIONS)):
        partition(x, y, 2, 2, method="nope")


def _config(**kw):
    base = dict(
        dataset="digits",
        data_dir=None,
        partition="pathological",
        num_agents=12,
        seed=0,
        labels_per_agent=2,
        dirichlet_alpha=0.5,
        samples_per_agent=0,
        standardize=True,
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_make_partition_digits():
    import ml_collections

    cfg = ml_collections.ConfigDict(vars(_config()))
    part = make_partition(cfg)
    assert part.num_agents == 12 and part.num_classes == 10
    assert part.input_shape == (8, 8, 1)
    x, y, _ = load_source("digits")
    direct = partition(x, y, 10, 12, seed=0)
    np.testing.assert_array_equal(part.x_train, direct.x_train)
    iid = make_partition(_config(partition="iid", data_dir="", samples_per_agent=20))
    assert ((iid.n_train + iid.n_test) == 20).all()
    with pytest.raises(ConfigError, match="partition='bad'"):
        make_partition(_config(partition="bad"))
    with pytest.raises(ConfigError, match="dataset='bad'"):
        make_partition(_config(dataset="bad"))
    with pytest.raises(ConfigError, match="num_agents=5000 is too many .*digits"):
        make_partition(_config(num_agents=5000))


def test_eval_subsample():
    x, y = _coded_pool(3, 50)
    part = partition(x, y, 3, 5, method="iid")
    m = part.y_all.shape[0]
    idx = eval_subsample(part, 7, seed=1)
    assert idx.dtype == np.int32 and idx.shape == (7,)
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < m
    np.testing.assert_array_equal(idx, eval_subsample(part, 7, seed=1))
    assert not np.array_equal(idx, eval_subsample(part, 7, seed=2))
    for s in (0, -1, m, m + 5):
        np.testing.assert_array_equal(eval_subsample(part, s, 0), np.arange(m))
        assert eval_subsample(part, s, 0).dtype == np.int32


def test_sources_listed():
    assert set(SOURCES) >= {"digits", "fashion_mnist", "mnist", "emnist", "cifar10"}
    assert set(POOL_PARTITIONS) == {"pathological", "dirichlet", "iid"}
    assert set(PARTITIONS) == {*POOL_PARTITIONS, "natural", "file", "arrays"}


def test_cifar100_through_tfds_names_its_data(monkeypatch, tmp_path):
    """cifar100 goes through tfds 'cifar100' (fake module: the call and the clear
    error when the data are absent)."""
    seen = {}

    def fake_load(name, **kwargs):
        seen.update(name=name, **kwargs)
        raise FileNotFoundError("Could not find cifar100 in " + str(tmp_path))

    fake = types.ModuleType("tensorflow_datasets")
    fake.load = fake_load
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    monkeypatch.setattr(sources_mod, "_tensorflow_available", lambda: True)
    with pytest.raises(DataNotFoundError) as info:
        load_source("cifar100", data_dir=str(tmp_path), download=False)
    assert seen["name"] == "cifar100" and seen["download"] is False
    msg = str(info.value)
    assert "dataset=cifar100" in msg and str(tmp_path) in msg and "\n" not in msg


def test_tfds_mock_cifar100_with_partitioners():
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")
    with tfds.testing.mock_data(num_examples=40):
        x, y, c = load_source("cifar100", download=False, standardize=False)
    assert c == 100 and x.shape == (80, 32, 32, 3) and x.dtype == np.float32
    part = partition(x, y, c, 4, method="iid", seed=0)
    assert part.num_agents == 4 and part.num_classes == 100
