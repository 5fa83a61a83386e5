"""Helpers over pytrees whose leaves carry a leading agent axis ``[A, ...]``.

Every algorithm keeps its per-agent state (models, optimizer states) as one
pytree with leaves stacked over the A agents; these are the operations they
share: per-agent select, broadcasting a per-agent vector over a leaf, the
finite-rows test of the divergence guard, masked means and tree distances. All
are pure ``jax.numpy`` functions, usable inside ``jax.jit`` and ``jax.vmap``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np


def per_agent(v: jax.Array, like: jax.Array) -> jax.Array:
    """``v [A]`` reshaped to ``[A, 1, ..., 1]`` to broadcast against ``like``
    (``[A, ...]``)."""
    return v.reshape((v.shape[0],) + (1,) * (like.ndim - 1))


def stack(tree, num: int):
    """One model -> ``num`` copies: leaves ``[...]`` -> ``[num, ...]`` (a
    broadcast, materialized only where XLA needs it)."""
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (num, *p.shape)), tree)


def where_agents(mask: jax.Array, new, old):
    """Per-agent select: ``new`` for the agents where ``mask`` (bool ``[A]``)
    holds, else ``old``.

    Args:
      mask: bool ``[A]``.
      new, old: pytrees of one structure, leaves ``[A, ...]`` of equal shapes.

    Raises:
      AssertionError (chex): the trees differ in structure or leaf shapes.
    """
    chex.assert_trees_all_equal_shapes(new, old)
    return jax.tree.map(lambda n, o: jnp.where(per_agent(mask, n), n, o), new, old)


def finite_agents(tree) -> jax.Array:
    """bool ``[A]``: every entry of agent a's rows in every leaf is finite."""
    leaves = jax.tree.leaves(tree)
    ok = jnp.ones((leaves[0].shape[0],), bool)
    for leaf in leaves:
        ok = ok & jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
    return ok


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum w v / sum w`` over ``[A]`` (0 when every weight is 0): a scalar."""
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def keep_if_finite(new, old):
    """``new`` where every entry of every leaf is finite, else ``old`` (one
    model each; e.g. an aggregate without participants, or a NaN median)."""
    ok = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new)]))
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def tree_sq_dist(a, b) -> jax.Array:
    """``||a - b||^2`` summed over all leaves (one model each): a float scalar."""
    return sum(
        jnp.sum(jnp.square(x - y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def sq_norms(tree) -> jax.Array:
    """float ``[A]``: ``||tree_a||^2`` of every agent's rows over all leaves."""
    return sum(
        jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1)
        for x in jax.tree.leaves(tree)
    )


__all__ = [
    "finite_agents",
    "keep_if_finite",
    "masked_mean",
    "per_agent",
    "sq_norms",
    "stack",
    "tree_sq_dist",
    "where_agents",
]


def tree_bytes(tree) -> int:
    """Bytes of one message: the sum over ``tree``'s leaves of size times item
    size (a Python int, from static shapes and dtypes; works on arrays, tracers
    and ``jax.ShapeDtypeStruct``). Pass one model (unstacked) for the size of
    what one agent sends; communication accounting multiplies by the senders."""
    return int(
        sum(
            int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
            for x in jax.tree.leaves(tree)
        )
    )
