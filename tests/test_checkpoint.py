"""Checkpoint/resume: a run killed after a checkpoint and resumed equals an
uninterrupted run of the same seed; the workdir convention refuses silent loss."""

import os
import sys

import pytest
from helpers import INTERRUPTED_ROUNDS

from demjax import train
from demjax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import default  # noqa: E402

ROUNDS = INTERRUPTED_ROUNDS  # 40


def config():
    """``helpers.INTERRUPTED_CLI`` as a config."""
    c = default.get_config()
    c.model, c.num_agents, c.num_levels, c.local_epochs = "mlr", 12, 2, 1
    c.checkpoint_every, c.progress, c.num_rounds = 3, False, ROUNDS
    return c


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, interrupted_run):
    whole = tmp_path / "whole"
    train.run(config(), str(whole))
    run = interrupted_run  # scripts/run.py, SIGINT after 5 rounds
    if run.returncode == 0:
        pytest.skip("the run finished before SIGINT arrived")
    assert run.returncode == 130, run.stderr
    assert "checkpoint saved" in run.stderr
    done = len(run.metrics.splitlines()) // 2
    assert 0 < done < ROUNDS
    train.run(config(), str(run.workdir))  # resumes
    assert (run.workdir / "metrics.jsonl").read_bytes() == (
        whole / "metrics.jsonl"
    ).read_bytes()


def test_workdir_convention(tmp_path):
    c = config()
    c.num_rounds = 3
    train.run(c, str(tmp_path))
    other = config()
    other.num_rounds, other.alpha = 3, 0.5
    with pytest.raises(ConfigError, match="different config.*alpha.*--overwrite"):
        train.run(other, str(tmp_path))
    res = train.run(other, str(tmp_path), overwrite=True)
    assert len(res["records"]) == 6
    # Extending num_rounds resumes from the last checkpoint (round 3) and adds 2.
    other.num_rounds = 5
    res = train.run(other, str(tmp_path))
    assert [r["round"] for r in res["records"]][-2:] == [4, 4]
    # Results without any checkpoint are never overwritten silently.
    plain = config()
    plain.num_rounds, plain.checkpoint_every = 2, 0
    train.run(plain, str(tmp_path / "plain"))
    with pytest.raises(ConfigError, match="without a checkpoint"):
        train.run(plain, str(tmp_path / "plain"))


def test_resume_from_older_config_without_new_fields(tmp_path):
    """A config.json written before a field existed resumes when the field keeps
    its default, and is refused when the new run changes it."""
    import json

    c = config()
    c.num_rounds = 3
    train.run(c, str(tmp_path))
    path = tmp_path / "config.json"
    old = json.loads(path.read_text())
    del old["aggregator"], old["trim_fraction"]  # as written by an older demjax
    path.write_text(json.dumps(old))
    c.num_rounds = 4
    res = train.run(c, str(tmp_path))
    assert [r["round"] for r in res["records"]][-1] == 3
    path.write_text(json.dumps(old))
    c.num_rounds, c.aggregator = 5, "median"
    with pytest.raises(ConfigError, match="different config.*aggregator"):
        train.run(c, str(tmp_path))
