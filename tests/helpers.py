"""Small builders shared by the plug-in tests (not a test module)."""

from __future__ import annotations

import numpy as np

from demjax.types import Partition


def train_is_test_partition(x, y, n_train, num_classes: int) -> Partition:
    """A partition whose test set is its training set and whose pooled test set is
    every agent's padded rows (owner = agent).

    Args:
      x: float32 ``[A, N, F]``; y: int32 ``[A, N]``; n_train: int32 ``[A]`` real rows.
    """
    a, n, f = x.shape
    return Partition(
        x_train=x,
        y_train=y,
        n_train=n_train,
        x_test=x,
        y_test=y,
        n_test=n_train,
        x_all=x.reshape(-1, f),
        y_all=y.reshape(-1),
        owner_all=np.repeat(np.arange(a), n).astype(np.int32),
        num_classes=num_classes,
    )


def mlr_numpy(params, i=None):
    """An MLR's (kernel, bias) in float64: all agents', or agent ``i``'s."""
    d = params["Dense_0"]
    k, b = np.asarray(d["kernel"], np.float64), np.asarray(d["bias"], np.float64)
    return (k, b) if i is None else (k[i], b[i])
