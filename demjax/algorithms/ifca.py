"""IFCA: Ghosh, Chung, Yin, Ramchandran, "An Efficient Framework for Clustered
Federated Learning", NeurIPS 2020, Algorithm 2 (model averaging).

The server keeps ``k`` cluster models ``theta_1..theta_k`` (leaves ``[k, ...]``).
Each round every participating agent i

1. estimates its cluster identity ``c_i = argmin_j F_i(theta_j)`` (Alg. 2, line 6),
   ``F_i`` the mean cross-entropy over its training samples (all k losses in one
   vmapped evaluation);
2. trains ``theta_{c_i}`` for ``local_epochs`` (Alg. 2, line 7, model averaging);

and the server sets ``theta_j`` to the sample-weighted mean of the models of the
agents that chose j (Alg. 2, line 10; ``jax.ops.segment_sum`` over cluster ids,
or the robust ``config.aggregator`` applied per cluster). A cluster nobody chose
keeps its model.

The personal model of agent i (C-SPE, C-GEN) is the model of the cluster it picks
with the current models on its training data (the paper's cluster estimation,
redone at evaluation, so agents that never participated get one too). IFCA has
no single global model (Global is null).

Divergence guard: an agent whose trained model, optimizer state or loss turn
non-finite keeps its previous optimizer state and cluster identity and gets no
weight in any cluster's average (``num_diverged``). Communication per round:
every participating agent downloads all ``k`` cluster models (it needs them to
estimate its identity): ``bytes_down`` = active x k x model bytes; every one that
did not diverge uploads its trained model and its int32 cluster identity:
``bytes_up`` = those agents x (model bytes + 4).

State: ``models`` cluster models, leaves ``[k, ...]``; ``cluster`` int32 ``[A]``
each agent's last estimated identity; ``opt [A, ...]`` per-agent optimizer
states (kept across rounds, as every engine's local optimizer).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from demjax.algorithms.protocol import Algorithm, HParam, Rounds, one_round
from demjax.local import masked_cross_entropy
from demjax.pytrees import (
    comm_bytes,
    divergence_guard,
    masked_mean,
    round_counts,
    stack,
    tree_bytes,
    where_agents,
)

INITS = ("random", "shared")


@flax.struct.dataclass
class IFCAState:
    models: object
    cluster: jax.Array
    opt: object


HPARAMS = {
    "k": HParam(
        4,
        "ifca: number of cluster models k (>= 1; the paper uses k = 2 and 4, 4 "
        "here for the label-skewed partitions)",
        low=1,
    ),
    "init": HParam(
        "random",
        "ifca: cluster model initialization: random (independent per cluster, the "
        "paper) or shared (one init for all k: every agent picks cluster 0, FedAvg)",
        choices=INITS,
    ),
}


def cluster_losses(apply_fn, models, x, y, n, block_size: int = 0) -> jax.Array:
    """Every agent's training loss under every cluster model.

    Args:
      apply_fn: ``apply_fn(params, x [N, ...], train, key) -> logits [N, C]``.
      models: cluster models, leaves ``[k, ...]``.
      x: float32 ``[A, N_max, ...]``; y: int32 ``[A, N_max]``; n: int32 ``[A]``
        real samples per agent (padding rows are masked out).
      block_size: if > 0, agents are evaluated this many at a time.

    Returns:
      float32 ``[A, k]``: mean cross-entropy of agent i's samples under model j.
    """
    n_max = y.shape[1]

    def per_model(m):
        def per_agent(args):
            xa, ya, na = args
            logits = apply_fn(m, xa, False, None)
            return masked_cross_entropy(logits, ya, jnp.arange(n_max) < na)

        if block_size:
            return jax.lax.map(per_agent, (x, y, n), batch_size=block_size)
        return jax.vmap(per_agent)((x, y, n))

    return jax.lax.map(per_model, models).T


def choose_clusters(losses: jax.Array) -> jax.Array:
    """``argmin_j F_i(theta_j)`` (Alg. 2, line 6): ``[A, k]`` -> int32 ``[A]``
    (ties: the lowest cluster id)."""
    return jnp.argmin(losses, axis=1).astype(jnp.int32)


def cluster_average(models, trained, weights: jax.Array, cluster: jax.Array):
    """Per-cluster sample-weighted mean (Alg. 2, line 10) with ``segment_sum``.

    Args:
      models: the current cluster models, leaves ``[k, ...]``.
      trained: the agents' trained models, leaves ``[A, ...]``.
      weights: float32 ``[A]`` (``active * n_train``; 0 = excluded).
      cluster: int32 ``[A]`` chosen cluster ids in ``[0, k)``.

    Returns:
      ``(models, member_weight [k])``: clusters with no weight keep their model.
    """
    k = jax.tree.leaves(models)[0].shape[0]
    total = jax.ops.segment_sum(weights, cluster, num_segments=k)
    keep = total > 0

    def avg(old, p):
        shape = (-1,) + (1,) * (p.ndim - 1)
        wp = jnp.where(weights.reshape(shape) > 0, p, 0.0) * weights.reshape(shape)
        s = jax.ops.segment_sum(wp, cluster, num_segments=k)
        mean = s / jnp.maximum(total, 1e-12).reshape(shape)
        return jnp.where(keep.reshape(shape), mean.astype(old.dtype), old)

    return jax.tree.map(avg, models, trained), total


def build(ctx) -> Rounds:
    k = int(ctx.hp["k"])
    shared = ctx.hp["init"] == "shared"
    train = ctx.trainer()
    num_agents = ctx.num_agents
    block = int(ctx.block_size)
    robust = str(ctx.config.aggregator) != "mean"

    def losses_of(models, part):
        return cluster_losses(
            ctx.eval_apply_fn, models, part.x_train, part.y_train, part.n_train, block
        )

    model = tree_bytes(jax.eval_shape(ctx.init_model, jax.random.PRNGKey(0)))

    def init(key, part):
        if shared:
            models = stack(ctx.init_model(key), k)
        else:
            models = jax.vmap(ctx.init_model)(jax.random.split(key, k))
        one = jax.tree.map(lambda p: p[0], models)
        opt = jax.vmap(ctx.tx.init)(stack(one, num_agents))
        return IFCAState(
            models=models, cluster=jnp.zeros((num_agents,), jnp.int32), opt=opt
        )

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_train, k_agg = jax.random.split(jax.random.fold_in(key, 17))
        choice = choose_clusters(losses_of(state.models, part))
        start = jax.tree.map(lambda m: m[choice], state.models)
        trained, opt, loss = train(
            jax.random.split(k_train, num_agents),
            start,
            state.opt,
            part.x_train,
            part.y_train,
            part.n_train,
            start,
            jnp.float32(0.0),
            max_steps,
        )
        (trained, opt), ok, diverged = divergence_guard(
            active, (trained, opt), (start, state.opt), loss
        )
        weight = ok * part.n_train.astype(jnp.float32)
        models, total = cluster_average(state.models, trained, weight, choice)
        if robust:  # the configured robust aggregator within each cluster

            def one(c, kc):
                wc = jnp.where(choice == c, weight, 0.0)
                return ctx.aggregate(trained, wc, kc)

            agg = jax.vmap(one)(jnp.arange(k), jax.random.split(k_agg, k))
            good = (total > 0) & jnp.all(
                jnp.stack(
                    [
                        jnp.all(jnp.isfinite(p.reshape(k, -1)), axis=1)
                        for p in jax.tree.leaves(agg)
                    ]
                ),
                axis=0,
            )
            models = where_agents(good, agg, state.models)
        new = IFCAState(
            models=models,
            cluster=jnp.where(ok, choice, state.cluster),
            opt=opt,
        )
        info = {
            "train_loss": masked_mean(loss, ok.astype(jnp.float32)),
            "num_clusters": jnp.sum(total > 0).astype(jnp.float32),
            **round_counts(active, diverged),
            # Down: all k cluster models; up: the trained model and the int32
            # cluster identity.
            **comm_bytes(model + 4, ok, k * model, active),
        }
        return new, info

    def personal(state, part, key):
        choice = choose_clusters(losses_of(state.models, part))
        return jax.tree.map(lambda m: m[choice], state.models)

    return one_round(ctx, init=init, round=round_fn, personal=personal)


ALGORITHM = Algorithm(
    name="ifca",
    citation="Ghosh et al., NeurIPS 2020, Algorithm 2 (IFCA, model averaging)",
    hparams=HPARAMS,
    build=build,
    has_global=False,
)
