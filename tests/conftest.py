"""Suite-wide fixtures, markers and the time budget.

Speed only, no test's claim depends on them:

- One persistent JAX compilation cache for the whole session, in a fresh temporary
  directory, also exported through the environment so that the ``scripts/run.py``
  subprocesses of the CLI tests read and fill the same cache. Many tests build the
  same tiny configs in new closures, so XLA compiles each program once per session
  instead of once per test. The cache starts empty on every run, so no result can
  depend on an earlier session.
- XLA's expensive LLVM passes are off (``jax_disable_most_optimizations``, also
  exported to the subprocesses): compiling the tiny programs of the tests costs
  more than running them, and this cuts the suite's CPU time by about a third.
  The HLO passes (fusion, buffer assignment, donation) still run; results may
  differ from an optimized build in the last bits (as they do between CPU kinds);
  the suite compares within a session, or to references with a tolerance.
- XLA:CPU's fusion emitters are off (``--xla_cpu_use_fusion_emitters=false`` in
  ``XLA_FLAGS``, set before any backend starts and inherited by the
  subprocesses; tests that start processes with their own ``XLA_FLAGS`` append
  to it with ``helpers.xla_flags``): XLA then emits each fused kernel directly
  instead of through its MLIR pipeline, which cost a DemLearn golden run 2-5x
  more compile time (measured on a 2-core AMD EPYC; all goldens still match).
- ``@pytest.mark.cli(NAME=ARGS, ...)`` with the ``cli`` fixture: the test reads the
  ``scripts/run.py ARGS`` process ``NAME`` (``helpers.CliResult``). The cases of
  all collected tests run once per session, each in its own process, forked from
  one interpreter that imported the libraries once (``helpers.run_cli_batch``); a
  NAME used by two tests is one run. These processes and the ``interrupted_run``
  start with the first test, in the background: they use the core that the
  in-process tests (mostly compiling on one core) leave idle, and the modules that
  read them run after the others.
- Optionally on pytest-xdist workers (``-n N --dist loadgroup``, for machines with
  more cores than the 2-core CI machine, where it does not pay): one
  compilation cache for all workers (a size limit turns on its file lock); the
  tests reading the CLI processes are one group, sent first to one worker, which
  starts the processes; other tests are grouped by module (module fixtures run
  once); each slow test is its own group, scheduled last.
- ``@pytest.mark.slow(seconds=S)``: an end-to-end test that takes up to about S
  seconds on the slow CI kind (an idle 2-core EPYC; S is about 1.5 times what it
  took there). Slow tests run after all others, cheapest first, and each is
  skipped, with the reason in its skip message and a list at the end of the
  report, when the time since the session started plus S would pass the budget
  ``DEMJAX_TEST_BUDGET_S`` (default 540 s: the suite stays under 10 minutes on a
  slow machine and runs everything when there is time; ``inf`` runs them all,
  ``0`` none; ``-m "not slow"`` deselects them).
"""

import os
import time
from concurrent.futures import ThreadPoolExecutor

_START = time.monotonic()  # before the JAX import: close to the session's start

# Before any XLA backend starts (see the module docstring).
FAST_COMPILE_XLA_FLAG = "--xla_cpu_use_fusion_emitters=false"
if FAST_COMPILE_XLA_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_XLA_FLAG
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import INTERRUPTED_CLI, interrupt_cli, run_cli_batch  # noqa: E402

BUDGET_ENV = "DEMJAX_TEST_BUDGET_S"
DEFAULT_BUDGET_S = 540.0

_JAX_FLAGS = {
    "jax_compilation_cache_dir": None,  # the session's temporary directory
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
    "jax_disable_most_optimizations": True,
}
_JAX_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
}

# pytest-xdist worker id ("gw0", ...) when the suite runs on several workers.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER is not None:
    # A size limit turns on the cache's file lock: the workers and the CLI
    # processes read and write one directory at the same time.
    _JAX_FLAGS["jax_compilation_cache_max_size"] = 16 * 2**30
    _JAX_ENV["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 * 2**30)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """The session's compilation-cache directory (a ``str``); XLA's expensive
    passes off."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    if _WORKER is None:
        path = str(tmp_path_factory.mktemp("jax_cache"))
    else:  # one cache for all workers of the session (their common temp root)
        shared = tmp_path_factory.getbasetemp().parent / "jax_cache"
        shared.mkdir(exist_ok=True)
        path = str(shared)
    saved_flags = {name: jax.config._read(name) for name in _JAX_FLAGS}
    env = dict(_JAX_ENV, JAX_COMPILATION_CACHE_DIR=path)
    saved_env = {name: os.environ.get(name) for name in env}
    for name, value in _JAX_FLAGS.items():
        jax.config.update(name, path if value is None else value)
    os.environ.update(env)
    cc.reset_cache()
    yield path
    for name, value in saved_flags.items():
        jax.config.update(name, value)
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    cc.reset_cache()


# ------------------------------------------------------------------ CLI processes


def _cli_cases(items) -> dict[str, list[str]]:
    cases = {}
    for item in items:
        for mark in item.iter_markers("cli"):
            for name, args in mark.kwargs.items():
                if cases.setdefault(name, list(args)) != list(args):
                    raise ValueError(f"cli case {name!r} has two argument lists")
    return cases


def _reads_processes(item) -> bool:
    return bool(item.get_closest_marker("cli")) or (
        "interrupted_run" in getattr(item, "fixturenames", ())
    )


@pytest.fixture(scope="session", autouse=True)
def _processes(request, tmp_path_factory, compilation_cache):
    """Futures of the session's ``scripts/run.py`` processes (the interrupted run,
    then the ``cli`` cases one at a time), started with the first test in one
    background thread: they use the core that the in-process tests, which mostly
    compile on one core, leave idle; the modules reading them run last."""
    items = request.session.items
    futures = {}

    def start():
        root = tmp_path_factory.mktemp("cli")
        if any("interrupted_run" in getattr(i, "fixturenames", ()) for i in items):
            futures["interrupted"] = pool.submit(
                interrupt_cli, INTERRUPTED_CLI, root / "interrupted", after_lines=10
            )
        cases = _cli_cases(items)
        if cases:
            futures["cli"] = pool.submit(_timed, run_cli_batch, cases, root)

    with ThreadPoolExecutor(max_workers=1) as pool:
        if _WORKER is None:
            start()
        else:  # only the worker given the tests that read them starts them
            futures["start"] = start
        yield futures


_PROCESS_TIMES: list[str] = []  # how long the background processes took


def _timed(fn, cases, root):
    t0 = time.monotonic()
    try:
        return fn(cases, root)
    finally:
        t1 = time.monotonic()
        _PROCESS_TIMES.append(
            f"{len(cases)} scripts/run.py processes in the background: {t1 - t0:.0f} s "
            f"(done {t1 - _START:.0f} s into the session)"
        )


def _future(processes: dict, name: str):
    start = processes.pop("start", None)
    if start is not None:
        start()
    return processes[name]


@pytest.fixture
def cli(request, _processes):
    """``{NAME: helpers.CliResult}`` of the test's ``@pytest.mark.cli`` cases."""
    results = _future(_processes, "cli").result()
    names = [n for mark in request.node.iter_markers("cli") for n in mark.kwargs]
    return {name: results[name] for name in names}


@pytest.fixture
def interrupted_run(_processes):
    """``helpers.InterruptedRun``: ``scripts/run.py INTERRUPTED_CLI`` sent SIGINT
    after 5 rounds (10 metric lines) of 40, read by test_checkpoint (resume) and
    test_faults (clean exit)."""
    return _future(_processes, "interrupted").result()


# ------------------------------------------------------------- slow tests, budget


_SKIP_TEXT = "does not fit the time budget"
_BUDGET_SKIPS: list[str] = []  # node ids of the slow tests the budget skipped


def _budget() -> float:
    return float(os.environ.get(BUDGET_ENV, DEFAULT_BUDGET_S))


def _cost(item) -> float:
    mark = item.get_closest_marker("slow")
    return float(mark.kwargs.get("seconds", 0.0)) if mark else 0.0


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow(seconds): end-to-end test of about `seconds` on an idle 2-core CPU; "
        f"run last, skipped past the {BUDGET_ENV} budget (tests/conftest.py)",
    )
    config.addinivalue_line(
        "markers", "cli(NAME=ARGS): scripts/run.py processes read by the `cli` fixture"
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Modules whose tests read the background processes after the others, the
    slow tests last, cheapest first (a stable sort: the order is kept otherwise)."""
    late = {i.module for i in items if _reads_processes(i)}
    if _WORKER is None:
        items.sort(key=lambda i: (_cost(i) if i.get_closest_marker("slow") else -1,
                                  i.module in late))  # fmt: skip
        return
    # On pytest-xdist workers (``-n N --dist loadgroup``): the tests reading the
    # processes are one group, sent first to one worker, which starts them; the
    # other tests are grouped by module (module fixtures run once); each other slow
    # test is its own group, last, cheapest first.
    for item in items:
        if _reads_processes(item):
            group = "processes"
        elif item.get_closest_marker("slow"):
            group = f"slow:{item.nodeid}"
        else:
            group = item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda i: (_cost(i) if i.get_closest_marker("slow") else -1,
                              not _reads_processes(i)))  # fmt: skip


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if not item.get_closest_marker("slow"):
        return
    elapsed, cost, budget = time.monotonic() - _START, _cost(item), _budget()
    if elapsed + cost > budget:
        pytest.skip(
            f"slow test (~{cost:.0f} s) {_SKIP_TEXT}: {elapsed:.0f} s "
            f"used of {BUDGET_ENV}={budget:g} (tests/conftest.py)"
        )


def pytest_runtest_logreport(report):
    """Collects the budget's skips (also those reported by xdist workers)."""
    if report.skipped and _SKIP_TEXT in str(report.longrepr):
        _BUDGET_SKIPS.append(report.nodeid)


def pytest_terminal_summary(terminalreporter, config):
    for line in _PROCESS_TIMES:
        terminalreporter.write_line(line)
    skipped = _BUDGET_SKIPS
    if skipped:
        budget = _budget()
        what = "all" if budget == 0 else f"past {budget:g} s"
        terminalreporter.write_line(
            f"{len(skipped)} slow test(s) skipped by the time budget ({what}; "
            f"{BUDGET_ENV}=inf runs them): {', '.join(skipped)}"
        )
