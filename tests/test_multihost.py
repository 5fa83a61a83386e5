"""A 2-process job (jax.distributed.initialize, gloo CPU collectives) equals the
one-device run: two ``scripts/run.py`` processes with 4 forced CPU devices each
shard 16 agents over the 8 devices of both processes."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from helpers import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "scripts", "run.py")
OVERRIDES = [
    "--config.model=mlr",
    "--config.num_agents=16",
    "--config.num_rounds=2",
    "--config.num_levels=2",
    "--config.local_epochs=1",
    "--config.progress=False",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow(seconds=30)  # two processes and a reference run
def test_two_processes_equal_single_device(tmp_path):
    port = _free_port()
    workdir = str(tmp_path / "mh")
    env = dict(
        os.environ,
        XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO,
    )
    logs = [tmp_path / f"proc{i}" for i in range(2)]
    procs = []
    try:
        for i in range(2):
            with open(f"{logs[i]}.out", "w") as out, open(f"{logs[i]}.err", "w") as err:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            RUN,
                            *OVERRIDES,
                            f"--workdir={workdir}",
                            "--config.checkpoint_every=1",
                            f"--coordinator_address=localhost:{port}",
                            "--num_processes=2",
                            f"--process_id={i}",
                        ],
                        stdout=out,
                        stderr=err,
                        env=env,
                    )
                )
        # One failing process ends the test at once (its peer would wait for it).
        deadline = time.monotonic() + 180
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # never leave a process behind
            if p.poll() is None:
                p.kill()
            p.wait()
    outs = [(open(f"{log}.out").read(), open(f"{log}.err").read()) for log in logs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i}: {err[-3000:]}"
    # Process 0 reports (gloo prints its connections to stdout in both).
    assert "workdir" in outs[0][0] and "workdir" not in outs[1][0]
    assert "c_spe" in outs[0][0] and "c_spe" not in outs[1][0]
    # Orbax checkpoints were written by both processes together.
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]

    # The reference: one device, in this process.
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from configs import default
    from demjax import train

    c = default.get_config()
    c.model, c.num_agents, c.num_rounds, c.num_levels = "mlr", 16, 2, 2
    c.local_epochs, c.progress, c.num_devices = 1, False, 1
    ref_dir = str(tmp_path / "single")
    assert train.run(c, ref_dir)["num_devices"] == 1
    got, want = _records(workdir), _records(ref_dir)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, float):
                assert v == pytest.approx(b[k], abs=2e-5), k
            else:
                assert v == b[k], k
    with open(os.path.join(workdir, "tree_final.json")) as f:
        tree = json.load(f)
    with open(os.path.join(ref_dir, "tree_final.json")) as f:
        assert tree["agent_parent"] == json.load(f)["agent_parent"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--num_processes=2"], "--num_processes given alone"),
        (["--coordinator_address=localhost", "--num_processes=2",
          "--process_id=0"], "--coordinator_address='localhost' is not valid"),
        (["--coordinator_address=localhost:1", "--num_processes=2",
          "--process_id=2"], r"--process_id=2 is not valid; accepted: an integer in \[0, 2\)"),
        (["--coordinator_address=localhost:1", "--num_processes=0",
          "--process_id=0"], "--num_processes=0 is not valid"),
    ],
)  # fmt: skip
def test_bad_flags_exit_2_naming_the_flag(tmp_path, args, match):
    from demjax import multihost
    from demjax.errors import ConfigError

    values = dict(a.lstrip("-").split("=", 1) for a in args)
    with pytest.raises(ConfigError, match=match):
        multihost.initialize(
            values.get("coordinator_address"),
            int(values["num_processes"]) if "num_processes" in values else None,
            int(values["process_id"]) if "process_id" in values else None,
        )


@pytest.mark.cli(
    bad_process_id=[
        "--num_processes=2", "--process_id=5", "--coordinator_address=localhost:1"
    ]
)  # fmt: skip
def test_bad_flag_from_the_script_is_one_line(cli):
    proc = cli["bad_process_id"]
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --process_id=5 is not valid")
    )
