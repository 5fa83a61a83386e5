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

Replicas (``num_replicas`` R > 1): R independent runs (seeds ``seed + r``) as one
population with a leading replica axis, each phase run over it in one program
(vmapped, or one replica after another: ``config.replica_plan``), host steps
and measurements per replica; the records gain a ``replica`` field, and
``replicas.json`` holds mean and standard deviation over the replicas
(docs/running.md).

In a multi-process job (``demjax.multihost``) every process runs this same
program on its shards of the agents; only process 0 writes these files and shows
progress, while every process takes part in the orbax checkpoints (the workdir
must then be one shared path).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from demjax import (
    algorithms,
    attacks,
    checkpoint,
    data,
    local,
    memory,
    models,
    multihost,
    sharding,
)
from demjax import plan as plan_lib
from demjax.algorithms.protocol import Context
from demjax.config import hparams, resolved_mu, validate
from demjax.engine import choose_eval_plan, choose_plan, local_mesh
from demjax.errors import ConfigError
from demjax.faults import make_round_masks
from demjax.run_output import (
    GracefulStop,
    Interrupted,
    RunWriter,
    format_table,
    log_plan,
    mean_record,
    place_split,
    plan_record,
    prepare_run,
    replicas_json,
    rounded,
    unlock_workdir,
    unshard,
)

log = logging.getLogger(__name__)


def build(config, part, prepared: tuple | None = None):
    """``(algorithm, ctx, rounds)`` of a validated config on a partition.

    Chooses the run's execution plan (``demjax.engine.choose_plan``: agent
    blocks, conv/matmul implementations; ``choose_eval_plan``) with the
    algorithm's ``resources``, then calls ``Algorithm.build``.

    Args:
      config: a validated run config.
      part: the agents' data (``Partition``, host or device arrays).
      prepared: ``(plan, plan_info)`` of an earlier ``build`` of the same run
        (``ctx.plan``, ``ctx.plan_info``): reused instead of choosing anew.
    """
    algo = algorithms.get(config.algorithm)
    res = {"donate": False, "num_group_models": 1, "points": 1}
    if algo.resources is not None:
        res.update(algo.resources(config))
    tx = local.make_optimizer(config.optimizer, config.lr)
    mu = resolved_mu(config)
    if prepared is None:
        plain = models.make_model(config.model, part.num_classes, config.hidden)
        cap_probe = memory.memory_cap(
            config, part, plain, tx, donate=bool(res["donate"]),
            num_group_models=int(res["num_group_models"]),
        )  # fmt: skip
        plan, plan_info = choose_plan(
            config, part, tx, mu, cap_probe=cap_probe, algorithm=config.algorithm,
            shard_mapped=algo.shard_mapped,
        )  # fmt: skip
        _, eval_conv, plan_info["eval"] = choose_eval_plan(
            config, part, probe=cap_probe[1], points=int(res["points"])
        )
    else:
        plan, plan_info = prepared
        eval_conv = plan_info["eval"]["conv_impl"]
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
        mesh=local_mesh(part),
    )
    return algo, ctx, algo.build(ctx)


def _placement(mesh, num_agents: int, replicas: bool = False):
    """``(place, constrain)`` of a state pytree on the mesh: leaves with a
    leading agent axis ``[A, ...]`` split over ``agents``, the others replicated
    (``replicas``: a state stacked over replicas, ``[m, A, ...]``, split over
    ``agents`` on axis 1, the replica axis whole on every device).
    ``place(state)`` puts host or device leaves there (without a mesh: on the
    default device); ``constrain(fn)`` makes a phase return its state with the
    same shardings (``with_sharding_constraint``), so every round's phases see
    the shardings of round 0 and never recompile (identity without a mesh)."""
    if mesh is None:
        return (lambda state: jax.tree.map(jnp.asarray, state)), (lambda fn: fn)
    whole = sharding.replicated(mesh)
    axis = 1 if replicas else 0
    split = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*([None] * axis), sharding.AXIS)
    )

    def where(x):
        agents = np.ndim(x) > axis and np.shape(x)[axis] == num_agents
        return split if agents else whole

    def place(state):
        return jax.tree.map(lambda x: sharding.place(x, where(x)), state)

    def constrain(fn):
        def phase(state, part, key, t):
            state, info = fn(state, part, key, t)
            shardings = jax.tree.map(where, state)
            return jax.lax.with_sharding_constraint(state, shardings), info

        return phase

    return place, constrain


def _stack(trees: list):
    """Stacks pytrees of one structure on a new leading (replica) axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@dataclasses.dataclass
class _Cohort:
    """Replicas run by one program (``num_replicas`` > 1): one jitted program
    per phase over their stacked states (``vmapped``: the property's name; the
    program vmaps or loops over them, ``plan.over_replicas``), or a single
    replica run by the plain program.

    Attributes:
      members: the replica indices r (seeds ``config.seed + r``).
      ctx, rounds: the leader's (members[0]) context and ``Rounds``, whose pure
        phases, ``init`` and ``measure`` every member runs.
      own: each member's ``Rounds`` (its host steps and final files: host-side
        values such as DemLearn's last linkage live in them).
      part: the shared device partition, or the members' stacked on axis 0.
      part_axis: None (shared) or 0 (stacked), the vmap axis of ``part``.
      data: each member's ``place_split`` dict (``part``, ``x_gen``, ``y_gen``).
      own_measure: measure with each member's own ``measure`` (its own split).
      jitted: the jitted phase programs; state: the members' state (stacked
        when ``vmapped``).
    """

    members: list
    ctx: object
    rounds: object
    own: list
    part: object
    part_axis: int | None
    data: list
    own_measure: bool
    place: object = None
    jitted: list = dataclasses.field(default_factory=list)
    state: object = None

    @property
    def vmapped(self) -> bool:
        return len(self.members) > 1


def _signature(rounds, part) -> tuple:
    """What must match for replicas to share one compiled program: the jaxprs
    (with shapes) of ``init`` and of every phase, and their constants."""
    key = jax.random.PRNGKey(0)
    like = jax.eval_shape(rounds.init, key, part)
    closed = [jax.make_jaxpr(rounds.init)(key, part)]
    closed += [
        jax.make_jaxpr(p.fn)(like, part, key, jnp.int32(0)) for p in rounds.phases
    ]
    # (Python objects printed with their address, e.g. a custom rule's
    # function, are compared by what they print without it.)
    text = tuple(re.sub(r" at 0x[0-9a-fA-F]+", "", str(c.jaxpr)) for c in closed)
    consts = tuple(_const(x) for c in closed for x in c.consts)
    return text, consts


def _const(x) -> np.ndarray:
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _same_signature(a: tuple, b: tuple) -> bool:
    return (
        a[0] == b[0]
        and len(a[1]) == len(b[1])
        and all(
            x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
            for x, y in zip(a[1], b[1], strict=True)
        )
    )


def _replica_config(config, r: int):
    """The config of replica r's set-up (split, evaluation subsample, the
    algorithm's own seeded set-up): ``seed + r`` with ``replicate_split``, else
    ``config`` itself (every replica shares the set-up of ``seed``)."""
    if r == 0 or not config.replicate_split:
        return config
    c = copy.deepcopy(config)
    with c.unlocked():
        c.seed = int(config.seed) + r
    return c


def _cohorts(config, setup, workdir: str, partition) -> tuple[list, object]:
    """The replicas grouped into ``_Cohort``s (see ``run``), and the setup
    (on one device when the plan search measured one device faster than the
    mesh: ``plan.resolve_devices``)."""
    reps = int(config.num_replicas)
    _, ctx, rounds = build(config, setup.part)
    devices = ctx.plan_info.get("devices")
    if devices is not None:
        log.info(
            "local training on %d of %d CPU devices (%s)",
            devices["chosen"], setup.mesh.devices.size,
            "; ".join(f"{r['devices']} device(s), plan {r['plan']}: "
                      f"{r['agent_steps_per_s']:.0f} agent-steps/s"
                      for r in devices["table"])
            or "too short a run to time both sides",
        )  # fmt: skip
        if devices["chosen"] == 1:
            setup = unshard(setup)
            _, ctx, rounds = build(config, setup.part, (ctx.plan, ctx.plan_info))
    if setup.mesh is not None:
        log.info("agents sharded over %d devices (mesh axis 'agents')",
                 setup.mesh.devices.size)  # fmt: skip
    log_plan(ctx.plan_info)
    prepared = (ctx.plan, ctx.plan_info)
    algo = algorithms.get(config.algorithm)
    first = {"part": setup.part, "x_gen": setup.x_gen, "y_gen": setup.y_gen}
    if reps == 1 or not config.replicate_split:
        own = [rounds] + [algo.build(ctx) for _ in range(1, reps)]
        return [_Cohort(list(range(reps)), ctx, rounds, own, setup.part, None,
                        [first] * reps, own_measure=False)], setup  # fmt: skip
    # replicate_split: each replica's own split (and set-up) and programs; the
    # replicas whose programs match exactly share one vmapped program.
    entries = [(ctx, rounds, first, _signature(rounds, setup.part))]
    for r in range(1, reps):
        c = _replica_config(config, r)
        split = data.make_split(c, partition)
        if multihost.is_primary():
            data.write_card(os.path.join(workdir, f"replica_{r}"), split)
        got = place_split(c, split, setup.mesh)
        _, ctx_r, rounds_r = build(c, got["part"], prepared)
        entries.append((ctx_r, rounds_r, got, _signature(rounds_r, got["part"])))
    groups: list[list[int]] = []
    for r, entry in enumerate(entries):
        for g in groups:
            if _same_signature(entries[g[0]][3], entry[3]):
                g.append(r)
                break
        else:
            groups.append([r])
    if len(groups) > 1:
        log.info(
            "replicate_split: the replicas' splits give %d different programs "
            "(replica groups %s): each group runs as its own program, one after "
            "another",
            len(groups), groups,
        )  # fmt: skip
    out = []
    for g in groups:
        parts = [entries[r][2]["part"] for r in g]
        ctx_g, rounds_g = entries[g[0]][0], entries[g[0]][1]
        stacked = _stack(parts) if len(g) > 1 else parts[0]
        own = [entries[r][1] for r in g]
        out.append(_Cohort(g, ctx_g, rounds_g, own, stacked, 0 if len(g) > 1 else None,
                           [entries[r][2] for r in g], own_measure=True))  # fmt: skip
    return out, setup


def _record(t: int, point: str, values: dict, replica: int | None = None) -> dict:
    rec = {"round": t, "point": point}
    if replica is not None:
        rec["replica"] = int(replica)
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
      the final state pytree}``. With ``config.num_replicas`` R > 1 (replica r
      is the run of seed ``seed + r``; docs/running.md): ``records`` carry a
      ``replica`` field, ``final`` holds per point the mean over replicas of
      the last round's records, ``replicas`` the ``replicas.json`` summary
      (``demjax.run_output.replica_summary``), ``state`` leaves
      ``[R, A, ...]``, and ``compilations`` counts the programs of all groups
      of replicas (1 per phase when they share one).

    Raises:
      ConfigError: bad config field or input (before any array is built);
        ``replicate_split=True`` with a given partition.
      DataNotFoundError: the data set is not available offline.
    """
    validate(config)
    reps = int(config.num_replicas)
    if (
        reps > 1
        and config.replicate_split
        and (partition is not None or config.partition == "arrays")
    ):
        raise ConfigError(
            "replicate_split=True needs a split drawn from the seed; accepted: "
            "replicate_split=False with partition='arrays' (every replica shares "
            "the given partition)"
        )
    setup = prepare_run(config, workdir, overwrite, partition)
    show = config.progress if progress is None else progress
    show = show and multihost.is_primary()

    try:
        cohorts, setup = _cohorts(config, setup, workdir, partition)
    except BaseException:
        unlock_workdir(workdir)
        raise
    mesh, resume = setup.mesh, setup.resume
    ctx, rounds = cohorts[0].ctx, cohorts[0].rounds
    num_agents = ctx.num_agents
    phases = rounds.phases
    # Replica r's keys are those of a one-replica run with seed ``seed + r``.
    run_keys = []
    init_keys = []
    for r in range(reps):
        init_key, run_key = jax.random.split(jax.random.PRNGKey(int(config.seed) + r))
        init_keys.append(init_key)
        run_keys.append(run_key)
    # How the phases run over the replicas (``plan.resolve_replicas``).
    rp = ctx.plan_info.get("replicas") or {"mode": "vmap"}
    serial_replicas = rp["mode"] == "one_at_a_time"
    for c in cohorts:
        c.place, constrain = _placement(mesh, num_agents, replicas=c.vmapped)
        if c.vmapped:
            if c.part_axis is not None:
                c.part = c.place(c.part)
            fns = [
                plan_lib.over_replicas(p.fn, c.part_axis, serial_replicas, p.name)
                for p in c.rounds.phases
            ]
            c.state = c.place(
                _stack([
                    c.rounds.init(init_keys[r], d["part"])
                    for r, d in zip(c.members, c.data, strict=True)
                ])
            )  # fmt: skip
        else:
            fns = [p.fn for p in c.rounds.phases]
            c.state = c.place(c.rounds.init(init_keys[c.members[0]], c.part))
        c.jitted = [
            jax.jit(constrain(fn), donate_argnums=(0,) if p.donate else ())
            for p, fn in zip(c.rounds.phases, fns, strict=True)
        ]

    def payload(states: list) -> dict:
        if reps == 1:
            return {"state": states[0]}
        return {"state": {f"cohort_{i}": s for i, s in enumerate(states)}}

    every = int(config.checkpoint_every)
    keep = int(config.keep_checkpoints)
    mngr = checkpoint.manager(workdir, keep) if (every or resume) else None
    start = 0
    if resume:  # the newest readable checkpoint (damaged ones are set aside)
        got, start = checkpoint.restore_payload(
            mngr, payload([c.state for c in cohorts])
        )
        got = got["state"]
        for i, c in enumerate(cohorts):
            c.state = c.place(got if reps == 1 else got[f"cohort_{i}"])
    writer = RunWriter(
        workdir,
        keep_rounds_below=start if resume else None,
        write=multihost.is_primary(),
    )
    writer.json("config.json", setup.config_json)
    writer.timing(
        plan_record(ctx.plan_info, 1 if mesh is None else int(mesh.devices.size))
    )
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
    states_done = [c.state for c in cohorts]  # after the last completed round

    def write_files(files: dict, r: int) -> None:
        for name, obj in files.items():
            writer.json(name if reps == 1 else os.path.join(f"replica_{r}", name), obj)

    def final_files() -> None:
        for c, state in zip(cohorts, states_done, strict=True):
            for j, r in enumerate(c.members):
                if c.own[j].final_files is None:
                    continue
                one = plan_lib.take_replica(state, j) if c.vmapped else state
                write_files(c.own[j].final_files(one, done - 1), r)
        if reps > 1 and records:
            writer.json("replicas.json", _replicas_json(config, records))

    def host_step(c, i: int, state, info, t: int, keys: list):
        """Phase i's host step for every member of cohort c; returns the state
        and the members' reports."""
        if not c.vmapped:
            state, report = c.own[0].phases[i].host(state, info, t, keys[0])
            return c.place(state), [report]
        leaves, treedef = jax.tree.flatten(state)
        new_leaves, reports = [], []
        for j in range(len(c.members)):
            mine = [x[j] for x in leaves]
            one, report = c.own[j].phases[i].host(
                jax.tree.unflatten(treedef, mine),
                {k: v[j] for k, v in info.items()}, t, keys[j],
            )  # fmt: skip
            new_leaves.append((mine, jax.tree.leaves(one)))
            reports.append(report)
        # Leaves no member changed keep their stacked arrays (no copy).
        out = [
            x if all(n[k] is m[k] for m, n in new_leaves)
            else jnp.stack([jnp.asarray(n[k]) for _, n in new_leaves])
            for k, x in enumerate(leaves)
        ]  # fmt: skip
        return c.place(jax.tree.unflatten(treedef, out)), reports

    try:
        for t in steps:
            timing = {"round": t}
            t0 = time.perf_counter()
            round_keys = [jax.random.fold_in(k, t) for k in run_keys]
            eval_keys = [jax.random.fold_in(k, 7) for k in round_keys]
            t_dev = jnp.int32(t)
            last_round = t == num_rounds - 1
            evaluating = t % int(config.eval_every) == 0 or last_round
            infos = [{} for _ in cohorts]
            eval_s = 0.0
            for i, phase in enumerate(phases):
                point_recs = []
                for c, info in zip(cohorts, infos, strict=True):
                    t1 = time.perf_counter()
                    keys = [round_keys[r] for r in c.members]
                    key = jnp.stack(keys) if c.vmapped else keys[0]
                    c.state, phase_info = c.jitted[i](c.state, c.part, key, t_dev)
                    if phase.host is not None:
                        c.state, reports = host_step(c, i, c.state, phase_info, t, keys)
                        for r, report in zip(c.members, reports, strict=True):
                            if reps == 1:
                                timing.update(report.get("timing", {}))
                            else:  # summed over the replicas
                                for k, v in report.get("timing", {}).items():
                                    timing[k] = timing.get(k, 0) + v
                            write_files(report.get("files", {}), r)
                    jax.block_until_ready(c.state)
                    name = f"{phase.timing}_s"
                    timing[name] = timing.get(name, 0.0) + time.perf_counter() - t1
                    info.update(phase_info)
                    if phase.point is not None and evaluating:
                        t2 = time.perf_counter()
                        point_recs += _measure(
                            c, phase.point, info, eval_keys, t, reps > 1
                        )
                        eval_s += time.perf_counter() - t2
                for rec in sorted(point_recs, key=lambda x: x.get("replica", 0)):
                    records.append(rec)
                    writer.metrics(rec)
                    loss = rec.get("train_loss")
                    if loss is not None and not math.isfinite(loss):
                        log.warning("training loss is %s at round %d", loss, t)
            counts = {}
            for info in infos:
                for k, v in sharding.to_host(info).items():
                    if k in ("num_active", "num_diverged"):
                        counts[k] = counts.get(k, 0) + int(np.sum(v))
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
            done, states_done = t + 1, [c.state for c in cohorts]
            if every and (done % every == 0 or last_round):
                t3 = time.perf_counter()
                checkpoint.save_payload(mngr, done, payload(states_done))
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
            for x in jax.tree.leaves(states_done)
        )
        if every and not consumed:
            checkpoint.save_payload(mngr, done, payload(states_done))
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
    axis = 1 if reps > 1 else 0
    if reps == 1:
        state = cohorts[0].state
    elif len(cohorts) == 1:
        state = cohorts[0].state
    else:  # replica order
        order = {r: (c, j) for c in cohorts for j, r in enumerate(c.members)}
        state = _stack([
            plan_lib.take_replica(order[r][0].state, order[r][1]) if order[r][0].vmapped
            else order[r][0].state
            for r in range(reps)
        ])  # fmt: skip
    per_agent = [
        x
        for x in jax.tree.leaves(state)
        if x.ndim > axis and x.shape[axis] == num_agents
    ]
    compilations = {p.name: 0 for p in phases}
    for c in cohorts:
        for p, fn in zip(phases, c.jitted, strict=True):
            compilations[p.name] += fn._cache_size()
    compilations.update({k: f._cache_size() for k, f in rounds.jitted.items()})
    final = {}
    for rec in records:
        final[rec["point"]] = rec
    out = {}
    if reps > 1:
        final = {p: mean_record(records, p, rec["round"]) for p, rec in final.items()}
        out["replicas"] = _replicas_json(config, records)
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
        # (or any host-step decision) changes (and for any number of replicas
        # sharing one program).
        "compilations": compilations,
        "state": state,
        **out,
    }


def _measure(c, point: str, info: dict, eval_keys: list, t: int, tag: bool) -> list:
    """The records of cohort c's members at a measurement point (one per
    replica; ``tag``: with their ``replica`` field)."""
    host_info = sharding.to_host(info)
    out = []
    for j, r in enumerate(c.members):
        state = plan_lib.take_replica(c.state, j) if c.vmapped else c.state
        mine = {k: v[j] for k, v in host_info.items()} if c.vmapped else host_info
        d = c.data[j]
        measure = (c.own[j] if c.own_measure else c.rounds).measure
        values = measure(
            point, state, d["part"], d["x_gen"], d["y_gen"], eval_keys[r], mine
        )
        host = sharding.to_host(values)  # (sorts dict keys)
        out.append(_record(t, point, {k: host[k] for k in values}, r if tag else None))
    return out


def _replicas_json(config, records: list[dict]) -> dict:
    return replicas_json(records, int(config.num_replicas), int(config.seed),
                         bool(config.replicate_split))  # fmt: skip


__all__ = ["Interrupted", "build", "format_table", "run"]
