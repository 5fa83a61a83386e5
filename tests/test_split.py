"""Bring-your-own splits: split files, partition_from_arrays, train.run(partition=),
standardize modes, the data.json dataset card and scripts/export_split.py."""

from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from helpers import REPO, run_cli_batch, tiny_config

from demjax import data
from demjax.config import validate
from demjax.data import (
    make_split,
    partition_from_arrays,
    read_split_file,
    write_split_file,
)
from demjax.errors import ConfigError, DataFileError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
tiny = functools.partial(tiny_config, num_agents=4, num_levels=1, local_plan="all")


def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    """IDX bytes written with struct (independent of demjax.data.read_idx)."""
    head = bytes([0, 0, code, array.ndim])
    head += b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.astype(">u1").tobytes()


def _fashion_dir(tmp_path, n_train=30, n_test=12, seed=0):
    """A Fashion-MNIST folder in the real IDX format (4x4 images): images, labels."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n_train + n_test, 4, 4)).astype(np.uint8)
    labels = (np.arange(n_train + n_test) % 10).astype(np.uint8)
    d = tmp_path / "fmnist"
    d.mkdir()
    files = {
        "train-images-idx3-ubyte": imgs[:n_train],
        "train-labels-idx1-ubyte": labels[:n_train],
        "t10k-images-idx3-ubyte": imgs[n_train:],
        "t10k-labels-idx1-ubyte": labels[n_train:],
    }
    for stem, arr in files.items():
        (d / (stem + ".gz")).write_bytes(gzip.compress(_idx(arr)))
    return d, imgs, labels


def _fconfig(d, path, **kw):
    return tiny(
        dataset="fashion_mnist",
        data_dir=str(d),
        partition="file",
        partition_file=str(path),
        standardize="none",
        num_agents=kw.pop("num_agents", 3),
        **kw,
    )


AGENTS = [  # (name, train indices, test indices) into the train / test files
    ("alice", [0, 5, 5, 29], [11, 0]),
    ("bob", [1, 2], [3]),
    ("carol", [7, 8, 9, 10, 12], [4, 5, 6]),
]


@pytest.mark.parametrize("ext", ["json", "npz"])
def test_split_file_reproduces_per_agent_data_to_the_sample(tmp_path, ext):
    d, imgs, labels = _fashion_dir(tmp_path)
    path = tmp_path / f"split.{ext}"
    names, train, test = zip(*AGENTS, strict=True)
    write_split_file(path, names, train, test, index="files", dataset="fashion_mnist")
    split = make_split(_fconfig(d, path))
    part = split.partition
    assert split.names == ("alice", "bob", "carol")
    n_train = 30
    for a, (_, tr, te) in enumerate(AGENTS):
        assert part.n_train[a] == len(tr) and part.n_test[a] == len(te)
        want_tr = imgs[tr].astype(np.float32)[..., None] / 255.0
        want_te = imgs[n_train + np.array(te)].astype(np.float32)[..., None] / 255.0
        np.testing.assert_allclose(part.x_train[a, : len(tr)], want_tr, atol=1e-7)
        np.testing.assert_allclose(part.x_test[a, : len(te)], want_te, atol=1e-7)
        np.testing.assert_array_equal(part.y_train[a, : len(tr)], labels[tr])
        np.testing.assert_array_equal(
            part.y_test[a, : len(te)], labels[n_train + np.array(te)]
        )
        assert not part.x_train[a, len(tr) :].any()  # padding is zero
    owners = np.repeat(np.arange(3), [len(te) for _, _, te in AGENTS])
    np.testing.assert_array_equal(part.owner_all, owners)
    # The pool form of the same split gives the same partition.
    pool_path = tmp_path / f"pool.{ext}"
    write_split_file(
        pool_path, names, train, [np.array(t) + n_train for t in test], index="pool"
    )
    again = make_split(_fconfig(d, pool_path)).partition
    np.testing.assert_array_equal(again.x_train, part.x_train)
    np.testing.assert_array_equal(again.x_test, part.x_test)


def _write_json(path, doc):
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def _doc(agents, **kw):
    return {"agents": [dict(name=n, train=tr, test=te) for n, tr, te in agents], **kw}


@pytest.mark.parametrize(
    "doc, words",
    [
        (_doc([("a", [0], [0]), ("b", [30], [1]), ("c", [1], [1])]),
         ["'b'", "train index 30", "0..29"]),
        (_doc([("a", [0], [0]), ("b", [1], [12]), ("c", [1], [1])]),
         ["'b'", "test index 12", "0..11"]),
        (_doc([("a", [0], [0]), ("b", [], [1]), ("c", [1], [1])]),
         ["'b'", "no train samples"]),
        (_doc([("a", [0], [0]), ("a", [1], [1]), ("c", [1], [1])]),
         ["duplicate agent name 'a'"]),
        (_doc([("a", [0], [0]), ("", [1], [1]), ("c", [1], [1])]), ["name ''"]),
        (_doc([("a", [0], [0])]), ["1 agents", "at least 2"]),
        (_doc([("a", [0], [0]), ("b", [1.5], [1]), ("c", [1], [1])]),
         ["'b'", "not a list of integers"]),
        (_doc([("a", [0], [0]), ("b", [-1], [1]), ("c", [1], [1])]),
         ["'b'", "negative"]),
        (_doc([("a", [0], [0]), ("b", [1], [1]), ("c", [1], [1])], index="rows"),
         ["index='rows'", "files, pool"]),
        ({"agents": {"a": 1}}, ["not a split file"]),
        ({"format": "other", "agents": []}, ["format='other'"]),
        ("{not json", ["not valid JSON"]),
        ([1, 2], ["not a split file"]),
        ({"agents": [{"name": "a", "train": [0]}]}, ["agent 0", "'test'"]),
    ],
)  # fmt: skip
def test_bad_split_files_are_one_line_errors_naming_the_file(tmp_path, doc, words):
    d, _, _ = _fashion_dir(tmp_path)
    path = _write_json(tmp_path / "bad.json", doc)
    with pytest.raises(DataFileError) as err:
        make_split(_fconfig(d, path))
    msg = str(err.value)
    assert "\n" not in msg and f"partition_file={str(path)!r}" in msg, msg
    for w in words:
        assert w in msg, msg


def test_split_file_config_errors(tmp_path):
    d, _, _ = _fashion_dir(tmp_path)
    good = tmp_path / "s.json"
    write_split_file(good, ["a", "b"], [[0], [1]], [[0], [1]], dataset="digits")
    cases = [
        (_fconfig(d, tmp_path / "missing.json"), "no such file"),
        (_fconfig(d, tmp_path), "no such file"),
        (_fconfig(d, _write_json(tmp_path / "s.txt", "{}")), "unknown extension"),
        (_fconfig(d, good, num_agents=2), "dataset='digits'"),
        (tiny(partition="file", partition_file=str(good), num_agents=5),
         "--config.num_agents=2"),
        (tiny(partition="file"), "partition_file=''"),
        (tiny(partition_file=str(good)), "partition='file'"),
    ]  # fmt: skip
    for config, words in cases:
        with pytest.raises(ConfigError) as err:
            make_split(config)
        msg = str(err.value)
        assert words in msg and "\n" not in msg, msg
    with pytest.raises(ConfigError, match="partition_file"):
        validate(tiny(partition="file"))
    with pytest.raises(ConfigError, match="partition_file=.*no such file"):
        validate(tiny(partition="file", partition_file=str(tmp_path / "nope.json")))
    validate(tiny(partition="file", partition_file=str(good)))  # exists: accepted
    for field, value in (("partition_file", 3), ("standardize_mean", float("nan")),
                         ("standardize_std", float("inf")), ("standardize_std", "1"),
                         ("partition", "natural")):  # fmt: skip
        c = ml_collections.ConfigDict(tiny().to_dict(), type_safe=False)
        c[field] = value
        with pytest.raises(ConfigError) as err:
            validate(c)
        assert str(err.value).startswith(field + "="), str(err.value)


def test_bad_npz_split_files(tmp_path):
    d, _, _ = _fashion_dir(tmp_path)
    path = tmp_path / "s.npz"
    names, tr, te = np.array(["a", "b"]), np.array([0, 1, 2]), np.array([0, 1])
    cases = {
        "missing arrays": dict(names=names, train=tr),
        "train_counts": dict(names=names, train=tr, train_counts=np.array([1, 1]),
                             test=te, test_counts=np.array([1, 1])),
        "names is not": dict(names=np.array([1, 2]), train=tr,
                             train_counts=np.array([1, 2]), test=te,
                             test_counts=np.array([1, 1])),
        "no test samples": dict(names=names, train=tr, train_counts=np.array([1, 2]),
                                test=te, test_counts=np.array([2, 0])),
    }  # fmt: skip
    for words, arrays in cases.items():
        np.savez(path, **arrays)
        with pytest.raises(DataFileError) as err:
            make_split(_fconfig(d, path, num_agents=2))
        assert words in str(err.value) and str(path) in str(err.value)
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataFileError, match="not a valid .npz"):
        make_split(_fconfig(d, path, num_agents=2))
    # Pickled object arrays are refused (no pickles are loaded).
    np.savez(path, names=np.array([{"a": 1}], dtype=object), train=tr,
             train_counts=np.array([3]), test=te, test_counts=np.array([2]))  # fmt: skip
    with pytest.raises(DataFileError, match="not a valid .npz"):
        read_split_file(path)


def test_partition_from_arrays_both_forms():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(n, 3, 2)).astype(np.float32) for n in (4, 2, 3)]
    ys = [rng.integers(0, 5, n) for n in (4, 2, 3)]
    xt = [rng.normal(size=(n, 3, 2)).astype(np.float32) for n in (1, 2, 1)]
    yt = [rng.integers(0, 5, n) for n in (1, 2, 1)]
    split = partition_from_arrays(xs, ys, xt, yt, num_classes=6, names=["p", "q", "r"])
    part = split.partition
    assert split.names == ("p", "q", "r") and part.num_classes == 6
    assert part.x_train.shape == (3, 4, 3, 2) and part.x_train.dtype == np.float32
    assert part.y_train.dtype == np.int32
    for a in range(3):
        np.testing.assert_array_equal(part.x_train[a, : len(ys[a])], xs[a])
        np.testing.assert_array_equal(part.y_train[a, : len(ys[a])], ys[a])
        np.testing.assert_array_equal(part.x_test[a, : len(yt[a])], xt[a])
    np.testing.assert_array_equal(part.x_all, np.concatenate(xt))
    # Index form: one array per split plus per-agent indices.
    x_tr, y_tr = np.concatenate(xs), np.concatenate(ys)
    x_te, y_te = np.concatenate(xt), np.concatenate(yt)
    tr_idx = [np.arange(0, 4), np.arange(4, 6), np.arange(6, 9)]
    te_idx = [np.array([0]), np.array([1, 2]), np.array([3])]
    same = partition_from_arrays(
        x_tr, y_tr, x_te, y_te, train_idx=tr_idx, test_idx=te_idx, num_classes=6
    ).partition
    for f in ("x_train", "y_train", "n_train", "x_test", "y_test", "x_all"):
        np.testing.assert_array_equal(getattr(same, f), getattr(part, f))
    bad = [
        (lambda: partition_from_arrays(xs[:1], ys[:1], xt[:1], yt[:1]), "at least 2"),
        (lambda: partition_from_arrays(xs, ys[:2], xt, yt), "y_train has 2 agents"),
        (lambda: partition_from_arrays(xs, ys, xt, yt, num_classes=3), "labels in"),
        (lambda: partition_from_arrays(xs, ys, xt, yt, names=["a", "a", "b"]),
         "distinct"),
        (lambda: partition_from_arrays(x_tr, y_tr, x_te, y_te, train_idx=tr_idx,
                                       test_idx=[[0], [9], [1]]), "test_idx[1]"),
        (lambda: partition_from_arrays(x_tr, y_tr, x_te, y_te, train_idx=tr_idx,
                                       test_idx=[[0], [], [1]]), "agent 1"),
        (lambda: partition_from_arrays(x_tr, y_tr, x_te, y_te, train_idx=tr_idx),
         "both"),
    ]  # fmt: skip
    for call, words in bad:
        with pytest.raises(ConfigError) as err:
            call()
        assert words in str(err.value), str(err.value)


def test_standardize_modes():
    x, y, _ = data.load_source("digits", standardize="none")
    raw = x.astype(np.float64)
    g, stats = data.standardize_pool(x, "global")
    want = (raw - raw.mean()) / (raw.std() + 0.001)
    np.testing.assert_allclose(g, want, atol=1e-5)
    assert stats["mean"] == pytest.approx(raw.mean())
    np.testing.assert_array_equal(g, data.load_source("digits", standardize=True)[0])
    p, stats = data.standardize_pool(x, "per_pixel")
    want = (raw - raw.mean(0)) / (raw.std(0) + 0.001)
    np.testing.assert_allclose(p, want, atol=1e-4)
    assert np.abs(p.mean(0)).max() < 1e-4  # each pixel centred
    gv, _ = data.standardize_pool(x, "given", 0.5, 2.0)
    np.testing.assert_allclose(gv, (raw - 0.5) / 2.0, atol=1e-6)
    np.testing.assert_array_equal(data.standardize_pool(x, "none")[0], x)
    for bad in ("yes", 1, None, "Global"):
        c = ml_collections.ConfigDict(tiny().to_dict(), type_safe=False)
        c.standardize = bad
        with pytest.raises(ConfigError, match="standardize="):
            validate(c)
    with pytest.raises(ConfigError, match="standardize_std"):
        validate(tiny(standardize="given", standardize_std=0.0))
    with pytest.raises(ConfigError, match="standardize_mean"):
        validate(tiny(standardize="given", standardize_mean=float("inf")))


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    """A tiny pathological digits run: (its workdir, its result)."""
    from demjax.train import run

    workdir = tmp_path_factory.mktemp("ref") / "run"
    return workdir, run(tiny(), str(workdir))


def test_arrays_partition_run_and_dataset_card(tmp_path, ref_run):
    """train.run(partition=...) trains on the given arrays; data.json describes
    them (names, counts, classes, histogram, digest) and config.json records the
    partition and standardize fields."""
    from demjax.train import run

    base = make_split(tiny())
    part = base.partition
    xs = [part.x_train[a, : part.n_train[a]] for a in range(4)]
    ys = [part.y_train[a, : part.n_train[a]] for a in range(4)]
    xt = [part.x_test[a, : part.n_test[a]] for a in range(4)]
    yt = [part.y_test[a, : part.n_test[a]] for a in range(4)]
    names = ["w", "x", "y", "z"]
    split = partition_from_arrays(xs, ys, xt, yt, num_classes=10, names=names)
    with pytest.raises(ConfigError, match="partition='arrays'"):
        run(tiny(), str(tmp_path / "no"), partition=split)
    with pytest.raises(ConfigError, match="needs a ready partition"):
        run(tiny(partition="arrays"), str(tmp_path / "no2"))
    with pytest.raises(ConfigError, match="num_agents=3"):
        run(
            tiny(partition="arrays", num_agents=3),
            str(tmp_path / "no3"),
            partition=split,
        )
    out = run(tiny(partition="arrays"), str(tmp_path / "a"), partition=split)
    ref_dir, ref = ref_run
    assert out["final"] == ref["final"]  # the same data: the same run
    card = json.loads((tmp_path / "a" / "data.json").read_text())
    ref_card = json.loads((ref_dir / "data.json").read_text())
    assert card["partition_sha256"] == ref_card["partition_sha256"]
    assert [a["name"] for a in card["agents"]] == names
    n_tr, n_te = part.n_train, part.n_test
    assert [a["n_train"] for a in card["agents"]] == n_tr.tolist()
    assert card["samples_per_agent"]["train"] == {
        "min": int(n_tr.min()), "median": float(np.median(n_tr)),
        "max": int(n_tr.max()), "total": int(n_tr.sum()),
    }  # fmt: skip
    hist = np.zeros(10, int)
    for a in range(4):
        np.add.at(hist, part.y_train[a, : n_tr[a]], 1)
    assert card["label_histogram"]["train"]["counts"] == hist.tolist()
    classes = [
        len(set(part.y_train[a, : n_tr[a]]) | set(part.y_test[a, : n_te[a]]))
        for a in range(4)
    ]
    assert [a["classes"] for a in card["agents"]] == classes
    assert ref_card["sources"][0]["loader"] == "sklearn.datasets.load_digits"
    assert ref_card["standardize"]["mode"] == "global"
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["partition"] == "arrays" and cfg["standardize"] == "global"


def test_dataset_card_checksums_source_files(tmp_path):
    d, _, _ = _fashion_dir(tmp_path)
    path = tmp_path / "s.json"
    write_split_file(path, ["a", "b", "c"], *zip(*[(tr, te) for _, tr, te in AGENTS],
                     strict=True), index="files")  # fmt: skip
    card = data.data_card(make_split(_fconfig(d, path)))
    import hashlib

    by_name = {os.path.basename(s["path"]): s for s in card["sources"]}
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "s.json"):
        raw = (d / name if name != "s.json" else path).read_bytes()
        assert by_name[name]["sha256"] == hashlib.sha256(raw).hexdigest()
        assert by_name[name]["bytes"] == len(raw)
    assert card["num_agents"] == 3 and card["input_shape"] == [4, 4, 1]


def test_export_split_of_a_run_reruns_identically(tmp_path, ref_run):
    """Acceptance: a pathological run's split exported (scripts/export_split.py
    logic, in-process), then a run on that file: identical metrics."""
    from demjax.data.split import export_split
    from demjax.train import run

    ref_dir, _ = ref_run
    shutil.copytree(ref_dir, tmp_path / "a")
    out = tmp_path / "split.json"
    split = export_split(str(out), workdir=str(tmp_path / "a"))
    assert read_split_file(out).index == "pool" and split.num_agents == 4
    run(tiny(partition="file", partition_file=str(out)), str(tmp_path / "b"))
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == (
        tmp_path / "b" / "metrics.jsonl"
    ).read_bytes()
    # The card catches data that changed under the run.
    card = tmp_path / "a" / "data.json"
    doc = json.loads(card.read_text())
    card.write_text(json.dumps(dict(doc, partition_sha256="0" * 64)))
    with pytest.raises(ConfigError, match="differ from the run's"):
        export_split(str(tmp_path / "x.json"), workdir=str(tmp_path / "a"))


@pytest.mark.slow(seconds=60)
def test_export_split_script_and_split_file_from_run_py(tmp_path):
    """scripts/export_split.py writes a config's split; scripts/run.py on that file
    and on the config itself: identical metrics; a bad file: exit 2, one line."""
    args = ["--config.model=mlr", "--config.num_agents=4", "--config.num_rounds=2",
            "--config.local_epochs=1", "--config.num_levels=1",
            "--config.local_plan=all", "--config.progress=False"]  # fmt: skip
    out = tmp_path / "split.npz"
    env = dict(os.environ, PYTHONPATH=REPO)
    script = os.path.join(REPO, "scripts", "export_split.py")
    proc = subprocess.run(
        [sys.executable, script, f"--config={REPO}/configs/default.py", *args,
         f"--out={out}"], capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--config.partition_file=" in proc.stdout
    bad = _write_json(
        tmp_path / "bad.json", _doc([("a", [0], [0]), ("b", [9999], [1])])
    )
    file_args = [*args, "--config.partition=file"]
    (tmp_path / "runs").mkdir()
    res = run_cli_batch(
        {"ref": args, "file": [*file_args, f"--config.partition_file={out}"],
         "bad": [*file_args, "--config.num_agents=2",
                 f"--config.partition_file={bad}"]},
        tmp_path / "runs",
    )  # fmt: skip
    assert res["ref"].returncode == 0 and res["file"].returncode == 0, res[
        "file"
    ].stderr
    metrics = [(res[k].workdir / "metrics.jsonl").read_bytes() for k in ("ref", "file")]
    assert metrics[0] == metrics[1]
    err = [s for s in res["bad"].stderr.splitlines() if s.startswith("error:")]
    assert res["bad"].returncode == 2 and len(err) == 1 and "9999" in err[0]
    assert "Traceback" not in res["bad"].stderr
    proc = subprocess.run(
        [sys.executable, script, f"--out={tmp_path / 'x.json'}",
         f"--workdir={tmp_path / 'nowhere'}"], capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == 2 and "config.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_documented_split_file_example_reads(tmp_path):
    """The JSON example of docs/data.md is a valid split file of Fashion-MNIST."""
    text = open(os.path.join(REPO, "docs", "data.md")).read()
    block = text.split("```json\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "split.json"
    path.write_text(block)
    sf = read_split_file(path)
    assert sf.names == ("alice", "bob", "carol") and sf.index == "files"
    assert sf.dataset == "fashion_mnist"
    if not os.path.isdir(FASHION_DIR):
        pytest.skip(f"{FASHION_DIR} not installed")
    split = make_split(_fconfig(FASHION_DIR, path))
    x, y, _ = data.load_source("fashion_mnist", standardize="none")
    np.testing.assert_array_equal(split.partition.x_train[0, :4], x[[0, 17, 4, 31]])
    np.testing.assert_array_equal(split.partition.y_test[0, :2], y[[60003, 60009]])
