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
    wb = w.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sum(x * wb, axis=0) / jnp.maximum(jnp.sum(w), 1e-12)


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
