"""FEMNIST from LEAF's JSON shards: one agent per writer, writers sampled, files
in the real format written by the tests, and a 2-round scripts/run.py run."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from helpers import REPO, run_cli_batch, tiny_config

from demjax.data import leaf, make_split
from demjax.errors import ConfigError, DataNotFoundError

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


@pytest.mark.slow(seconds=45)
def test_femnist_config_runs_from_run_py(tmp_path):
    """configs/femnist.py on generated LEAF shards: 2 rounds from scripts/run.py."""
    root = write_leaf(tmp_path / "leaf")
    (tmp_path / "runs").mkdir()
    res = run_cli_batch(
        {"femnist": [f"--config={REPO}/configs/femnist.py",
                     f"--config.data_dir={root}", "--config.num_agents=3",
                     "--config.model=mlr", "--config.num_rounds=2",
                     "--config.num_levels=1", "--config.local_epochs=1",
                     "--config.local_plan=all", "--config.progress=False"]},
        tmp_path / "runs",
    )["femnist"]  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    lines = (res.workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["round"] for s in lines] == [0, 0, 1, 1]
    card = json.loads((res.workdir / "data.json").read_text())
    assert card["num_classes"] == 62 and card["num_agents"] == 3
    assert card["dataset"] == "femnist" and card["partition"] == "natural"
    assert {a["name"] for a in card["agents"]} <= set(WRITERS)
    assert len(card["sources"]) == 3  # the three shards, with checksums
