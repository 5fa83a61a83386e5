"""CFL: Sattler, Müller, Samek, "Clustered Federated Learning: Model-Agnostic
Distributed Multitask Optimization Under Privacy Constraints", IEEE TNNLS 2020
(arXiv 1910.01991), Algorithm 1.

Agents are partitioned into clusters (int32 ids ``[A]``, one cluster at the start)
and every cluster runs FedAvg on its own. Each round:

1. every participating agent i trains its cluster's model ``theta_c`` for
   ``local_epochs`` and uploads ``dtheta_i = SGD(theta_c) - theta_c``;
2. per cluster c (on the host, between the round's two phases), after
   ``warmup`` rounds, if ``||sum_{i in c} (D_i / D_c) dtheta_i|| < eps1`` (the
   cluster is near a stationary point of its joint objective),
   ``max_{i in c} ||dtheta_i|| > eps2`` (some agents are not) and more than 2
   of its agents participated, c is split in two by the cosine similarity
   ``alpha_ij = <dtheta_i, dtheta_j> / (|dtheta_i| |dtheta_j|)``: the two
   children of the root of a ``linkage`` dendrogram of the distances
   ``1 - alpha_ij`` (complete linkage, as the authors' code; ``single`` linkage
   gives exactly Algorithm 1's ``argmin max_{i in c1, j in c2} alpha_ij``, the
   maximum-spacing bipartition);
3. every cluster (after the split) moves its model by the sample-weighted mean
   of its members' updates, ``theta_c += sum_{i in c} (D_i / D_c) dtheta_i``
   (``jax.ops.segment_sum`` over cluster ids).

As in the authors' code, step 3 is applied with the clusters after step 2 (the
two halves of a split cluster move apart at once): the round has two jitted
phases, training (steps 1 and the split criteria) and aggregation (step 3), with
the host-side split (step 2) between them. Agents that did not participate in
the splitting round stay in the half that keeps the old id (the paper assumes
full participation). The personal model of agent i (C-SPE, C-GEN) is its
cluster's model; CFL has no single global model (Global is null).

Divergence guard: an agent whose trained model, optimizer state or loss turn
non-finite uploads no update (``dtheta_i = 0``, weight 0: it neither moves nor
splits its cluster) and keeps its previous optimizer state (``num_diverged``).
Communication per round: every participating agent downloads its cluster's
model and every one that did not diverge uploads ``dtheta_i`` (model-shaped):
``bytes_down`` / ``bytes_up`` = those agents x model bytes; the cluster ids stay
on the server.

State (stacked over A agents): ``theta [A, ...]`` the agents' cluster models
(equal within a cluster), ``dtheta [A, ...]`` the last round's updates (0 for
non-participants), ``weight [A]`` float32 ``active * n_train``, ``cluster [A]``
int32 ids in ``[0, A)``, ``opt [A, ...]`` optimizer states; per cluster id
(``[A]``): ``mean_norm``, ``max_norm`` float32 and ``count`` int32 (participants).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from demjax import cluster as clustering
from demjax import sharding
from demjax.algorithms.protocol import Algorithm, HParam, Phase, Rounds, make_measure
from demjax.pytrees import (
    comm_bytes,
    divergence_guard,
    masked_mean,
    per_agent,
    round_counts,
    sq_norms,
    tree_bytes,
)

LINKAGES = ("complete", "single", "average")


@flax.struct.dataclass
class CFLState:
    theta: object
    dtheta: object
    weight: jax.Array
    cluster: jax.Array
    opt: object
    mean_norm: jax.Array
    max_norm: jax.Array
    count: jax.Array


HPARAMS = {
    "eps1": HParam(
        0.4,
        "cfl: split when a cluster's mean update norm is below eps1 (> 0; paper's "
        "code 0.4; scales with lr and model)",
        low=0.0,
        low_open=True,
    ),
    "eps2": HParam(
        1.6,
        "cfl: ... and its largest agent update norm is above eps2 (> 0; paper's "
        "code 1.6)",
        low=0.0,
        low_open=True,
    ),
    "warmup": HParam(
        20,
        "cfl: no split in rounds t < warmup (>= 0; paper's code 20)",
        low=0,
    ),
    "linkage": HParam(
        "complete",
        "cfl: bipartition by the root of this linkage of 1 - cos: complete (the "
        "paper's code), single (Alg. 1's exact argmin), average",
        choices=LINKAGES,
    ),
}


def cluster_means(dtheta, weight: jax.Array, cluster: jax.Array):
    """Sample-weighted mean update of every cluster id (Alg. 1, aggregation).

    Args:
      dtheta: updates, leaves ``[A, ...]``; weight: float32 ``[A]``;
      cluster: int32 ``[A]`` ids in ``[0, A)``.

    Returns:
      leaves ``[A, ...]`` indexed by cluster id (0 for ids without weight).
    """
    num = weight.shape[0]
    total = jax.ops.segment_sum(weight, cluster, num_segments=num)

    def mean(d):
        shape = (-1,) + (1,) * (d.ndim - 1)
        s = jax.ops.segment_sum(d * weight.reshape(shape), cluster, num_segments=num)
        return (s / jnp.maximum(total, 1e-12).reshape(shape)).astype(d.dtype)

    return jax.tree.map(mean, dtheta)


def cluster_models(theta, dtheta, weight, cluster):
    """``theta_i + mean update of i's cluster``: the agents' models after the
    (pending) aggregation, leaves ``[A, ...]``."""
    means = cluster_means(dtheta, weight, cluster)
    return jax.tree.map(lambda p, m: p + m[cluster], theta, means)


def cluster_stats(dtheta, weight: jax.Array, cluster: jax.Array):
    """The split criteria of every cluster id (Alg. 1).

    Returns:
      ``(mean_norm, max_norm, count)``, each ``[A]`` by cluster id:
      ``||sum_{i in c} (D_i / D_c) dtheta_i||``, ``max_{i in c, D_i > 0}
      ||dtheta_i||`` (0 without participants), and the number of participants
      (``weight > 0``).
    """
    num = weight.shape[0]
    mean_norm = jnp.sqrt(sq_norms(cluster_means(dtheta, weight, cluster)))
    part = weight > 0
    norms = jnp.where(part, jnp.sqrt(sq_norms(dtheta)), 0.0)
    max_norm = jnp.maximum(jax.ops.segment_max(norms, cluster, num_segments=num), 0.0)
    count = jax.ops.segment_sum(part.astype(jnp.int32), cluster, num_segments=num)
    return mean_norm, max_norm, count


def bipartition(dist, linkage: str = "complete") -> np.ndarray:
    """Splits agents in two by the root of their dendrogram (Alg. 1, line 12).

    Args:
      dist: ``[m, m]`` cosine distances ``1 - alpha_ij`` (m >= 2).
      linkage: ``complete`` (the authors' code), ``single`` (maximises the
        smallest cross distance, i.e. Alg. 1's ``argmin max alpha_ij``) or
        ``average``.

    Returns:
      int ``[m]`` of 0/1, agent 0 in part 0.
    """
    dist = np.asarray(dist, np.float64)
    m = dist.shape[0]
    z = clustering.linkage(dist, linkage)
    labels = np.ones(m, np.int64)
    labels[clustering._subtree_leaves(z, m, int(z[-1, 0]))] = 0
    return labels if labels[0] == 0 else 1 - labels


def build(ctx) -> Rounds:
    eps1, eps2 = float(ctx.hp["eps1"]), float(ctx.hp["eps2"])
    warmup, linkage = int(ctx.hp["warmup"]), str(ctx.hp["linkage"])
    block = int(ctx.config.distance_block)
    train = ctx.trainer()
    num_agents = ctx.num_agents

    model = tree_bytes(jax.eval_shape(ctx.init_model, jax.random.PRNGKey(0)))

    def init(key, part):
        theta = ctx.init_population(key)
        zeros_f = jnp.zeros((num_agents,), jnp.float32)
        zeros_i = jnp.zeros((num_agents,), jnp.int32)
        return CFLState(
            theta=theta,
            dtheta=jax.tree.map(jnp.zeros_like, theta),
            weight=zeros_f,
            cluster=zeros_i,
            opt=jax.vmap(ctx.tx.init)(theta),
            mean_norm=zeros_f,
            max_norm=zeros_f,
            count=zeros_i,
        )

    def train_phase(state, part, key, t):
        """Step 1 and the split criteria of every cluster."""
        active, max_steps = ctx.round_masks(key, part.n_train)
        theta = state.theta
        trained, opt, loss = train(
            jax.random.split(jax.random.fold_in(key, 17), num_agents),
            theta,
            state.opt,
            part.x_train,
            part.y_train,
            part.n_train,
            theta,
            jnp.float32(0.0),
            max_steps,
        )
        (trained, opt), ok, diverged = divergence_guard(
            active, (trained, opt), (theta, state.opt), loss
        )
        weight = ok * part.n_train.astype(jnp.float32)
        dtheta = jax.tree.map(
            lambda a, b: jnp.where(per_agent(ok, a), a - b, 0.0),
            trained,
            theta,
        )
        mean_norm, max_norm, count = cluster_stats(dtheta, weight, state.cluster)
        new = CFLState(
            theta=theta,
            dtheta=dtheta,
            weight=weight,
            cluster=state.cluster,
            opt=opt,
            mean_norm=mean_norm,
            max_norm=max_norm,
            count=count,
        )
        sizes = jax.ops.segment_sum(
            jnp.ones((num_agents,), jnp.int32), state.cluster, num_segments=num_agents
        )
        info = {
            "train_loss": masked_mean(loss, ok.astype(jnp.float32)),
            "num_clusters": jnp.sum(sizes > 0).astype(jnp.float32),
            "mean_update_norm": jnp.max(jnp.where(count > 0, mean_norm, 0.0)),
            "max_update_norm": jnp.max(max_norm),
            **round_counts(active, diverged),
            **comm_bytes(model, ok, model, active),
        }
        return new, info

    def split(state, info, t, key):
        """Step 2: splits the clusters that meet Alg. 1's criteria (host, scipy)."""
        if t < warmup:
            return state, {}
        mean_norm, max_norm, count, cid, weight = sharding.to_host(
            (state.mean_norm, state.max_norm, state.count, state.cluster, state.weight)
        )
        split = np.flatnonzero((count > 2) & (mean_norm < eps1) & (max_norm > eps2))
        if split.size == 0:
            return state, {}
        cid = np.array(cid, np.int32)
        feats = clustering.flatten_params(state.dtheta)
        dist = sharding.to_host(clustering.pairwise_distances(feats, "cosine", block))
        free = sorted(set(range(num_agents)) - set(cid.tolist()))
        for c in split:
            members = np.flatnonzero((cid == c) & (weight > 0))
            labels = bipartition(dist[np.ix_(members, members)], linkage)
            cid[members[labels == 1]] = free.pop(0)
        return state.replace(cluster=jnp.asarray(cid, jnp.int32)), {}

    def aggregate_phase(state, part, key, t):
        """Step 3, with the clusters after the split."""
        theta = cluster_models(state.theta, state.dtheta, state.weight, state.cluster)
        return state.replace(theta=theta), {}

    def personal(state, part, key):
        return state.theta

    measure, jitted = make_measure(ctx, personal, global_model=None)
    return Rounds(
        init=init,
        phases=(
            Phase("round", train_phase, host=split),
            Phase("aggregate", aggregate_phase, timing="sync", point="sync"),
        ),
        measure=measure,
        jitted=jitted,
        personal=personal,
    )


ALGORITHM = Algorithm(
    name="cfl",
    citation="Sattler et al., IEEE TNNLS 2020, Algorithm 1 (CFL)",
    hparams=HPARAMS,
    build=build,
    has_global=False,
)
