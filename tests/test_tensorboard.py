"""TensorBoard event files load with TensorFlow's event reader and hold the tags."""

import glob

import pytest
from helpers import DIGITS_CLI


@pytest.mark.cli(digits=DIGITS_CLI)
def test_tensorboard_events_have_expected_tags(cli):
    tf = pytest.importorskip("tensorflow")
    proc = cli["digits"]  # scripts/run.py --tensorboard --quiet, 3 rounds
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demlearn:" not in proc.stderr  # --quiet: no progress bar
    files = glob.glob(str(proc.workdir / "tensorboard" / "events.out.tfevents.*"))
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
