"""FEMNIST from LEAF's JSON shards: one agent per writer, writers sampled, files
in the real format written by the tests, and a 2-round scripts/run.py run."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from helpers import REPO, run_cli_batch, tiny_config

from demjax.data import leaf, make_split
from demjax.errors import ConfigError, DataFileError, DataNotFoundError

tiny = functools.partial(
    tiny_config, num_agents=3, num_levels=1, local_plan="all", dataset="femnist",
    partition="natural", standardize="none",
)  # fmt: skip

# writer -> (train samples, test samples); w3 only in the train shards.
WRITERS = {"w0": (3, 1), "w1": (2, 2), "w2": (4, 1), "w3": (5, 0), "w4": (1, 0)}


def _rows(writer: str, split: int, n: int) -> np.ndarray:
    """``[n, 784]`` rows coding (writer, split, sample) in the first pixels."""
    x = np.full((n, 784), 0.25, dtype=np.float32)
    x[:, 0] = int(writer[1:]) / 10
    x[:, 1] = split / 10
    x[:, 2] = np.arange(n) / 100
    return x


def _labels(writer: str, split: int, n: int) -> np.ndarray:
    return (np.arange(n) * 7 + int(writer[1:]) * 13 + split * 29) % 62


def _shard(writers, split):
    users = sorted(writers)
    return {
        "users": users,
        "num_samples": [writers[u] for u in users],
        "user_data": {
            u: {"x": _rows(u, split, writers[u]).tolist(),
                "y": _labels(u, split, writers[u]).tolist()}
            for u in users
        },
    }  # fmt: skip


def write_leaf(root, split_layout: bool = True):
    """LEAF shards: train/ and test/ (two train shards), or all_data_*.json."""
    root.mkdir(parents=True, exist_ok=True)
    tr = {u: n for u, (n, _) in WRITERS.items()}
    te = {u: n for u, (_, n) in WRITERS.items() if n}
    if split_layout:
        (root / "train").mkdir()
        (root / "test").mkdir()
        first = {u: tr[u] for u in ("w0", "w1")}
        rest = {u: tr[u] for u in tr if u not in first}
        for i, part in enumerate((first, rest)):
            (root / "train" / f"all_data_{i}_train_9.json").write_text(
                json.dumps(_shard(part, 0))
            )
        (root / "test" / "all_data_0_test_9.json").write_text(json.dumps(_shard(te, 1)))
    else:
        (root / "all_data_0.json").write_text(json.dumps(_shard(tr, 0)))
    return root


def _ids(x):
    """(writer, split, sample) of each row of float32 ``[n, 28, 28, 1]``."""
    flat = x.reshape(x.shape[0], -1)
    return [
        tuple(np.rint(flat[i, :3] * [10, 10, 100]).astype(int)) for i in range(len(x))
    ]


def test_natural_partition_is_one_agent_per_sampled_writer(tmp_path):
    root = write_leaf(tmp_path / "leaf")
    split = make_split(tiny(data_dir=str(root), seed=5))
    part = split.partition
    eligible = ["w0", "w1", "w2", "w3"]  # w4 has a single sample
    pick = np.random.default_rng(5).choice(4, 3, replace=False)
    assert split.names == tuple(sorted(eligible[i] for i in pick))
    assert part.num_classes == 62 and part.input_shape == (28, 28, 1)
    for a, w in enumerate(split.names):
        k = int(w[1:])
        n_tr, n_te = WRITERS[w]
        x_tr = part.x_train[a, : part.n_train[a]]
        y_tr = part.y_train[a, : part.n_train[a]]
        x_te = part.x_test[a, : part.n_test[a]]
        if n_te:  # LEAF's own split, in shard order
            assert _ids(x_tr) == [(k, 0, i) for i in range(n_tr)]
            assert _ids(x_te) == [(k, 1, i) for i in range(n_te)]
            np.testing.assert_array_equal(y_tr, _labels(w, 0, n_tr))
            np.testing.assert_allclose(
                x_tr.reshape(n_tr, -1), _rows(w, 0, n_tr), atol=1e-7
            )
        else:  # train shards only: the writer's samples split 80/20
            got = sorted(_ids(x_tr) + _ids(x_te))
            assert got == [(k, 0, i) for i in range(n_tr)]
            assert part.n_train[a] == int(0.8 * n_tr)
    # The same seed, the same partition.
    again = make_split(tiny(data_dir=str(root), seed=5))
    np.testing.assert_array_equal(again.partition.x_train, part.x_train)
    from demjax.data.split import export_split

    with pytest.raises(ConfigError, match="same dataset, data_dir, num_agents"):
        export_split(str(tmp_path / "s.json"), config=tiny(data_dir=str(root)))


def test_unsplit_shards_split_each_writer(tmp_path):
    root = write_leaf(tmp_path / "leaf", split_layout=False)
    split = make_split(tiny(data_dir=str(root), num_agents=4, samples_per_agent=0))
    assert split.names == ("w0", "w1", "w2", "w3")
    for a, w in enumerate(split.names):
        n = WRITERS[w][0]
        part = split.partition
        assert part.n_train[a] == max(1, int(0.8 * n))
        assert part.n_train[a] + part.n_test[a] == n
        rows = np.concatenate(
            [part.x_train[a, : part.n_train[a]], part.x_test[a, : part.n_test[a]]]
        )
        assert sorted(_ids(rows)) == [(int(w[1:]), 0, i) for i in range(n)]
    pool = leaf.load_femnist(str(root))  # all eligible writers
    assert pool.group_names == ("w0", "w1", "w2", "w3") and pool.num_train == 14


def test_femnist_config_errors(tmp_path):
    root = write_leaf(tmp_path / "leaf")
    cases = [
        (tiny(data_dir=str(root), num_agents=5), ConfigError, "at most 4"),
        (tiny(data_dir=""), DataNotFoundError, "needs data_dir"),
        (tiny(data_dir=str(tmp_path / "none")), DataNotFoundError, "not a directory"),
        (tiny(data_dir=str(tmp_path)), DataNotFoundError, "no LEAF JSON shard"),
        (tiny(data_dir=str(root), partition="iid"), ConfigError, "natural"),
        (tiny(dataset="digits"), ConfigError, "femnist"),
    ]
    for config, kind, words in cases:
        with pytest.raises(kind) as err:
            make_split(config)
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.slow(seconds=75)
def test_leaf_configs_run_from_run_py(tmp_path):
    """configs/femnist.py and configs/shakespeare.py on generated LEAF shards:
    2 rounds each from scripts/run.py."""
    root = write_leaf(tmp_path / "leaf")
    text_root = write_shakespeare(tmp_path / "shakespeare")
    (tmp_path / "runs").mkdir()
    small = ["--config.num_agents=3", "--config.num_rounds=2", "--config.num_levels=1",
             "--config.local_epochs=1", "--config.local_plan=all",
             "--config.progress=False"]  # fmt: skip
    results = run_cli_batch(
        {"femnist": [f"--config={REPO}/configs/femnist.py",
                     f"--config.data_dir={root}", "--config.model=mlr", *small],
         "shakespeare": [f"--config={REPO}/configs/shakespeare.py",
                         f"--config.data_dir={text_root}", "--config.hidden=(8,)",
                         *small]},
        tmp_path / "runs",
    )  # fmt: skip
    text = results["shakespeare"]
    assert text.returncode == 0, text.stderr[-2000:]
    card = json.loads((text.workdir / "data.json").read_text())
    assert card["num_classes"] == 81 and card["input_shape"] == [80]
    assert {a["name"] for a in card["agents"]} <= set(ROLES)
    rec = json.loads((text.workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= rec["c_gen"] <= 1.0 and rec["round"] == 1
    res = results["femnist"]
    assert res.returncode == 0, res.stderr[-2000:]
    lines = (res.workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["round"] for s in lines] == [0, 0, 1, 1]
    card = json.loads((res.workdir / "data.json").read_text())
    assert card["num_classes"] == 62 and card["num_agents"] == 3
    assert card["dataset"] == "femnist" and card["partition"] == "natural"
    assert {a["name"] for a in card["agents"]} <= set(WRITERS)
    assert len(card["sources"]) == 3  # the three shards, with checksums


# role -> (train windows, test windows)
ROLES = {"HAMLET": (6, 2), "OPHELIA": (5, 2), "GHOST": (4, 1), "YORICK": (3, 0)}
TEXT = "To be, or not to be~ that is the question: " * 4  # '~' is not in LEAF's set


def _windows(role: str, split: int, n: int):
    start = sum(map(ord, role)) % 20 + 7 * split
    xs = [TEXT[start + i : start + i + 80] for i in range(n)]
    ys = [TEXT[start + i + 80] for i in range(n)]
    return xs, ys


def write_shakespeare(root):
    """LEAF Shakespeare shards (train/ and test/): 80-character windows."""
    root.mkdir(parents=True)
    for split, sub in ((0, "train"), (1, "test")):
        (root / sub).mkdir()
        roles = {r: n[split] for r, n in ROLES.items() if n[split]}
        doc = {"users": sorted(roles), "num_samples": [roles[r] for r in sorted(roles)],
               "user_data": {}}  # fmt: skip
        for r, n in roles.items():
            xs, ys = _windows(r, split, n)
            doc["user_data"][r] = {"x": xs, "y": ys}
        (root / sub / f"all_data_{split}.json").write_text(json.dumps(doc))
    return root


def test_shakespeare_roles_and_character_ids(tmp_path):
    root = write_shakespeare(tmp_path / "s")
    config = tiny(dataset="shakespeare", model="char_rnn", num_agents=4,
                  data_dir=str(root))  # fmt: skip
    split = make_split(config)
    part = split.partition
    assert split.names == tuple(sorted(ROLES)) and part.num_classes == 81
    vocab = leaf.SHAKESPEARE_VOCAB
    assert len(vocab) == 80 and vocab.index("a") == 53
    for a, role in enumerate(split.names):
        n_tr, n_te = ROLES[role]
        if not n_te:
            continue
        xs, ys = _windows(role, 0, n_tr)
        want = [[vocab.find(c) if c in vocab else 80 for c in t] for t in xs]
        np.testing.assert_array_equal(part.x_train[a, :n_tr], want)
        np.testing.assert_array_equal(
            part.y_train[a, :n_tr], [vocab.find(c) if c in vocab else 80 for c in ys]
        )
        assert part.n_test[a] == n_te
    assert (part.x_train == 80).any()  # '~' is out of vocabulary
    bad = [
        (dict(model="mlr"), "model='mlr'"),
        (dict(standardize="global"), "standardize='global'"),
    ]
    for kw, words in bad:
        args = dict(dataset="shakespeare", model="char_rnn", num_agents=4,
                    data_dir=str(root))  # fmt: skip
        args.update(kw)
        with pytest.raises(ConfigError, match=words):
            make_split(tiny(**args))
    shard = root / "train" / "all_data_0.json"
    doc = json.loads(shard.read_text())
    doc["user_data"]["HAMLET"]["x"][1] = "short"
    shard.write_text(json.dumps(doc))
    with pytest.raises(DataFileError, match=f"{shard}: user 'HAMLET'.*80-character"):
        make_split(config)


def test_char_rnn_matches_a_numpy_lstm():
    """CharRNN = embedding, LSTM (flax's gate layout), last step, dense: against
    a NumPy LSTM written from the equations."""
    import jax

    from demjax.models import make_model

    model = make_model("char_rnn", 81, hidden=(5, 4))
    x = np.random.default_rng(0).integers(0, 81, (3, 7)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(1), x)["params"]
    got = np.asarray(model.apply({"params": params}, x))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    h_seq = p["embed"]["embedding"][x.astype(int)]  # [B, L, 8]
    for layer in (0, 1):
        cell = p[f"OptimizedLSTMCell_{layer}"]
        width = cell["hi"]["kernel"].shape[0]
        h = np.zeros((3, width))
        c = np.zeros((3, width))
        outs = []
        for t in range(h_seq.shape[1]):
            xt = h_seq[:, t]

            def gate(g, xt=xt, h=h, cell=cell):
                return (xt @ cell["i" + g]["kernel"] + h @ cell["h" + g]["kernel"]
                        + cell["h" + g]["bias"])  # fmt: skip

            i, f = sigmoid(gate("i")), sigmoid(gate("f"))
            g, o = np.tanh(gate("g")), sigmoid(gate("o"))
            c = f * c + i * g
            h = o * np.tanh(c)
            outs.append(h)
        h_seq = np.stack(outs, axis=1)
    want = h_seq[:, -1] @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------- TFF HDF5 files


def _write_h5(path, clients, x_key, make_x):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        for c, n in clients.items():
            g = f.create_group(f"examples/{c}")
            g[x_key] = make_x(c, n)
            g["label"] = (np.arange(n) + len(c)) % 62
    return path


def _emnist_x(c, n, split=0):
    x = np.full((n, 28, 28), 0.5, np.float32)
    x[:, 0, 0] = int(c[1:]) / 10
    x[:, 0, 1] = np.arange(n) / 100 + split
    return x


def test_tff_h5_femnist_clients_keep_their_split(tmp_path):
    train = {"c0": 3, "c1": 2, "c2": 4}
    test = {"c0": 1, "c1": 2, "c2": 1}
    _write_h5(tmp_path / "fed_emnist_train.h5", train, "pixels", _emnist_x)
    _write_h5(tmp_path / "fed_emnist_test.h5", test, "pixels",
              lambda c, n: _emnist_x(c, n, split=1))  # fmt: skip
    split = make_split(tiny(data_dir=str(tmp_path), num_agents=2, seed=1))
    pick = np.random.default_rng(1).choice(3, 2, replace=False)
    assert split.names == tuple(sorted(["c0", "c1", "c2"][i] for i in pick))
    part = split.partition
    for a, c in enumerate(split.names):
        n_tr, n_te = train[c], test[c]
        assert (part.n_train[a], part.n_test[a]) == (n_tr, n_te)
        np.testing.assert_array_equal(
            part.x_train[a, :n_tr, :, :, 0], _emnist_x(c, n_tr)
        )
        np.testing.assert_array_equal(
            part.x_test[a, :n_te, :, :, 0], _emnist_x(c, n_te, split=1)
        )
        np.testing.assert_array_equal(
            part.y_train[a, :n_tr], (np.arange(n_tr) + len(c)) % 62
        )
    assert part.num_classes == 62


def test_tff_h5_pachinko_cifar100_clients(tmp_path):
    def image(c, n):
        x = np.zeros((n, 32, 32, 3), np.uint8)
        x[:, 0, 0, 0] = int(c)
        x[:, 0, 0, 1] = np.arange(n)
        return x

    clients = {str(i): 5 for i in range(4)}
    _write_h5(tmp_path / "fed_cifar100_train.h5", clients, "image", image)
    _write_h5(tmp_path / "fed_cifar100_test.h5", {"0": 5}, "image", image)
    config = tiny(dataset="cifar100", data_dir=str(tmp_path), num_agents=4,
                  standardize="none")  # fmt: skip
    split = make_split(config)
    part = split.partition
    assert split.names == ("0", "1", "2", "3") and part.num_classes == 100
    assert part.input_shape == (32, 32, 3)
    for a, c in enumerate(split.names):
        assert (part.n_train[a], part.n_test[a]) == (4, 1)  # 80/20 of 5
        rows = np.concatenate([part.x_train[a, :4], part.x_test[a, :1]])
        np.testing.assert_allclose(rows[:, 0, 0, 0], int(c) / 255.0, atol=1e-7)
        assert sorted(np.rint(rows[:, 0, 0, 1] * 255).astype(int)) == [0, 1, 2, 3, 4]
    with pytest.raises(DataNotFoundError, match="fed_cifar100_train.h5"):
        make_split(tiny(dataset="cifar100", data_dir=str(tmp_path / "x"),
                        num_agents=4, standardize="none"))  # fmt: skip


def test_tff_h5_malformed_files(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "fed_emnist_train.h5"
    config = tiny(data_dir=str(tmp_path), num_agents=2)
    _write_h5(path, {"c0": 3, "c1": 2}, "pixels", _emnist_x)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFileError, match=str(path)):
        make_split(config)
    with h5py.File(path, "w") as f:
        f["examples/c0/pixels"] = np.zeros((2, 28, 28), np.float32)
    with pytest.raises(DataFileError, match="label"):
        make_split(config)
    with h5py.File(path, "w") as f:
        for c in ("c0", "c1"):
            f[f"examples/{c}/pixels"] = np.zeros((2, 27, 28), np.float32)
            f[f"examples/{c}/label"] = np.zeros(2, np.int64)
    with pytest.raises(DataFileError, match="'c0' has x"):
        make_split(config)
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataFileError, match="not a TFF HDF5 file"):
        make_split(config)
