"""Helpers over pytrees whose leaves carry a leading agent axis ``[A, ...]``.

Every algorithm keeps its per-agent state (models, optimizer states) as one
pytree with leaves stacked over the A agents; these are the operations they
share: per-agent select, broadcasting a per-agent vector over a leaf, the
divergence guard (finite rows, reset, counts), masked means, tree distances and
message sizes for communication accounting. All are pure ``jax.numpy``
functions, usable inside ``jax.jit`` and ``jax.vmap`` (the sizes are Python ints
from static shapes).
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


def divergence_guard(active: jax.Array, new, old, *checks):
    """The divergence guard of one round's local work (every algorithm's).

    An active agent whose new state, or any of ``checks`` (its loss, the
    messages it would send), holds a non-finite entry has diverged: it keeps
    its old state, gets no aggregation weight and sends nothing.

    Args:
      active: bool ``[A]`` agents that worked this round.
      new, old: pytrees of one structure, leaves ``[A, ...]`` (the agents'
        state after and before the round's local work).
      checks: more pytrees whose leaves are ``[A, ...]`` (e.g. float32 ``[A]``
        losses) that must be finite for an agent to count.

    Returns:
      ``(kept, ok, diverged)``: ``kept`` = ``new`` for the ``ok`` agents, else
      ``old`` (leaves ``[A, ...]``); ``ok`` bool ``[A]`` active and finite (the
      agents that contribute); ``diverged`` bool ``[A]`` active, not finite.

    Raises:
      AssertionError (chex): ``new`` and ``old`` differ in structure or shapes.
    """
    finite = finite_agents(new)
    for c in checks:
        finite = finite & finite_agents(c)
    ok = active & finite
    return where_agents(ok, new, old), ok, active & ~finite


def round_counts(active: jax.Array, diverged: jax.Array) -> dict:
    """The round-info counts of every algorithm: ``num_active`` (agents that
    worked) and ``num_diverged`` (of them, those the guard reset), int32
    scalars from bool ``[A]`` masks."""
    return {
        "num_active": jnp.sum(active).astype(jnp.int32),
        "num_diverged": jnp.sum(diverged).astype(jnp.int32),
    }


def agent_bytes(tree) -> int:
    """Bytes of ONE agent's rows of a stacked pytree (leaves ``[A, ...]``): the
    ``tree_bytes`` of one agent's model or message (a Python int)."""
    return tree_bytes(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)
    )


def comm_bytes(up: int, senders, down: int, receivers) -> dict:
    """The round-info communication figures ``bytes_up`` / ``bytes_down``
    (float32 scalars): ``up`` bytes (one message, ``tree_bytes``) times the
    number of ``senders``, ``down`` bytes times the number of ``receivers``.

    Args:
      up, down: Python ints, bytes of one upload / one download.
      senders, receivers: counts (int scalars, traced or not) or bool ``[A]``
        masks (counted).
    """

    def count(c):
        c = jnp.asarray(c)
        return jnp.sum(c) if c.ndim else c

    return {
        "bytes_up": jnp.float32(up) * count(senders).astype(jnp.float32),
        "bytes_down": jnp.float32(down) * count(receivers).astype(jnp.float32),
    }


__all__ = [
    "agent_bytes",
    "comm_bytes",
    "divergence_guard",
    "finite_agents",
    "keep_if_finite",
    "masked_mean",
    "per_agent",
    "round_counts",
    "sq_norms",
    "stack",
    "tree_bytes",
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
