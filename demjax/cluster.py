"""Self-organizing hierarchical structuring: agent features, distances, group trees.

At every re-grouping round DemLearn clusters the agents by their models and turns
the dendrogram into a fixed-capacity :class:`~demjax.types.GroupTree`:

1. :func:`features` flattens every agent's parameters (or this round's update)
   into one row, ``[A, D]``;
2. :func:`pairwise_distances` computes the ``[A, A]`` Euclidean or cosine
   distance matrix on the device (an ``A^2 D`` matmul: the expensive step);
3. :func:`linkage` builds the full dendrogram on the host (scipy or fastcluster);
4. :func:`tree_from_linkage` (binary top-down mode of the authors' code) or
   :func:`tree_from_linkage_maxclust` (a configured group count per level, for
   thousands of agents) turns it into a :class:`~demjax.types.GroupTree`.

:func:`build_tree` chains the three last steps and times them.

Shapes: A agents, D flat parameters, N tree nodes (all groups plus the root),
L group levels below the root. Every ``GroupTree`` array built here is a numpy
``int32`` array; the caller moves it to the device. Trees built with the same
``(num_agents, num_levels)`` (binary mode) or the same ``level_groups`` (maxclust
mode) always have the same shapes and ``level_sizes``, so jitted rounds that take
a tree never recompile after a re-grouping.

Source: Nguyen et al., "Self-organizing Democratized Learning: Towards Large-scale
Distributed Learning Systems", IEEE TNNLS (arXiv 2007.03278), section on the
self-organizing hierarchical structuring; the binary mode follows the authors' code.
"""

from __future__ import annotations

import functools
import numbers
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.cluster import hierarchy as sch
from scipy.spatial import distance as ssd

from demjax import sharding
from demjax.errors import ConfigError, DivergenceError, check_arg
from demjax.types import GroupTree

FEATURE_KINDS = ("weights", "updates")
METRICS = ("euclidean", "cosine")
LINKAGE_METHODS = ("single", "complete", "average", "weighted", "ward")
LINKAGE_BACKENDS = ("scipy", "fastcluster")


def fastcluster_available() -> bool:
    """True when the optional ``fastcluster`` linkage backend is installed."""
    import importlib.util

    return importlib.util.find_spec("fastcluster") is not None


TREE_MODES = ("binary", "maxclust")

_HIGHEST = jax.lax.Precision.HIGHEST

__all__ = [
    "FEATURE_KINDS",
    "LINKAGE_BACKENDS",
    "LINKAGE_METHODS",
    "METRICS",
    "TREE_MODES",
    "build_tree",
    "features",
    "flatten_params",
    "linkage",
    "pairwise_distances",
    "tree_from_linkage",
    "tree_from_linkage_maxclust",
    "tree_to_json",
    "trivial_tree",
]


# --------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------


@jax.jit
def _flatten_jit(leaves: list[jax.Array]) -> jax.Array:
    num_agents = leaves[0].shape[0]
    rows = [jnp.reshape(leaf, (num_agents, -1)).astype(jnp.float32) for leaf in leaves]
    return jnp.concatenate(rows, axis=1)


@jax.jit
def _flatten_diff_jit(leaves: list[jax.Array], prev: list[jax.Array]) -> jax.Array:
    return _flatten_jit([a - b for a, b in zip(leaves, prev, strict=True)])


def _stacked_leaves(params: Any, name: str) -> list[Any]:
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError(f"{name} has no array leaves")
    num_agents = np.shape(leaves[0])[0] if np.ndim(leaves[0]) else None
    for leaf in leaves:
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != num_agents:
            raise ValueError(
                f"every leaf of {name} must be stacked over agents with the same "
                f"leading size; got shapes {[np.shape(x) for x in leaves]}"
            )
    return leaves


def flatten_params(params: Any) -> jax.Array:
    """Flattens a stacked parameter pytree into one row per agent.

    Leaves are taken in ``jax.tree.leaves`` order, each reshaped to ``[A, -1]``
    and concatenated along the feature axis.

    Args:
      params: pytree whose every leaf is ``[A, ...]`` (numpy or jax).

    Returns:
      float32 ``[A, D]`` with ``D`` the total number of parameters per agent.

    Raises:
      ValueError: the pytree has no leaves, or the leaves disagree on ``A``.
    """
    return _flatten_jit(_stacked_leaves(params, "params"))


def features(params: Any, prev_params: Any = None, kind: str = "weights") -> jax.Array:
    """Per-agent clustering features.

    Args:
      params: stacked parameter pytree, every leaf ``[A, ...]`` (the models after
        this round's local training).
      prev_params: stacked pytree of the same structure (the models entering the
        round); required for ``kind="updates"``, ignored otherwise.
      kind: ``"weights"``: all parameters flattened (the reference's feature);
        ``"updates"``: the flattened round update ``params - prev_params`` (the
        "gradient" feature).

    Returns:
      float32 ``[A, D]``.

    Raises:
      ValueError: ``kind`` is not one of ``FEATURE_KINDS``, ``kind="updates"``
        without ``prev_params``, or malformed pytrees (see
        :func:`flatten_params`).
    """
    check_arg("kind", kind, FEATURE_KINDS)
    if kind == "weights":
        return flatten_params(params)
    if prev_params is None:
        raise ValueError(
            "kind='updates' needs the models entering the round (prev_params); got None"
        )
    leaves = _stacked_leaves(params, "params")
    prev = _stacked_leaves(prev_params, "prev_params")
    if jax.tree.structure(params) != jax.tree.structure(prev_params):
        raise ValueError("params and prev_params have different pytree structures")
    return _flatten_diff_jit(leaves, prev)


# --------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------


def _symmetric_zero_diag(d: jax.Array) -> jax.Array:
    d = 0.5 * (d + d.T)
    return jnp.fill_diagonal(d, 0.0, inplace=False)


def _gram(x: jax.Array, center: bool, block_size: int) -> jax.Array:
    """``x x^T`` (optionally of column-centred x), accumulated over column blocks.

    With ``block_size`` (> 0, < D) only one ``[A, block]`` slice is centred at a
    time, so the extra memory is ``A x block + A x A`` instead of a centred copy
    of the whole ``[A, D]`` features.
    """
    num_agents, dim = x.shape
    weights = jnp.full((1, num_agents), 1.0 / num_agents, jnp.float32)

    def part(xb):
        if center:
            # The column mean as a matmul with a weight vector (mean over the
            # agent axis is slow on CPU).
            xb = xb - jnp.matmul(weights, xb, precision=_HIGHEST)
        return jnp.matmul(xb, xb.T, precision=_HIGHEST)

    if not block_size or block_size >= dim:
        return part(x)
    full = dim // block_size

    def body(i, acc):
        return acc + part(
            jax.lax.dynamic_slice_in_dim(x, i * block_size, block_size, 1)
        )

    gram = jax.lax.fori_loop(
        0, full, body, jnp.zeros((num_agents, num_agents), jnp.float32)
    )
    if dim % block_size:
        gram = gram + part(x[:, full * block_size :])
    return gram


# Features whose largest magnitude exceeds 2**_SCALE_ABOVE are scaled by a power
# of two before the Gram matmul, so squared norms cannot overflow float32 (they
# would from |x| ~ 1.8e19). Scaling by a power of two is exact, so smaller
# features, i.e. every normal run, are left untouched bit for bit.
_SCALE_ABOVE = 16


def _power_of_two_scaled(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x * 2**-e, e)``: int32 ``e`` = the binary exponent of ``max |x|`` when
    that exceeds ``2**_SCALE_ABOVE`` (scaled max in [0.5, 1)), else 0 (``x``
    unchanged). Non-finite ``x`` is returned unchanged."""
    e = _scale_exponent(jnp.max(jnp.abs(x)) if x.size else jnp.float32(0.0))
    return _times_power_of_two(x, -e), e


def _scale_exponent(big: jax.Array) -> jax.Array:
    """int32 binary exponent of ``big`` if it exceeds ``2**_SCALE_ABOVE``, else 0."""
    _, e = jnp.frexp(big)
    return jnp.where(jnp.isfinite(big) & (e > _SCALE_ABOVE), e, 0).astype(jnp.int32)


def _times_power_of_two(x: jax.Array, e: jax.Array) -> jax.Array:
    """``x * 2**e`` exactly, for int32 ``e`` in [-126, 127] (two exact factors,
    each a normal float32 power of two built from its bits)."""
    half = e // 2

    def pow2(k):
        return jax.lax.bitcast_convert_type((k + 127) << 23, jnp.float32)

    return x * pow2(half) * pow2(e - half)


@functools.partial(jax.jit, static_argnames=("metric", "block_size"))
def _pairwise_distances_jit(
    feats: jax.Array, metric: str, block_size: int
) -> jax.Array:
    x, exponent = _power_of_two_scaled(feats.astype(jnp.float32))
    if metric == "euclidean":
        # Distances are translation invariant: centring shrinks |x|^2 and with it
        # the cancellation error of the Gram identity.
        gram = _gram(x, True, block_size)
        sq_norm = jnp.diagonal(gram)
        sq = sq_norm[:, None] + sq_norm[None, :] - 2.0 * gram
        d = _times_power_of_two(jnp.sqrt(jnp.maximum(sq, 0.0)), exponent)
    else:  # cosine; Gram normalised after the matmul (docs/benchmarks.md).
        gram = _gram(x, False, block_size)
        norm = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        denom = norm[:, None] * norm[None, :]
        ok = denom > 0.0
        sim = jnp.where(ok, gram / jnp.where(ok, denom, 1.0), 0.0)
        d = 1.0 - jnp.clip(sim, -1.0, 1.0)
    return _symmetric_zero_diag(d)


def pairwise_distances(
    feats: Any, metric: str = "euclidean", block_size: int = 0
) -> jax.Array:
    """All-pairs distances between agents' feature rows (jitted, metric static).

    Euclidean: Gram identity ``|x - y|^2 = |x|^2 + |y|^2 - 2 x.y`` on features
    centred by their column mean (translation invariance; it reduces float32
    cancellation), squared distances clamped at zero before the square root, so
    nearly identical agents give 0 rather than NaN. Features larger than
    ``2**16`` in magnitude are first scaled by a power of two (exact, undone on
    the distances), so squared norms do not overflow float32 (as they would from
    ``|x| ~ 1.8e19``); distances beyond the float32 range are ``inf``.

    Cosine: ``1 - x.y / (|x| |y|)``, the Gram matrix being normalised after the
    matmul (not centred). A zero feature vector (or a pair whose norm product
    underflows to zero) has similarity 0, i.e. distance 1, to every other agent;
    scipy would return NaN there.

    Both: matmul at ``Precision.HIGHEST``, result symmetrised as ``(d + d.T) / 2``
    and the diagonal set to exactly 0.

    Args:
      feats: float ``[A, D]`` features (numpy or jax).
      metric: ``"euclidean"`` or ``"cosine"``.
      block_size: if > 0, the Gram matrix is accumulated over column blocks of
        this width (bounded memory: one ``[A, block]`` slice at a time).

    Returns:
      float32 ``[A, A]`` symmetric distance matrix with zero diagonal.

    Raises:
      ValueError: unknown ``metric``, or ``feats`` is not 2-D.
    """
    check_arg("metric", metric, METRICS)
    if np.ndim(feats) != 2:
        raise ValueError(f"feats must be [A, D]; got shape {np.shape(feats)}")
    return _pairwise_distances_jit(jnp.asarray(feats), metric, int(block_size))


@functools.partial(jax.jit, static_argnames=("sketch_dim", "block_size"))
def _sketch_jit(key, feats, sketch_dim: int, block_size: int):
    x = feats.astype(jnp.float32)
    num_agents, dim = x.shape
    full = dim // block_size

    def project(xb, k):
        r = jax.random.normal(k, (xb.shape[1], sketch_dim), jnp.float32)
        return jnp.matmul(xb, r, precision=_HIGHEST)

    def body(i, acc):
        xb = jax.lax.dynamic_slice_in_dim(x, i * block_size, block_size, axis=1)
        return acc + project(xb, jax.random.fold_in(key, i))

    acc = jax.lax.fori_loop(
        0, full, body, jnp.zeros((num_agents, sketch_dim), jnp.float32)
    )
    if dim % block_size:
        acc = acc + project(x[:, full * block_size :], jax.random.fold_in(key, full))
    return acc / jnp.sqrt(jnp.float32(sketch_dim))


def sketch(key: jax.Array, feats: Any, sketch_dim: int, block_size: int = 4096):
    """Gaussian random projection of agents' features (Johnson-Lindenstrauss).

    ``feats @ R / sqrt(k)`` with ``R ~ N(0, 1)^[D, k]`` generated block by block
    from ``key`` (never materialised whole), so regrouping thousands of agents of
    a large model costs ``A x D x k`` instead of ``A^2 x D`` flops and the
    distance matrix is computed on ``[A, k]``. Pairwise Euclidean distances and
    angles are preserved up to a factor ``1 +- O(sqrt(log A / k))`` with high
    probability (Johnson & Lindenstrauss 1984; Achlioptas 2003).

    Args:
      key: PRNG key (use a fresh one per regrouping for unbiased sketches).
      feats: float ``[A, D]`` features.
      sketch_dim: k, the projected dimension (> 0).
      block_size: columns of ``R`` generated at a time (memory ``block x k``).

    Returns:
      float32 ``[A, k]``.

    Raises:
      ValueError: ``sketch_dim`` is not an integer >= 1.
    """
    if (
        isinstance(sketch_dim, bool)
        or not isinstance(sketch_dim, int)
        or sketch_dim < 1
    ):
        raise ValueError(
            f"sketch_dim={sketch_dim!r} is not valid; accepted: an integer >= 1"
        )
    if np.ndim(feats) != 2:
        raise ValueError(f"feats must be [A, D]; got shape {np.shape(feats)}")
    block = max(1, min(int(block_size), int(np.shape(feats)[1])))
    return _sketch_jit(key, jnp.asarray(feats), int(sketch_dim), block)


@functools.partial(jax.jit, static_argnames=("sketch_dim", "block_size"))
def _sketch_params_jit(key, params, sketch_dim: int, block_size: int):
    leaves = jax.tree.leaves(params)
    num_agents = leaves[0].shape[0]
    acc = jnp.zeros((num_agents, sketch_dim), jnp.float32)
    for i, leaf in enumerate(leaves):
        x = leaf.reshape(num_agents, -1)
        block = max(1, min(block_size, x.shape[1]))
        acc = acc + _sketch_jit(jax.random.fold_in(key, i), x, sketch_dim, block)
    return acc


def sketch_params(key: jax.Array, params: Any, sketch_dim: int, block_size: int = 4096):
    """:func:`sketch` of the flattened parameters, leaf by leaf.

    Equal in distribution to sketching ``flatten_params(params)`` (an independent
    Gaussian block of ``R`` per leaf), without ever building the ``[A, D]``
    concatenation: at 10,000 agents of an 80k-parameter MLP that copy alone is
    3.2 GB.

    Args:
      key: PRNG key; params: stacked pytree, leaves ``[A, ...]``.
      sketch_dim: k (> 0); block_size: columns of ``R`` generated at a time.

    Returns:
      float32 ``[A, k]``.

    Raises:
      ValueError: ``sketch_dim`` is not an integer >= 1.
    """
    if (
        isinstance(sketch_dim, bool)
        or not isinstance(sketch_dim, int)
        or sketch_dim < 1
    ):
        raise ValueError(
            f"sketch_dim={sketch_dim!r} is not valid; accepted: an integer >= 1"
        )
    # Each leaf's sketch is divided by sqrt(k) inside _sketch_jit: the sum is the
    # sketch of the concatenation.
    return _sketch_params_jit(key, params, int(sketch_dim), int(block_size))


# --------------------------------------------------------------------------------------
# Linkage
# --------------------------------------------------------------------------------------


def linkage(dist: Any, method: str = "average", backend: str = "scipy") -> np.ndarray:
    """Agglomerative clustering of a square distance matrix.

    The matrix is copied to float64 and condensed with
    ``scipy.spatial.distance.squareform(..., checks=False)`` (the upper triangle
    is used). ``ward`` is only meaningful on Euclidean distances; the caller
    (:func:`build_tree`) enforces that.

    Args:
      dist: ``[A, A]`` distance matrix (numpy or jax).
      method: ``single``, ``complete``, ``average`` (the reference's choice),
        ``weighted`` or ``ward``.
      backend: ``"scipy"`` (``scipy.cluster.hierarchy.linkage``) or
        ``"fastcluster"`` (``fastcluster.linkage``, same result, faster at scale).

    Returns:
      float64 ``[A - 1, 4]`` scipy linkage matrix ``Z`` (empty ``[0, 4]`` if A=1).

    Raises:
      ConfigError: fastcluster requested but not installed.
      ValueError: unknown ``method`` or ``backend``, ``dist`` is not square, or
        holds non-finite values.
    """
    check_arg("method", method, LINKAGE_METHODS)
    check_arg("backend", backend, LINKAGE_BACKENDS)
    d = np.array(dist, dtype=np.float64, copy=True)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"dist must be a square [A, A] matrix; got {d.shape}")
    if d.shape[0] < 2:
        return np.zeros((0, 4), np.float64)
    if not np.all(np.isfinite(d)):
        raise ValueError(
            f"dist holds {int(np.sum(~np.isfinite(d)))} non-finite entries; "
            "linkage needs finite distances"
        )
    condensed = ssd.squareform(d, checks=False)
    if backend == "fastcluster":
        try:
            import fastcluster
        except ImportError as e:
            raise ConfigError(
                "linkage_backend='fastcluster' needs the fastcluster package: "
                "pip install fastcluster (or use linkage_backend='scipy')"
            ) from e
        z = fastcluster.linkage(condensed, method=method)
    else:
        z = sch.linkage(condensed, method=method)
    return np.asarray(z, dtype=np.float64)


# --------------------------------------------------------------------------------------
# Trees
# --------------------------------------------------------------------------------------


def _z_arg(z: Any, num_agents: int) -> np.ndarray:
    if not isinstance(num_agents, numbers.Integral) or num_agents < 1:
        raise ValueError(f"num_agents={num_agents!r} is not valid; accepted: >= 1")
    z = np.asarray(z, dtype=np.float64)
    if z.shape != (num_agents - 1, 4):
        raise ValueError(
            f"linkage matrix must be [{num_agents - 1}, 4] for {num_agents} agents; "
            f"got {z.shape}"
        )
    return z


def _finish_tree(
    agent_parent: np.ndarray, node_parent: np.ndarray, level_sizes: tuple[int, ...]
) -> GroupTree:
    """Derives ``agent_ancestor`` from the parents and packs the tree."""
    level_sizes = tuple(int(s) for s in level_sizes)
    num_levels = len(level_sizes) - 1
    num_nodes = sum(level_sizes)
    if (agent_parent < 0).any():
        raise AssertionError("internal error: an agent was left without a parent")
    node_level = np.repeat(np.arange(1, num_levels + 2), level_sizes)  # [N], 1-based
    ancestor = np.full((num_levels + 1, agent_parent.shape[0]), -1, np.int64)
    cols = np.arange(agent_parent.shape[0])
    cur = agent_parent.astype(np.int64)
    # Used nodes' parents are exactly one level up, so L + 1 steps reach the root.
    for _ in range(num_levels + 1):
        ancestor[node_level[cur] - 1, cols] = cur
        cur = node_parent[cur]
    assert (ancestor[-1] == num_nodes - 1).all()
    return GroupTree(
        agent_parent=agent_parent.astype(np.int32),
        node_parent=node_parent.astype(np.int32),
        agent_ancestor=ancestor.astype(np.int32),
        level_sizes=level_sizes,
    )


def trivial_tree(num_agents: int) -> GroupTree:
    """The tree without group levels: every agent is a direct member of the root.

    Used by FedAvg, FedProx and local-only training, and by DemLearn with
    ``num_levels=0``.

    Args:
      num_agents: A >= 1.

    Returns:
      ``GroupTree`` with ``level_sizes=(1,)``: ``agent_parent`` int32 ``[A]`` of
      zeros, ``node_parent`` int32 ``[1]`` = ``[0]``, ``agent_ancestor`` int32
      ``[1, A]`` of zeros.

    Raises:
      ValueError: ``num_agents < 1``.
    """
    if not isinstance(num_agents, numbers.Integral) or num_agents < 1:
        raise ValueError(f"num_agents={num_agents!r} is not valid; accepted: >= 1")
    return GroupTree(
        agent_parent=np.zeros((num_agents,), np.int32),
        node_parent=np.zeros((1,), np.int32),
        agent_ancestor=np.zeros((1, num_agents), np.int32),
        level_sizes=(1,),
    )


def _subtree_leaves(z: np.ndarray, num_agents: int, cid: int) -> list[int]:
    """Agents under dendrogram cluster ``cid`` (iterative: no recursion limit)."""
    out, stack = [], [cid]
    while stack:
        c = stack.pop()
        if c < num_agents:
            out.append(c)
        else:
            row = z[c - num_agents]
            stack.append(int(row[1]))
            stack.append(int(row[0]))
    return out


def _num_levels_arg(num_levels: Any) -> int:
    if (
        isinstance(num_levels, bool)
        or not isinstance(num_levels, numbers.Integral)
        or num_levels < 0
    ):
        raise ValueError(
            f"num_levels={num_levels!r} is not valid; accepted: an integer >= 0"
        )
    return int(num_levels)


def tree_from_linkage(z: Any, num_agents: int, num_levels: int) -> GroupTree:
    """Binary top-down tree from a dendrogram (the reference's mode).

    With L = ``num_levels`` group levels, the dendrogram root (last merge) is the
    tree root, at level L + 1. Each tree node is split into its two dendrogram
    children, each going one level down:

    * a child that is a single agent becomes a direct member of the node being
      split (``agent_parent`` = that node, whatever its level);
    * a child with several agents becomes a group node one level down;
    * a level-1 node is not split: it takes all agents of its dendrogram subtree
      as direct members.

    Node slots form a binary heap per level: the node at heap depth ``d`` (root
    depth 0, level ``L + 1 - d``) and position ``p`` has its children at
    positions ``2p`` (``Z[i, 0]``) and ``2p + 1`` (``Z[i, 1]``) one depth below;
    its global id is ``level_offsets[l - 1] + p``. Hence ``level_sizes =
    (2**L, ..., 4, 2, 1)`` and N = ``2**(L + 1) - 1`` whatever the data. Unused
    slots are padding nodes whose parent is the root; the root is its own parent.

    Args:
      z: float ``[A - 1, 4]`` scipy linkage matrix.
      num_agents: A >= 1.
      num_levels: L >= 0; 0 gives :func:`trivial_tree`.

    Returns:
      ``GroupTree``: ``agent_parent`` int32 ``[A]``, ``node_parent`` int32
      ``[N]``, ``agent_ancestor`` int32 ``[L + 1, A]`` (-1 where the agent is
      attached above that level).

    Raises:
      ValueError: ``num_levels`` is not an integer >= 0, or ``z`` does not have
        shape ``[A - 1, 4]``.
    """
    num_levels = _num_levels_arg(num_levels)
    z = _z_arg(z, num_agents)
    if num_levels == 0:
        return trivial_tree(num_agents)
    level_sizes = tuple(2 ** (num_levels - lv + 1) for lv in range(1, num_levels + 1))
    level_sizes += (1,)
    offsets = np.cumsum((0,) + level_sizes[:-1])
    num_nodes = sum(level_sizes)
    root = num_nodes - 1
    agent_parent = np.full((num_agents,), -1, np.int64)
    node_parent = np.full((num_nodes,), root, np.int64)
    if num_agents == 1:
        agent_parent[0] = root
        return _finish_tree(agent_parent, node_parent, level_sizes)

    # (dendrogram cluster id, tree level, heap position within the level)
    stack = [(2 * num_agents - 2, num_levels + 1, 0)]
    while stack:
        cid, level, pos = stack.pop()
        nid = int(offsets[level - 1]) + pos
        if level == 1:
            agent_parent[_subtree_leaves(z, num_agents, cid)] = nid
            continue
        row = z[cid - num_agents]
        for k in (0, 1):
            child = int(row[k])
            if child < num_agents:
                agent_parent[child] = nid
            else:
                cpos = 2 * pos + k
                node_parent[int(offsets[level - 2]) + cpos] = nid
                stack.append((child, level - 1, cpos))
    return _finish_tree(agent_parent, node_parent, level_sizes)


def _level_groups_arg(level_groups: Any, num_agents: int) -> tuple[int, ...]:
    try:
        groups = tuple(level_groups)
    except TypeError:
        groups = None
    bad = groups is None or any(
        isinstance(g, bool) or not isinstance(g, numbers.Integral) for g in groups
    )
    if not bad:
        groups = tuple(int(g) for g in groups)
        bad = (
            any(g < 1 for g in groups)
            or (len(groups) > 0 and groups[0] > num_agents)
            or any(b > a for a, b in zip(groups, groups[1:], strict=False))
        )
    if bad:
        raise ValueError(
            f"level_groups={level_groups!r} is not valid for {num_agents} agents; "
            "accepted: group counts (G_1, ..., G_L) per level from the bottom, each "
            f">= 1, G_1 <= {num_agents}, non-increasing"
        )
    return groups


def _dense_labels(labels: np.ndarray) -> np.ndarray:
    """Relabels clusters 0..k-1 in order of their smallest member agent index."""
    uniq, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    return rank[inverse.reshape(-1)]


def tree_from_linkage_maxclust(
    z: Any, num_agents: int, level_groups: Sequence[int]
) -> GroupTree:
    """Tree with a configured number of groups per level (for many agents).

    Level l is the flat cut ``scipy.cluster.hierarchy.fcluster(Z, G_l,
    criterion="maxclust")`` of the dendrogram. Every agent is a direct member of
    its level-1 group; a level-l group's parent is the level-(l+1) cluster of its
    members (the cuts are nested for monotone linkages: checked). Groups of each
    level are numbered densely 0..k-1 in order of their smallest member agent
    index. ``fcluster`` may return fewer than ``G_l`` clusters (ties): the
    remaining slots are padding nodes (no agents, parent = root).

    Args:
      z: float ``[A - 1, 4]`` scipy linkage matrix.
      num_agents: A >= 1.
      level_groups: ``(G_1, ..., G_L)`` group capacities from the bottom level up;
        ``()`` gives :func:`trivial_tree`.

    Returns:
      ``GroupTree`` with ``level_sizes = (G_1, ..., G_L, 1)``; ``agent_ancestor``
      int32 ``[L + 1, A]`` has no -1 entries in this mode.

    Raises:
      ValueError: ``level_groups`` entries not integers >= 1, ``G_1 > A`` or
        increasing; ``z`` has the wrong shape, or the per-level cuts are not
        nested.
    """
    z = _z_arg(z, num_agents)
    groups = _level_groups_arg(level_groups, num_agents)
    if not groups:
        return trivial_tree(num_agents)
    level_sizes = groups + (1,)
    offsets = np.cumsum((0,) + level_sizes[:-1])
    num_nodes = sum(level_sizes)
    root = num_nodes - 1

    dense = []
    for g in groups:
        if num_agents == 1:
            labels = np.zeros((1,), np.int64)
        else:
            labels = np.asarray(sch.fcluster(z, g, criterion="maxclust"))
        lab = _dense_labels(labels)
        if lab.max() + 1 > g:  # fcluster promises at most g clusters
            raise ValueError(f"fcluster returned {lab.max() + 1} > {g} clusters")
        dense.append(lab)

    node_parent = np.full((num_nodes,), root, np.int64)
    for i in range(len(groups) - 1):  # level i + 1 -> level i + 2
        child, parent = dense[i], dense[i + 1]
        up = np.full((groups[i],), -1, np.int64)
        up[child] = parent
        if (up[child] != parent).any():
            raise ValueError(
                f"per-level cuts are not nested: a level-{i + 1} group spans several "
                f"level-{i + 2} groups (non-monotone linkage?)"
            )
        used = np.flatnonzero(up >= 0)
        node_parent[offsets[i] + used] = offsets[i + 1] + up[used]
    # Top group level's used nodes already point to the root (default).
    agent_parent = offsets[0] + dense[0]
    return _finish_tree(agent_parent, node_parent, level_sizes)


def tree_to_json(tree: GroupTree) -> dict:
    """A JSON-serialisable description of a tree (for ``tree_final.json``).

    Args:
      tree: any ``GroupTree`` (numpy or jax arrays).

    Returns:
      dict of plain Python lists/ints: ``agent_parent`` ``[A]``, ``node_parent``
      ``[N]``, ``agent_ancestor`` ``[L + 1][A]``, ``level_sizes``,
      ``level_offsets``, ``root``, and ``nodes``: one entry per node with ``id``,
      ``level`` (1..L+1, root = L+1), ``parent``, ``members`` (direct agent
      members, ascending) and ``num_agents`` (agents anywhere under the node;
      0 for padding nodes).
    """
    agent_parent = np.asarray(tree.agent_parent).astype(np.int64)
    node_parent = np.asarray(tree.node_parent).astype(np.int64)
    ancestor = np.asarray(tree.agent_ancestor).astype(np.int64)
    num_nodes = tree.num_nodes
    node_level = np.repeat(np.arange(1, tree.num_levels + 2), tree.level_sizes)
    under = np.bincount(ancestor[ancestor >= 0].ravel(), minlength=num_nodes)
    members: list[list[int]] = [[] for _ in range(num_nodes)]
    for a, p in enumerate(agent_parent.tolist()):
        members[p].append(a)
    nodes = [
        {
            "id": n,
            "level": int(node_level[n]),
            "parent": int(node_parent[n]),
            "members": members[n],
            "num_agents": int(under[n]),
        }
        for n in range(num_nodes)
    ]
    return {
        "agent_parent": agent_parent.tolist(),
        "node_parent": node_parent.tolist(),
        "agent_ancestor": ancestor.tolist(),
        "level_sizes": [int(s) for s in tree.level_sizes],
        "level_offsets": [int(o) for o in tree.level_offsets],
        "root": int(tree.root),
        "nodes": nodes,
    }


# --------------------------------------------------------------------------------------
# Everything together
# --------------------------------------------------------------------------------------


def _linkage_sample_arg(value: Any, num_agents: int) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < 0
        or value == 1
        or value > num_agents
    ):
        raise ValueError(
            f"linkage_sample={value!r} is not valid; accepted: 0 (exact) or an "
            f"integer in [2, num_agents={num_agents}]"
        )
    return 0 if int(value) == num_agents else int(value)


@functools.partial(jax.jit, static_argnames=("metric", "block"))
def _nearest_jit(x, s, metric: str, block: int):
    # One power-of-two scale for both (exact; argmin is scale invariant), so
    # huge features do not overflow the squared norms.
    e = _scale_exponent(jnp.maximum(jnp.max(jnp.abs(x)), jnp.max(jnp.abs(s))))
    x, s = _times_power_of_two(x, -e), _times_power_of_two(s, -e)
    if metric == "cosine":
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        s = s / jnp.maximum(jnp.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    s_sq = jnp.sum(s * s, axis=1)
    a = x.shape[0]
    pad = (-a) % block
    xb = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block, x.shape[1])

    def one(xi):
        # ||x - s||^2 up to the per-row constant ||x||^2 (cosine: -2 cos + const)
        score = s_sq[None, :] - 2.0 * jnp.dot(
            xi, s.T, precision=jax.lax.Precision.HIGHEST
        )
        return jnp.argmin(score, axis=1).astype(jnp.int32)

    return jax.lax.map(one, xb).reshape(-1)[:a]


def nearest_rows(x: Any, s: Any, metric: str = "euclidean", block: int = 4096):
    """Index of the nearest row of ``s`` for every row of ``x`` (device, blocked).

    Args:
      x: float32 ``[A, D]``; s: float32 ``[m, D]``.
      metric: ``euclidean`` or ``cosine`` (smallest ``1 - cos``).
      block: rows of ``x`` per step, bounding memory to ``block * m`` floats.

    Returns:
      int32 ``[A]`` in ``[0, m)``.
    """
    check_arg("metric", metric, METRICS)
    x, s = jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32)
    return _nearest_jit(x, s, metric, int(min(block, max(x.shape[0], 1))))


def _check_finite_features(feats: Any) -> None:
    """Raise ``DivergenceError`` naming how many agents' features are non-finite."""
    bad = int(jnp.sum(~jnp.all(jnp.isfinite(jnp.asarray(feats)), axis=1)))
    if bad:
        raise DivergenceError(
            f"{bad} of {int(np.shape(feats)[0])} agents' models are non-finite "
            "(NaN/inf), so no distances for the re-grouping; the training "
            "diverged: lower lr (or amplify_factor/amplify_rounds with amplify=True)"
        )


def build_tree(
    feats: Any,
    *,
    num_levels: int,
    metric: str = "euclidean",
    method: str = "average",
    mode: str = "binary",
    level_groups: Sequence[int] = (),
    backend: str = "scipy",
    sketch_dim: int = 0,
    key: jax.Array | None = None,
    distance_block: int = 0,
    linkage_sample: int = 0,
) -> tuple[GroupTree, dict]:
    """Distances (device, jitted) -> linkage (host) -> group tree.

    All options are validated before any computation.

    Args:
      feats: float ``[A, D]`` agent features (see :func:`features`).
      num_levels: group levels L below the root. Binary mode: the tree depth.
        Maxclust mode: must equal ``len(level_groups)``.
      metric: ``"euclidean"`` or ``"cosine"`` (field ``distance``).
      method: linkage method (field ``linkage``); ``ward`` needs Euclidean.
      mode: ``"binary"`` (:func:`tree_from_linkage`) or ``"maxclust"``
        (:func:`tree_from_linkage_maxclust`) (field ``tree_mode``).
      level_groups: ``(G_1, ..., G_L)`` for maxclust mode; ignored in binary mode.
      backend: ``"scipy"`` or ``"fastcluster"`` (field ``linkage_backend``).
      sketch_dim: if > 0 and smaller than D, features are first projected to
        ``sketch_dim`` dimensions with :func:`sketch` (needs ``key``).
      key: PRNG key of the sketch.
      distance_block: column block width of the Gram accumulation (0 = whole).
      linkage_sample: if ``0 < m < A``: the linkage runs on ``m`` agents drawn
        uniformly without replacement (``key``), and every other agent joins the
        level-1 group of its nearest sampled agent (same metric) — the sampling
        scheme of CURE (Guha et al., SIGMOD 1998, Sec. 3) — so regrouping costs
        ``O(m^2 + A m)`` instead of ``O(A^2)`` memory and time (100,000 agents:
        the exact condensed matrix alone would be 40 GB). 0 = exact.

    Returns:
      ``(tree, info)`` with ``info = {"distance_s", "linkage_s", "tree_s",
      "linkage"}`` (``linkage``: the scipy matrix ``Z``; with ``linkage_sample``
      it is over the sampled agents, listed in ``info["linkage_agents"]``, and
      ``assign_s`` times the nearest-sample assignment)
      (plus ``sketch_s`` when sketching), the
      wall seconds of each step (``distance_s`` includes the jit compile the
      first time a shape is seen).

    Raises:
      ValueError: any invalid option (the message names the argument), or
        ``feats`` is not 2-D.
      ConfigError: fastcluster requested but not installed.
      DivergenceError: some agents' features are non-finite, or their distances
        overflow float32 (a one-line message naming the cause; never reaches
        scipy).
    """
    check_arg("metric", metric, METRICS)
    check_arg("method", method, LINKAGE_METHODS)
    if method == "ward" and metric != "euclidean":
        raise ValueError(
            f"method='ward' needs metric='euclidean'; got metric={metric!r}"
        )
    check_arg("mode", mode, TREE_MODES)
    check_arg("backend", backend, LINKAGE_BACKENDS)
    num_levels = _num_levels_arg(num_levels)
    if np.ndim(feats) != 2:
        raise ValueError(f"feats must be [A, D]; got shape {np.shape(feats)}")
    num_agents = int(np.shape(feats)[0])
    if mode == "maxclust":
        groups = _level_groups_arg(level_groups, num_agents)
        if len(groups) != num_levels:
            raise ValueError(
                f"level_groups={tuple(level_groups)!r} has {len(groups)} levels but "
                f"num_levels={num_levels}; in mode='maxclust' they must agree"
            )

    info = {}
    if sketch_dim and sketch_dim < np.shape(feats)[1]:
        if key is None:
            raise ValueError("build_tree(sketch_dim > 0) needs a PRNG key")
        ts = time.perf_counter()
        feats = sketch(key, feats, int(sketch_dim)).block_until_ready()
        info["sketch_s"] = time.perf_counter() - ts
    m = _linkage_sample_arg(linkage_sample, num_agents)
    _check_finite_features(feats)
    full_feats, sample = feats, None
    if m:
        if key is None:
            raise ValueError("build_tree(linkage_sample > 0) needs a PRNG key")
        sample = np.sort(
            np.asarray(
                jax.random.choice(
                    jax.random.fold_in(key, 7), num_agents, (m,), replace=False
                )
            )
        )
        feats = jnp.asarray(feats)[sample]
    n_tree = m or num_agents
    t0 = time.perf_counter()
    dist = pairwise_distances(feats, metric, distance_block).block_until_ready()
    t1 = time.perf_counter()
    # sharding.to_host: a multi-process job's distances may be spread over
    # processes (gathered then; a plain device_get in one process).
    dist = sharding.to_host(dist)
    if not np.all(np.isfinite(dist)):
        raise DivergenceError(
            "agents' models are too large for float32 distances (max |w| = "
            f"{float(jnp.max(jnp.abs(jnp.asarray(feats)))):.3g}); the training "
            "diverged: lower lr (or amplify_factor/amplify_rounds with amplify=True)"
        )
    z = linkage(dist, method, backend)
    t2 = time.perf_counter()
    if mode == "binary":
        tree = tree_from_linkage(z, n_tree, num_levels)
    else:
        tree = tree_from_linkage_maxclust(z, n_tree, groups)
    t3 = time.perf_counter()
    info.update(distance_s=t1 - t0, linkage_s=t2 - t1, tree_s=t3 - t2)
    if m:
        nearest = sharding.to_host(nearest_rows(full_feats, feats, metric))
        agent_parent = np.asarray(tree.agent_parent)[nearest]
        tree = _finish_tree(
            agent_parent, np.asarray(tree.node_parent), tree.level_sizes
        )
        info["assign_s"] = time.perf_counter() - t3
        info["linkage_agents"] = sample.tolist()
    info["linkage"] = z  # float64 [A - 1, 4], for dendrogram plots (not a timing)
    return tree, info
