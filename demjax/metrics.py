"""DemLearn's evaluation metrics, vmapped over agents and groups.

Source: Nguyen et al., "Self-organizing Democratized Learning", IEEE TNNLS
(arXiv 2007.03278), Sec. V "performance metrics" (see ``docs/demlearn.md``):

- **C-SPE**: each agent's model on its own test set; correct answers summed over
  agents divided by the total number of test samples.
- **C-GEN**: each agent's model on the union of all agents' test sets (or a
  fixed, seeded subsample of it), averaged equally over agents.
- **G-SPE(l)**: each level-l group model on the pooled test data of the agents
  under it, averaged over the level's groups weighted by group size (agents).
- **G-GEN(l)**: each level-l group model on all test data, same weighting.
- **Global**: the root model on all test data.

All accuracies are fractions in [0, 1]. Evaluation over many models is a
``lax.map`` with ``batch_size`` (a vmap of ``batch_size`` models at a time), so
memory stays bounded by ``batch_size x M`` activations.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from demjax.types import GroupTree, Partition


def _correct(apply_fn, params, x, y):
    logits = apply_fn(params, x, False, None)
    return jnp.argmax(logits, axis=-1) == y


def correct_matrix(apply_fn: Callable, models, x, y, batch_size: int = 8):
    """Correctness of K models on M samples.

    Args:
      apply_fn: ``apply_fn(params, x, train, key) -> logits``.
      models: pytree with leaves ``[K, ...]``.
      x: float32 ``[M, ...]``; y: int32 ``[M]``.
      batch_size: models evaluated at once.

    Returns:
      bool ``[K, M]``.
    """
    return jax.lax.map(
        lambda p: _correct(apply_fn, p, x, y), models, batch_size=batch_size
    )


def sharded_correct_matrix(apply_fn: Callable, models, x, y, batch_size: int = 8,
                           mesh=None):  # fmt: skip
    """``correct_matrix`` of K replicated models split over the devices of
    ``mesh`` (padded to a multiple of D with copies of the last model, the
    padding dropped from the result); without a mesh ``correct_matrix``.

    Returns:
      bool ``[K, M]``.
    """
    if mesh is None:
        return correct_matrix(apply_fn, models, x, y, batch_size)
    from jax.sharding import PartitionSpec as P

    from demjax.sharding import AXIS

    d = int(mesh.devices.size)
    k = jax.tree.leaves(models)[0].shape[0]
    pad = (-k) % d
    if pad:
        models = jax.tree.map(
            lambda p: jnp.concatenate([p, jnp.repeat(p[-1:], pad, axis=0)]), models
        )
    fn = jax.shard_map(
        lambda m, x, y: correct_matrix(apply_fn, m, x, y, batch_size), mesh=mesh,
        in_specs=(P(AXIS), P(), P()), out_specs=P(AXIS), check_vma=False,
    )  # fmt: skip
    return fn(models, x, y)[:k]


def client_metrics(apply_fn, params, part: Partition, x_gen, y_gen, batch_size=8,
                   mesh=None):  # fmt: skip
    """C-SPE and C-GEN of agent models.

    Args:
      params: agent models, leaves ``[A, ...]``.
      part: the partition (own test sets ``x_test [A, N_test_max, ...]``).
      x_gen, y_gen: the pooled test set or its evaluation subsample ``[S, ...]``.
      mesh: the ``agents`` mesh the population is sharded over, or None. With
        a mesh each device evaluates its own agents (``jax.shard_map``; the
        evaluation set replicated), instead of leaving the partitioning of the
        ``lax.map`` over agents to XLA.

    Returns:
      dict of float32 scalars ``c_spe``, ``c_gen``.
    """
    mask = jnp.arange(part.y_test.shape[1])[None, :] < part.n_test[:, None]

    def per_agent(params, x_test, y_test, mask, x_gen, y_gen):
        """Own correct answers ``[A']`` and C-GEN accuracy ``[A']`` per agent."""

        def own(args):
            p, x, y, m = args
            return jnp.sum(_correct(apply_fn, p, x, y) & m)

        own_correct = jax.lax.map(own, (params, x_test, y_test, mask),
                                  batch_size=batch_size)  # fmt: skip
        gen = correct_matrix(apply_fn, params, x_gen, y_gen, batch_size)
        return own_correct, jnp.mean(gen, axis=1)

    if mesh is not None:
        from jax.sharding import PartitionSpec as P

        from demjax.sharding import AXIS

        a = P(AXIS)
        per_agent = jax.shard_map(
            per_agent, mesh=mesh, in_specs=(a, a, a, a, P(), P()),
            out_specs=(a, a), check_vma=False,
        )  # fmt: skip
    own_correct, gen_acc = per_agent(params, part.x_test, part.y_test, mask, x_gen,
                                     y_gen)  # fmt: skip
    c_spe = jnp.sum(own_correct) / jnp.sum(part.n_test)
    return {"c_spe": c_spe, "c_gen": jnp.mean(gen_acc)}


def group_metrics(
    apply_fn, node_params, node_weight, tree: GroupTree, part: Partition, batch_size=8,
    mesh=None,
):  # fmt: skip
    """G-SPE(l), G-GEN(l) for every group level l = 1..L and the Global accuracy.

    Args:
      node_params: group models, leaves ``[N, ...]`` (root last).
      node_weight: float32 ``[N]`` group sizes (agents under each node); padding
        nodes (weight 0) are ignored.
      tree: group tree; part: partition (pooled test set ``x_all [M, ...]``).
      mesh: the ``agents`` mesh, or None. With D devices the (replicated)
        group models are split over them, padded to a multiple of D with
        copies of the root, each device evaluating ``ceil(N / D)`` of them
        (``jax.shard_map``) instead of every device evaluating all N.

    Returns:
      dict with ``g_spe_l{l}``, ``g_gen_l{l}`` for l = 1..L and ``global_acc``.
    """
    correct = sharded_correct_matrix(apply_fn, node_params, part.x_all, part.y_all,
                                     batch_size, mesh)  # fmt: skip
    acc_all = jnp.mean(correct, axis=1)  # [N]
    out = {"global_acc": acc_all[tree.root]}
    sizes, offsets = tree.level_sizes, tree.level_offsets
    for level in range(tree.num_levels):
        o, g = offsets[level], sizes[level]
        w = node_weight[o : o + g]
        wsum = jnp.maximum(jnp.sum(w), 1e-12)
        out[f"g_gen_l{level + 1}"] = jnp.sum(w * acc_all[o : o + g]) / wsum
        # Sample s belongs to group ancestor(owner(s)) at this level (or none).
        anc = tree.agent_ancestor[level][part.owner_all]  # [M]
        member = anc[None, :] == (o + jnp.arange(g))[:, None]  # [g, M]
        n_mem = jnp.sum(member, axis=1)
        spe = jnp.sum(correct[o : o + g] & member, axis=1) / jnp.maximum(n_mem, 1)
        w_spe = jnp.where(n_mem > 0, w, 0.0)
        out[f"g_spe_l{level + 1}"] = jnp.sum(w_spe * spe) / jnp.maximum(
            jnp.sum(w_spe), 1e-12
        )
    return out
