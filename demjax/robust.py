"""Robust aggregation of agent models: mean, median, trimmed mean, noisy median.

Options of any server averaging step (``config.aggregator``):

- ``mean``: the weighted mean ``sum_a w_a x_a / sum_a w_a`` (FedAvg).
- ``median``: the coordinate-wise median of the included agents (``w_a > 0``),
  unweighted (Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
  Statistical Rates", ICML 2018, Eq. "median").
- ``trimmed_mean``: per coordinate, drop the ``floor(trim_fraction * k)`` largest
  and smallest of the ``k`` included values and average the rest (Yin et al.,
  ICML 2018, Definition 2).
- ``noisy_median``: the coordinate-wise median of ``x_a + noise_scale * N(0, 1)``:
  Chen, Chen, Hong, Wu, Zhang, "Bridging the Gap between Median and Mean
  Algorithms in Distributed Optimization", NeurIPS 2020, Sec. 3 (noise added
  before the median closes the gap between median and mean as the scale grows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATORS = ("mean", "median", "trimmed_mean", "noisy_median")


def _mean(x, w):
    # A [A] x [A, D] contraction (one GEMV on the flattened leaf) rather than an
    # elementwise product + reduction, which materializes a second [A, ...] copy.
    flat = x.reshape(x.shape[0], -1)
    out = jnp.dot(w.astype(x.dtype), flat, precision=jax.lax.Precision.HIGHEST)
    return (out / jnp.maximum(jnp.sum(w), 1e-12)).reshape(x.shape[1:])


def _median(x, include):
    inc = include.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.nanmedian(jnp.where(inc, x, jnp.nan), axis=0)


def _trimmed_mean(x, include, trim_fraction):
    inc = include.reshape((-1,) + (1,) * (x.ndim - 1))
    k = jnp.sum(include)
    b = jnp.floor(trim_fraction * k).astype(jnp.int32)
    s = jnp.sort(jnp.where(inc, x, jnp.inf), axis=0)  # excluded agents sort last
    rank = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
    keep = (rank >= b) & (rank < k - b)
    return jnp.sum(jnp.where(keep, s, 0.0), axis=0) / jnp.maximum(k - 2 * b, 1)


def aggregate(
    params,
    weights: jax.Array,
    kind: str = "mean",
    trim_fraction: float = 0.1,
    noise_scale: float = 0.0,
    key: jax.Array | None = None,
):
    """Aggregates agent models into one.

    Args:
      params: pytree, leaves float32 ``[A, ...]``.
      weights: float32 ``[A]``; agents with weight 0 are excluded (the robust
        aggregators ignore the other weights' values).
      kind: one of ``AGGREGATORS``.
      trim_fraction: ``trimmed_mean``: fraction cut from each end, [0, 0.5).
      noise_scale: ``noisy_median``: standard deviation of the Gaussian noise.
      key: PRNG key, required by ``noisy_median``.

    Returns:
      pytree with leaves ``[...]`` (no agent axis). With no included agent the
      mean is 0 and the medians NaN: callers keep the previous model then.

    Raises:
      ValueError: unknown ``kind`` or ``noisy_median`` without a key.
    """
    include = weights > 0
    if kind == "mean":
        return jax.tree.map(lambda x: _mean(x, weights), params)
    if kind == "median":
        return jax.tree.map(lambda x: _median(x, include), params)
    if kind == "trimmed_mean":
        return jax.tree.map(lambda x: _trimmed_mean(x, include, trim_fraction), params)
    if kind == "noisy_median":
        if key is None:
            raise ValueError("aggregator='noisy_median' needs a PRNG key")
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        noisy = [
            x + noise_scale * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree.map(
            lambda x: _median(x, include), jax.tree.unflatten(treedef, noisy)
        )
    raise ValueError(
        f"aggregator={kind!r} is not valid; accepted: {', '.join(AGGREGATORS)}"
    )


def segment_aggregate(
    x: jax.Array,
    segment_ids: jax.Array,
    include: jax.Array,
    num_segments: int,
    kind: str,
    trim_fraction: float = 0.1,
) -> jax.Array:
    """Coordinate-wise median or trimmed mean of the included rows of every segment.

    The segment-wise form of ``median`` / ``trimmed_mean`` used at every level of
    the group tree (``demjax.hierarchy.aggregate_up``): one sort of ``[K, ...]``
    by (segment, value) per coordinate, then each segment's order statistics are
    gathered at its offsets (median) or read off prefix sums (trimmed mean), so
    memory stays ``O(K D)`` whatever the number of segments (no ``[G, K, D]``
    mask).

    Args:
      x: float32 ``[K, ...]`` rows (agents or child-group models).
      segment_ids: int32 ``[K]`` segment of each row; ids outside
        ``[0, num_segments)`` are dropped.
      include: bool ``[K]``; excluded rows are ignored.
      num_segments: static G.
      kind: ``median`` or ``trimmed_mean`` (Yin et al., ICML 2018).
      trim_fraction: ``trimmed_mean``: ``floor(trim_fraction * k)`` values cut
        from each end of a segment with ``k`` included rows.

    Returns:
      float32 ``[G, ...]``; NaN for a segment without included rows.

    Raises:
      ValueError: ``kind`` is not ``median`` or ``trimmed_mean``.
    """
    if kind not in ("median", "trimmed_mean"):
        raise ValueError(
            f"segment_aggregate kind={kind!r} is not valid; accepted: median, "
            "trimmed_mean"
        )
    k_rows = x.shape[0]
    g = num_segments
    seg = segment_ids.astype(jnp.int32)
    valid = include & (seg >= 0) & (seg < g)
    seg = jnp.where(valid, seg, g)  # excluded rows sort after every segment
    flat = x.reshape(k_rows, -1)
    keys = jnp.broadcast_to(seg[:, None], flat.shape)
    seg_sorted, s = jax.lax.sort((keys, flat), dimension=0, num_keys=2)
    count = jax.ops.segment_sum(valid.astype(jnp.int32), seg, num_segments=g + 1)[:g]
    start = jnp.cumsum(count) - count
    if kind == "median":
        lo = jnp.clip(start + (count - 1) // 2, 0, k_rows - 1)
        hi = jnp.clip(start + count // 2, 0, k_rows - 1)
        out = 0.5 * (s[lo] + s[hi])
    else:
        b = jnp.floor(trim_fraction * count).astype(jnp.int32)
        # Every column sorts the same multiset of segment ids, so the sorted ids
        # (and each position's rank inside its segment) are one [K] vector.
        sid = seg_sorted[:, 0]
        start_x = jnp.concatenate([start, jnp.zeros((1,), start.dtype)])
        count_x = jnp.concatenate([count, jnp.zeros((1,), count.dtype)])
        b_x = jnp.concatenate([b, jnp.zeros((1,), b.dtype)])
        rank = jnp.arange(k_rows, dtype=jnp.int32) - start_x[sid]
        keep = (rank >= b_x[sid]) & (rank < count_x[sid] - b_x[sid])
        total = jax.ops.segment_sum(
            jnp.where(keep[:, None], s, 0.0), sid, num_segments=g + 1
        )[:g]
        out = total / jnp.maximum(count - 2 * b, 1)[:, None].astype(s.dtype)
    out = jnp.where((count > 0)[:, None], out, jnp.nan)
    return out.reshape((g,) + x.shape[1:])
