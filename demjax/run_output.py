"""Run outputs and set-up shared by every engine: the run writer (metrics.jsonl,
metrics.csv, timing.jsonl, TensorBoard), the results table, workdir checks, tree
snapshots, SIGINT handling and the common pre-round set-up (``prepare_run``).

Host-side only; nothing here is jitted.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from demjax import attacks, checkpoint, cluster, data, multihost, sharding
from demjax.config import default_config_json, to_json
from demjax.errors import ConfigError

log = logging.getLogger(__name__)
POINTS = ("local", "sync")


def cli_log_filter(record: logging.LogRecord) -> bool:
    """The log records ``scripts/run.py`` shows: demjax's own at every level
    (loggers ``demjax`` and ``demjax.*``; every demjax module logs through
    ``logging.getLogger(__name__)``) and every library's warnings and errors, not
    the INFO chatter of JAX, orbax and other libraries. Chosen by logger name, so
    where the code lives on disk (e.g. a clone in a folder named ``demjax`` with
    its virtualenv inside) does not matter."""
    return (
        record.levelno >= logging.WARNING
        or record.name == "demjax"
        or record.name.startswith("demjax.")
    )


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file ([] if absent). A last line cut short (the
    process was killed while writing it) is dropped.

    Raises:
      ConfigError: another line is not JSON (names the file and line).
    """
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1 and not line.endswith("\n"):
                log.warning("%s: dropped an incomplete last line", path)
                break
            raise ConfigError(
                f"{path}: line {i + 1} is not JSON ({e}); accepted: --overwrite to "
                "replace the run, or another --workdir"
            ) from e
    return out


def plan_record(info: dict, num_devices: int = 1) -> dict:
    """The ``timing.jsonl`` record of the local-training plan (``round`` -1,
    written first): the devices the agents are sharded over, the plan, how it
    was chosen and the candidates' timings."""
    return {
        "round": -1,
        "num_devices": int(num_devices),
        "local_plan": info["plan"],
        "conv_impl": info["conv_impl"],
        "matmul_impl": info["matmul_impl"],
        "plan_source": info["source"],
        "plan_cap": info["cap"],
        "plan_search_s": info.get("search_s", 0.0),
        "plan_search_complete": info.get("complete"),
        "plan_search_runs": info.get("search_runs"),
        "plan_outside_load": info.get("outside_load"),
        "plan_table": info.get("table", []),
        "replica_plan": (info.get("replicas") or {}).get("mode"),
        "replica_plan_source": (info.get("replicas") or {}).get("source"),
        "replica_plan_table": (info.get("replicas") or {}).get("table", []),
        "eval_batch": info["eval"]["eval_batch"],
        "eval_conv_impl": info["eval"]["conv_impl"],
        "eval_plan_source": info["eval"]["source"],
        "eval_plan_search_s": info["eval"].get("search_s", 0.0),
        "eval_plan_outside_load": info["eval"].get("outside_load"),
        "eval_plan_table": info["eval"].get("table", []),
        # one device or the mesh, measured (plan.resolve_devices); None: not chosen
        "device_choice": info.get("devices"),
    }


def log_plan(info: dict) -> None:
    """Logs the chosen local-training plan and, when measured, its timing table."""
    log.info(
        "local training plan: %s (conv_impl=%s, matmul_impl=%s; %s; at most %d "
        "agents fit at once)",
        info["plan"], info["conv_impl"], info["matmul_impl"], info["source"],
        info["cap"],
    )  # fmt: skip
    if info.get("complete") is False:
        log.info(
            "  the plan search's budget ran out before its last candidate: the "
            "next run of this workload resumes it (search run %d)",
            info.get("search_runs", 1),
        )  # fmt: skip
    for r in info.get("table", []):
        log.info(
            "  plan %-12s conv %-7s matmul %-7s %9.1f agent-steps/s (%d agents x "
            "%d steps, compile %.1f s)%s",
            r["plan"], r["conv_impl"], r.get("matmul_impl", "xla"),
            r["agent_steps_per_s"], r["agents"],
            r["steps"], r["compile_s"],
            " at scale" if r.get("at_scale") else
            " from an earlier run" if r.get("resumed") else "",
        )  # fmt: skip
    rp = info.get("replicas")
    if rp:
        log.info("replicas: %s (%s)", "vmapped" if rp["mode"] == "vmap"
                 else "one after another", rp["source"])  # fmt: skip
        for r in rp.get("table", []):
            log.info("  replicas %-14s %9.1f agent-steps/s (%d replicas x %d agents "
                     "x %d steps, compile %.1f s)", r["replica_plan"],
                     r["agent_steps_per_s"], r["replicas"], r["agents"], r["steps"],
                     r["compile_s"])  # fmt: skip
    ev = info["eval"]
    log.info(
        "evaluation plan: %d models at once (conv_impl=%s; %s)",
        ev["eval_batch"], ev["conv_impl"], ev["source"],
    )  # fmt: skip
    for r in ev.get("table", []):
        log.info(
            "  eval_batch %-3d conv %-7s %9.1f models/s (compile %.1f s)",
            r["eval_batch"], r["conv_impl"], r["models_per_s"], r["compile_s"],
        )  # fmt: skip


class RunWriter:
    """The run writer of every engine (``demjax.train.run`` and the
    continual-learning scenario, ``demjax.continual.run``): appends records to
    ``metrics.jsonl`` / ``metrics.csv`` and ``timing.jsonl``, optionally
    TensorBoard events, writes JSON files atomically, and flushes each write (a
    killed run leaves every record written so far). ``close`` releases the
    workdir lock (``lock_workdir``) the run took.

    A record is a flat dict; its ``step`` key (``"round"``, or ``"task"`` for
    the continual scenario) is the TensorBoard step. List values are written to
    the CSV as JSON text.
    """

    def __init__(
        self,
        workdir: str,
        keep_rounds_below: int | None = None,
        write: bool = True,
        step: str = "round",
    ):
        """Opens the files; with ``keep_rounds_below`` (resume) the records of
        earlier rounds are kept (in ``self.kept``) and later ones dropped.
        ``write=False`` (processes other than 0 of a multi-process job) reads
        the kept records but writes nothing."""
        self.workdir = workdir
        self.write = bool(write)
        self.step = step
        self.kept: list[dict] = []
        old_timing: list[dict] = []
        if keep_rounds_below is not None:
            self.kept = [
                r
                for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                if r["round"] < keep_rounds_below
            ]
            old_timing = [  # the plan record (round -1) is written anew
                r
                for r in read_jsonl(os.path.join(workdir, "timing.jsonl"))
                if 0 <= r["round"] < keep_rounds_below
            ]
        if self.write:
            os.makedirs(workdir, exist_ok=True)
        path = (
            (lambda name: os.path.join(workdir, name))
            if self.write
            else (lambda name: os.devnull)
        )
        self._metrics = open(path("metrics.jsonl"), "w")
        self._timing = open(path("timing.jsonl"), "w")
        self._csv_file = open(path("metrics.csv"), "w", newline="")
        self._csv = None
        self._tb = None
        for r in self.kept:
            self.metrics(r)
        for r in old_timing:
            self.timing(r)

    def tensorboard(self) -> None:
        """Also write TensorBoard event files (``<workdir>/tensorboard``).

        One scalar series per metric, level and measurement point, tagged
        ``<point>/<metric>`` (e.g. ``sync/c_gen``, ``local/g_spe_l2``), step = round;
        with replicas (records with a ``replica`` field) one series per replica,
        ``replica_<r>/<point>/<metric>``. Records without a ``point`` (the
        continual scenario's) are tagged ``<metric>``, step = the record's ``step``
        key; a list value gives one series per entry, ``<metric>/<i>``. Written
        with tensorboardX (a maintained event writer without TensorFlow).
        """
        if not self.write:
            return
        from tensorboardX import SummaryWriter

        # Earlier event files are replaced: the kept records (those before the
        # resumed round) are written anew, so TensorBoard holds no later round.
        tb_dir = os.path.join(self.workdir, "tensorboard")
        if os.path.isdir(tb_dir):
            for name in os.listdir(tb_dir):
                if name.startswith("events.out.tfevents."):
                    os.remove(os.path.join(tb_dir, name))
        self._tb = SummaryWriter(tb_dir)
        for r in self.kept:
            self._tb_write(r)

    def _tb_write(self, record: dict) -> None:
        step = record[self.step]
        # Replicas (num_replicas > 1): one series per replica, replica_<r>/...
        prefix = "" if "replica" not in record else f"replica_{record['replica']}/"
        prefix += f"{record['point']}/" if "point" in record else ""
        for k, v in record.items():
            if k in (self.step, "point", "replica"):
                continue
            if isinstance(v, (int, float)):
                self._tb.add_scalar(f"{prefix}{k}", v, step)
            elif isinstance(v, list):
                for i, x in enumerate(v):
                    if isinstance(x, (int, float)):
                        self._tb.add_scalar(f"{prefix}{k}/{i}", x, step)
        self._tb.flush()

    def metrics(self, record: dict) -> None:
        if self._tb is not None:
            self._tb_write(record)
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._csv is None:
            self._csv = csv.DictWriter(self._csv_file, fieldnames=list(record))
            self._csv.writeheader()
        self._csv.writerow({k: _csv_cell(v) for k, v in record.items()})
        self._csv_file.flush()

    def timing(self, record: dict) -> None:
        self._timing.write(json.dumps(record) + "\n")
        self._timing.flush()

    def json(self, name: str, obj) -> None:
        if not self.write:
            return
        path = os.path.join(self.workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(path + ".tmp", path)

    def close(self) -> None:
        """Closes the files and releases the workdir lock (``lock_workdir``)."""
        for f in (self._metrics, self._timing, self._csv_file):
            f.close()
        if self._tb is not None:
            self._tb.close()
        unlock_workdir(self.workdir)


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return v


def make_record(t: int, point: str, values: dict, level_names: list[str]) -> dict:
    rec = {"round": t, "point": point}
    for k in ["c_spe", "c_gen", *level_names, "global_acc", "train_loss"]:
        v = values.get(k)
        rec[k] = None if v is None else round(float(v), 6)
    return rec


SUMMARY_METRICS = ("c_spe", "c_gen", "global_acc")


def _mean_std(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return {"mean": round(float(np.mean(v)), 6), "std": round(std, 6)}


def replica_summary(records: list[dict], num_replicas: int) -> dict:
    """Mean and standard deviation over replicas (``replicas.json``).

    For every measurement point and metric (``c_spe``, ``c_gen``,
    ``global_acc`` and the group levels ``g_spe_l{l}`` / ``g_gen_l{l}``; a metric
    null in every record is left out):

    - ``final``: the last evaluated round: ``round``, ``mean``, ``std``,
      ``values`` (one per replica, replica order);
    - ``best``: each replica's best round: ``mean``, ``std`` of the best values,
      ``values`` and ``rounds`` (the round of each replica's best; the earliest
      on ties);
    - ``best_of_mean``: the round whose mean over replicas is highest (the
      earliest on ties): ``round``, ``mean``, ``std``.

    ``std`` is the sample standard deviation (ddof 1; 0 for one replica).

    Args:
      records: ``metrics.jsonl`` records, each with a ``replica`` int field.
      num_replicas: R.

    Raises:
      ValueError: a round and point lacks the record of some replica.
    """
    points: dict = {}
    for point in dict.fromkeys(r["point"] for r in records):
        recs = [r for r in records if r["point"] == point]
        rounds = sorted({r["round"] for r in recs})
        table: dict = {}
        for r in recs:
            table[(r["replica"], r["round"])] = r
        missing = [
            (q, t) for q in range(num_replicas) for t in rounds if (q, t) not in table
        ]
        if missing:
            raise ValueError(f"no record of replica {missing[0][0]} at round "
                             f"{missing[0][1]}, point {point!r}")  # fmt: skip
        names = [
            k
            for k in recs[0]
            if k in SUMMARY_METRICS or k.startswith(("g_spe_l", "g_gen_l"))
        ]
        out = {}
        for k in names:
            if all(r.get(k) is None for r in recs):
                continue
            grid = np.array(
                [[table[(q, t)][k] for t in rounds] for q in range(num_replicas)],
                np.float64,
            )  # [R, T]
            best_t = np.argmax(grid, axis=1)
            mean_curve = grid.mean(axis=0)
            j = int(np.argmax(mean_curve))
            out[k] = {
                "final": {"round": rounds[-1], **_mean_std(grid[:, -1]),
                          "values": grid[:, -1].tolist()},
                "best": {**_mean_std(grid[np.arange(num_replicas), best_t]),
                         "values": grid[np.arange(num_replicas), best_t].tolist(),
                         "rounds": [rounds[i] for i in best_t]},
                "best_of_mean": {"round": rounds[j], **_mean_std(grid[:, j])},
            }  # fmt: skip
        points[point] = out
    return {"num_replicas": int(num_replicas), "points": points}



def mean_record(records: list[dict], point: str, t: int) -> dict:
    """The mean over replicas of round t's records at a point (null stays null)."""
    recs = [r for r in records if r["point"] == point and r["round"] == t]
    out = {"round": t, "point": point}
    for k in recs[0]:
        if k in ("round", "point", "replica"):
            continue
        vals = [r[k] for r in recs]
        out[k] = None if None in vals else round(float(np.mean(vals)), 6)
    return out


def replicas_json(records: list[dict], num_replicas: int, seed: int,
                  replicate_split: bool) -> dict:  # fmt: skip
    """``replicas.json``: the replicas' seeds (``seed + r``), ``replicate_split``
    and ``replica_summary``."""
    return {
        "seeds": [int(seed) + r for r in range(num_replicas)],
        "replicate_split": bool(replicate_split),
        **replica_summary(records, num_replicas),
    }


def rounded(d: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in d.items()}


def format_table(records: list[dict]) -> str:
    """A plain-text table of metric records (one row per record)."""
    keys = [k for k in records[0] if k not in ("round",)]
    head = ["round", *keys]
    rows = [[str(r["round"])] + [_fmt(r[k]) for k in keys] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(
        c.rjust(w) for c, w in zip(cells, widths, strict=True)
    )  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def check_workdir(workdir: str) -> None:
    """Refuses a workdir that cannot be created or written, before any training.

    Raises:
      ConfigError: naming ``workdir`` and the reason.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        # One probe per process: the processes of a multi-process job share it.
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"workdir={workdir!r} is not writable ({e.strerror or e}); accepted: a "
            "directory path that can be created and written"
        ) from e


LOCK_FILE = ".lock"
# Workdir locks this process holds: real path -> (file descriptor, thread id).
_HELD: dict[str, tuple[int, int]] = {}


def _lock_path(workdir: str) -> str:
    return os.path.join(os.path.realpath(workdir), LOCK_FILE)


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    try:
        out = json.loads(text) if text else {}
    except ValueError:
        out = {"pid": text[:40]}
    return out if isinstance(out, dict) else {}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def lock_workdir(workdir: str) -> None:
    """Takes the workdir's lock (``<workdir>/.lock``, an exclusive ``flock`` held
    until :func:`unlock_workdir` or the end of the process) for one run.

    The file records the holder (``{"pid", "host", "since"}``) and is emptied on
    release; a non-empty file whose lock is free belongs to a process that ended
    without releasing it (killed): it is taken over with a warning. A lock left
    by an earlier run of the same thread (ended by an exception) is taken over
    silently. On a file system without ``flock`` the recorded PID decides.

    Raises:
      ConfigError: another process (or thread) holds the lock; names its PID.
    """
    import fcntl
    import socket

    path = _lock_path(workdir)
    me = threading.get_ident()
    if path in _HELD:
        fd, owner = _HELD[path]
        alive = any(t.ident == owner for t in threading.enumerate())
        if owner == me or not alive:  # runs of one thread are sequential
            unlock_workdir(workdir)
        else:
            raise ConfigError(
                f"workdir={workdir!r} is in use by another thread of this process "
                f"(PID {os.getpid()}); accepted: another workdir, or wait for that "
                "run to end"
            )
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        except OSError:  # no flock on this file system: the recorded PID decides
            held = _holder(fd)
            locked = not (
                held.get("host") == socket.gethostname() and _alive(held.get("pid"))
            )
        old = _holder(fd)
        if not locked:
            raise ConfigError(
                f"workdir={workdir!r} is in use by process {old.get('pid', '?')} on "
                f"{old.get('host', '?')} (since {old.get('since', '?')}; lock file "
                f"{path}); accepted: another --workdir, or wait for that run to end"
            )
        if old:
            log.warning(
                "workdir %s: taking over the stale lock of process %s on %s (it "
                "ended without releasing it)",
                workdir, old.get("pid", "?"), old.get("host", "?"),
            )  # fmt: skip
        me_rec = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me_rec).encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    _HELD[path] = (fd, me)


def unlock_workdir(workdir: str) -> None:
    """Releases the workdir's lock taken by :func:`lock_workdir` (a no-op if this
    process does not hold it). The file is emptied, not removed: a process that
    opened it meanwhile must not lock a deleted file."""
    held = _HELD.pop(_lock_path(workdir), None)
    if held is None:
        return
    fd = held[0]
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)  # releases the flock


def majority_labels(part) -> list[int]:
    """Each agent's most frequent training label (for plots)."""
    y, n = np.asarray(part.y_train), np.asarray(part.n_train)
    return [int(np.bincount(y[a, : n[a]]).argmax()) for a in range(len(n))]


def tree_snapshot(tree, z, t: int, majority: list[int], linkage_agents=None) -> dict:
    out = cluster.tree_to_json(tree)
    out["round"] = int(t)
    out["linkage"] = None if z is None else np.asarray(z).tolist()
    if linkage_agents is not None:  # linkage_sample: Z is over these agents
        out["linkage_agents"] = linkage_agents
    out["agent_majority_label"] = majority
    return out


class GracefulStop:
    """SIGINT ends the run at the end of the current round (never mid-checkpoint);
    a second SIGINT interrupts at once. Only in the main thread."""

    def __init__(self):
        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nSIGINT: stopping after the current round (again to stop now)",
            file=sys.stderr,
        )

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


@dataclasses.dataclass
class RunSetup:
    """What every engine needs before its first round (``prepare_run``)."""

    config_json: dict
    resume: bool
    part_np: object  # host Partition
    part: object  # device Partition (sharded over `agents` when mesh is set)
    mesh: object
    eval_idx: np.ndarray
    subsampled: bool
    x_gen: jax.Array
    y_gen: jax.Array
    t_start: float


def prepare_run(config, workdir: str, overwrite: bool, partition=None) -> RunSetup:
    """Workdir checks and resume convention, the partition on devices, and the
    C-GEN evaluation set. ``partition``: a ready ``demjax.data.Split`` /
    ``Partition`` for ``config.partition="arrays"``. Writes the dataset card
    ``data.json``.

    Takes the workdir lock (``lock_workdir``; the round loop's ``RunWriter.close``
    releases it).

    Raises:
      ConfigError: unwritable workdir, workdir in use by another process,
        results that would be lost, bad input.
      DataNotFoundError: the data set is not available offline.
    """
    check_workdir(workdir)
    config_json = json.loads(to_json(config))
    if multihost.is_primary():  # one run per workdir; RunWriter.close releases it
        lock_workdir(workdir)
    try:
        return _prepare_locked(config, workdir, overwrite, config_json, partition)
    except BaseException:
        unlock_workdir(workdir)
        raise


def _prepare_locked(
    config, workdir: str, overwrite: bool, config_json: dict, partition=None
):
    resume = checkpoint.prepare_workdir(
        workdir,
        config_json,
        overwrite,
        defaults=default_config_json(),
        delete=multihost.is_primary(),
    )
    # Every process decided on the workdir before process 0 writes to it.
    multihost.barrier("demjax.prepare_workdir")
    split = data.make_split(config, partition)
    if multihost.is_primary():
        data.write_card(workdir, split)
    t_start = time.perf_counter()
    mesh = sharding.make_mesh(int(config.num_devices), split.partition.num_agents)
    got = place_split(config, split, mesh)
    return RunSetup(config_json=config_json, resume=resume, t_start=t_start, **got)


def place_split(config, split, mesh) -> dict:
    """A split's partition on the devices (sharded over ``agents`` on a mesh)
    and its C-GEN evaluation set (the seeded subsample of ``eval_samples``
    drawn with ``config.seed``): the ``RunSetup`` fields ``part_np``, ``part``,
    ``mesh``, ``eval_idx``, ``subsampled``, ``x_gen``, ``y_gen``."""
    part_np = attacks.poison_partition(config, split.partition)  # label_flip
    # Sharded: global arrays straight from the host data (one copy per device).
    if mesh is not None:
        part = sharding.shard_partition(part_np, mesh)
    else:
        part = jax.tree.map(jnp.asarray, part_np)
    eval_idx = data.eval_subsample(part_np, int(config.eval_samples), int(config.seed))
    num_pooled = int(part_np.y_all.shape[0])
    subsampled = len(eval_idx) < num_pooled
    if subsampled:
        log.info(
            "C-GEN is measured on a seeded evaluation subsample of %d of %d pooled "
            "test samples (eval_samples=%d).",
            len(eval_idx),
            num_pooled,
            config.eval_samples,
        )
    return dict(
        part_np=part_np,
        part=part,
        mesh=mesh,
        eval_idx=eval_idx,
        subsampled=subsampled,
        x_gen=part.x_all[eval_idx],
        y_gen=part.y_all[eval_idx],
    )


def unshard(setup: RunSetup) -> RunSetup:
    """``setup`` with its partition and C-GEN set on one device and no mesh
    (the plan search measured one device faster than the mesh's,
    ``demjax.plan.resolve_devices``)."""
    part = jax.tree.map(jnp.asarray, setup.part_np)
    return dataclasses.replace(
        setup,
        part=part,
        mesh=None,
        x_gen=part.x_all[setup.eval_idx],
        y_gen=part.y_all[setup.eval_idx],
    )


class Interrupted(Exception):
    """Raised by ``run`` when SIGINT stops a run; results so far are on disk."""
