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

import logging
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from demjax import checkpoint, multihost, plugin_engine, sharding
from demjax.algorithms import REGISTRY, is_plugin
from demjax.config import validate
from demjax.engine import Simulator, placeholder_tree
from demjax.errors import ConfigError
from demjax.run_output import (
    POINTS,
    GracefulStop,
    Interrupted,
    RunWriter,
    format_table,
    log_plan,
    majority_labels,
    make_record,
    plan_record,
    prepare_run,
    rounded,
    tree_snapshot,
)

log = logging.getLogger(__name__)


def run(
    config,
    workdir: str,
    progress: bool | None = None,
    overwrite: bool = False,
    partition=None,
) -> dict:
    """Runs one simulation and writes its results to ``workdir``.

    Args:
      config: run config (``configs/default.py`` fields); validated first.
      workdir: output directory (created).
      progress: show a tqdm bar (default ``config.progress``).
      overwrite: replace results already in ``workdir`` instead of resuming from
        its checkpoint or refusing (see ``demjax.checkpoint``).
      partition: with ``config.partition="arrays"``, the agents' data: a
        ``demjax.data.Split`` (``demjax.data.partition_from_arrays``) or a
        ``Partition``; None loads ``config.dataset`` (``demjax.data.make_split``).

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
        return plugin_engine.run(config, workdir, progress, overwrite, partition)
    setup = prepare_run(config, workdir, overwrite, partition)
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
    keep = int(config.keep_checkpoints)
    mngr = checkpoint.manager(workdir, keep) if (every or resume) else None
    start = 0
    if resume:  # the newest readable checkpoint (damaged ones are set aside)
        state, tree, start = checkpoint.restore(mngr, state, tree)
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
    majority = majority_labels(part_np)
    z, tree_round, linkage_agents = None, max(start - 1, 0), None

    def write_final_tree():
        # Once, at the end (or on SIGINT): serialising the tree every round is
        # host work on the hot path; per-round trees are the snapshots above.
        last = tree_round if sim.algo.self_organizing else num_rounds - 1
        writer.json(
            "tree_final.json", tree_snapshot(tree, z, last, majority, linkage_agents)
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
    stop = GracefulStop()

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
                        tree_snapshot(tree, z, t, majority, linkage_agents),
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
                log.warning(
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
                    rec = make_record(t, point, values, level_names)
                    rec.update(counts)
                    records.append(rec)
                    writer.metrics(rec)
                if not math.isfinite(float(loss_mean)):
                    log.warning("training loss is %s at round %d", loss_mean, t)
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
            writer.timing(rounded(timing))
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


__all__ = ["Interrupted", "format_table", "run"]
