"""The hierarchical (DemLearn) family: one group tree, three phases per round.

DemLearn (Nguyen et al., IEEE TNNLS, arXiv 2007.03278, Algorithm 1) and its
special cases FedAvg, FedProx (a tree with no group levels and alpha = 1) and
local training (no communication) share one round, built here from the phases
of ``demjax.engine.Simulator``:

1. ``local_phase`` (jitted): every active agent trains (vmap of one agent's
   scan, in agent blocks), with the proximal anchor taken from its parent model
   of the previous round; an agent whose loss or parameters turn non-finite is
   reset to its parent group model, excluded from aggregation and counted
   (``num_diverged``). Host step, self-organizing algorithms only, every
   ``tau`` rounds (Sec. IV-A): features -> jitted distance matrix -> scipy
   linkage -> a new ``GroupTree`` (same capacities: nothing recompiles).
2. ``aggregate_phase`` (jitted): bottom-up group models (Sec. IV-B,
   ``hierarchy.aggregate_up``). Measurement point ``local``: the agents' locally
   trained models and the round's group models.
3. ``mix_phase`` (jitted): top-down mixing ``w <- (1 - alpha) w + alpha
   w_parent`` (Sec. IV-C, ``hierarchy.mix_down``; alpha = 1 for broadcast
   algorithms). Measurement point ``sync``: the models the agents hold entering
   the next round.

Communication (round info ``bytes_up`` / ``bytes_down``, in both measurement
points' records): every active agent that did not diverge uploads its trained
model to its level-1 group (groups and the root live on the server), every
active agent receives its parent's model (FedAvg/FedProx: the global model);
``bytes_up`` = senders x model bytes, ``bytes_down`` = active x model bytes; 0
and 0 for local training.

An algorithm of the family is ``family_algorithm(name, citation, Hierarchy(...))``
in its own module; the options below are read only here and by the phases.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types

import flax.struct
import jax
import jax.numpy as jnp

from demjax import cluster
from demjax.algorithms.protocol import Algorithm, Phase, Rounds
from demjax.errors import ConfigError, DivergenceError
from demjax.pytrees import agent_bytes, comm_bytes


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """How an algorithm of the family combines the shared phases.

    Attributes:
      self_organizing: builds a group tree by clustering agents' models (DemLearn);
        otherwise every agent hangs directly under one global model.
      communicates: False for local-only training (no aggregation, no global model).
      default_mu: proximal coefficient used when ``config.mu`` is unset.
      requires_mu_positive: ``mu`` must be > 0 (DemLearn-P, FedProx).
      prox_from_round0: apply the proximal term from round 0 (FedProx, anchored to
        the global model) rather than from round 1 (DemLearn-P, anchored to the
        parent group model of the previous round).
      sample_weighted: aggregate with sample-count weights (FedAvg); otherwise
        ``config.weighting`` decides (DemLearn's reference: agent counts).
      broadcast: after aggregation agents take the parent model outright
        (alpha = 1, FedAvg/FedProx); otherwise ``config.alpha`` mixing.
    """

    self_organizing: bool
    communicates: bool = True
    default_mu: float = 0.0
    requires_mu_positive: bool = False
    prox_from_round0: bool = False
    sample_weighted: bool = False
    broadcast: bool = False


@flax.struct.dataclass
class TreeState:
    """State of a hierarchical algorithm (checkpointed whole).

    Attributes:
      params: agent models, leaves float32 ``[A, ...]``.
      opt_state: agent optimizer states, leaves ``[A, ...]``.
      node_params: group models, leaves ``[N, ...]`` (root last): after the last
        synchronization, or the round's aggregates between ``aggregate_phase``
        and ``mix_phase``; the proximal anchors of the next round.
      tree: the current ``GroupTree`` (int32 arrays; static capacities).
      node_weight: float32 ``[N]`` agents under each group.
      active, diverged: bool ``[A]`` of the last local phase.
      loss: float32 ``[A]`` mean training loss of the last local phase (0 for
        inactive or diverged agents).
      start: the agents' models entering the round (only for self-organizing
        algorithms whose clustering features are the round's updates or under
        a message attack, else None).
      tree_round: int32 scalar, the round that built ``tree`` (0 before any).
    """

    params: object
    opt_state: object
    node_params: object
    tree: object
    node_weight: jax.Array
    active: jax.Array
    diverged: jax.Array
    loss: jax.Array
    start: object
    tree_round: jax.Array


def check(options: Hierarchy, name: str, config) -> None:
    """The config fields the family reads beyond the common ones.

    Raises:
      ConfigError: ``mu`` 0 where it must be positive; bad ``num_levels`` or
        ``level_groups`` for a self-organizing algorithm; fastcluster missing.
    """
    mu = float(options.default_mu if config.mu is None else config.mu)
    if options.requires_mu_positive and mu == 0:
        plain = "demlearn" if options.self_organizing else "fedavg"
        raise ConfigError(
            f"mu=0 is not valid for algorithm={name!r}; accepted: mu > 0 "
            f"(use algorithm={plain!r} for mu=0)"
        )
    if not options.self_organizing:
        return
    if config.tree_mode == "binary" and config.num_levels < 1:
        raise ConfigError(
            f"num_levels={config.num_levels!r} is not valid for algorithm="
            f"{name!r}; accepted: an integer >= 1"
        )
    if config.tree_mode == "maxclust":
        groups = tuple(config.level_groups)
        ok = (
            len(groups) >= 1
            and all(isinstance(g, int) and g >= 1 for g in groups)
            and all(a >= b for a, b in zip(groups, groups[1:], strict=False))
            and groups[0] <= config.num_agents
        )
        if not ok:
            raise ConfigError(
                f"level_groups={groups!r} is not valid for tree_mode='maxclust'; "
                "accepted: non-increasing positive integers, level 1 first, the "
                f"first at most num_agents={config.num_agents}, e.g. (16, 4, 2)"
            )
    if config.linkage_backend == "fastcluster" and not cluster.fastcluster_available():
        raise ConfigError(
            "linkage_backend='fastcluster' needs the fastcluster package; "
            "accepted: scipy, or `pip install 'demjax[fastcluster]'`"
        )


def resources(options: Hierarchy, config) -> dict:
    """In-place rounds unless the round's starting parameters are needed
    (self-organizing algorithms with ``cluster_features="updates"``, or under a
    message attack: the Byzantine update is relative to them; one more copy of
    the population); every group model held; two measurement points."""
    from demjax import attacks, engine

    needs_start = config.cluster_features == "updates" or (
        config.get("attack", "none") in attacks.MESSAGE_ATTACKS
    )
    return {
        "donate": not (options.self_organizing and needs_start),
        "num_group_models": int(
            sum(engine.tree_capacity(config, options.self_organizing))
        ),
        "points": 2,
    }


# name -> options of every registered member of the family.
FAMILY: dict[str, Hierarchy] = {}


def simulator(config, part, donate: bool = False, *, mu: float | None = None,
              prepared: tuple | None = None):  # fmt: skip
    """The ``demjax.engine.Simulator`` (the jitted phases) of a validated config
    whose algorithm is a member of the family, on a partition ``part``.

    Args:
      donate: in-place phases (buffer donation).
      mu: the proximal coefficient; default ``config.mu`` or the algorithm's.
      prepared: ``(LocalPlan, plan_info)`` already chosen; None: chosen here.

    Raises:
      KeyError: ``config.algorithm`` is not a member of the family.
    """
    from demjax import engine

    options = FAMILY[config.algorithm]
    mu = float((options.default_mu if config.mu is None else config.mu)
               if mu is None else mu)  # fmt: skip
    return engine.Simulator(
        config, part, donate, options=options, mu=mu, prepared=prepared
    )


def build(options: Hierarchy, ctx) -> Rounds:
    """``Rounds`` of a hierarchical algorithm (see the module docstring)."""
    from demjax import engine, sharding
    from demjax.run_output import majority_labels, tree_snapshot

    config, part = ctx.config, ctx.partition
    donate = bool(resources(options, config)["donate"])
    sim = simulator(config, part, donate, mu=ctx.mu, prepared=(ctx.plan, ctx.plan_info))
    num_agents, num_rounds = sim.num_agents, int(config.num_rounds)
    keep_start = not donate
    raw = sim.raw
    mu = float(sim.mu)
    alpha = float(sim.round_alpha())
    amplify_on, amplify_rounds = bool(config.amplify), int(config.amplify_rounds)
    amplify_factor = float(config.amplify_factor)
    num_levels = len(sim.level_sizes) - 1
    level_names = [
        f"{m}_l{k}" for k in range(1, num_levels + 1) for m in ("g_spe", "g_gen")
    ]
    majority = majority_labels(
        types.SimpleNamespace(
            y_train=sharding.to_host(part.y_train),
            n_train=sharding.to_host(part.n_train),
        )
    )
    snap = int(config.tree_snapshot_every)
    linkage = {"z": None, "agents": None}  # of the last tree built on this host

    def init(key, part):
        s = sim.init(key, part)
        tree = engine.placeholder_tree(num_agents, sim.level_sizes)
        n = int(sum(sim.level_sizes))
        return TreeState(
            params=s.params,
            opt_state=s.opt_state,
            node_params=s.node_params,
            tree=tree,
            node_weight=jnp.zeros((n,), jnp.float32),
            active=jnp.zeros((num_agents,), bool),
            diverged=jnp.zeros((num_agents,), bool),
            loss=jnp.zeros((num_agents,), jnp.float32),
            start=jax.tree.map(jnp.copy, s.params) if keep_start else None,
            tree_round=jnp.int32(0),
        )

    def local_fn(state, part, key, t):
        if options.prox_from_round0:
            round_mu = jnp.float32(mu)
        else:
            round_mu = jnp.where(t == 0, jnp.float32(0.0), jnp.float32(mu))
        params, opt_state, loss, active, diverged = raw["local_phase"](
            state.params, state.opt_state, state.node_params, part, state.tree,
            round_mu, key,
        )  # fmt: skip
        new = state.replace(
            params=params,
            opt_state=opt_state,
            loss=loss,
            active=active,
            diverged=diverged,
            start=state.params if keep_start else None,
        )
        info = {
            "num_active": jnp.sum(active),
            "num_diverged": jnp.sum(diverged),
        }
        # Agents upload their trained model to their level-1 group and receive
        # their parent's model (the groups live on the server); local training
        # communicates nothing. Diverged agents send nothing.
        model = agent_bytes(params) if options.communicates else 0
        info.update(comm_bytes(model, active & ~diverged, model, active))
        return new, info

    def regroup(state, info, t, key):
        """Host step: the self-organizing re-grouping (every ``tau`` rounds)."""
        if not sim.regroups(t):
            return state, {}
        try:
            tree, tinfo = sim.build_tree(
                state.params, state.start, jax.random.fold_in(key, 1)
            )
        except DivergenceError as e:
            raise DivergenceError(f"round {t}: {e}") from None
        linkage["z"] = tinfo.pop("linkage")
        linkage["agents"] = tinfo.pop("linkage_agents", None)
        report = {"timing": tinfo}
        if snap and (t % snap == 0 or t == num_rounds - 1):
            report["files"] = {
                os.path.join("trees", f"round_{t:05d}.json"): tree_snapshot(
                    tree, linkage["z"], t, majority, linkage["agents"]
                )
            }
        return state.replace(tree=tree, tree_round=jnp.int32(t)), report

    def agent_weight(part):
        if options.sample_weighted or config.weighting == "samples":
            return jnp.asarray(part.n_train, jnp.float32)
        return jnp.ones((num_agents,), jnp.float32)

    def aggregate_fn(state, part, key, t):
        if amplify_on:
            amplify = jnp.where(
                t < amplify_rounds, jnp.float32(amplify_factor), jnp.float32(1.0)
            )
        else:
            amplify = jnp.float32(1.0)
        node_params, node_weight = raw["aggregate_phase"](
            state.params, state.tree, agent_weight(part), state.active,
            state.diverged, amplify, state.node_params, jax.random.fold_in(key, 2),
            start=state.start,
        )  # fmt: skip
        return state.replace(node_params=node_params, node_weight=node_weight), {}

    def mix_fn(state, part, key, t):
        node_params, params = raw["mix_phase"](
            state.node_params, state.params, state.tree, jnp.float32(alpha),
            state.active,
        )  # fmt: skip
        return state.replace(params=params, node_params=node_params), {}

    evaluate, evaluate_root = sim.jitted["evaluate"], sim.jitted["evaluate_root"]

    def measure(point, state, part, x_gen, y_gen, key, info):
        counts = {k: int(info[k]) for k in ("num_active", "num_diverged")}
        if point == "sync" and options.broadcast and counts["num_active"] == num_agents:
            # Every agent holds the global model: evaluate it once.
            m = evaluate_root(state.node_params, part, x_gen, y_gen)
        else:
            m = evaluate(
                state.params, state.node_params, state.node_weight, state.tree,
                part, x_gen, y_gen,
            )  # fmt: skip
        if point == "local":
            ok = (state.active & ~state.diverged).astype(jnp.float32) * agent_weight(
                part
            )
            m["train_loss"] = jnp.sum(state.loss * ok) / jnp.maximum(jnp.sum(ok), 1e-12)
        rec = {
            k: m.get(k)
            for k in ["c_spe", "c_gen", *level_names, "global_acc", "train_loss"]
        }
        rec.update(counts)
        rec.update({k: info[k] for k in ("bytes_up", "bytes_down")})
        return rec

    def final_files(state, t):
        tree = sharding.to_host(state.tree)
        last = (
            int(sharding.to_host(state.tree_round))
            if options.self_organizing
            else (num_rounds - 1)
        )
        snapshot = tree_snapshot(tree, linkage["z"], last, majority, linkage["agents"])
        return {"tree_final.json": snapshot}

    sync = "sync"
    return Rounds(
        init=init,
        phases=(
            Phase(
                "local_phase",
                local_fn,
                timing="local",
                donate=donate,
                host=regroup if options.self_organizing else None,
            ),
            Phase(
                "aggregate_phase",
                aggregate_fn,
                timing=sync,
                donate=donate,
                point="local",
            ),  # fmt: skip
            Phase("mix_phase", mix_fn, timing=sync, donate=donate, point="sync"),
        ),
        measure=measure,
        jitted={"evaluate": evaluate, "evaluate_root": evaluate_root},
        final_files=final_files,
        personal=lambda state, part, key: state.params,
        global_model=(
            (lambda state: jax.tree.map(lambda p: p[-1], state.node_params))
            if options.communicates
            else None
        ),
    )


def family_algorithm(name: str, citation: str, options: Hierarchy) -> Algorithm:
    """The registered ``Algorithm`` of a member of the family."""
    FAMILY[name] = options
    return Algorithm(
        name=name,
        citation=citation,
        hparams={},
        build=functools.partial(build, options),
        has_global=options.communicates,
        default_mu=options.default_mu,
        check=functools.partial(check, options, name),
        resources=functools.partial(resources, options),
        attackable=options.communicates,
    )


__all__ = [
    "FAMILY",
    "Hierarchy",
    "TreeState",
    "build",
    "check",
    "family_algorithm",
    "simulator",
]
