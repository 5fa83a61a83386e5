"""A held-out validation split of the agents' training data, for tuning.

Hyper-parameters must be chosen without looking at the test data. With
``config.val_fraction = f > 0`` every agent's training rows are split in two: a
seeded random ``round(f * n_a)`` of them (at least one) become the agent's
evaluation rows, the others stay its training rows (in their order). The test
rows of the partition are dropped, so nothing a run reports can depend on them:
C-SPE is then the mean accuracy of the agents' models on their own validation
rows, C-GEN and Global use the pooled validation rows. ``benchmarks/tune.py``
picks hyper-parameters by this validation C-SPE and the comparison tables then
run on the real test split (``val_fraction = 0``).
"""

from __future__ import annotations

import numpy as np

from demjax.errors import ConfigError
from demjax.types import Partition


def num_held_out(n_train: np.ndarray, fraction: float) -> np.ndarray:
    """int ``[A]``: validation rows per agent, ``round(fraction * n)``, at least
    one; 0 everywhere when ``fraction == 0``."""
    n = np.asarray(n_train, np.int64)
    if fraction == 0.0:
        return np.zeros_like(n)
    return np.maximum(np.rint(fraction * n).astype(np.int64), 1)


def held_masks(n_train, fraction: float, seed: int) -> list[np.ndarray]:
    """Per agent a bool ``[n_a]``: which of its training rows are held out.

    Raises:
      ConfigError: ``val_fraction`` outside ``[0, 1)``, or an agent would keep
        no training row (the message names the agent and its row count).
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(
            f"val_fraction={fraction!r} is not valid; accepted: a number in [0, 1)"
        )
    n_train = np.asarray(n_train, np.int64)
    k = num_held_out(n_train, fraction)
    bad = np.flatnonzero(n_train - k < 1)
    if bad.size:
        a = int(bad[0])
        raise ConfigError(
            f"val_fraction={fraction} leaves agent {a} ({int(n_train[a])} training "
            "rows) no training row; accepted: a smaller val_fraction or more samples "
            "per agent"
        )
    rng = np.random.default_rng(seed)
    masks = []
    for n, m in zip(n_train, k, strict=True):
        held = np.zeros(int(n), bool)
        held[rng.choice(int(n), size=int(m), replace=False)] = True
        masks.append(held)
    return masks


def hold_out_indices(splits, fraction: float, seed: int) -> list:
    """``hold_out`` on pool indices: A pairs ``(train_idx, test_idx)`` -> A pairs
    ``(kept train_idx, held-out train_idx)``, the same rows ``hold_out`` picks
    from the partition ``stack_partition`` builds of ``splits``."""
    if fraction == 0.0:
        return list(splits)
    trains = [np.asarray(tr) for tr, _ in splits]
    masks = held_masks([t.shape[0] for t in trains], fraction, seed)
    return [(t[~m], t[m]) for t, m in zip(trains, masks, strict=True)]


def hold_out(part: Partition, fraction: float, seed: int) -> Partition:
    """The partition whose evaluation rows are held-out training rows.

    Args:
      part: a host ``Partition`` (numpy arrays; A agents).
      fraction: share of each agent's training rows held out, in ``[0, 1)``;
        0 returns ``part`` unchanged.
      seed: seeds the choice of rows (one ``numpy`` generator, agents in order).

    Returns:
      A ``Partition`` with ``x_train``/``y_train``/``n_train`` the kept rows (in
      their order), ``x_test``/``y_test``/``n_test`` the held-out rows (in their
      order), ``x_all``/``y_all``/``owner_all`` the held-out rows pooled in agent
      order; the original test rows are not in it.

    Raises:
      ConfigError: ``val_fraction`` outside ``[0, 1)``, or an agent would keep
        no training row (the message names the agent and its row count).
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(
            f"val_fraction={fraction!r} is not valid; accepted: a number in [0, 1)"
        )
    if fraction == 0.0:
        return part
    n_train = np.asarray(part.n_train)
    k = num_held_out(n_train, fraction)
    masks = held_masks(n_train, fraction, seed)
    x, y = np.asarray(part.x_train), np.asarray(part.y_train)
    num_agents, feat = x.shape[0], x.shape[2:]
    keep_n, val_n = n_train - k, k
    x_tr = np.zeros((num_agents, int(keep_n.max()), *feat), x.dtype)
    y_tr = np.zeros((num_agents, int(keep_n.max())), y.dtype)
    x_va = np.zeros((num_agents, int(val_n.max()), *feat), x.dtype)
    y_va = np.zeros((num_agents, int(val_n.max())), y.dtype)
    for a in range(num_agents):  # host-side data preparation, once per run
        n, held = int(n_train[a]), masks[a]
        x_tr[a, : keep_n[a]], y_tr[a, : keep_n[a]] = x[a, :n][~held], y[a, :n][~held]
        x_va[a, : val_n[a]], y_va[a, : val_n[a]] = x[a, :n][held], y[a, :n][held]
    rows = [x_va[a, : val_n[a]] for a in range(num_agents)]
    labels = [y_va[a, : val_n[a]] for a in range(num_agents)]
    return Partition(
        x_train=x_tr,
        y_train=y_tr,
        n_train=keep_n.astype(np.int32),
        x_test=x_va,
        y_test=y_va,
        n_test=val_n.astype(np.int32),
        x_all=np.concatenate(rows).astype(np.float32),
        y_all=np.concatenate(labels).astype(np.int32),
        owner_all=np.repeat(np.arange(num_agents, dtype=np.int32), val_n),
        num_classes=part.num_classes,
    )
