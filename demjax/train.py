"""``run(config, workdir)``: the main job, from data to metrics on disk.

The workdir receives, each flushed every round so a run never loses its results:

- ``config.json``: the resolved config (``mu`` resolved to the algorithm default).
- ``metrics.jsonl``: one JSON object per round and measurement point, keys
  ``round``, ``point`` (``local`` = after local training, ``sync`` = after
  synchronization, the model the agent holds entering the next round), ``c_spe``,
  ``c_gen``, ``g_spe_l{l}``, ``g_gen_l{l}``, ``global_acc`` (null for ``local``),
  ``train_loss``. No wall-clock fields: two runs of one seed compare byte for byte.
- ``metrics.csv``: the same records as CSV.
- ``timing.jsonl``: seconds per phase per round (``local_s``, ``distance_s``,
  ``linkage_s``, ``tree_s``, ``sync_s``, ``eval_s``, ``round_s``); round 0
  includes compilation.
- ``tree_final.json``: the last group tree, written at the end of the run.

In a multi-process job (``demjax.multihost``) every process runs this same
program on its shards of the agents; only process 0 writes these files and shows
progress, while every process takes part in the orbax checkpoints (the workdir
must then be one shared path).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from demjax import checkpoint, cluster, data, multihost, sharding
from demjax.algorithms import REGISTRY, is_plugin
from demjax.config import default_config_json, to_json, validate
from demjax.engine import Simulator, placeholder_tree
from demjax.errors import ConfigError

POINTS = ("local", "sync")


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plan_record(info: dict) -> dict:
    """The ``timing.jsonl`` record of the local-training plan (``round`` -1,
    written first): the plan, how it was chosen and the candidates' timings."""
    return {
        "round": -1,
        "local_plan": info["plan"],
        "conv_impl": info["conv_impl"],
        "matmul_impl": info["matmul_impl"],
        "plan_source": info["source"],
        "plan_cap": info["cap"],
        "plan_search_s": info.get("search_s", 0.0),
        "plan_table": info.get("table", []),
        "eval_batch": info["eval"]["eval_batch"],
        "eval_conv_impl": info["eval"]["conv_impl"],
        "eval_plan_source": info["eval"]["source"],
        "eval_plan_search_s": info["eval"].get("search_s", 0.0),
        "eval_plan_table": info["eval"].get("table", []),
    }


def log_plan(info: dict) -> None:
    """Logs the chosen local-training plan and, when measured, its timing table."""
    logging.info(
        "local training plan: %s (conv_impl=%s, matmul_impl=%s; %s; at most %d "
        "agents fit at once)",
        info["plan"], info["conv_impl"], info["matmul_impl"], info["source"],
        info["cap"],
    )  # fmt: skip
    for r in info.get("table", []):
        logging.info(
            "  plan %-12s conv %-7s matmul %-7s %9.1f agent-steps/s (%d agents x "
            "%d steps, compile %.1f s)",
            r["plan"], r["conv_impl"], r.get("matmul_impl", "xla"),
            r["agent_steps_per_s"], r["agents"],
            r["steps"], r["compile_s"],
        )  # fmt: skip
    ev = info["eval"]
    logging.info(
        "evaluation plan: %d models at once (conv_impl=%s; %s)",
        ev["eval_batch"], ev["conv_impl"], ev["source"],
    )  # fmt: skip
    for r in ev.get("table", []):
        logging.info(
            "  eval_batch %-3d conv %-7s %9.1f models/s (compile %.1f s)",
            r["eval_batch"], r["conv_impl"], r["models_per_s"], r["compile_s"],
        )  # fmt: skip


class RunWriter:
    """Appends per-round records to JSONL/CSV files and flushes each write."""

    def __init__(
        self, workdir: str, keep_rounds_below: int | None = None, write: bool = True
    ):
        """Opens the files; with ``keep_rounds_below`` (resume) the records of
        earlier rounds are kept (in ``self.kept``) and later ones dropped.
        ``write=False`` (processes other than 0 of a multi-process job) reads
        the kept records but writes nothing."""
        self.workdir = workdir
        self.write = bool(write)
        self.kept: list[dict] = []
        old_timing: list[dict] = []
        if keep_rounds_below is not None:
            self.kept = [
                r
                for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                if r["round"] < keep_rounds_below
            ]
            old_timing = [  # the plan record (round -1) is written anew
                r
                for r in _read_jsonl(os.path.join(workdir, "timing.jsonl"))
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
        ``<point>/<metric>`` (e.g. ``sync/c_gen``, ``local/g_spe_l2``), step = round.
        Written with tensorboardX (a maintained event writer without TensorFlow).
        """
        if not self.write:
            return
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))
        for r in self.kept:
            self._tb_write(r)

    def _tb_write(self, record: dict) -> None:
        for k, v in record.items():
            if k not in ("round", "point") and isinstance(v, (int, float)):
                self._tb.add_scalar(f"{record['point']}/{k}", v, record["round"])
        self._tb.flush()

    def metrics(self, record: dict) -> None:
        if self._tb is not None:
            self._tb_write(record)
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._csv is None:
            self._csv = csv.DictWriter(self._csv_file, fieldnames=list(record))
            self._csv.writeheader()
        self._csv.writerow({k: "" if v is None else v for k, v in record.items()})
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
        for f in (self._metrics, self._timing, self._csv_file):
            f.close()
        if self._tb is not None:
            self._tb.close()


def _record(t: int, point: str, values: dict, level_names: list[str]) -> dict:
    rec = {"round": t, "point": point}
    for k in ["c_spe", "c_gen", *level_names, "global_acc", "train_loss"]:
        v = values.get(k)
        rec[k] = None if v is None else round(float(v), 6)
    return rec


def _rounded(d: dict) -> dict:
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


def _majority_labels(part) -> list[int]:
    """Each agent's most frequent training label (for plots)."""
    y, n = np.asarray(part.y_train), np.asarray(part.n_train)
    return [int(np.bincount(y[a, : n[a]]).argmax()) for a in range(len(n))]


def _tree_snapshot(tree, z, t: int, majority: list[int], linkage_agents=None) -> dict:
    out = cluster.tree_to_json(tree)
    out["round"] = int(t)
    out["linkage"] = None if z is None else np.asarray(z).tolist()
    if linkage_agents is not None:  # linkage_sample: Z is over these agents
        out["linkage_agents"] = linkage_agents
    out["agent_majority_label"] = majority
    return out


class _GracefulStop:
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


def prepare_run(config, workdir: str, overwrite: bool) -> RunSetup:
    """Workdir checks and resume convention, the partition on devices, and the
    C-GEN evaluation set (shared by the tree engine and the plug-in engine).

    Raises:
      ConfigError: unwritable workdir, results that would be lost, bad input.
      DataNotFoundError: the data set is not available offline.
    """
    check_workdir(workdir)
    config_json = json.loads(to_json(config))
    resume = checkpoint.prepare_workdir(
        workdir,
        config_json,
        overwrite,
        defaults=default_config_json(),
        delete=multihost.is_primary(),
    )
    # Every process decided on the workdir before process 0 writes to it.
    multihost.barrier("demjax.prepare_workdir")
    part_np = data.make_partition(config)
    t_start = time.perf_counter()
    mesh = sharding.make_mesh(int(config.num_devices), part_np.num_agents)
    # Sharded: global arrays straight from the host data (one copy per device).
    if mesh is not None:
        part = sharding.shard_partition(part_np, mesh)
    else:
        part = jax.tree.map(jnp.asarray, part_np)
    eval_idx = data.eval_subsample(part_np, int(config.eval_samples), int(config.seed))
    num_pooled = int(part_np.y_all.shape[0])
    subsampled = len(eval_idx) < num_pooled
    if subsampled:
        logging.info(
            "C-GEN is measured on a seeded evaluation subsample of %d of %d pooled "
            "test samples (eval_samples=%d).",
            len(eval_idx),
            num_pooled,
            config.eval_samples,
        )
    return RunSetup(
        config_json=config_json,
        resume=resume,
        part_np=part_np,
        part=part,
        mesh=mesh,
        eval_idx=eval_idx,
        subsampled=subsampled,
        x_gen=part.x_all[eval_idx],
        y_gen=part.y_all[eval_idx],
        t_start=t_start,
    )


class Interrupted(Exception):
    """Raised by ``run`` when SIGINT stops a run; results so far are on disk."""


def run(
    config, workdir: str, progress: bool | None = None, overwrite: bool = False
) -> dict:
    """Runs one simulation and writes its results to ``workdir``.

    Args:
      config: run config (``configs/default.py`` fields); validated first.
      workdir: output directory (created).
      progress: show a tqdm bar (default ``config.progress``).
      overwrite: replace results already in ``workdir`` instead of resuming from
        its checkpoint or refusing (see ``demjax.checkpoint``).

    Returns:
      ``{"final": {point: record}, "records": [...], "wall_s": float,
      "eval_samples": S or None}``.

    Raises:
      ConfigError: bad config field or input (before any array is built).
      DataNotFoundError: the data set is not available offline.
    """
    validate(config)
    if is_plugin(config.algorithm):
        if sharding.multiprocess():
            raise ConfigError(
                f"algorithm={config.algorithm!r} is a plug-in algorithm, which runs "
                f"in one process only (this job has {jax.process_count()}); "
                "accepted in a multi-process job: the tree-engine algorithms ("
                + ", ".join(REGISTRY)
                + ")"
            )
        from demjax import plugin_engine

        return plugin_engine.run(config, workdir, progress, overwrite)
    setup = prepare_run(config, workdir, overwrite)
    config_json, resume, part_np, part, mesh = (
        setup.config_json,
        setup.resume,
        setup.part_np,
        setup.part,
        setup.mesh,
    )
    eval_idx, subsampled, x_gen, y_gen = (
        setup.eval_idx,
        setup.subsampled,
        setup.x_gen,
        setup.y_gen,
    )
    t_start = setup.t_start
    show = config.progress if progress is None else progress
    show = show and multihost.is_primary()

    # In-place rounds (buffer donation) unless the clustering features need the
    # round's starting parameters (cluster_features='updates').
    sim = Simulator(config, part, donate=config.cluster_features == "weights")
    log_plan(sim.plan_info)
    key = jax.random.PRNGKey(int(config.seed))
    init_key, run_key = jax.random.split(key)
    state = sim.init(init_key, part)
    tree = placeholder_tree(sim.num_agents, sim.level_sizes)
    agent_weight = sim.agent_weight(part)
    if mesh is not None:
        state = state.replace(
            params=sharding.shard_agents(state.params, mesh),
            opt_state=sharding.shard_agents(state.opt_state, mesh),
            node_params=sharding.replicate(state.node_params, mesh),
        )
        agent_weight = sharding.shard_agents(agent_weight, mesh)
    every = int(config.checkpoint_every)
    mngr = checkpoint.manager(workdir) if (every or resume) else None
    start = 0
    if resume:
        state, tree, start = checkpoint.restore(mngr, state, tree)
        logging.info("resuming %s after round %d", workdir, start - 1)
    to_device = (
        (lambda t: jax.tree.map(jnp.asarray, t))
        if mesh is None
        else (lambda t: sharding.replicate(t, mesh))
    )
    tree_dev = to_device(tree)
    writer = RunWriter(
        workdir,
        keep_rounds_below=start if resume else None,
        write=multihost.is_primary(),
    )
    writer.json("config.json", config_json)
    writer.timing(plan_record(sim.plan_info))
    if config.tensorboard:
        writer.tensorboard()
    num_levels = len(sim.level_sizes) - 1
    level_names = [
        f"{m}_l{k}" for k in range(1, num_levels + 1) for m in ("g_spe", "g_gen")
    ]

    records: list[dict] = list(writer.kept)
    majority = _majority_labels(part_np)
    z, tree_round, linkage_agents = None, max(start - 1, 0), None

    def write_final_tree():
        # Once, at the end (or on SIGINT): serialising the tree every round is
        # host work on the hot path; per-round trees are the snapshots above.
        last = tree_round if sim.algo.self_organizing else num_rounds - 1
        writer.json(
            "tree_final.json", _tree_snapshot(tree, z, last, majority, linkage_agents)
        )

    num_rounds = int(config.num_rounds)
    bar = None
    rounds = range(start, num_rounds)
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(
            rounds,
            desc=f"{config.algorithm}",
            unit="round",
            file=sys.stderr,
            initial=start,
            total=num_rounds,
        )
        rounds = bar
    state_tree = tree  # the tree that belongs to `state` (for checkpoints)
    stop = _GracefulStop()

    try:
        for t in rounds:
            timing = {"round": t}
            t0 = time.perf_counter()
            round_key = jax.random.fold_in(run_key, t)
            params_start = None if sim.donate else state.params
            params_local, opt_state, loss, active, diverged = sim.local_phase(
                state, part, tree_dev, jnp.float32(sim.round_mu(t)), round_key
            )
            jax.block_until_ready(params_local)
            timing["local_s"] = time.perf_counter() - t0

            if sim.regroups(t):
                tree, info = sim.build_tree(
                    params_local, params_start, jax.random.fold_in(round_key, 1)
                )
                tree_dev = to_device(tree)
                z, tree_round = info.pop("linkage"), t
                linkage_agents = info.pop("linkage_agents", None)
                timing.update(info)
                snap = int(config.tree_snapshot_every)
                if snap and (t % snap == 0 or t == num_rounds - 1):
                    writer.json(
                        os.path.join("trees", f"round_{t:05d}.json"),
                        _tree_snapshot(tree, z, t, majority, linkage_agents),
                    )

            t1 = time.perf_counter()
            node_local, node_weight = sim.aggregate_phase(
                params_local,
                tree_dev,
                agent_weight,
                active,
                diverged,
                jnp.float32(sim.round_amplify(t)),
                state.node_params,
                jax.random.fold_in(round_key, 2),
            )
            jax.block_until_ready(node_local)
            timing["sync_s"] = time.perf_counter() - t1
            counts = sharding.to_host(
                {"num_active": jnp.sum(active), "num_diverged": jnp.sum(diverged)}
            )
            counts = {k: int(v) for k, v in counts.items()}
            timing.update(counts)
            if counts["num_diverged"]:
                logging.warning(
                    "round %d: %d agent(s) diverged (non-finite loss or parameters); "
                    "reset to parent group models",
                    t,
                    counts["num_diverged"],
                )

            last_round = t == num_rounds - 1
            evaluating = t % int(config.eval_every) == 0 or last_round
            eval_s = 0.0
            if evaluating:  # the 'local' point, before mixing consumes params_local
                t2 = time.perf_counter()
                m_local = sim.evaluate(
                    params_local, node_local, node_weight, tree_dev, part, x_gen, y_gen
                )
                jax.block_until_ready(m_local)
                eval_s = time.perf_counter() - t2
            t1 = time.perf_counter()
            node_sync, params_sync = sim.mix_phase(
                node_local,
                params_local,
                tree_dev,
                jnp.float32(sim.round_alpha()),
                active,
            )
            del params_local  # donated to the mixing when sim.donate
            jax.block_until_ready(params_sync)
            timing["sync_s"] += time.perf_counter() - t1
            if evaluating:
                t2 = time.perf_counter()
                if sim.algo.broadcast and counts["num_active"] == sim.num_agents:
                    # Every agent holds the global model: evaluate it once.
                    m_sync = sim.evaluate_root(node_sync, part, x_gen, y_gen)
                else:
                    m_sync = sim.evaluate(
                        params_sync, node_sync, node_weight, tree_dev, part,
                        x_gen, y_gen,
                    )  # fmt: skip
                ok = (active & ~diverged).astype(jnp.float32) * agent_weight
                m_local, m_sync, loss_mean = sharding.to_host(
                    (
                        m_local,
                        m_sync,
                        jnp.sum(loss * ok) / jnp.maximum(jnp.sum(ok), 1e-12),
                    )
                )
                timing["eval_s"] = eval_s + time.perf_counter() - t2
                m_local["train_loss"] = loss_mean
                for point, values in (("local", m_local), ("sync", m_sync)):
                    rec = _record(t, point, values, level_names)
                    rec.update(counts)
                    records.append(rec)
                    writer.metrics(rec)
                if not math.isfinite(float(loss_mean)):
                    logging.warning("training loss is %s at round %d", loss_mean, t)
            state = state.replace(
                params=params_sync,
                opt_state=opt_state,
                node_params=node_sync,
                round=jnp.int32(t + 1),
            )
            state_tree = tree
            if every and ((t + 1) % every == 0 or last_round):
                t3 = time.perf_counter()
                checkpoint.save(mngr, state, state_tree)
                timing["checkpoint_s"] = time.perf_counter() - t3
            timing["round_s"] = time.perf_counter() - t0
            writer.timing(_rounded(timing))
            if bar is not None and records:
                last = records[-1]
                bar.set_postfix(
                    c_spe=f"{last['c_spe']:.3f}",
                    c_gen=f"{last['c_gen']:.3f}",
                    glob="-"
                    if last["global_acc"] is None
                    else f"{last['global_acc']:.3f}",
                )
            if stop.requested:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        stop.restore()
        if bar is not None:
            bar.close()
        done = int(state.round) - 1
        # A second SIGINT mid-round may come after the round consumed (donated)
        # the state's buffers: the last periodic checkpoint is then the resume point.
        consumed = any(
            getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state)
        )
        if every and not consumed:
            checkpoint.save(mngr, state, state_tree)
            how = "rerun the same command to resume from it (checkpoint saved)"
        elif every:
            how = "rerun the same command to resume from the last periodic checkpoint"
        else:
            how = (
                "set checkpoint_every > 0 to be able to resume; rerun with --overwrite"
            )
        write_final_tree()
        writer.close()
        raise Interrupted(
            f"interrupted (SIGINT) after round {done}; results are in {workdir}; {how}"
        ) from None
    finally:
        stop.restore()

    if bar is not None:
        bar.close()
    write_final_tree()
    writer.close()
    if mngr is not None:
        mngr.close()
    final = {p: next(r for r in reversed(records) if r["point"] == p) for p in POINTS}
    return {
        "final": final,
        "records": records,
        "wall_s": time.perf_counter() - t_start,
        "eval_samples": len(eval_idx) if subsampled else None,
        "num_params": int(
            sum(np.prod(x.shape[1:]) for x in jax.tree.leaves(state.params))
        ),
        "tree": tree,
        "num_devices": 1 if mesh is None else int(mesh.devices.size),
        "agent_block": sim.block_size,
        "local_plan": sim.plan_info,
        "params_devices": len(jax.tree.leaves(state.params)[0].sharding.device_set),
        # Compiled variants per jitted phase: stays 1 however often the tree changes.
        "compilations": {name: fn._cache_size() for name, fn in sim.jitted.items()},
        # Final state (agent models ``state.params [A, ...]``), as the plug-in engine.
        "state": state,
    }
