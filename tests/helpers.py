"""Small builders shared by the test modules (not a test module)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from demjax.types import Partition

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from configs import default  # noqa: E402


def xla_flags(*extra: str) -> str:
    """``XLA_FLAGS`` for a subprocess: the session's flags (conftest's fast-compile
    flag) plus ``extra`` (e.g. ``--xla_force_host_platform_device_count=8``)."""
    return " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), *extra]))


def tiny_config(*, num_agents: int = 8, num_rounds: int = 2, **overrides):
    """``configs/default.py`` cut to seconds: an MLR on the embedded digits, one
    local epoch, no progress bar; ``overrides`` set fields, dotted keys
    (``"network.topology"``) set fields of a sub-config. Modules fix their own
    defaults with ``functools.partial``; a caller's keyword wins over them."""
    c = default.get_config()
    c.num_agents, c.num_rounds = num_agents, num_rounds
    c.model, c.progress, c.local_epochs = "mlr", False, 1
    for k, v in overrides.items():
        group, _, field = k.rpartition(".")
        (c[group] if group else c)[field] = v
    return c


def run_round(rounds, state, part, key, t: int):
    """One round of an algorithm's ``Rounds`` as ``demjax.train.run`` runs it:
    each jitted phase, then its host step. Returns ``(state, info)`` (info on
    the host)."""
    import jax
    import jax.numpy as jnp

    info = {}
    for phase in rounds.phases:
        state, more = jax.jit(phase.fn)(state, part, key, jnp.int32(t))
        if phase.host is not None:
            state, _ = phase.host(state, more, t, key)
            state = jax.tree.map(jnp.asarray, state)
        info.update(more)
    return state, jax.device_get(info)


def count_eqns(jaxpr) -> int:
    """Equations of a jaxpr, sub-jaxprs (jit, scan, cond, ...) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if hasattr(sub, "eqns"):
                    n += count_eqns(sub)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    n += count_eqns(sub.jaxpr)
    return n


def traced_sizes(rounds, part) -> tuple[int, int]:
    """Equation counts ``(round, personal)`` of an algorithm's ``Rounds`` on the
    device partition ``part``: every jitted phase of the round (traced at the
    initial state, round 0) summed, and ``rounds.personal`` (0 without one).
    Equal counts for two agent counts mean the agent axis is an array axis, not
    a Python loop."""
    import jax
    import jax.numpy as jnp

    state = rounds.init(jax.random.PRNGKey(0), part)
    key, t = jax.random.PRNGKey(1), jnp.int32(0)
    size = sum(
        count_eqns(jax.make_jaxpr(p.fn)(state, part, key, t).jaxpr)
        for p in rounds.phases
    )
    personal = 0
    if rounds.personal is not None:
        personal = count_eqns(jax.make_jaxpr(rounds.personal)(state, part, key).jaxpr)
    return size, personal


def cli_records(res, num_rounds: int = 2) -> list[dict]:
    """The ``metrics.jsonl`` records of a finished ``scripts/run.py`` case
    (``helpers.CliResult``), after checking that it exited 0 and wrote one
    record per round ``0 .. num_rounds - 1``."""
    assert res.returncode == 0, res.stderr
    lines = (res.workdir / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["round"] for r in recs] == list(range(num_rounds))
    return recs


def build_rounds(cfg, part, active=None):
    """``(rounds, device partition)`` of ``cfg`` on the host partition ``part``;
    ``active`` (bool ``[A]``) fixes the participants of every round (no step
    limit) instead of the config's participation masks."""
    import jax
    import jax.numpy as jnp

    from demjax import local, train

    plugin, ctx, rounds = train.build(cfg, jax.tree.map(jnp.asarray, part))
    if active is not None:
        act = jnp.asarray(active, bool)
        steps = jnp.full(act.shape, local._NO_LIMIT, jnp.int32)
        ctx = dataclasses.replace(ctx, round_masks=lambda key, n: (act, steps))
        rounds = plugin.build(ctx)
    return rounds, jax.tree.map(jnp.asarray, part)


def train_is_test_partition(x, y, n_train, num_classes: int) -> Partition:
    """A partition whose test set is its training set and whose pooled test set is
    every agent's padded rows (owner = agent).

    Args:
      x: float32 ``[A, N, F]``; y: int32 ``[A, N]``; n_train: int32 ``[A]`` real rows.
    """
    a, n, f = x.shape
    return Partition(
        x_train=x,
        y_train=y,
        n_train=n_train,
        x_test=x,
        y_test=y,
        n_test=n_train,
        x_all=x.reshape(-1, f),
        y_all=y.reshape(-1),
        owner_all=np.repeat(np.arange(a), n).astype(np.int32),
        num_classes=num_classes,
    )


def mlr_numpy(params, i=None):
    """An MLR's (kernel, bias) in float64: all agents', or agent ``i``'s."""
    d = params["Dense_0"]
    k, b = np.asarray(d["kernel"], np.float64), np.asarray(d["bias"], np.float64)
    return (k, b) if i is None else (k[i], b[i])


RUN_PY = os.path.join(REPO, "scripts", "run.py")
# One small digits run of scripts/run.py read by two tests: its TensorBoard events
# (test_tensorboard) and its stderr (test_engine: the evaluation subsample is
# reported, JAX's and orbax's INFO chatter is not).
DIGITS_CLI = [
    "--tensorboard", "--quiet", "--config.num_rounds=3", "--config.num_agents=10",
    "--config.model=mlr", "--config.num_levels=2", "--config.eval_samples=20",
]  # fmt: skip

# The batch driver: one interpreter imports what the scripts/run.py processes
# import (JAX, flax, orbax, scikit-learn, tensorboardX, demjax; nothing that
# initializes a backend or defines a flag), freezes those objects out of the
# garbage collector (so the children do not copy them page by page), then forks
# once per case, at most ``parallel`` at a time. Each child is a process of its
# own running scripts/run.py as ``__main__``: its own absl flags, backend, exit
# status, stdout and stderr (fds 1 and 2, so native logs too); an exception the
# script does not handle prints its traceback and exits 1, as in a fresh
# interpreter. Only the import of the libraries is shared.
_BATCH_DRIVER = r"""
import json, os, runpy, signal, sys, time
spec = json.loads(sys.argv[1])
import absl.app, ml_collections.config_flags, sklearn.datasets, tensorboardX  # noqa: E401
import demjax.train, demjax.continual.run  # noqa: E401
import gc
gc.freeze()  # the children's collections skip (and so do not copy) these objects
sys.stdout.flush(); sys.stderr.flush()
pending, running, codes = list(spec["cases"]), {}, {}
while pending or running:
    while pending and len(running) < spec["parallel"]:
        name, argv, out, err = pending.pop(0)
        pid = os.fork()
        if pid == 0:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, path in ((1, out), (2, err)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = [spec["run"], *argv]
            runpy.run_path(spec["run"], run_name="__main__")
            raise SystemExit(0)  # an exception or SystemExit above ends the child too
        running[pid] = (name, time.monotonic() + spec["timeout"])
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid:
        codes[running.pop(pid)[0]] = os.waitstatus_to_exitcode(status)
        continue
    for pid, (name, deadline) in running.items():
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.05)
print(json.dumps(codes))
"""


@dataclasses.dataclass
class CliResult:
    """One ``scripts/run.py`` process of :func:`run_cli_batch`."""

    returncode: int
    stdout: str
    stderr: str
    workdir: pathlib.Path


def run_cli_batch(
    cases: dict[str, list[str]],
    root: pathlib.Path,
    *,
    parallel: int = 1,
    timeout: float = 600,
) -> dict[str, CliResult]:
    """``scripts/run.py ARGS --workdir=root/NAME`` for every ``NAME: ARGS`` of
    ``cases``, each in its own process, ``parallel`` at a time, forked from one
    interpreter that paid the library imports once (see ``_BATCH_DRIVER``): a CLI
    case costs its own flags, compilation and run, not another JAX import. A case
    still running after ``timeout`` seconds is killed (return code -9)."""
    spec = dict(run=RUN_PY, timeout=timeout, parallel=parallel)
    spec["cases"] = [
        (name, [*args, f"--workdir={root / name}"], str(root / f"{name}.out"),
         str(root / f"{name}.err"))
        for name, args in cases.items()
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, "-c", _BATCH_DRIVER, json.dumps(spec)],
        capture_output=True, text=True, env=env,
        timeout=timeout * len(cases) + 120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        name: CliResult(
            codes[name],
            (root / f"{name}.out").read_text(),
            (root / f"{name}.err").read_text(),
            root / name,
        )
        for name in cases
    }


# A run of scripts/run.py sent SIGINT mid-run: test_checkpoint resumes it (its
# ``config()`` is the same config), test_faults checks that it exited cleanly.
INTERRUPTED_ROUNDS = 40
INTERRUPTED_CLI = [
    "--config.model=mlr", "--config.num_agents=12", "--config.num_levels=2",
    "--config.local_epochs=1", "--config.checkpoint_every=3",
    "--config.progress=False", f"--config.num_rounds={INTERRUPTED_ROUNDS}",
]  # fmt: skip


@dataclasses.dataclass
class InterruptedRun:
    """A ``scripts/run.py`` process sent SIGINT (or finished before it)."""

    returncode: int
    stdout: str
    stderr: str
    workdir: pathlib.Path
    metrics: str  # metrics.jsonl as the process left it


def interrupt_cli(args, workdir: pathlib.Path, after_lines: int) -> InterruptedRun:
    """``scripts/run.py ARGS --workdir=WORKDIR`` sent SIGINT once its
    metrics.jsonl holds ``after_lines`` lines."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, RUN_PY, *args, f"--workdir={workdir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < after_lines
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    text = metrics.read_text() if metrics.exists() else ""
    return InterruptedRun(proc.returncode, out, err, workdir, text)
