"""Per-round fault and participation masks, shared by every algorithm.

Participation (a uniformly random subset of ``round(participation * A)`` agents
per round), independent per-round ``dropout`` and ``stragglers`` (agents that
complete only a uniformly random part of their local steps), all drawn from the
round key and vectorized over the agents (``config.participation``,
``config.dropout``, ``config.stragglers``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from demjax import local


def make_round_masks(config, num_agents: int):
    """Builds ``round_masks(key, n_train) -> (active bool [A], max_steps int32 [A])``.

    Participation (a uniformly random subset of ``round(participation * A)``
    agents), independent per-round ``dropout``, and ``stragglers`` (agents that
    complete only a uniformly random part of their local steps), all drawn from
    the round key, vectorized over agents. Shared by every algorithm
    (``Context.round_masks``).
    """
    participation = float(config.participation)
    dropout, stragglers = float(config.dropout), float(config.stragglers)
    num_selected = max(1, int(round(participation * num_agents)))
    batch_size, local_epochs = int(config.batch_size), int(config.local_epochs)

    def round_masks(key, n_train):
        """Participation, dropout and straggler budgets of one round.

        Returns ``(active bool [A], max_steps int32 [A])``.
        """
        k_sel, k_drop, k_str, k_frac = (
            jax.random.fold_in(key, 1_000_003 + i) for i in range(4)
        )
        active = jnp.ones((num_agents,), bool)
        if num_selected < num_agents:
            ranks = jnp.argsort(jnp.argsort(jax.random.uniform(k_sel, (num_agents,))))
            active = ranks < num_selected
        if dropout > 0:
            active = active & (jax.random.uniform(k_drop, (num_agents,)) >= dropout)
        max_steps = jnp.full((num_agents,), local._NO_LIMIT, jnp.int32)
        if stragglers > 0:
            steps = local_epochs * ((n_train + batch_size - 1) // batch_size)
            frac = jax.random.uniform(k_frac, (num_agents,))
            budget = jnp.maximum(1, jnp.floor(frac * steps)).astype(jnp.int32)
            slow = jax.random.uniform(k_str, (num_agents,)) < stragglers
            max_steps = jnp.where(slow, budget, max_steps)
        return active, max_steps

    return round_masks


__all__ = ["make_round_masks"]
