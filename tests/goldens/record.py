"""Records the golden metrics that ``tests/test_golden.py`` checks the code against.

The goldens are reference metrics of the current implementation: one
``<case>.jsonl`` per case in this directory, the deterministic fields of the run's
``metrics.jsonl`` (one JSON object per round and measurement point). The cases:

- every registered algorithm (``demjax.algorithms.ALGORITHMS``): the default
  config (``configs/default.py``: DemLearn's digits setup, 50 agents, an MLP, the
  default network for the decentralized plug-ins) with ``algorithm=<name>`` and
  ``num_rounds=3``, as ``scripts/run.py --config.algorithm=NAME
  --config.num_rounds=3`` runs it (FedGen with ``--config.fedgen.gen_steps=5``:
  its 50 default generator steps per round made it the slowest case, 14 s of
  the suite, without checking more);
- ``fmnist_paper``: ``configs/fmnist_paper.py`` (DemLearn-P, the paper's CNN on
  Fashion-MNIST) with ``num_rounds=2``; needs the IDX files. Its float results
  depend on the CPU's vector ISA, so it has one golden per kind:
  ``fmnist_paper.jsonl`` (no AVX-512, recorded on a 2-core AMD EPYC) and
  ``fmnist_paper.avx512.jsonl`` (a 2-core AVX-512 Xeon); ``record.py`` writes the
  one of the machine it runs on.

Regenerate only when a change is meant to alter results (a new algorithm, a fixed
bug, a deliberate change of numerics), and say so when committing the new files; a
refactor must pass the test against the goldens unchanged.

    python tests/goldens/record.py                 # every case
    python tests/goldens/record.py fedavg ditto    # the named cases only
    python tests/goldens/record.py --out DIR       # write elsewhere (e.g. to diff)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # so `configs` imports, as in scripts/run.py

from configs import default, fmnist_paper  # noqa: E402
from demjax import train  # noqa: E402
from demjax.algorithms import ALGORITHMS  # noqa: E402
from demjax.data.sources import DEFAULT_FASHION_MNIST_DIR  # noqa: E402

FMNIST_CASE = "fmnist_paper"
FMNIST_DIR = DEFAULT_FASHION_MNIST_DIR  # configs/fmnist_paper.py reads the default
DIGITS_ROUNDS = 3
FMNIST_ROUNDS = 2
GEN_STEPS = 5  # FedGen's generator steps per round in its case
# Fields of a metrics record that depend on the clock rather than on the numerics
# (metrics.jsonl has none today; timing lives in timing.jsonl). Dropped if present.
WALL_CLOCK_SUFFIXES = ("_s", "_time", "_seconds")


def float_kind() -> str:
    """The CPU class whose XLA:CPU float results the CNN case's golden holds:
    ``"avx512"`` on CPUs with AVX-512 (XLA's GEMM kernels, so the rounding,
    differ; two rounds of DemLearn's clustering turn that into accuracies a
    sample apart), ``""`` otherwise (the golden first recorded, on a 2-core AMD
    EPYC without AVX-512)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return ""
    return "avx512" if "avx512f" in flags else ""


def golden_path(case: str, directory: str = HERE, kind: str | None = None) -> str:
    """``<case>.jsonl``; the CNN case on an AVX-512 CPU ``<case>.avx512.jsonl``
    (``float_kind``; ``kind`` overrides the detection)."""
    kind = float_kind() if kind is None else kind
    suffix = f".{kind}" if case == FMNIST_CASE and kind else ""
    return os.path.join(directory, f"{case}{suffix}.jsonl")


def case_config(case: str):
    """The run config of a golden case (an algorithm name or ``fmnist_paper``).

    Only fields that change what is shown or written, never the metrics, differ
    from the command-line run: no progress bar.
    """
    if case == FMNIST_CASE:
        c = fmnist_paper.get_config()
        c.num_rounds = FMNIST_ROUNDS
        # The execution plan the golden was recorded with (CNN agents trained
        # in vmapped blocks of 2, im2col convolutions, XLA weight gradients);
        # another plan gives the same results only to float tolerance, which
        # DemLearn's clustering can amplify in two rounds.
        c.local_plan, c.conv_impl, c.matmul_impl = "block:2", "patches", "xla"
    else:
        c = default.get_config()
        c.algorithm = case
        c.num_rounds = DIGITS_ROUNDS
        if case == "fedgen":
            c.fedgen.gen_steps = GEN_STEPS
    c.progress = False
    return c


def deterministic(record: dict) -> dict:
    """``record`` without wall-clock fields."""
    return {k: v for k, v in record.items() if not k.endswith(WALL_CLOCK_SUFFIXES)}


def run_case(case: str, workdir: str) -> list[dict]:
    """Runs a case in-process into ``workdir``; its deterministic metric records."""
    return run_case_result(case, workdir)[0]


def run_case_result(case: str, workdir: str) -> tuple[list[dict], dict]:
    """``run_case`` and the ``train.run`` result (compiled variants etc.)."""
    result = train.run(case_config(case), workdir, overwrite=True)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [deterministic(json.loads(line)) for line in f if line.strip()], result


def read_golden(case: str, directory: str = HERE) -> list[dict]:
    with open(golden_path(case, directory)) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_golden(case: str, records: list[dict], directory: str = HERE) -> str:
    path = golden_path(case, directory)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def all_cases() -> list[str]:
    return [*ALGORITHMS, FMNIST_CASE]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="*", help=f"default: all of {all_cases()}")
    p.add_argument("--out", default=HERE, help="directory of the .jsonl files")
    args = p.parse_args(argv)
    cases = args.cases or all_cases()
    unknown = sorted(set(cases) - set(all_cases()))
    if unknown:
        p.error(f"unknown case(s) {unknown}; accepted: {all_cases()}")
    os.makedirs(args.out, exist_ok=True)
    for case in cases:
        if case == FMNIST_CASE and not os.path.isdir(FMNIST_DIR):
            print(f"{case}: skipped, no {FMNIST_DIR}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
            records = run_case(case, workdir)
        path = write_golden(case, records, args.out)
        print(
            f"{case}: {len(records)} records, {time.perf_counter() - t0:.1f} s -> {path}"
        )


if __name__ == "__main__":
    main()
