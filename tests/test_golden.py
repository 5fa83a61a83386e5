"""Every registered algorithm, and the Fashion-MNIST paper setup, reproduce their
golden metrics (``tests/goldens/<case>.jsonl``, written by
``tests/goldens/record.py``, whose docstring lists the cases and when to
regenerate them).

Each case runs in-process and its ``metrics.jsonl`` must match the golden record
for record: the same rows, the same keys, ints and strings (``round``, ``point``,
``num_active``, ``num_diverged``) and nulls equal, every float within ``ATOL``; and
every jitted phase and evaluator of the run compiled at most once.
"""

import math
import os
import subprocess
import sys

import pytest
from goldens.record import (
    ALGORITHMS,
    FMNIST_CASE,
    FMNIST_DIR,
    HERE,
    golden_path,
    read_golden,
    run_case_result,
)

# Records hold floats rounded to 6 decimals: one unit in the last digit (plus the
# binary representation error of such a difference).
ATOL = 1e-6
_SLACK = 1e-12


def _mismatches(got: list[dict], want: list[dict]) -> list[str]:
    if len(got) != len(want):
        return [f"{len(got)} records, golden has {len(want)}"]
    out = []
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        where = f"record {i} (round {w.get('round')}, point {w.get('point')!r})"
        if set(g) != set(w):
            out.append(
                f"{where}: keys {sorted(g)} != golden {sorted(w)} (missing "
                f"{sorted(set(w) - set(g))}, extra {sorted(set(g) - set(w))})"
            )
            continue
        for k, wv in w.items():
            gv = g[k]
            if isinstance(wv, float) and not isinstance(gv, bool):
                ok = isinstance(gv, (int, float)) and (
                    math.isclose(gv, wv, rel_tol=0.0, abs_tol=ATOL + _SLACK)
                    or (math.isnan(gv) and math.isnan(wv))
                )
                if not ok:
                    diff = abs(gv - wv) if isinstance(gv, (int, float)) else "-"
                    out.append(f"{where}: {k}={gv!r}, golden {wv!r} (|diff| {diff})")
            elif type(gv) is not type(wv) or gv != wv:
                out.append(f"{where}: {k}={gv!r}, golden {wv!r} (must be equal)")
    return out


def _check(case: str, workdir: str) -> None:
    path = golden_path(case)
    if not os.path.exists(path):
        pytest.fail(
            f"no golden metrics for {case!r} ({os.path.relpath(path)}): record them "
            f"with `python tests/goldens/record.py {case}` and commit the file",
            pytrace=False,
        )
    records, result = run_case_result(case, workdir)
    bad = _mismatches(records, read_golden(case))
    # Every jitted phase and evaluator compiled at most once (0: unused in the
    # case): no recompilation after round 0.
    many = {k: v for k, v in result["compilations"].items() if v > 1}
    if many:
        bad.append(f"compiled more than once (name: variants): {many}")
    if bad:
        pytest.fail(
            f"{case} differs from its golden metrics ({os.path.relpath(path)}; "
            f"floats to {ATOL}):\n  " + "\n  ".join(bad) + "\nIf the change is meant "
            f"to alter results, regenerate: `python tests/goldens/record.py {case}`",
            pytrace=False,
        )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_matches_golden(algorithm, tmp_path):
    _check(algorithm, str(tmp_path))


@pytest.mark.slow(seconds=240)
@pytest.mark.skipif(
    not os.path.isdir(FMNIST_DIR), reason=f"no Fashion-MNIST IDX files ({FMNIST_DIR})"
)
def test_fmnist_paper_matches_golden(tmp_path):
    # Recorded with XLA's optimizations on, as every user run compiles (the suite's
    # fast-compile setting changes the CNN's float results). It runs in a fresh
    # process: in this one, programs compiled earlier under the suite's setting
    # could be reused from the in-memory or persistent compilation caches.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_", "XLA_")) and k != "DEMJAX_CACHE_DIR"
    }
    env["DEMJAX_CACHE_DIR"] = str(tmp_path / "plan_cache")
    out = tmp_path / "records"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "record.py"), FMNIST_CASE, "--out", out],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = _mismatches(read_golden(FMNIST_CASE, str(out)), read_golden(FMNIST_CASE))
    if bad:
        pytest.fail(
            f"{FMNIST_CASE} differs from its golden metrics (floats to {ATOL}):\n  "
            + "\n  ".join(bad)
            + f"\nIf the change is meant to alter results, regenerate: "
            f"`python tests/goldens/record.py {FMNIST_CASE}`",
            pytrace=False,
        )


def test_every_golden_belongs_to_a_case():
    cases = {*ALGORITHMS, FMNIST_CASE}
    stale = sorted(
        name
        for name in os.listdir(HERE)
        if name.endswith(".jsonl") and name.split(".")[0] not in cases
    )
    # The CNN case: one golden per CPU kind (goldens/record.py float_kind).
    assert os.path.exists(golden_path(FMNIST_CASE, kind=""))
    assert os.path.exists(golden_path(FMNIST_CASE, kind="avx512"))
    assert not stale, f"golden files without a case (delete them): {stale}"


def test_mismatches_are_reported():
    want = [{"round": 0, "point": "sync", "c_gen": 0.5, "num_diverged": 0}]
    assert _mismatches([dict(want[0], c_gen=0.500001)], want) == []
    assert _mismatches([dict(want[0], c_gen=0.5001)], want)
    assert _mismatches([dict(want[0], num_diverged=1)], want)
    assert _mismatches([dict(want[0], num_diverged=0.0)], want)
    assert _mismatches([dict(want[0], c_gen=None)], want)
    assert _mismatches([{"round": 0, "point": "sync", "c_gen": 0.5}], want)
    assert _mismatches(want * 2, want)
