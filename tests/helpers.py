"""Small builders shared by the test modules (not a test module)."""

from __future__ import annotations

import os
import sys

import numpy as np

from demjax.types import Partition

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from configs import default  # noqa: E402


def tiny_config(*, num_agents: int = 8, num_rounds: int = 2, **overrides):
    """``configs/default.py`` cut to seconds: an MLR on the embedded digits, one
    local epoch, no progress bar; ``overrides`` set fields, dotted keys
    (``"network.topology"``) set fields of a sub-config. Modules fix their own
    defaults with ``functools.partial``; a caller's keyword wins over them."""
    c = default.get_config()
    c.num_agents, c.num_rounds = num_agents, num_rounds
    c.model, c.progress, c.local_epochs = "mlr", False, 1
    for k, v in overrides.items():
        group, _, field = k.rpartition(".")
        (c[group] if group else c)[field] = v
    return c


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
