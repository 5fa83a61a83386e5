"""End-to-end runs on tiny configs, recompilation, determinism and the CLI."""

import functools
import json
import os
import re
import sys

import pytest
from helpers import DIGITS_CLI
from helpers import tiny_config as base_config

from demjax import train
from demjax.algorithms import hierarchical
from demjax.algorithms.hierarchical import FAMILY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 4
tiny_config = functools.partial(
    base_config, num_agents=10, num_rounds=ROUNDS, num_levels=2, tau=1
)


@pytest.fixture(scope="module")
def demlearn_run(tmp_path_factory):
    """``(result, workdir)`` of one DemLearn run of ``tiny_config()`` (regrouping
    every round), read by several tests."""
    workdir = tmp_path_factory.mktemp("demlearn")
    return train.run(tiny_config(), str(workdir)), workdir


@pytest.mark.parametrize("algorithm", sorted(FAMILY))
def test_every_algorithm_runs_end_to_end(algorithm, tmp_path, request):
    if algorithm == "demlearn":
        result, workdir = request.getfixturevalue("demlearn_run")
    else:
        workdir = tmp_path
        result = train.run(tiny_config(algorithm=algorithm), str(workdir))
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * ROUNDS  # two measurement points per round
    recs = [json.loads(line) for line in lines]
    assert [r["point"] for r in recs[:2]] == ["local", "sync"]
    for r in recs:
        assert 0.0 <= r["c_spe"] <= 1.0 and 0.0 <= r["c_gen"] <= 1.0
    for name in ("config.json", "metrics.csv", "timing.jsonl", "tree_final.json"):
        assert (workdir / name).exists(), name
    assert json.loads((workdir / "config.json").read_text())["algorithm"] == algorithm
    final = result["final"]["sync"]
    if algorithm == "local":
        assert final["global_acc"] is None
    else:
        assert 0.0 <= final["global_acc"] <= 1.0
    if algorithm in ("fedavg", "fedprox"):
        # After synchronization every agent holds the global model: C-GEN == Global.
        assert final["c_gen"] == pytest.approx(final["global_acc"], abs=1e-6)
    if FAMILY[algorithm].self_organizing:
        assert "g_spe_l2" in final and "g_gen_l1" in final


def test_learning_happens_on_digits(demlearn_run):
    # Local training on 2 labels per agent must specialize quickly (4 rounds).
    result, _ = demlearn_run
    first, last = result["records"][0], result["final"]["local"]
    assert last["c_spe"] > 0.8
    assert result["records"][-2]["train_loss"] < first["train_loss"]


def test_new_trees_do_not_recompile(demlearn_run):
    result, workdir = demlearn_run  # tau=1, 4 rounds
    trees = [
        json.loads(line) for line in (workdir / "timing.jsonl").read_text().splitlines()
    ]
    assert trees[0]["round"] == -1 and "local_plan" in trees[0]  # the plan record
    assert all("linkage_s" in t for t in trees[1:])  # regrouped every round
    assert result["compilations"] == {
        "local_phase": 1,
        "aggregate_phase": 1,
        "mix_phase": 1,
        "evaluate": 1,
        "evaluate_root": 0,  # DemLearn's agents never all hold the root model
    }


def test_maxclust_mode_runs(tmp_path):
    c = tiny_config(tree_mode="maxclust", level_groups=(4, 2), num_levels=2)
    result = train.run(c, str(tmp_path))
    tree = json.loads((tmp_path / "tree_final.json").read_text())
    assert tree["level_sizes"] == [4, 2, 1]
    assert result["compilations"]["mix_phase"] == 1


@pytest.mark.parametrize("algorithm", ["demlearn_p", "fedavg"])
def test_in_place_rounds_equal_copying_rounds(algorithm, tmp_path, monkeypatch):
    """Buffer donation (the default) changes memory, never results: metrics equal
    a run whose phases copy, with partial participation (absent agents kept)."""
    c = tiny_config(num_rounds=3, algorithm=algorithm, participation=0.6)
    donating = train.run(c, str(tmp_path / "a"))
    assert donating["compilations"]["local_phase"] == 1
    resources = hierarchical.resources
    monkeypatch.setattr(
        hierarchical,
        "resources",
        lambda options, config: {**resources(options, config), "donate": False},
    )
    copying = train.run(c, str(tmp_path / "b"))
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == (
        tmp_path / "b" / "metrics.jsonl"
    ).read_bytes()
    assert donating["records"] == copying["records"]


def test_same_seed_gives_identical_metrics(tmp_path, demlearn_run):
    _, a = demlearn_run  # tiny_config()
    b = tmp_path / "b"
    train.run(tiny_config(), str(b))
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    train.run(tiny_config(seed=1), str(tmp_path / "c"))
    assert (a / "metrics.jsonl").read_bytes() != (
        tmp_path / "c" / "metrics.jsonl"
    ).read_bytes()


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """``(result, workdir)``: 3 rounds evaluated every 2nd round (and the last),
    C-GEN on a subsample of 20."""
    workdir = tmp_path_factory.mktemp("eval")
    c = tiny_config(num_rounds=3, eval_every=2, eval_samples=20)
    return train.run(c, str(workdir)), workdir


@pytest.mark.cli(digits=DIGITS_CLI)
def test_eval_subsample_is_reported(eval_run, cli):
    result, _ = eval_run
    assert result["eval_samples"] == 20
    proc = cli["digits"]  # scripts/run.py --config.eval_samples=20
    assert proc.returncode == 0, proc.stderr
    assert "evaluation subsample of 20" in proc.stderr  # an absl INFO line
    assert "orbax" not in proc.stderr and "xla_bridge" not in proc.stderr
    # Every INFO line (absl format "I<date> <time> <thread> <file>:<line>] ...")
    # comes from a demjax module.
    demjax_files = {f for _, _, fs in os.walk(os.path.join(REPO, "demjax")) for f in fs}
    info = re.findall(r"^I\d{4} \S+ +\d+ (\S+?):\d+\]", proc.stderr, re.M)
    assert info and set(info) <= demjax_files, info


@pytest.mark.slow(seconds=20)  # 70,000 images, 50 agents
def test_fmnist_paper_config_runs_on_real_data(tmp_path):
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("dataset-fashion-mnist not installed")
    sys.path.insert(0, REPO)
    from configs import fmnist_paper

    c = fmnist_paper.get_config()
    c.num_rounds = 1
    c.model = "mlr"  # the CNN round is covered by benchmarks; keep the suite fast
    c.progress = False
    result = train.run(c, str(tmp_path))
    assert result["final"]["local"]["c_spe"] > 0.5  # 2 labels per agent, one round


BAD_INPUTS = [
    (["--config.algorithm=fedsgd"], "algorithm"),
    (["--config.dataset=imagenet"], "dataset"),
    (["--config.linkage=median"], "linkage"),
    (["--config.distance=manhattan"], "distance"),
    (["--config.num_agents=1"], "num_agents"),
    (["--config.labels_per_agent=11"], "labels_per_agent"),
    (["--config.num_agents=5000"], "num_agents"),
    (
        ["--config.dataset=fashion_mnist", "--config.data_dir=/nonexistent/fm"],
        "data_dir",
    ),
    (["--config.num_agentz=5"], "num_agentz"),
    (["--config.num_agents=abc"], "num_agents"),
    (["--config.lr=inf"], "lr"),
    ([f"--config={REPO}/configs/no_such_config.py"], "config"),
    ([f"--config={REPO}/README.md"], "config"),  # not Python: a SyntaxError
]


BAD_CLI = {
    f"bad_{i}_{field}": [*args, "--config.num_rounds=1"]
    for i, (args, field) in enumerate(BAD_INPUTS)
}


@pytest.mark.parametrize("case", BAD_CLI)
@pytest.mark.cli(**BAD_CLI)
def test_cli_bad_input_is_one_line_exit_2(case, cli):
    proc, field = cli[case], case.split("_", 2)[2]
    assert proc.returncode == 2, proc.stderr
    err_lines = [s for s in proc.stderr.splitlines() if s.startswith("error:")]
    assert len(err_lines) == 1 and field in err_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert any(
        w in err_lines[0] for w in ("accepted", "apt-get", "at most", "invalid literal")
    )


@pytest.mark.cli(help=["--help"])
def test_cli_help_exits_0(cli):
    proc = cli["help"]
    assert proc.returncode == 0, proc.stderr
    assert "--workdir" in proc.stdout and "--[no]overwrite" in proc.stdout


def test_cli_log_filter_selects_by_logger_name():
    """scripts/run.py's filter keeps demjax's INFO records and everyone's warnings,
    whatever the file path: a library inside a clone named ``demjax`` (its
    virtualenv at ``<clone>/.venv``) is still filtered out."""
    import logging

    from demjax.run_output import cli_log_filter

    clone = "/home/u/demjax"
    lib = f"{clone}/.venv/lib/python3.11/site-packages/orbax/checkpoint/manager.py"

    def record(name, level, path):
        return logging.LogRecord(name, level, path, 1, "msg", (), None)

    assert not cli_log_filter(record("absl", logging.INFO, lib))  # orbax via absl
    assert not cli_log_filter(record("jax._src.xla_bridge", logging.INFO, lib))
    assert not cli_log_filter(record("demjaxx", logging.INFO, f"{clone}/x.py"))
    assert cli_log_filter(record("absl", logging.WARNING, lib))
    for name in ("demjax", "demjax.run_output", "demjax.continual.run"):
        assert cli_log_filter(record(name, logging.INFO, "/elsewhere/mod.py"))
    # Every demjax module logs through logging.getLogger(__name__), not absl.
    for dirpath, _, files in os.walk(os.path.join(REPO, "demjax")):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f)) as fh:
                    text = fh.read()
                assert "absl import logging" not in text or f == "train.py", f


def test_eval_every_skips_rounds_but_keeps_the_last(eval_run):
    _, workdir = eval_run
    recs = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [0, 0, 2, 2]
    timing = (workdir / "timing.jsonl").read_text().splitlines()
    assert len(timing) == 1 + 3  # the plan record, then one per round
