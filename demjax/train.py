"""``run(config, workdir)``: the one round loop, from data to metrics on disk.

Every registered algorithm (``demjax.algorithms``) runs here, through its
``Rounds`` (``demjax.algorithms.protocol``): one state pytree (per-agent leaves
``[A, ...]``, sharded over the ``agents`` mesh when ``num_devices`` > 1 or in a
multi-process job), the round's jitted phases with their host steps between
them, and a metrics record at each of the algorithm's measurement points. The
loop gives every algorithm the same machinery: the local-training execution
plan (agent blocks, ``conv_impl`` / ``matmul_impl``), participation and fault
masks, the divergence count (``num_diverged``), checkpoints and resume, SIGINT
handling, TensorBoard and progress.

The workdir receives, each flushed every round so a run never loses its results:

- ``config.json``: the resolved config (``mu`` resolved to the algorithm default).
- ``metrics.jsonl``: one JSON object per evaluated round and measurement point,
  keys ``round``, ``point`` (the hierarchical algorithms: ``local`` = after local
  training, ``sync`` = after synchronization, the model the agent holds entering
  the next round; the others: ``sync``), ``c_spe``, ``c_gen``, ``global_acc``
  (null without a global model), ``train_loss``, and the algorithm's own
  fields (``g_spe_l{l}``/``g_gen_l{l}`` and ``num_active``/``num_diverged`` of
  the hierarchical family, e.g. ``num_clusters`` of CFL). No wall-clock fields:
  two runs of one seed compare byte for byte.
- ``metrics.csv``: the same records as CSV.
- ``timing.jsonl``: seconds per phase per round (``local_s``, ``sync_s``,
  ``eval_s``, ``round_s``, host-step fields such as ``linkage_s``); round 0
  includes compilation. With ``config.attack`` set, ``num_byzantine``: the
  size of the round's Byzantine set.
- the algorithm's own files (e.g. ``tree_final.json``, ``trees/``).

In a multi-process job (``demjax.multihost``) every process runs this same
program on its shards of the agents; only process 0 writes these files and shows
progress, while every process takes part in the orbax checkpoints (the workdir
must then be one shared path).
"""

from __future__ import annotations

import logging
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from demjax import (
    algorithms,
    attacks,
    checkpoint,
    local,
    memory,
    models,
    multihost,
    sharding,
)
from demjax.algorithms.protocol import Context
from demjax.config import hparams, resolved_mu, validate
from demjax.engine import choose_eval_plan, choose_plan
from demjax.faults import make_round_masks
from demjax.run_output import (
    GracefulStop,
    Interrupted,
    RunWriter,
    format_table,
    log_plan,
    plan_record,
    prepare_run,
    rounded,
)

log = logging.getLogger(__name__)


def build(config, part):
    """``(algorithm, ctx, rounds)`` of a validated config on a partition.

    Chooses the run's execution plan (``demjax.engine.choose_plan``: agent
    blocks, conv/matmul implementations; ``choose_eval_plan``) with the
    algorithm's ``resources``, then calls ``Algorithm.build``.

    Args:
      config: a validated run config.
      part: the agents' data (``Partition``, host or device arrays).
    """
    algo = algorithms.get(config.algorithm)
    res = {"donate": False, "num_group_models": 1, "points": 1}
    if algo.resources is not None:
        res.update(algo.resources(config))
    tx = local.make_optimizer(config.optimizer, config.lr)
    mu = resolved_mu(config)
    plain = models.make_model(config.model, part.num_classes, config.hidden)
    cap_probe = memory.memory_cap(
        config, part, plain, tx, donate=bool(res["donate"]),
        num_group_models=int(res["num_group_models"]),
    )  # fmt: skip
    plan, plan_info = choose_plan(
        config, part, tx, mu, cap_probe=cap_probe, algorithm=config.algorithm
    )
    _, eval_conv, plan_info["eval"] = choose_eval_plan(
        config, part, probe=cap_probe[1], points=int(res["points"])
    )
    model = models.make_model(
        config.model, part.num_classes, config.hidden, plan.conv_impl,
        plan.matmul_impl, init=config.init,
    )  # fmt: skip
    ctx = Context(
        config=config,
        hp=hparams(config),
        num_agents=part.num_agents,
        num_classes=part.num_classes,
        input_shape=tuple(part.input_shape),
        model=model,
        apply_fn=models.make_apply(model),
        eval_apply_fn=models.make_eval_apply(
            models.make_model(config.model, part.num_classes, config.hidden, eval_conv)
        ),
        tx=tx,
        n_train=np.asarray(sharding.to_host(part.n_train)),
        round_masks=make_round_masks(config, part.num_agents),
        block_size=plan.block_size,
        plan_info=plan_info,
        partition=part,
        mu=mu,
        plan=plan,
    )
    return algo, ctx, algo.build(ctx)


def _placement(mesh, num_agents: int):
    """``(place, constrain)`` of a state pytree on the mesh: leaves with a
    leading agent axis ``[A, ...]`` split over ``agents``, the others replicated.
    ``place(state)`` puts host or device leaves there (without a mesh: on the
    default device); ``constrain(fn)`` makes a phase return its state with the
    same shardings (``with_sharding_constraint``), so every round's phases see
    the shardings of round 0 and never recompile (identity without a mesh)."""
    if mesh is None:
        return (lambda state: jax.tree.map(jnp.asarray, state)), (lambda fn: fn)
    split, whole = sharding.agent_sharding(mesh), sharding.replicated(mesh)

    def where(x):
        return split if np.ndim(x) >= 1 and np.shape(x)[0] == num_agents else whole

    def place(state):
        return jax.tree.map(lambda x: sharding.place(x, where(x)), state)

    def constrain(fn):
        def phase(state, part, key, t):
            state, info = fn(state, part, key, t)
            shardings = jax.tree.map(where, state)
            return jax.lax.with_sharding_constraint(state, shardings), info

        return phase

    return place, constrain


def _record(t: int, point: str, values: dict) -> dict:
    rec = {"round": t, "point": point}
    for k, v in values.items():
        if v is None:
            rec[k] = None
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            rec[k] = int(v)
        else:
            rec[k] = round(float(v), 6)
    return rec


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
      "eval_samples": S or None, "num_params": D, "num_devices": int,
      "params_devices": int, "agent_block": int, "local_plan": dict,
      "compilations": {phase or evaluator name: compiled variants}, "state":
      the final state pytree}``.

    Raises:
      ConfigError: bad config field or input (before any array is built).
      DataNotFoundError: the data set is not available offline.
    """
    validate(config)
    setup = prepare_run(config, workdir, overwrite, partition)
    part, mesh, resume = setup.part, setup.mesh, setup.resume
    x_gen, y_gen = setup.x_gen, setup.y_gen
    show = config.progress if progress is None else progress
    show = show and multihost.is_primary()

    _, ctx, rounds = build(config, part)
    log_plan(ctx.plan_info)
    num_agents = ctx.num_agents
    place, constrain = _placement(mesh, num_agents)
    phases = rounds.phases
    jitted = [
        jax.jit(constrain(p.fn), donate_argnums=(0,) if p.donate else ())
        for p in phases
    ]
    key = jax.random.PRNGKey(int(config.seed))
    init_key, run_key = jax.random.split(key)
    state = place(rounds.init(init_key, part))
    every = int(config.checkpoint_every)
    keep = int(config.keep_checkpoints)
    mngr = checkpoint.manager(workdir, keep) if (every or resume) else None
    start = 0
    if resume:  # the newest readable checkpoint (damaged ones are set aside)
        got, start = checkpoint.restore_payload(mngr, {"state": state})
        state = place(got["state"])
    writer = RunWriter(
        workdir,
        keep_rounds_below=start if resume else None,
        write=multihost.is_primary(),
    )
    writer.json("config.json", setup.config_json)
    writer.timing(plan_record(ctx.plan_info))
    if config.tensorboard:
        writer.tensorboard()

    records: list[dict] = list(writer.kept)
    byzantine = (
        attacks.num_byzantine(num_agents, float(config.attack_fraction))
        if config.attack != "none"
        else None
    )
    num_rounds = int(config.num_rounds)
    bar = None
    steps = range(start, num_rounds)
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(
            steps,
            desc=f"{config.algorithm}",
            unit="round",
            file=sys.stderr,
            initial=start,
            total=num_rounds,
        )
        steps = bar
    stop = GracefulStop()
    done = start  # rounds completed
    state_done = state  # the state after the last completed round

    def write_files(files: dict) -> None:
        for name, obj in files.items():
            writer.json(name, obj)

    def final_files() -> None:
        if rounds.final_files is not None:
            write_files(rounds.final_files(state_done, done - 1))

    try:
        for t in steps:
            timing = {"round": t}
            t0 = time.perf_counter()
            round_key = jax.random.fold_in(run_key, t)
            eval_key = jax.random.fold_in(round_key, 7)
            t_dev = jnp.int32(t)
            last_round = t == num_rounds - 1
            evaluating = t % int(config.eval_every) == 0 or last_round
            info: dict = {}
            eval_s = 0.0
            for phase, fn in zip(phases, jitted, strict=True):
                t1 = time.perf_counter()
                state, phase_info = fn(state, part, round_key, t_dev)
                if phase.host is not None:
                    state, report = phase.host(state, phase_info, t, round_key)
                    state = place(state)
                    timing.update(report.get("timing", {}))
                    write_files(report.get("files", {}))
                jax.block_until_ready(state)
                name = f"{phase.timing}_s"
                timing[name] = timing.get(name, 0.0) + time.perf_counter() - t1
                info.update(phase_info)
                if phase.point is not None and evaluating:
                    t2 = time.perf_counter()
                    values = rounds.measure(
                        phase.point, state, part, x_gen, y_gen, eval_key,
                        sharding.to_host(info),
                    )  # fmt: skip
                    host = sharding.to_host(values)  # (sorts dict keys)
                    rec = _record(t, phase.point, {k: host[k] for k in values})
                    records.append(rec)
                    writer.metrics(rec)
                    eval_s += time.perf_counter() - t2
                    loss = rec.get("train_loss")
                    if loss is not None and not math.isfinite(loss):
                        log.warning("training loss is %s at round %d", loss, t)
            counts = {
                k: int(v)
                for k, v in sharding.to_host(info).items()
                if k in ("num_active", "num_diverged")
            }
            timing.update(counts)
            if byzantine is not None:
                timing["num_byzantine"] = byzantine
            if counts.get("num_diverged"):
                log.warning(
                    "round %d: %d agent(s) diverged (non-finite loss or parameters); "
                    "reset and excluded from aggregation",
                    t,
                    counts["num_diverged"],
                )
            if evaluating:
                timing["eval_s"] = eval_s
            done, state_done = t + 1, state
            if every and (done % every == 0 or last_round):
                t3 = time.perf_counter()
                checkpoint.save_payload(mngr, done, {"state": state})
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
        # A second SIGINT mid-round may come after the round consumed (donated)
        # the buffers of the last completed round's state: the last periodic
        # checkpoint is then the resume point.
        consumed = any(
            getattr(x, "is_deleted", lambda: False)()
            for x in jax.tree.leaves(state_done)
        )
        if every and not consumed:
            checkpoint.save_payload(mngr, done, {"state": state_done})
            how = "rerun the same command to resume from it (checkpoint saved)"
        elif every:
            how = "rerun the same command to resume from the last periodic checkpoint"
        else:
            how = (
                "set checkpoint_every > 0 to be able to resume; rerun with --overwrite"
            )
        if not consumed:
            final_files()
        writer.close()
        raise Interrupted(
            f"interrupted (SIGINT) after round {done - 1}; results are in {workdir}; "
            f"{how}"
        ) from None
    finally:
        stop.restore()

    if bar is not None:
        bar.close()
    final_files()
    writer.close()
    if mngr is not None:
        mngr.close()
    one = jax.eval_shape(ctx.init_model, jax.random.PRNGKey(0))
    per_agent = [
        x for x in jax.tree.leaves(state) if x.ndim >= 1 and x.shape[0] == num_agents
    ]
    compilations = {
        p.name: fn._cache_size() for p, fn in zip(phases, jitted, strict=True)
    }
    compilations.update({k: f._cache_size() for k, f in rounds.jitted.items()})
    final = {}
    for rec in records:
        final[rec["point"]] = rec
    return {
        "final": final,
        "records": records,
        "wall_s": time.perf_counter() - setup.t_start,
        "eval_samples": len(setup.eval_idx) if setup.subsampled else None,
        "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(one))),
        "num_devices": 1 if mesh is None else int(mesh.devices.size),
        "agent_block": ctx.block_size,
        "local_plan": ctx.plan_info,
        # Devices holding the per-agent state (an algorithm without per-agent
        # leaves, e.g. Per-FedAvg's one global model: its replicated state).
        "params_devices": len(
            (per_agent or jax.tree.leaves(state))[0].sharding.device_set
        ),
        # Compiled variants per jitted phase: stays 1 however often the tree
        # (or any host-step decision) changes.
        "compilations": compilations,
        "state": state,
    }


__all__ = ["Interrupted", "build", "format_table", "run"]
