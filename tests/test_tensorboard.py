"""TensorBoard event files load with TensorFlow's event reader and hold the tags."""

import glob
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tensorboard_events_have_expected_tags(tmp_path):
    tf = pytest.importorskip("tensorflow")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "run.py"), "--tensorboard",
         "--quiet", f"--workdir={tmp_path}", "--config.num_rounds=3",
         "--config.num_agents=10", "--config.model=mlr", "--config.num_levels=2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demlearn:" not in proc.stderr  # --quiet: no progress bar
    files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert len(files) == 1
    seen = {}
    for event in tf.compat.v1.train.summary_iterator(files[0]):
        for v in event.summary.value:
            seen.setdefault(v.tag, []).append((event.step, v.simple_value))
    for point in ("local", "sync"):
        for metric in ("c_spe", "c_gen", "global_acc", "g_spe_l1", "g_gen_l2"):
            tag = f"{point}/{metric}"
            assert [s for s, _ in seen[tag]] == [0, 1, 2], tag
    assert "local/train_loss" in seen and "sync/train_loss" not in seen
