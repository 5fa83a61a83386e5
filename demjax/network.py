"""Communication graphs over the agent axis and column-stochastic (push-sum) mixing.

Setting of Terashita & Hara, "Personalized Decentralized Bilevel Optimization over
Stochastic and Directed Networks" (arXiv 2210.02129), Sec. 3 (communication
model) and Assran et al., "Stochastic Gradient Push for Distributed Deep
Learning" (ICML 2019), Sec. 2 (push-sum):

- a **base graph** over the A agents: ``complete``, ``erdos_renyi`` (each
  unordered pair linked with probability ``network_edge_prob``, redrawn until
  strongly connected) or ``file`` (an ``.npy`` / ``.txt`` 0/1 matrix, ``adj[i, j]
  = 1`` for an edge i -> j);
- a **mode**: ``static`` (every base edge active at every step), ``undirected``
  (each pair {i, j} active per step with its own rate ``r_ij``, both directions
  together) or ``directed`` (each direction i -> j active per step independently
  with its own rate ``r_ij``); rates ``r ~ U(low, high)`` drawn once per run from
  ``network_rates="low,high"``. Self-loops are always active;
- **column-stochastic mixing** ``P[j, i]`` (weight of sender i's message at
  receiver j): a sender splits its message equally over its currently active
  out-neighbours, itself included, ``P[j, i] = 1 / outdeg_i`` (columns sum to 1,
  so ``sum_i x_i`` is conserved: push-sum).

A stacked pytree (leaves ``[A, ...]``) is mixed as ``x <- P x`` over the agent
axis: a dense ``[A, A]`` matrix product (``network_impl="dense"``) or an edge list
``jax.ops.segment_sum`` (``"sparse"``, memory ``O(E * D)`` instead of ``O(A^2)``;
for sparse graphs of thousands of agents). Both are vectorized and jit-able and
give the same result.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from demjax.errors import ConfigError, check_arg

NETWORKS = ("complete", "erdos_renyi", "file")
NETWORK_MODES = ("static", "undirected", "directed")
NETWORK_IMPLS = ("dense", "sparse")


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
    """A base graph with per-edge activation rates (host arrays, built once).

    Attributes:
      num_agents: A.
      senders, receivers: int32 ``[E]`` edges i -> j of the base graph, the A
        self-loops included.
      rates: float32 ``[E]`` probability an edge is active at a step (1 for
        self-loops and in ``static`` mode).
      draw: int32 ``[E]`` index of the uniform draw deciding the edge: one per
        direction (``directed``) or shared by i -> j and j -> i (``undirected``).
      num_draws: number of uniform draws per step.
      mode: ``static`` | ``undirected`` | ``directed``.
      impl: ``dense`` | ``sparse``.
    """

    num_agents: int
    senders: np.ndarray
    receivers: np.ndarray
    rates: np.ndarray
    draw: np.ndarray
    num_draws: int
    mode: str = "static"
    impl: str = "dense"

    @property
    def num_edges(self) -> int:
        return int(self.senders.shape[0])

    def adjacency(self) -> np.ndarray:
        """Base graph, bool ``[A, A]``, ``adj[i, j]`` = edge i -> j (self-loops on)."""
        adj = np.zeros((self.num_agents, self.num_agents), bool)
        adj[self.senders, self.receivers] = True
        return adj

    def sample(self, key: jax.Array) -> jax.Array:
        """Edge weights of one step.

        Args:
          key: PRNG key of the step.

        Returns:
          float32 ``[E]``: ``P[receiver_e, sender_e]``, ``1 / outdeg(sender_e)`` on
          the active edges, 0 on the inactive ones (self-loops always active).
        """
        rates = jnp.asarray(self.rates)
        if self.mode == "static":
            active = jnp.ones((self.num_edges,), jnp.float32)
        else:
            u = jax.random.uniform(key, (self.num_draws,))
            active = (u[jnp.asarray(self.draw)] < rates).astype(jnp.float32)
        senders = jnp.asarray(self.senders)
        outdeg = jax.ops.segment_sum(active, senders, self.num_agents)
        return active / outdeg[senders]

    def matrix(self, weights: jax.Array) -> jax.Array:
        """Dense column-stochastic ``P`` float32 ``[A, A]`` from ``weights [E]``."""
        a = self.num_agents
        return (
            jnp.zeros((a, a), jnp.float32)
            .at[jnp.asarray(self.receivers), jnp.asarray(self.senders)]
            .add(weights)
        )

    def mix(self, weights: jax.Array, tree):
        """``x <- P x`` over the agent axis of every leaf.

        Args:
          weights: float32 ``[E]`` from ``sample``.
          tree: pytree with leaves ``[A, ...]`` (float).

        Returns:
          The mixed pytree (same shapes and dtypes):
          ``out[j] = sum_i P[j, i] * x[i]``.
        """
        if self.impl == "dense":
            p = self.matrix(weights)

            def leaf(x):
                flat = x.reshape(self.num_agents, -1)
                out = jnp.dot(p, flat.astype(jnp.float32), precision="highest")
                return out.reshape(x.shape).astype(x.dtype)

            return jax.tree.map(leaf, tree)
        senders = jnp.asarray(self.senders)
        receivers = jnp.asarray(self.receivers)

        def leaf(x):
            w = weights.reshape((-1,) + (1,) * (x.ndim - 1))
            msg = x[senders] * w.astype(x.dtype)
            return jax.ops.segment_sum(msg, receivers, self.num_agents)

        return jax.tree.map(leaf, tree)


def parse_rates(value) -> tuple[float, float]:
    """``"low,high"`` (or one number) -> ``(low, high)`` with ``0 < low <= high <= 1``.

    Raises:
      ConfigError: names ``network_rates``.
    """
    bad = ConfigError(
        f"network_rates={value!r} is not valid; accepted: 'low,high' with "
        "0 < low <= high <= 1 (e.g. '0.4,0.8'), or one rate in (0, 1]"
    )
    if isinstance(value, bool):
        raise bad
    if isinstance(value, (int, float)):
        parts = [float(value)]
    elif isinstance(value, str):
        try:
            parts = [float(s) for s in value.split(",")]
        except ValueError:
            raise bad from None
    else:
        raise bad
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise bad
    low, high = parts
    if not (np.isfinite(low) and np.isfinite(high) and 0 < low <= high <= 1):
        raise bad
    return low, high


def strongly_connected(adj: np.ndarray) -> bool:
    """Whether every agent reaches every other along edges ``adj[i, j]`` (i -> j)."""
    a = adj.shape[0]
    reach = np.asarray(adj, bool) | np.eye(a, dtype=bool)

    def closure(m):
        seen = m[0].copy()
        frontier = seen.copy()
        while frontier.any():
            nxt = m[frontier].any(axis=0) & ~seen
            seen |= nxt
            frontier = nxt
        return seen.all()

    return bool(closure(reach) and closure(reach.T))


def load_adjacency(path: str, num_agents: int) -> np.ndarray:
    """Reads a 0/1 ``[A, A]`` matrix from ``.npy`` or whitespace/comma ``.txt``.

    Raises:
      ConfigError: names ``network_file`` (missing, unreadable, wrong shape, not
        0/1).
    """
    if not os.path.exists(path):
        raise ConfigError(
            f"network_file={path!r} does not exist; accepted: a path to an .npy or "
            ".txt 0/1 adjacency matrix"
        )
    try:
        if path.endswith(".npy"):
            adj = np.load(path)
        else:
            with open(path) as f:
                text = f.read().replace(",", " ")
            adj = np.array([[float(v) for v in ln.split()] for ln in text.splitlines()
                            if ln.strip()])  # fmt: skip
    except (ValueError, OSError) as e:
        raise ConfigError(
            f"network_file={path!r} could not be read ({e}); accepted: an .npy or "
            ".txt 0/1 adjacency matrix"
        ) from None
    if adj.shape != (num_agents, num_agents):
        raise ConfigError(
            f"network_file={path!r} holds a {adj.shape} matrix; accepted: a 0/1 "
            f"matrix of shape ({num_agents}, {num_agents}) (num_agents)"
        )
    if not np.all((adj == 0) | (adj == 1)):
        raise ConfigError(
            f"network_file={path!r} has entries other than 0 and 1; accepted: a 0/1 "
            "adjacency matrix (adj[i, j] = 1 for an edge i -> j)"
        )
    return adj.astype(bool)


def build(
    num_agents: int,
    network: str = "complete",
    mode: str = "static",
    rates=(0.4, 0.8),
    edge_prob: float = 0.3,
    adjacency: np.ndarray | None = None,
    impl: str = "dense",
    seed: int = 0,
) -> Network:
    """Builds a ``Network`` (host numpy; rates drawn once from ``seed``).

    Args:
      num_agents: A.
      network: ``complete`` | ``erdos_renyi`` | ``file`` (then ``adjacency``).
      mode: ``static`` | ``undirected`` | ``directed``.
      rates: ``(low, high)`` of ``r ~ U(low, high)`` (stochastic modes).
      edge_prob: Erdos-Renyi link probability per unordered pair.
      adjacency: bool ``[A, A]`` base graph for ``network="file"``.
      impl: ``dense`` | ``sparse`` mixing.
      seed: seed of the Erdos-Renyi draw and of the rates.

    Raises:
      ValueError: an unknown ``network``, ``mode`` or ``impl``.
      ConfigError: an Erdos-Renyi graph that stays
        disconnected, a file graph that is not strongly connected (push-sum
        cannot reach consensus) or not symmetric in ``undirected`` mode.
    """
    check_arg("network", network, NETWORKS)
    check_arg("mode", mode, NETWORK_MODES)
    check_arg("impl", impl, NETWORK_IMPLS)
    a = int(num_agents)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x6E6574]))
    if network == "complete":
        adj = np.ones((a, a), bool)
    elif network == "erdos_renyi":
        for _ in range(100):
            upper = np.triu(rng.random((a, a)) < edge_prob, 1)
            adj = upper | upper.T
            if strongly_connected(adj):
                break
        else:
            raise ConfigError(
                f"network_edge_prob={edge_prob!r} gives no connected Erdos-Renyi "
                f"graph over {a} agents in 100 draws; accepted: a larger probability "
                f"(about >= log(A) / A = {np.log(a) / a:.3f})"
            )
    else:
        if adjacency is None:
            raise ConfigError("network='file' needs network_file (an adjacency matrix)")
        adj = np.asarray(adjacency, bool)
        if mode == "undirected" and not np.array_equal(adj, adj.T):
            raise ConfigError(
                "network_file holds a non-symmetric matrix, not valid for "
                "network_mode='undirected'; accepted: a symmetric matrix, or "
                "network_mode='directed' / 'static'"
            )
        if not strongly_connected(adj):
            raise ConfigError(
                "network_file holds a graph that is not strongly connected; "
                "accepted: a graph where every agent reaches every other (push-sum "
                "needs it to reach consensus)"
            )
    adj = adj.copy()
    np.fill_diagonal(adj, False)
    senders, receivers = np.nonzero(adj)
    low, high = rates
    if mode == "undirected":
        lo, hi = np.minimum(senders, receivers), np.maximum(senders, receivers)
        pair_ids, draw = np.unique(lo * a + hi, return_inverse=True)
        pair_rates = rng.uniform(low, high, size=len(pair_ids))
        edge_rates = pair_rates[draw]
    else:
        draw = np.arange(len(senders))
        edge_rates = rng.uniform(low, high, size=len(senders))
        if mode == "static":
            edge_rates = np.ones(len(senders))
    num_draws = int(draw.max()) + 1 if len(draw) else 0
    loops = np.arange(a)
    return Network(
        num_agents=a,
        senders=np.concatenate([senders, loops]).astype(np.int32),
        receivers=np.concatenate([receivers, loops]).astype(np.int32),
        rates=np.concatenate([edge_rates, np.ones(a)]).astype(np.float32),
        # Self-loops use a draw index that exists but their rate 1 keeps them on.
        draw=np.concatenate([draw, np.zeros(a, np.int64)]).astype(np.int32),
        num_draws=max(num_draws, 1),
        mode=mode,
        impl=impl,
    )


def from_config(config, num_agents: int) -> Network:
    """``build`` from the ``network*`` config fields (seeded by ``config.seed``).

    Raises:
      ConfigError: as ``load_adjacency`` and ``build`` (the fields themselves
        are checked by ``demjax.config.validate``).
    """
    adjacency = None
    if config.network == "file":
        adjacency = load_adjacency(config.network_file, num_agents)
    return build(
        num_agents,
        network=config.network,
        mode=config.network_mode,
        rates=parse_rates(config.network_rates),
        edge_prob=float(config.network_edge_prob),
        adjacency=adjacency,
        impl=config.network_impl,
        seed=int(config.seed),
    )


def push_sum_weights(num_agents: int) -> jax.Array:
    """Initial push-sum weights ``omega``: float32 ``[A]`` of ones."""
    return jnp.ones((num_agents,), jnp.float32)


def debias(tree, omega: jax.Array):
    """``z_i = x_i / omega_i`` for leaves ``[A, ...]`` and ``omega [A]``."""

    def leaf(x):
        return x / omega.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)

    return jax.tree.map(leaf, tree)


__all__ = [
    "NETWORKS",
    "NETWORK_IMPLS",
    "NETWORK_MODES",
    "Network",
    "build",
    "debias",
    "from_config",
    "load_adjacency",
    "parse_rates",
    "push_sum_weights",
    "strongly_connected",
]
