"""The phases of the hierarchical family and the execution plan of every run.

``Simulator`` holds the pure and the jitted phases of one round of DemLearn and
its special cases (Nguyen et al., IEEE TNNLS, arXiv 2007.03278, Algorithm 1;
FedAvg and FedProx are a tree with no group levels and alpha = 1), which
``demjax.algorithms.hierarchical`` runs inside the round loop:

1. ``local_phase``: every active agent trains (vmap of one agent's scan, in
   agent blocks), with the proximal anchor taken from its parent model of the
   previous round; non-finite agents are reset and flagged. With the agents
   sharded over several devices each device trains its own agents under
   ``jax.shard_map``.
2. ``build_tree`` (host, self-organizing algorithms every ``tau`` rounds):
   features -> jitted distance matrix -> scipy linkage -> ``GroupTree``.
3. ``aggregate_phase`` (``aggregate_up``) and ``mix_phase`` (``mix_down``).
4. ``evaluate`` / ``evaluate_root``: the metrics of a measurement point.

The tree is an argument of fixed-capacity int32 arrays, so a new tree never
recompiles anything; the partition is an argument too (not a baked-in constant).
``choose_plan`` / ``choose_eval_plan`` pick the local-training and evaluation
plans of every algorithm's run (``demjax.plan``).
"""

from __future__ import annotations

import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from demjax import (
    attacks,
    cluster,
    faults,
    hierarchy,
    local,
    memory,
    metrics,
    models,
    pytrees,
    sharding,
)
from demjax import plan as plan_lib
from demjax.types import GroupTree, Partition


@flax.struct.dataclass
class SimState:
    """Simulation state.

    Attributes:
      params: agent models, leaves float32 ``[A, ...]``.
      opt_state: agent optimizer states, leaves ``[A, ...]``.
      node_params: group models after the last synchronization, leaves
        ``[N, ...]`` (root last); the proximal anchors of the next round.
      round: int32 scalar, the next round to run.
    """

    params: object
    opt_state: object
    node_params: object
    round: jax.Array


def placeholder_tree(num_agents: int, level_sizes: tuple[int, ...]) -> GroupTree:
    """A tree of the given capacities with every agent directly under the root.

    Used before the first clustering (and for algorithms without groups), so the
    shapes of every later tree are known from the start.
    """
    n = int(sum(level_sizes))
    root = n - 1
    ancestor = np.full((len(level_sizes), num_agents), -1, np.int32)
    ancestor[-1] = root
    return GroupTree(
        agent_parent=np.full((num_agents,), root, np.int32),
        node_parent=np.full((n,), root, np.int32),
        agent_ancestor=ancestor,
        level_sizes=tuple(int(s) for s in level_sizes),
    )


def tree_capacity(config, self_organizing: bool = True) -> tuple[int, ...]:
    """Static ``level_sizes`` of the trees a config will build (``(1,)``: every
    agent under the root, for algorithms that build no group tree)."""
    if not self_organizing:
        return (1,)
    if config.tree_mode == "maxclust":
        return tuple(int(g) for g in config.level_groups) + (1,)
    levels = int(config.num_levels)
    return tuple(2 ** (levels - k) for k in range(levels)) + (1,)


def _host_rows(a, k: int) -> np.ndarray:
    """The first ``k`` rows of ``a`` on the host (zeros for an abstract array,
    e.g. a ``jax.ShapeDtypeStruct`` partition that is only lowered)."""
    if isinstance(a, jax.ShapeDtypeStruct):
        return np.zeros((k, *a.shape[1:]), a.dtype)
    return sharding.to_host(a[:k])


def local_mesh(partition: Partition):
    """The ``agents`` mesh local training is sharded over (``shard_map``), or
    None: one device, or the partition is not sharded (a plan measurement)."""
    x = partition.x_train
    if not isinstance(x, jax.Array) or len(x.sharding.device_set) < 2:
        return None
    mesh = getattr(x.sharding, "mesh", None)
    if mesh is None or tuple(mesh.axis_names) != (sharding.AXIS,):
        return None
    return mesh


def _sharded(train_shard, mesh, params, opt_state, node_params, part, anchor_tree,
             mu, keys, active, max_steps):  # fmt: skip
    """``train_shard`` under ``jax.shard_map``: each device of the ``agents``
    mesh trains its own contiguous A / D agents (anchors gathered from the
    replicated group models at the agents' global ids), one program per device
    running the local plan on its shard. Returns ``local_phase``'s tuple."""
    from jax.sharding import PartitionSpec as P

    a = sharding.AXIS
    per_device = keys.shape[0] // int(mesh.devices.size)

    def body(*args):  # train_shard's arguments but the agents' global offset
        return train_shard(*args, jax.lax.axis_index(a) * per_device)

    shard = P(a)
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(shard, shard, P(), shard, shard, shard, P(), P(), shard, shard,
                  shard),  # fmt: skip
        out_specs=(shard, shard, shard, shard),
        check_vma=False,
    )
    p, o, loss, div = fn(
        params, opt_state, node_params, part.x_train, part.y_train, part.n_train,
        anchor_tree, mu, keys, active, max_steps,
    )  # fmt: skip
    return p, o, loss, active, div


def choose_plan(config, partition: Partition, tx, mu: float, *,
                cap_probe: tuple[int, dict], algorithm: str,
                shard_mapped: bool = True):  # fmt: skip
    """The local-training execution plan of a run (``demjax.plan``).

    Times the candidate plans on the run's own model, optimizer and data
    shapes (the standard local objective's step), or takes them from
    ``config.local_plan`` / ``conv_impl`` / ``matmul_impl`` or the plan cache.

    Args:
      config: validated run config.
      partition: the agents' data (host or device arrays).
      tx: the agents' optax optimizer; mu: proximal coefficient of the run.
      cap_probe: ``memory_cap``'s result: the most agents whose training fits
        in memory at once, and the probe of one agent's gradient step.
      algorithm: name (part of the cache key: a plug-in's gradient differs).
      shard_mapped: on a mesh, the algorithm's local training runs each
        device's agents under shard_map (``Simulator``'s local phase for the
        hierarchical family, ``Context.trainer`` for plug-ins), so the
        candidates are one shard's plans; False: left to XLA's partitioner
        (``plan.resolve``'s ``shard_mapped``).

    On several CPU devices of one process with ``num_devices`` 0
    (``device_choice``), the best one-device plan over all agents and the
    best per-device plan are searched with half the budget each and timed
    against each other (``plan.resolve_devices``); ``info["devices"]["chosen"]``
    is then 1 or D, and ``train`` moves a partition placed on the mesh to one
    device when 1 wins.

    Returns:
      ``(plan.LocalPlan, info dict)`` as ``demjax.plan.resolve`` (with
      ``info["replicas"]``: how the phases run over ``num_replicas`` > 1
      replicas; ``info["devices"]`` with the device choice).
    """
    has_conv = config.model.startswith("cnn")
    n_train = sharding.to_host(partition.n_train)
    shape = tuple(partition.input_shape)
    num_classes = partition.num_classes
    batch_size, epochs = int(config.batch_size), int(config.local_epochs)

    def make_trainer(block, conv, matmul, n, local_epochs=1):
        model = models.make_model(config.model, num_classes, config.hidden, conv,
                                  matmul)  # fmt: skip
        return local.make_train_population(
            models.make_apply(model), tx, batch_size=batch_size,
            local_epochs=local_epochs,
            n_train=n, num_buckets=1, block_size=block,
        )  # fmt: skip

    # Parameters are interchangeable between conv implementations: init once.
    one = jax.device_get(
        models.init_params(
            jax.random.PRNGKey(0),
            models.make_model(config.model, num_classes, config.hidden),
            shape,
        )
    )

    def init_params(impl):
        return one

    # A few agents' real rows are enough: the timed steps reuse them.
    few = min(partition.num_agents, 16)
    x, y = _host_rows(partition.x_train, few), _host_rows(partition.y_train, few)
    x_train = partition.x_train
    n_dev = len(x_train.sharding.device_set) if isinstance(x_train, jax.Array) else 1
    cap, probe = cap_probe
    num_agents = partition.num_agents
    mapped = bool(shard_mapped)
    key_fields = {
        "algorithm": algorithm,
        "model": config.model,
        "hidden": list(config.hidden),
        "input_shape": list(shape),
        "num_classes": int(num_classes),
        "optimizer": config.optimizer,
        "local_epochs": epochs,
        "n_max": int(np.max(n_train)),
        "mu_positive": float(mu) > 0,
    }
    common = dict(
        probe=probe, has_conv=has_conv, make_trainer=make_trainer,
        init_params=init_params, tx=tx, mu=float(mu), x=x, y=y, n_train=n_train,
        key_fields=key_fields,
    )  # fmt: skip

    def resolve(agents: int, cap_: int, multi: bool, share: float = 1.0, mesh=None):
        # Local training runs each device's agents under shard_map; without
        # it (``shard_mapped`` False) XLA's partitioner runs only all agents
        # at once shard-locally.
        return plan_lib.resolve(
            config, num_agents=agents, cap=cap_, multi_device=multi,
            shard_mapped=mapped, budget_share=share, mesh=mesh, **common,
        )  # fmt: skip

    if n_dev > 1 and not sharding.multiprocess():
        per_device, cap_d = num_agents // n_dev, max(1, cap // n_dev)
        mesh = x_train.sharding.mesh  # candidates timed on every device at once
        if device_choice(config):
            # One device or all of them, by measurement: each side's search
            # gets half the budget, then the two winners are timed.
            unsharded = resolve(num_agents, cap, False, 0.5)
            sharded = (
                resolve(per_device, cap_d, True, 0.5, mesh)
                if mapped
                else resolve(num_agents, cap, True)
            )
            if mapped or sharded[0].block_size == 0:
                return plan_lib.resolve_devices(
                    config, mesh=mesh, one=unsharded, sharded=sharded,
                    num_agents=num_agents,
                    **{k: v for k, v in common.items() if k != "has_conv"},
                )  # fmt: skip
            return sharded
        if mapped:
            # Each device runs the plan on its own A / D agents (shard_map):
            # the candidates are plans of one shard, and D shards' blocks share
            # the memory of the ``cap`` agents that fit at once.
            return resolve(per_device, cap_d, True, mesh=mesh)
    return resolve(num_agents, cap, n_dev > 1)


def device_choice(config) -> bool:
    """Whether a single-process run on several devices chooses between one
    device and all of them by measurement (``plan.resolve_devices``): CPU
    devices (``--cpu_devices``; on accelerators sharding is the point) and
    ``num_devices`` 0 (auto); an explicit ``num_devices`` shards."""
    return jax.default_backend() == "cpu" and int(config.num_devices) == 0


def choose_eval_plan(config, partition: Partition, *, probe: dict, points: int):
    """The evaluation plan (models at once, conv implementation) of a run:
    ``config.eval_batch`` or measured on the run's own C-GEN set
    (``demjax.plan.resolve_eval``).

    Args:
      points: measurement points per evaluated round (2 for the tree
        algorithms, 1 for plug-ins).

    Returns:
      ``(eval_batch, conv_impl, info)``.
    """
    shape = tuple(partition.input_shape)
    num_classes = partition.num_classes
    m = int(partition.x_all.shape[0])
    s = min(m, int(config.eval_samples) or m)
    x, y = _host_rows(partition.x_all, s), _host_rows(partition.y_all, s)

    def make_eval(k, impl):
        model = models.make_model(config.model, num_classes, config.hidden, impl)
        apply = models.make_eval_apply(model)
        return lambda ms, xs, ys: metrics.correct_matrix(apply, ms, xs, ys, k)

    one = jax.device_get(models.init_params(
        jax.random.PRNGKey(0),
        models.make_model(config.model, num_classes, config.hidden), shape,
    ))  # fmt: skip
    rounds = int(config.num_rounds)
    # Every replica evaluates its own models (num_replicas x the evaluations).
    num_evals = (points * (-(-rounds // int(config.eval_every)) + 1)
                 * int(config.num_replicas))  # fmt: skip
    return plan_lib.resolve_eval(
        config,
        num_agents=partition.num_agents,
        has_conv=config.model.startswith("cnn"),
        make_eval=make_eval,
        one_params=one,
        x=x,
        y=y,
        num_evals=num_evals,
        key_fields={"model": config.model, "hidden": list(config.hidden),
                    "input_shape": list(shape), "num_classes": int(num_classes)},
        probe=probe,
        batch_size=int(config.batch_size),
    )  # fmt: skip


class Simulator:
    """Holds the jitted phases of one algorithm for one partition's shapes.

    Args:
      config: a validated run config (``demjax.config.validate``).
      partition: the agents' data (``Partition``); its shapes fix the compiled
        functions.
      donate: update the population in place (XLA buffer donation): inputs
        passed as ``state.params`` / ``state.opt_state`` to ``local_phase`` and
        ``params`` to ``mix_phase`` are consumed.
      options: the algorithm's ``demjax.algorithms.hierarchical.Hierarchy``.
      mu: the proximal coefficient (``config.mu`` resolved).
      prepared: ``(plan.LocalPlan, plan_info)`` already chosen for this run
        (``plan_info["eval"]`` holding the evaluation plan); None: chosen here.
    """

    def __init__(self, config, partition: Partition, donate: bool = False, *,
                 options, mu: float, prepared: tuple | None = None):  # fmt: skip
        self.config = config
        self.algo = options
        self.num_agents = partition.num_agents
        self.tx = local.make_optimizer(config.optimizer, config.lr)
        self.mu = float(mu)
        self.level_sizes = tree_capacity(config, options.self_organizing)
        self.donate = bool(donate)
        n_train = sharding.to_host(partition.n_train)
        self.model = models.make_model(
            config.model, partition.num_classes, config.hidden
        )
        if prepared is None:
            cap_probe = self._memory_cap(partition)
            self.plan, self.plan_info = choose_plan(
                config,
                partition,
                self.tx,
                self.mu,
                cap_probe=cap_probe,
                algorithm=config.algorithm,
            )
            eval_batch, eval_conv, self.plan_info["eval"] = choose_eval_plan(
                config, partition, probe=cap_probe[1], points=2
            )
        else:
            self.plan, self.plan_info = prepared
            eval_batch = int(self.plan_info["eval"]["eval_batch"])
            eval_conv = self.plan_info["eval"]["conv_impl"]
        self.model = models.make_model(
            config.model, partition.num_classes, config.hidden,
            self.plan.conv_impl, self.plan.matmul_impl, init=config.init,
        )  # fmt: skip
        apply_fn = models.make_apply(self.model)

        # Evaluation runs forward passes only, ``eval_batch`` models at a time
        # inside lax.map, with its own measured conv implementation (parameters
        # are interchangeable between the two).
        eval_apply_fn = models.make_eval_apply(
            models.make_model(
                config.model, partition.num_classes, config.hidden, eval_conv
            )
        )

        self.apply_fn = apply_fn
        self.block_size = self.plan.block_size
        # Several devices: local training runs under shard_map, each device
        # training its own A / D agents with the plan (one program per device,
        # compiled for the shard: the static sample counts are the largest of
        # each shard position, exact per agent at run time).
        self.mesh = local_mesh(partition)
        n_static = local.shard_counts(n_train, self.mesh)
        train_all = local.make_train_population(
            apply_fn,
            self.tx,
            batch_size=config.batch_size,
            local_epochs=config.local_epochs,
            n_train=n_static,
            num_buckets=int(config.local_buckets),
            block_size=self.block_size,
        )
        communicates = self.algo.communicates

        num_agents = self.num_agents
        broadcast = self.algo.broadcast

        round_masks = faults.make_round_masks(config, num_agents)

        def local_phase(params_in, opt_in, node_params, part, anchor_tree, mu, key):
            """Local training of the round's active agents.

            Returns ``(params, opt_state, loss [A], active [A], diverged [A])``:
            inactive agents keep their state (``params_in``); an agent whose loss
            or parameters are non-finite is reset to its parent group model (the
            anchor) and flagged ``diverged`` (excluded from aggregation).
            """
            keys = jax.random.split(key, num_agents)
            active, max_steps = round_masks(key, part.n_train)
            if mesh is not None:
                return _sharded(
                    train_shard, mesh, params_in, opt_in, node_params, part,
                    anchor_tree, mu, keys, active, max_steps,
                )  # fmt: skip
            params, opt_state, loss, diverged = train_shard(
                params_in, opt_in, node_params, part.x_train, part.y_train,
                part.n_train, anchor_tree, mu, keys, active, max_steps, 0,
            )  # fmt: skip
            return params, opt_state, loss, active, diverged

        def train_shard(params_in, opt_in, node_params, x, y, n, anchor_tree, mu,
                        keys, active, max_steps, offset):  # fmt: skip
            """Local training of the agents ``offset + [0, len(keys))`` (all of
            them, or one device's shard): ``(params, opt_state, loss, diverged)``."""
            # Each block's anchors are gathered from the group models inside the
            # training loop, never stacked [A, ...]; so are the
            # diverged/inactive picks, so the population is updated in place.
            anchor = lambda ids: hierarchy.parent_models(  # noqa: E731
                node_params, anchor_tree, ids + offset
            )

            def finish(ids, new_p, new_o, loss, old_p, old_o, anc):
                act = active[ids]
                finite = jnp.isfinite(loss)
                for leaf in jax.tree.leaves(new_p):
                    finite = finite & jnp.all(
                        jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1
                    )
                div = act & ~finite

                def pick(trained, reset, keep):
                    def f(t, r, k):
                        shape = (t.shape[0],) + (1,) * (t.ndim - 1)
                        out = jnp.where(div.reshape(shape), r, t)
                        return jnp.where(act.reshape(shape), out, k)

                    return jax.tree.map(f, trained, reset, keep)

                params = pick(new_p, anc, old_p)
                opt_state = pick(new_o, old_o, old_o)
                return params, opt_state, (jnp.where(act & finite, loss, 0.0), div)

            # FedAvg/FedProx agents start from the current global model.
            params, opt_state, (loss, diverged) = train_all(
                keys,
                params_in,
                opt_in,
                x,
                y,
                n,
                anchor,
                mu,
                max_steps,
                start=anchor if broadcast else None,
                finish=finish,
            )
            return params, opt_state, loss, diverged

        mesh = self.mesh

        aggregator = str(config.aggregator)
        # One device: the weighted bottom-up sums run over agent blocks of
        # ~64 MiB, so aggregation never holds a second [A, ...] copy of the
        # population. Sharded: each device's temporary is already one shard.
        agg_block_bytes = 64 * 2**20 if mesh is None else None
        trim_fraction = float(config.trim_fraction)
        aggregator_noise = float(config.aggregator_noise)
        attack = attacks.Attack.from_config(config, num_agents)

        def aggregate_phase(params, tree, agent_weight, active, diverged, amplify,
                            prev_node_params, key=None, start=None):  # fmt: skip
            """Bottom-up group models over the round's contributing agents, with
            the configured ``aggregator`` (``noisy_median`` needs ``key``).

            Under a message attack (``demjax.attacks.Attack``) every group
            average, from the lowest level up, receives the Byzantine agents'
            corrupted messages: the update relative to the round-start model,
            ``start`` ``[A, ...]`` (agents that keep their own model) or, for
            broadcast algorithms, the previous global model (the root of
            ``prev_node_params``).

            Returns ``(node_params [N, ...], group_size float32 [N])``.

            Raises:
              ValueError: a message attack on a non-broadcast algorithm without
                ``start``.
            """
            contributes = (active & ~diverged).astype(jnp.float32)
            if attack is not None:
                if broadcast:
                    start = jax.tree.map(lambda p: p[-1], prev_node_params)
                elif start is None:
                    raise ValueError(
                        f"attack={attack.kind!r} needs aggregate_phase(start=...)"
                    )
                params = attack(key, params, start, include=contributes > 0)
            if aggregator == "noisy_median" and key is None:
                key = jax.random.PRNGKey(0)
            node_params, node_weight = hierarchy.aggregate_up(
                params, tree, agent_weight * contributes, amplify,
                aggregator=aggregator, trim_fraction=trim_fraction,
                noise_scale=aggregator_noise, key=key, block_bytes=agg_block_bytes,
            )  # fmt: skip
            node_params = hierarchy.fill_empty_groups(
                node_params, node_weight, tree, prev_node_params
            )
            # Divergence guard for group models: a group average that overflows
            # (huge but finite agents, amplify) keeps the group's previous
            # model, so no non-finite model is ever mixed into the agents.
            node_params = pytrees.where_agents(
                pytrees.finite_agents(node_params), node_params, prev_node_params
            )
            group_size = hierarchy.node_counts(
                tree, jnp.ones((num_agents,), jnp.float32)
            )
            return node_params, group_size

        def mix_phase(node_params, params, tree, alpha, active):
            """Top-down mixing into the active agents (the others keep ``params``).

            Returns ``(mixed_node_params [N, ...], params [A, ...])``.
            """
            if not communicates:
                return node_params, params
            mixed_nodes, mixed = hierarchy.mix_down(node_params, params, tree, alpha)
            keep = jax.tree.map(
                lambda m, p: jnp.where(
                    active.reshape((num_agents,) + (1,) * (m.ndim - 1)), m, p
                ),
                mixed,
                params,
            )
            return mixed_nodes, keep

        def evaluate(params, node_params, node_weight, tree, part, x_gen, y_gen):
            out = metrics.client_metrics(
                eval_apply_fn, params, part, x_gen, y_gen, eval_batch, mesh=mesh
            )
            if communicates:
                out.update(
                    metrics.group_metrics(
                        eval_apply_fn, node_params, node_weight, tree, part,
                        eval_batch, mesh=mesh,
                    )
                )
            return out

        def evaluate_root(node_params, part, x_gen, y_gen):
            """Metrics when every agent holds the root model (broadcast
            algorithms at ``sync`` with all agents active): the root is
            evaluated once instead of A times. C-SPE is the root on the pooled
            test set (the union of the agents' own test sets), C-GEN the root
            on the evaluation set, Global the root on the pooled test set:
            the values ``evaluate`` gives for A copies of the root."""
            root = jax.tree.map(lambda p: p[-1:], node_params)
            on_all = metrics.correct_matrix(
                eval_apply_fn, root, part.x_all, part.y_all, 1
            )[0]
            on_gen = metrics.correct_matrix(eval_apply_fn, root, x_gen, y_gen, 1)[0]
            acc = jnp.mean(on_all)
            return {"c_spe": acc, "c_gen": jnp.mean(on_gen), "global_acc": acc}

        # With ``donate`` the round updates the population in place: local
        # training consumes the agents' params/optimizer state and mixing consumes
        # the locally trained params, so a round holds about one copy of the
        # stacked population instead of three or four (10,000 MLP agents: 3.2 GB
        # a copy). The caller must not touch a donated input again.
        # The phases as pure functions (``demjax.algorithms.hierarchical`` runs
        # them inside the round loop's jitted phases) and jitted on their own.
        self.raw = {
            "local_phase": local_phase,
            "aggregate_phase": aggregate_phase,
            "mix_phase": mix_phase,
            "evaluate": evaluate,
            "evaluate_root": evaluate_root,
        }
        self.jitted = {
            "local_phase": jax.jit(
                local_phase, donate_argnums=(0, 1) if donate else ()
            ),
            "aggregate_phase": jax.jit(aggregate_phase),
            "mix_phase": jax.jit(mix_phase, donate_argnums=(1,) if donate else ()),
            "evaluate": jax.jit(evaluate),
            "evaluate_root": jax.jit(evaluate_root),
        }
        self.evaluate_root = self.jitted["evaluate_root"]
        self.aggregate_phase = self.jitted["aggregate_phase"]
        self.mix_phase = self.jitted["mix_phase"]
        self.evaluate = self.jitted["evaluate"]

    def local_phase(self, state: SimState, part, anchor_tree, mu, key):
        """Local training: ``(params, opt_state, loss [A], active [A], diverged
        [A])``. With ``donate``, ``state.params`` and ``state.opt_state`` are
        consumed."""
        return self.jitted["local_phase"](
            state.params, state.opt_state, state.node_params, part, anchor_tree, mu, key
        )

    def sync_phase(self, params, tree, agent_weight, active, diverged, alpha,
                   amplify, prev_node_params, key=None):  # fmt: skip
        """``aggregate_phase`` then ``mix_phase``: ``(node_params, group_size,
        mixed_node_params, params)``; agents that did not take part keep
        ``params`` (which ``local_phase`` left untouched for them)."""
        nodes, size = self.aggregate_phase(
            params, tree, agent_weight, active, diverged, amplify, prev_node_params,
            key,
        )  # fmt: skip
        mixed_nodes, mixed = self.mix_phase(nodes, params, tree, alpha, active)
        return nodes, size, mixed_nodes, mixed

    def _memory_cap(self, partition: Partition) -> tuple[int, dict]:
        return memory.memory_cap(
            self.config, partition, self.model, self.tx,
            donate=self.donate, num_group_models=int(sum(self.level_sizes)),
        )  # fmt: skip

    def init(self, key: jax.Array, partition: Partition) -> SimState:
        """All agents (and all group models) start from one shared initialization."""
        params = models.init_population(
            key, self.model, partition.input_shape, self.num_agents
        )
        opt_state = jax.vmap(self.tx.init)(params)
        n = int(sum(self.level_sizes))
        node_params = jax.tree.map(
            lambda p: jnp.tile(p[:1], (n,) + (1,) * (p.ndim - 1)), params
        )
        return SimState(params, opt_state, node_params, jnp.int32(0))

    def agent_weight(self, partition: Partition) -> jax.Array:
        """float32 ``[A]``: sample counts (FedAvg, ``weighting='samples'``) or ones."""
        if self.algo.sample_weighted or self.config.weighting == "samples":
            return jnp.asarray(partition.n_train, jnp.float32)
        return jnp.ones((self.num_agents,), jnp.float32)

    def round_mu(self, t: int) -> float:
        if t == 0 and not self.algo.prox_from_round0:
            return 0.0
        return self.mu

    def round_alpha(self) -> float:
        return 1.0 if self.algo.broadcast else float(self.config.alpha)

    def round_amplify(self, t: int) -> float:
        c = self.config
        if c.amplify and t < c.amplify_rounds:
            return float(c.amplify_factor)
        return 1.0

    def regroups(self, t: int) -> bool:
        """Whether round ``t`` regroups (``t % tau == 0``; tau 0: only t = 0)."""
        if not self.algo.self_organizing:
            return False
        tau = int(self.config.tau)
        return t == 0 if tau == 0 else t % tau == 0

    def build_tree(
        self, params_local, params_start, key: jax.Array | None = None
    ) -> tuple[GroupTree, dict]:
        """Host-side self-organizing step: features -> distances -> linkage -> tree."""
        c = self.config
        sketch_dim, info = int(c.sketch_dim), {}
        num_params = sum(
            int(np.prod(x.shape[1:])) for x in jax.tree.leaves(params_local)
        )
        if c.cluster_features == "weights" and 0 < sketch_dim < num_params:
            # Leaf by leaf: never builds the [A, D] copy of the population.
            if key is None:
                raise ValueError("build_tree(sketch_dim > 0) needs a PRNG key")
            ts = time.perf_counter()
            feats = cluster.sketch_params(key, params_local, sketch_dim)
            feats.block_until_ready()
            info["sketch_s"] = time.perf_counter() - ts
            sketch_dim = 0
        else:
            feats = cluster.features(
                params_local, params_start, kind=c.cluster_features
            )
        tree, more = cluster.build_tree(
            feats,
            num_levels=(
                len(c.level_groups) if c.tree_mode == "maxclust" else int(c.num_levels)
            ),
            metric=c.distance,
            method=c.linkage,
            mode=c.tree_mode,
            level_groups=tuple(c.level_groups),
            backend=c.linkage_backend,
            sketch_dim=sketch_dim,
            distance_block=int(c.distance_block),
            key=key,
            linkage_sample=int(c.linkage_sample),
        )
        info.update(more)
        return tree, info
