"""Hierarchical aggregation over a group tree: bottom-up averaging, top-down mixing.

Source: Nguyen et al., "Self-organizing Democratized Learning: Towards
Large-scale Distributed Learning Systems", IEEE TNNLS (arXiv 2007.03278),
Sec. IV-B "hierarchical generalization" (bottom-up) and Sec. IV-C
"knowledge distribution / personalized update" (top-down), as the authors'
code runs them (see ``docs/demlearn.md``).

All reductions over agents are ``jax.ops.segment_sum`` with a static segment
count, level by level (no Python loop over agents or groups); a tree is a
``GroupTree`` of fixed-capacity index arrays, so a new tree never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from demjax.types import GroupTree


def _bcast(w, x):
    """Reshapes weights ``[K]`` to broadcast against ``x [K, ...]``."""
    return w.reshape(w.shape + (1,) * (x.ndim - 1)).astype(x.dtype)


def weighted_segment_sum(
    x: jax.Array,
    weight: jax.Array,
    ids: jax.Array,
    num_segments: int,
    block_rows: int | None = None,
) -> jax.Array:
    """``segment_sum(weight[:, None] * x, ids)`` without an ``[A, ...]`` temporary.

    XLA does not fuse the weighting into the scatter-add: the plain form
    materialises ``weight * x``, a second copy of the stacked population (3.2 GB
    for 10,000 MLP agents). With ``block_rows`` the rows are reduced in blocks
    of that many inside a ``lax.fori_loop`` (then the remainder), so the
    temporary is one block.

    Args:
      x: float ``[A, ...]``.
      weight: float32 ``[A]``.
      ids: int32 ``[A]`` segment of every row; ids outside ``[0, num_segments)``
        are dropped.
      num_segments: static number of segments S.
      block_rows: rows per block; ``None`` or ``>= A``: one unblocked reduction.

    Returns:
      ``[S, ...]`` in ``x.dtype``.
    """

    def part(xs, ws, js):
        return jax.ops.segment_sum(xs * _bcast(ws, xs), js, num_segments=num_segments)

    a = x.shape[0]
    if block_rows is None or block_rows >= a:
        return part(x, weight, ids)
    b = max(1, int(block_rows))
    full = a // b

    def body(i, acc):
        sl = lambda v: jax.lax.dynamic_slice_in_dim(v, i * b, b)  # noqa: E731
        return acc + part(sl(x), sl(weight), sl(ids))

    acc = jax.lax.fori_loop(
        0, full, body, jnp.zeros((num_segments,) + x.shape[1:], x.dtype)
    )
    if full * b < a:
        acc = acc + part(x[full * b :], weight[full * b :], ids[full * b :])
    return acc


def node_counts(tree: GroupTree, agent_weight: jax.Array) -> jax.Array:
    """Total agent weight under every node.

    Args:
      tree: the group tree (N nodes).
      agent_weight: float32 ``[A]`` (1 per agent, or sample counts).

    Returns:
      float32 ``[N]``: for a group, the weight of all agents below it (0 for a
      padding node); for the root, the total.
    """
    n = tree.num_nodes
    total = jnp.zeros((n,), jnp.float32)
    for row in range(tree.agent_ancestor.shape[0]):
        ids = tree.agent_ancestor[row]
        ids = jnp.where(ids < 0, n, ids)  # out of range: dropped
        total = total + jax.ops.segment_sum(agent_weight, ids, num_segments=n)
    return total


def aggregate_up(
    params,
    tree: GroupTree,
    agent_weight: jax.Array,
    amplify: jax.Array | float = 1.0,
    aggregator: str = "mean",
    trim_fraction: float = 0.1,
    noise_scale: float = 0.0,
    key: jax.Array | None = None,
    block_bytes: int | None = None,
):
    """Bottom-up hierarchical generalization.

    For each level from 1 up to the root, ``w_g = amplify * sum_c n_c w_c / sum_c
    n_c`` where c runs over g's children (child groups and agents attached to g
    directly) and ``n_c`` is the weight of all agents under c (agent count by
    default, as in the reference; sample counts as an option).

    Args:
      params: stacked agent parameters, leaves ``[A, ...]``.
      tree: group tree with N nodes.
      agent_weight: float32 ``[A]`` weight of each agent.
      amplify: scalar multiplying every group average (the reference code's
        undocumented "amplify" step, 1.15 for rounds t < 5; 1.0 = off). Because
        parents average already-scaled children, the factor compounds up the tree.
      aggregator: ``mean`` (the reference) or a robust option of
        ``demjax.robust``: ``median`` / ``trimmed_mean`` / ``noisy_median`` then
        replace every group's weighted average by the coordinate-wise robust
        aggregate of its contributing children (agents with weight > 0 attached
        to the group, and non-empty child groups), unweighted, via
        ``robust.segment_aggregate``. ``noisy_median`` adds
        ``noise_scale * N(0, 1)`` to every child before the median (Chen et al.,
        NeurIPS 2020, Sec. 3) and needs ``key``.
      trim_fraction: ``trimmed_mean``: fraction cut from each end, [0, 0.5).
      noise_scale: ``noisy_median``: standard deviation of the noise.
      key: PRNG key, required by ``noisy_median``.
      block_bytes: ``mean`` only: reduce each leaf over the agents in blocks of
        about this many bytes (``weighted_segment_sum``) instead of holding a
        weighted copy of the leaf; ``None``: one unblocked reduction (for
        agent-sharded inputs, where each device's copy is already a shard).

    Raises:
      ValueError: unknown ``aggregator``, or ``noisy_median`` without ``key``.

    Returns:
      ``(node_params, node_weight)``: leaves ``[N, ...]`` (a padding node holds
      zeros) and float32 ``[N]`` the weight under every node.
    """
    if aggregator != "mean":
        return _aggregate_up_robust(
            params, tree, agent_weight, amplify, aggregator, trim_fraction,
            noise_scale, key,
        )  # fmt: skip
    n = tree.num_nodes
    sizes, offsets = tree.level_sizes, tree.level_offsets
    direct_w = jax.ops.segment_sum(agent_weight, tree.agent_parent, num_segments=n)

    def rows(p):  # agents per block of about block_bytes
        if block_bytes is None:
            return None
        return max(1, int(block_bytes) // max(1, p[0].size * p.dtype.itemsize))

    direct_sum = jax.tree.map(
        lambda p: weighted_segment_sum(p, agent_weight, tree.agent_parent, n, rows(p)),
        params,
    )
    blocks_val, blocks_w = [], []
    for level, (o, g) in enumerate(zip(offsets, sizes, strict=True)):
        num = jax.tree.map(lambda s, o=o, g=g: s[o : o + g], direct_sum)
        w = direct_w[o : o + g]
        if level > 0:
            co, cg = offsets[level - 1], sizes[level - 1]
            child_val, child_w = blocks_val[-1], blocks_w[-1]
            local = tree.node_parent[co : co + cg] - o
            local = jnp.where((local < 0) | (local >= g), g, local)
            w = w + jax.ops.segment_sum(child_w, local, num_segments=g)
            num = jax.tree.map(
                lambda acc, c, cw=child_w, ids=local, g=g: (
                    acc + jax.ops.segment_sum(c * _bcast(cw, c), ids, num_segments=g)
                ),
                num,
                child_val,
            )
        safe = jnp.where(w > 0, w, 1.0)
        val = jax.tree.map(
            lambda s, safe=safe, w=w: jnp.where(
                _bcast(w > 0, s), s / _bcast(safe, s) * amplify, 0.0
            ),
            num,
        )
        blocks_val.append(val)
        blocks_w.append(w)
    node_params = jax.tree.map(lambda *b: jnp.concatenate(b, axis=0), *blocks_val)
    return node_params, jnp.concatenate(blocks_w)


def _aggregate_up_robust(
    params, tree, agent_weight, amplify, aggregator, trim_fraction, noise_scale, key
):
    """``aggregate_up`` with a robust per-group aggregate (see its docstring)."""
    from demjax import robust

    if aggregator not in robust.AGGREGATORS:
        raise ValueError(
            f"aggregator={aggregator!r} is not valid; accepted: "
            f"{', '.join(robust.AGGREGATORS)}"
        )
    if aggregator == "noisy_median" and key is None:
        raise ValueError("aggregator='noisy_median' needs a PRNG key")
    kind = "trimmed_mean" if aggregator == "trimmed_mean" else "median"
    n = tree.num_nodes
    sizes, offsets = tree.level_sizes, tree.level_offsets
    direct_w = jax.ops.segment_sum(agent_weight, tree.agent_parent, num_segments=n)
    agent_in = agent_weight > 0

    def noisy(x, k):
        if aggregator != "noisy_median":
            return x
        return x + noise_scale * jax.random.normal(k, x.shape, x.dtype)

    blocks_val, blocks_w = [], []
    for level, (o, g) in enumerate(zip(offsets, sizes, strict=True)):
        local_a = tree.agent_parent - o
        local_a = jnp.where((local_a < 0) | (local_a >= g), g, local_a)
        w = direct_w[o : o + g]
        rows, seg, inc = params, local_a, agent_in
        if level > 0:
            co, cg = offsets[level - 1], sizes[level - 1]
            child_val, child_w = blocks_val[-1], blocks_w[-1]
            local = tree.node_parent[co : co + cg] - o
            local = jnp.where((local < 0) | (local >= g), g, local)
            w = w + jax.ops.segment_sum(child_w, local, num_segments=g)
            rows = jax.tree.map(
                lambda a, c: jnp.concatenate([a, c], axis=0), params, child_val
            )
            seg = jnp.concatenate([local_a, local])
            inc = jnp.concatenate([agent_in, child_w > 0])
        if key is not None:
            leaves, treedef = jax.tree.flatten(rows)
            ks = jax.random.split(jax.random.fold_in(key, level), len(leaves))
            rows = jax.tree.unflatten(
                treedef, [noisy(x, k) for x, k in zip(leaves, ks, strict=True)]
            )
        val = jax.tree.map(
            lambda x, seg=seg, inc=inc, g=g, w=w: jnp.where(
                _bcast(w > 0, x[:g]),
                robust.segment_aggregate(x, seg, inc, g, kind, trim_fraction) * amplify,
                0.0,
            ),
            rows,
        )
        blocks_val.append(val)
        blocks_w.append(w)
    node_params = jax.tree.map(lambda *b: jnp.concatenate(b, axis=0), *blocks_val)
    return node_params, jnp.concatenate(blocks_w)


def mix_down(node_params, params, tree: GroupTree, alpha: jax.Array | float):
    """Top-down personalized update.

    From the root down, every group model and then every agent model is mixed
    with its (already updated) parent: ``w_child <- (1 - alpha) * w_child + alpha *
    w_parent``. With alpha = 0.6 and 3 group levels an agent ends at 0.4 own +
    0.24 level-1 + 0.144 level-2 + 0.0864 level-3 + 0.1296 root.

    Args:
      node_params: group models, leaves ``[N, ...]`` (from ``aggregate_up``).
      params: agent models, leaves ``[A, ...]``.
      tree: group tree.
      alpha: float mixing weight of the parent, in [0, 1].

    Returns:
      ``(node_params, params)`` after mixing; the root is unchanged.
    """
    sizes, offsets = tree.level_sizes, tree.level_offsets
    mixed = node_params
    for level in range(len(sizes) - 2, -1, -1):
        o, g = offsets[level], sizes[level]
        parent = tree.node_parent[o : o + g]
        mixed = jax.tree.map(
            lambda m, o=o, g=g, parent=parent: m.at[o : o + g].set(
                (1.0 - alpha) * m[o : o + g] + alpha * m[parent]
            ),
            mixed,
        )
    new_params = jax.tree.map(
        lambda p, m: (1.0 - alpha) * p + alpha * m[tree.agent_parent], params, mixed
    )
    return mixed, new_params


def parent_models(node_params, tree: GroupTree, ids=None):
    """Each agent's direct parent group model, leaves ``[A, ...]`` (a gather);
    only the agents ``ids`` (int ``[B]``, leaves ``[B, ...]``) if given."""
    parent = tree.agent_parent if ids is None else tree.agent_parent[ids]
    return jax.tree.map(lambda m: m[parent], node_params)


def fill_empty_groups(node_params, node_weight, tree: GroupTree, prev_node_params):
    """Gives groups without contributing agents a model instead of zeros.

    With partial participation a group may have no contributing agent in a
    round: it takes its parent's model (top-down, so a chain of empty groups
    inherits from the nearest non-empty ancestor); an empty root keeps its
    previous model.

    Args:
      node_params: leaves ``[N, ...]`` from ``aggregate_up``.
      node_weight: float32 ``[N]`` contributing weight under every node.
      tree: group tree.
      prev_node_params: leaves ``[N, ...]``, the group models of the last round.

    Returns:
      leaves ``[N, ...]``.
    """
    sizes, offsets = tree.level_sizes, tree.level_offsets
    root = tree.root

    def bcast(mask, x):
        return mask.reshape(mask.shape + (1,) * (x.ndim - 1))

    out = jax.tree.map(
        lambda v, prev: v.at[root].set(
            jnp.where(node_weight[root] > 0, v[root], prev[root])
        ),
        node_params,
        prev_node_params,
    )
    for level in range(len(sizes) - 2, -1, -1):
        o, g = offsets[level], sizes[level]
        parent = tree.node_parent[o : o + g]
        empty = node_weight[o : o + g] <= 0
        out = jax.tree.map(
            lambda v, o=o, g=g, parent=parent, empty=empty: v.at[o : o + g].set(
                jnp.where(bcast(empty, v[o : o + g]), v[parent], v[o : o + g])
            ),
            out,
        )
    return out
