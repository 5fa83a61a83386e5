"""Every registered algorithm gets the round loop's machinery: the state sharded
over 8 forced CPU devices, each device's agents trained under shard_map (but the
gossip algorithms, left to XLA's partitioner), equals one device training agents
in blocks; SIGINT after a checkpoint, then resume, equals an uninterrupted
run byte for byte; no jitted phase compiles more than once; a 2-process job
equals one process. One subprocess (``tests/registry_check.py``), and one pair of
processes, run all algorithms, 2 rounds each."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from helpers import xla_flags

from demjax import algorithms
from demjax.algorithms import ALGORITHMS

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Sums of float32 in another order (sharded aggregation, blocks): the records
# hold accuracies over a few hundred samples and losses rounded to 6 decimals.
ATOL = 2e-5


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    out = tmp_path_factory.mktemp("registry")
    env = dict(
        os.environ,
        XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO,
        DEMJAX_CACHE_DIR=str(out / "cache"),
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "registry_check.py"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return {g["algorithm"]: g for g in got}


def _close(got: list[dict], want: list[dict]) -> list[str]:
    bad = []
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k, v in w.items():
            if isinstance(v, float):
                if abs(g[k] - v) > ATOL:
                    bad.append(f"round {w['round']} {w['point']} {k}: {g[k]} != {v}")
            elif g[k] != v:
                bad.append(f"round {w['round']} {w['point']} {k}: {g[k]!r} != {v!r}")
    return bad


# One test over the whole registry (the runs are shared): its cost is paid once.
@pytest.mark.slow(seconds=270)
def test_every_algorithm_gets_the_loop_machinery(lines):
    bad = []
    assert sorted(lines) == sorted(ALGORITHMS)
    for name in ALGORITHMS:
        r = lines[name]
        if r["sharded_devices"] != 8:  # the per-agent state is spread over the mesh
            bad.append(f"{name}: state on {r['sharded_devices']} devices, not 8")
        # 8 devices, each device's agents under shard_map == 1 device, blocks of 3
        bad += [f"{name} sharded: {m}" for m in _close(r["sharded"], r["ref"])]
        if (r["shard_mapped"] > 0) != algorithms.get(name).shard_mapped:
            bad.append(f"{name}: {r['shard_mapped']} programs under shard_map")
        if not r["resumed_equal"]:  # SIGINT + resume == uninterrupted, byte for byte
            bad.append(f"{name}: resumed metrics.jsonl differs from uninterrupted")
        for compiled in r["compilations"]:  # no recompilation after round 0
            if not (set(compiled.values()) <= {0, 1} and max(compiled.values()) == 1):
                bad.append(f"{name}: compiled variants {compiled}")
    assert bad == []


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Process 0's records of every algorithm in a 2-process job (4 forced CPU
    devices each, the state sharded over all 8)."""
    out = tmp_path_factory.mktemp("registry_mp")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO,
        DEMJAX_CACHE_DIR=str(out / "cache"),
    )
    script = os.path.join(HERE, "registry_check.py")
    procs = []
    try:
        for i in range(2):
            procs.append(
                subprocess.Popen(
                    [sys.executable, script, "--process", f"localhost:{port}",
                     str(i), str(out)],
                    stdout=open(out / f"p{i}.out", "w"),
                    stderr=open(out / f"p{i}.err", "w"),
                    env=env,
                )
            )  # fmt: skip
        # One failing process ends the wait at once (its peer would hang).
        deadline = time.monotonic() + 1200
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for p in procs:  # never leave a process behind
            if p.poll() is None:
                p.kill()
            p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, (out / f"p{i}.err").read_text()[-4000:]
    got = [
        json.loads(x)
        for x in (out / "p0.out").read_text().splitlines()
        if x.startswith("{")
    ]
    return {g["algorithm"]: g["records"] for g in got}


@pytest.mark.slow(seconds=200)
def test_two_processes_equal_one_process(lines, two_processes):
    assert sorted(two_processes) == sorted(ALGORITHMS)
    bad = []
    for name in ALGORITHMS:
        bad += [f"{name}: {m}" for m in _close(two_processes[name], lines[name]["ref"])]
    assert bad == []
