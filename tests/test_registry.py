"""Every registered algorithm gets the round loop's machinery: the state sharded
over 8 forced CPU devices equals one device; agents trained in blocks equal all
agents at once; SIGINT after a checkpoint, then resume, equals an uninterrupted
run byte for byte; no jitted phase compiles more than once. One subprocess
(``tests/registry_check.py``) runs all algorithms, 2 rounds each."""

import json
import os
import subprocess
import sys

import pytest

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
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
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


@pytest.mark.slow(seconds=420)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_gets_the_loop_machinery(lines, algorithm):
    r = lines[algorithm]
    assert r["sharded_devices"] == 8  # the per-agent state is spread over the mesh
    assert _close(r["sharded"], r["ref"]) == []  # 8 devices == 1 device
    assert _close(r["all"], r["ref"]) == []  # blocks of 3 == all agents at once
    assert r["resumed_equal"]  # SIGINT + resume == uninterrupted, byte for byte
    for compiled in r["compilations"]:  # no recompilation after round 0
        assert set(compiled.values()) <= {0, 1}, compiled
        assert max(compiled.values()) == 1
