"""Checkpoint/resume: a run killed after a checkpoint and resumed equals an
uninterrupted run of the same seed; the workdir convention refuses silent loss."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from helpers import INTERRUPTED_ROUNDS, tiny_config

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


# ----------------------------------------------------- damaged checkpoints, lock


def short_config(rounds: int):
    """Tiny DemLearn run: checkpoints after rounds 1, 3 (every 2) and the last."""
    return tiny_config(
        num_agents=8, num_rounds=rounds, num_levels=2, checkpoint_every=2,
        tensorboard=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """``(whole, stopped)``: a 5-round run, and the same config stopped after 4
    rounds (checkpoints 2 and 4, as a run interrupted in round 4 leaves them)."""
    root = tmp_path_factory.mktemp("short")
    train.run(short_config(5), str(root / "whole"))
    train.run(short_config(4), str(root / "stopped"))
    return root / "whole", root / "stopped"


def tb_scalars(workdir) -> dict:
    """``{tag: [(step, value), ...]}`` of every TensorBoard event file (TFRecord
    framing read by hand: length, CRC, event proto, CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def damage(step_dir, kind: str) -> None:
    """Damages one checkpoint as a disk fault or a killed copy would."""
    if kind == "metadata":  # orbax's tree metadata overwritten
        (step_dir / "state" / "_METADATA").write_text("\x00garbage")
    elif kind == "truncated":  # the largest array data file cut in half
        f = max(
            (p for p in (step_dir / "state").rglob("*") if p.parent.name == "d"),
            key=lambda p: p.stat().st_size,
        )
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "checksum":  # readable arrays that are not the saved state
        meta = step_dir / "demjax" / "metadata"
        rec = json.loads(meta.read_text())
        rec["sha256"] = "0" * 64
        meta.write_text(json.dumps(rec))


@pytest.mark.parametrize("kind", ["metadata", "truncated", "checksum"])
def test_damaged_newest_checkpoint_falls_back(kind, short_runs, tmp_path, caplog):
    whole, stopped = short_runs
    assert sorted(os.listdir(whole / "checkpoints")) == ["4", "5"]  # keep 2
    work = tmp_path / "run"
    shutil.copytree(stopped, work)
    damage(work / "checkpoints" / "4", kind)
    with caplog.at_level(logging.WARNING, logger="demjax.checkpoint"):
        train.run(short_config(5), str(work))  # resumes after round 1, not 3
    warn = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warn) == 1 and "after round 3" in warn[0] and "\n" not in warn[0]
    assert os.listdir(work / "checkpoints_unreadable") == ["4"]
    assert sorted(os.listdir(work / "checkpoints")) == ["4", "5"]
    for name in ("metrics.jsonl", "metrics.csv"):
        assert (work / name).read_bytes() == (whole / name).read_bytes(), name
    timing = [json.loads(s)["round"] for s in (work / "timing.jsonl").open()]
    assert sorted(timing) == [-1, 0, 1, 2, 3, 4]  # the plan record (-1) anew
    got, want = tb_scalars(work), tb_scalars(whole)
    assert got.keys() == want.keys() and "sync/c_gen" in got
    for tag in want:  # no round twice, none after the checkpoint's left over
        assert got[tag] == want[tag], tag


def test_no_readable_checkpoint_is_one_line_error(short_runs, tmp_path):
    _, stopped = short_runs
    work = tmp_path / "run"
    shutil.copytree(stopped, work)
    damage(work / "checkpoints" / "4", "metadata")
    damage(work / "checkpoints" / "2", "truncated")
    with pytest.raises(ConfigError) as err:
        train.run(short_config(5), str(work))
    msg = str(err.value)
    assert str(work) in msg and "no readable checkpoint" in msg
    assert "--overwrite" in msg and "\n" not in msg
    assert sorted(os.listdir(work / "checkpoints_unreadable")) == ["2", "4"]


# A run of short_config(5) in its own process that stops (holding the workdir)
# after its metrics record number argv[3] until it reads a line from stdin.
_PAUSED_RUN = """
import sys
sys.path.insert(0, sys.argv[2])
from test_checkpoint import short_config
from demjax import run_output, train

real, seen = run_output.RunWriter.metrics, []
def metrics(self, record):
    real(self, record)
    seen.append(record)
    if len(seen) == int(sys.argv[3]):
        print("paused", flush=True)
        sys.stdin.readline()
run_output.RunWriter.metrics = metrics
train.run(short_config(5), sys.argv[1])
"""


def paused_run(workdir, after_records: int) -> subprocess.Popen:
    """``_PAUSED_RUN`` started; returns once it has paused."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_RUN, str(workdir), os.path.dirname(__file__),
         str(after_records)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )  # fmt: skip
    if proc.stdout.readline().strip() != "paused":
        proc.kill()
        raise AssertionError(proc.stderr.read()[-3000:])
    return proc


@pytest.mark.slow(seconds=20)  # a second process: JAX import and a 5-round run
def test_second_run_on_a_workdir_is_refused_and_the_first_unharmed(
    short_runs, tmp_path
):
    whole, _ = short_runs
    work = tmp_path / "run"
    first = paused_run(work, after_records=1)
    try:
        before = (work / "metrics.jsonl").read_bytes()
        for overwrite in (False, True):  # --overwrite must not touch it either
            with pytest.raises(ConfigError) as err:
                train.run(short_config(5), str(work), overwrite=overwrite)
            msg = str(err.value)
            assert f"in use by process {first.pid} " in msg and "\n" not in msg
        assert (work / "metrics.jsonl").read_bytes() == before
        out, errs = first.communicate("\n", timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, errs[-3000:]
    assert (work / "metrics.jsonl").read_bytes() == (
        whole / "metrics.jsonl"
    ).read_bytes()
    assert (work / ".lock").read_text() == ""  # released


@pytest.mark.slow(seconds=20)  # a second process: JAX import and a 3-round run
def test_killed_run_leaves_a_stale_lock_and_resumes_identically(
    short_runs, tmp_path, caplog
):
    """``kill -9`` in round 2 (after the checkpoint of rounds 0-1): the next run takes
    the lock over with a warning and ends with the uninterrupted run's metrics."""
    whole, _ = short_runs
    work = tmp_path / "run"
    first = paused_run(work, after_records=5)  # round 2's 'local' record
    first.kill()  # SIGKILL: no cleanup
    first.communicate(timeout=60)
    assert json.loads((work / ".lock").read_text())["pid"] == first.pid
    with caplog.at_level(logging.WARNING, logger="demjax.run_output"):
        train.run(short_config(5), str(work))
    warn = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
    assert len(warn) == 1 and f"process {first.pid} " in warn[0]
    for name in ("metrics.jsonl", "metrics.csv"):
        assert (work / name).read_bytes() == (whole / name).read_bytes(), name


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": pid, "host": "h", "since": 0}))
    c = short_config(1)
    c.checkpoint_every, c.tensorboard = 0, False
    with caplog.at_level(logging.WARNING, logger="demjax.run_output"):
        res = train.run(c, str(tmp_path))
    assert len(res["records"]) == 2
    warn = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
    assert len(warn) == 1 and f"process {pid} " in warn[0]
    assert (tmp_path / ".lock").read_text() == ""


def test_payload_checkpoints_fall_back_and_read_the_older_format(tmp_path, caplog):
    """checkpoint.save_payload / restore_payload on a small pytree, no training:
    the newest readable checkpoint wins, and one written without a checksum (an
    older demjax: orbax's single unnamed item) is read, then saved over."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from demjax import checkpoint

    like = {"w": np.zeros((3, 4), np.float32), "t": (np.zeros(2, np.int32),)}

    def at(step):
        return jax.tree.map(lambda x: x + step, like)

    mngr = checkpoint.manager(str(tmp_path / "new"), 3)
    for step in (1, 2, 3):
        checkpoint.save_payload(mngr, step, at(step))
    mngr.close()
    damage(tmp_path / "new" / "checkpoints" / "3", "checksum")
    mngr = checkpoint.manager(str(tmp_path / "new"), 3)
    with caplog.at_level(logging.WARNING, logger="demjax.checkpoint"):
        got, step = checkpoint.restore_payload(mngr, like)
    assert step == 2 and isinstance(got["t"], tuple)
    np.testing.assert_array_equal(got["w"], np.full((3, 4), 2.0, np.float32))
    assert "checksum mismatch" in caplog.text
    checkpoint.save_payload(mngr, 3, at(3))  # not skipped: the damaged 3 is gone
    assert mngr.all_steps() == [1, 2, 3]

    old = ocp.CheckpointManager(str(tmp_path / "old" / "checkpoints"))
    old.save(7, args=ocp.args.StandardSave(at(7)))
    old.wait_until_finished()
    old.close()
    mngr = checkpoint.manager(str(tmp_path / "old"), 2)
    got, step = checkpoint.restore_payload(mngr, like)
    assert step == 7 and got["t"][0].tolist() == [7, 7]
    checkpoint.save_payload(mngr, 8, at(8))  # with a checksum from now on
    mngr.close()
    mngr = checkpoint.manager(str(tmp_path / "old"), 2)
    got, step = checkpoint.restore_payload(mngr, like)
    assert step == 8 and got["t"][0].tolist() == [8, 8]


def test_damaged_result_files_are_one_line_errors(tmp_path):
    """A metrics line cut short by a kill is dropped; any other damage of the
    workdir's files is a one-line ConfigError naming the file and --overwrite."""
    from demjax import checkpoint
    from demjax.run_output import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n{"rou')
    assert read_jsonl(str(path)) == [{"round": 0}, {"round": 1}]
    path.write_text('{"round": 0}\n{"rou\n{"round": 1}\n')
    with pytest.raises(ConfigError, match=r"metrics\.jsonl: line 2 .*--overwrite"):
        read_jsonl(str(path))
    (tmp_path / "config.json").write_text('{"seed": ')
    with pytest.raises(ConfigError) as err:
        checkpoint.prepare_workdir(str(tmp_path), {"seed": 0}, overwrite=False)
    assert "config.json" in str(err.value) and "--overwrite" in str(err.value)
    assert "\n" not in str(err.value)
