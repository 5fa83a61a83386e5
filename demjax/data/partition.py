"""Dealing a data pool out to agents, each with its own train/test split.

All partitioners are pure numpy and deterministic given the integer ``seed``
(one ``np.random.default_rng(seed)`` drives every draw). Each agent's samples
are shuffled and split into its first ``int(train_fraction * n)`` samples for
training and the rest for testing; every agent gets at least one of each, or a
``ConfigError`` says how many agents fit. Agents are never dropped silently.

Methods:

- ``pathological``: the label-skewed split of DemLearn (Nguyen et al.,
  "Self-organizing Democratized Learning: Towards Large-scale Distributed
  Learning Systems", IEEE TNNLS, arXiv 2007.03278), after the authors' data
  generator. Agent u holds the labels ``(u + j) % C`` for j < labels_per_agent.
- ``dirichlet``: each class is split among the agents by proportions drawn from
  ``Dirichlet(dirichlet_alpha * ones(A))``.
- ``iid``: the shuffled pool is dealt out in equal shares.
"""

from __future__ import annotations

import numpy as np

from demjax.errors import ConfigError, check_choice
from demjax.types import Partition

PARTITIONS = ("pathological", "dirichlet", "iid")
"""Methods of ``partition`` (dealing a pool out); ``CONFIG_PARTITIONS`` (also
``demjax.data.PARTITIONS``) adds the natural, file and array partitions."""
CONFIG_PARTITIONS = (*PARTITIONS, "natural", "file", "arrays")
"""Accepted values of ``config.partition``."""

_DIRICHLET_TRIES = 100


def partition_indices(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    num_agents: int,
    method: str = "pathological",
    seed: int = 0,
    labels_per_agent: int = 2,
    dirichlet_alpha: float = 0.5,
    base_per_label: int = 10,
    pool_fraction: float = 0.055,
    samples_per_agent: int | None = None,
    train_fraction: float = 0.8,
    dataset_name: str | None = None,
) -> Partition:
    """Deals the pool ``(x, y)`` out to ``num_agents`` agents.

    ``pathological`` (DemLearn; Nguyen et al., "Self-organizing Democratized
    Learning", IEEE TNNLS, arXiv 2007.03278, after the authors' data
    generator). Agent u holds labels ``(u + j) % C`` for ``j`` in
    ``range(labels_per_agent)``; each (agent, j) pair is a *slot* of that label.
    Draws, in this order: each label's pool is shuffled (``rng.permutation``,
    labels 0..C-1); then slot weights ``w = rng.lognormal(0, 1, (A, K))``; then
    each agent's samples are shuffled (``rng.permutation``, agents in order).

    1. First pass: every slot takes ``base_per_label`` samples of its label, in
       slot order (agent-major). If a label's pool cannot serve all its slots,
       each of its slots takes ``pool_l // slots_l`` instead.
    2. Second pass: with ``remaining_l`` the samples of label l left after the
       first pass, each slot of label l takes
       ``int(pool_fraction * remaining_l * w_slot / sum(w over slots of l))``
       more (again in slot order).

    The reference scales a lognormal weight matrix of 100 slots by 0.55 but only
    10 of the slots are used, so its effective fraction is 0.55 * 10 / 100 =
    0.055, the default ``pool_fraction``. For 50 agents on Fashion-MNIST this
    gives about 4800 samples in all and a median of ~80 per agent.
    ``samples_per_agent``, if set, caps each agent after its shuffle.

    ``dirichlet``: if ``samples_per_agent`` is set, a uniform subsample of
    ``min(N, samples_per_agent * A)`` samples is drawn first. Each class's
    samples are shuffled and cut among the agents by proportions
    ``p ~ Dirichlet(dirichlet_alpha * ones(A))``. The draw is repeated (up to
    100 times) until every agent has enough samples for a train and a test
    sample; if it never does, the smallest agents take random samples from the
    largest ones.

    ``iid``: the pool is shuffled and dealt out in equal shares of
    ``N // A`` samples (``samples_per_agent`` each if set and it fits).

    Args:
      x: float32 ``[N, H, W, C]`` inputs (any ``[N, *F]`` works).
      y: int ``[N]`` labels in ``[0, num_classes)``.
      num_classes: C.
      num_agents: A >= 2.
      method: one of ``PARTITIONS``.
      seed: seed of ``np.random.default_rng``.
      labels_per_agent: K, labels per agent (``pathological``), 1..C.
      dirichlet_alpha: concentration (``dirichlet``), > 0.
      base_per_label: first-pass samples per slot (``pathological``), >= 0.
      pool_fraction: second-pass fraction (``pathological``), in [0, 1].
      samples_per_agent: per-agent cap / budget; None or 0 means no limit.
      train_fraction: each agent trains on ``int(train_fraction * n)`` of its
        ``n`` samples and tests on the rest, in (0, 1).
      dataset_name: only used to name the data set in error messages.

    Returns:
      A list of A pairs ``(train_idx, test_idx)``: int64 ``[n_train_a]`` and
      ``[n_test_a]`` indices into the pool ``(x, y)``, each agent's in its
      shuffled order (the rows ``stack_partition`` lays out).

    Raises:
      ConfigError: an unknown ``method`` (field ``partition``), a parameter out
        of range (the message names it), or more agents than the data can give
        one train and one test sample each (field ``num_agents``, with the
        maximum that fits).
    """
    check_choice("partition", method, PARTITIONS)
    x = np.asarray(x)
    y = np.asarray(y)
    num_classes = int(num_classes)
    _validate(
        x,
        y,
        num_classes,
        num_agents,
        labels_per_agent,
        dirichlet_alpha,
        base_per_label,
        pool_fraction,
        samples_per_agent,
        train_fraction,
    )
    cap = int(samples_per_agent) if samples_per_agent else None
    n_min = _min_samples(train_fraction)
    what = f"dataset {dataset_name}" if dataset_name else f"{y.shape[0]} samples"
    rng = np.random.default_rng(seed)

    if method == "pathological":
        counts = np.bincount(y, minlength=num_classes)
        max_fit = _pathological_max_agents(
            counts, labels_per_agent, base_per_label, n_min
        )
        if num_agents > max_fit:
            raise _too_many(num_agents, max_fit, what, method)
        if cap is not None and cap < n_min:
            raise _cap_too_small(cap, n_min)
        agents = _pathological(
            y,
            num_classes,
            num_agents,
            labels_per_agent,
            base_per_label,
            pool_fraction,
            rng,
        )
    elif method == "dirichlet":
        max_fit = y.shape[0] // n_min
        if num_agents > max_fit:
            raise _too_many(num_agents, max_fit, what, method)
        if cap is not None and cap < n_min:
            raise _cap_too_small(cap, n_min)
        agents = _dirichlet(
            y, num_classes, num_agents, dirichlet_alpha, cap, n_min, rng
        )
        cap = None  # Already used as the overall budget.
    else:
        max_fit = y.shape[0] // n_min
        if num_agents > max_fit:
            raise _too_many(num_agents, max_fit, what, method)
        if cap is not None and cap < n_min:
            raise _cap_too_small(cap, n_min)
        agents = _iid(y.shape[0], num_agents, cap, rng)
        cap = None

    splits = []
    for idx in agents:
        idx = idx[rng.permutation(idx.shape[0])]
        if cap is not None:
            idx = idx[:cap]
        n_tr = int(train_fraction * idx.shape[0])
        splits.append((idx[:n_tr], idx[n_tr:]))
    sizes = [(tr.shape[0], te.shape[0]) for tr, te in splits]
    if min(min(s) for s in sizes) < 1:  # Guarded by the checks above.
        raise ConfigError(
            f"num_agents={num_agents} is too many for {what} with "
            f"partition={method}: some agent gets no train or no test sample"
        )
    return splits


def partition(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    num_agents: int,
    method: str = "pathological",
    seed: int = 0,
    **kwargs,
) -> Partition:
    """Deals the pool ``(x, y)`` out to ``num_agents`` agents, stacked.

    ``stack_partition(x, y, partition_indices(x, y, ...), num_classes)``: the
    methods, draws, arguments and errors are those of ``partition_indices``.

    Returns:
      A ``Partition`` of numpy arrays: ``x_train`` float32
      ``[A, N_train_max, *F]``, ``y_train`` int32 ``[A, N_train_max]``,
      ``n_train`` int32 ``[A]``, the same for test, and the pooled test set
      ``x_all`` float32 ``[M, *F]``, ``y_all`` / ``owner_all`` int32 ``[M]``
      (all agents' real test samples in agent order, with the owning agent).
      Real rows come first in each agent's block; padding rows are zero.

    Raises:
      ConfigError: as ``partition_indices``.
    """
    splits = partition_indices(
        x, y, num_classes, num_agents, method=method, seed=seed, **kwargs
    )
    return stack_partition(x, y, splits, num_classes)


def _validate(
    x,
    y,
    num_classes,
    num_agents,
    labels_per_agent,
    dirichlet_alpha,
    base_per_label,
    pool_fraction,
    samples_per_agent,
    train_fraction,
):
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ConfigError(
            f"x has shape {x.shape} and y has shape {y.shape}; accepted: x "
            "[N, *F] and y [N] with the same N"
        )
    if num_classes < 1:
        raise ConfigError(f"num_classes={num_classes} is not valid; accepted: >= 1")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(
            f"y has labels in [{y.min()}, {y.max()}]; accepted: 0..{num_classes - 1} "
            f"(num_classes={num_classes})"
        )
    if not isinstance(num_agents, (int, np.integer)) or num_agents < 2:
        raise ConfigError(
            f"num_agents={num_agents!r} is not valid; accepted: an integer >= 2"
        )
    if not (
        isinstance(labels_per_agent, (int, np.integer))
        and 1 <= labels_per_agent <= num_classes
    ):
        raise ConfigError(
            f"labels_per_agent={labels_per_agent!r} is not valid; accepted: an "
            f"integer in 1..{num_classes} (num_classes)"
        )
    if not dirichlet_alpha > 0:
        raise ConfigError(
            f"dirichlet_alpha={dirichlet_alpha!r} is not valid; accepted: > 0"
        )
    if not (isinstance(base_per_label, (int, np.integer)) and base_per_label >= 0):
        raise ConfigError(
            f"base_per_label={base_per_label!r} is not valid; accepted: an integer >= 0"
        )
    if not 0 <= pool_fraction <= 1:
        raise ConfigError(
            f"pool_fraction={pool_fraction!r} is not valid; accepted: 0..1"
        )
    if samples_per_agent is not None and (
        not isinstance(samples_per_agent, (int, np.integer)) or samples_per_agent < 0
    ):
        raise ConfigError(
            f"samples_per_agent={samples_per_agent!r} is not valid; accepted: an "
            "integer >= 0 (0 or None: no limit)"
        )
    if not 0 < train_fraction < 1:
        raise ConfigError(
            f"train_fraction={train_fraction!r} is not valid; accepted: strictly "
            "between 0 and 1"
        )


def _min_samples(train_fraction: float) -> int:
    """Smallest n with at least one train and one test sample after the split."""
    n = max(2, int(1.0 / train_fraction) - 1)
    while int(train_fraction * n) < 1:
        n += 1
    return n


def _too_many(num_agents, max_fit, what, method) -> ConfigError:
    return ConfigError(
        f"num_agents={num_agents} is too many for {what} with partition={method}: "
        f"at most {max_fit} agents get 1 train and 1 test sample"
    )


def _cap_too_small(cap, n_min) -> ConfigError:
    return ConfigError(
        f"samples_per_agent={cap} is too small; accepted: >= {n_min} (1 train and "
        "1 test sample) or 0 for no limit"
    )


def _slot_labels(num_agents: int, labels_per_agent: int, num_classes: int):
    """int ``[A, K]``: the label of each (agent, j) slot, ``(u + j) % C``."""
    return (np.arange(num_agents)[:, None] + np.arange(labels_per_agent)) % num_classes


def _pathological_base(counts, num_agents, labels_per_agent, base_per_label):
    """First-pass samples per slot of each label, int ``[C]``, and slots per label."""
    slots = _slot_labels(num_agents, labels_per_agent, counts.shape[0])
    per_label = np.bincount(slots.reshape(-1), minlength=counts.shape[0])
    base = np.minimum(base_per_label, counts // np.maximum(per_label, 1))
    return base, slots


def _pathological_fits(counts, num_agents, labels_per_agent, base_per_label, n_min):
    base, slots = _pathological_base(
        counts, num_agents, labels_per_agent, base_per_label
    )
    return int(base[slots].sum(axis=1).min()) >= n_min


def _pathological_max_agents(counts, labels_per_agent, base_per_label, n_min):
    """Largest A whose first pass alone gives every agent ``n_min`` samples.

    The first-pass share of every agent only shrinks as agents are added, so
    this is a binary search. The second pass only adds samples.
    """
    hi = int(counts.sum()) // n_min
    if hi < 1 or not _pathological_fits(
        counts, 1, labels_per_agent, base_per_label, n_min
    ):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _pathological_fits(counts, mid, labels_per_agent, base_per_label, n_min):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _pathological(
    y, num_classes, num_agents, labels_per_agent, base_per_label, pool_fraction, rng
):
    counts = np.bincount(y, minlength=num_classes)
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in range(num_classes)]
    weights = rng.lognormal(0.0, 1.0, size=(num_agents, labels_per_agent))
    base, slots = _pathological_base(
        counts, num_agents, labels_per_agent, base_per_label
    )
    ptr = np.zeros(num_classes, dtype=np.int64)
    taken = [[None] * labels_per_agent for _ in range(num_agents)]
    for u in range(num_agents):
        for j in range(labels_per_agent):
            c = slots[u, j]
            taken[u][j] = pools[c][ptr[c] : ptr[c] + base[c]]
            ptr[c] += base[c]
    remaining = counts - ptr
    wsum = np.zeros(num_classes)
    np.add.at(wsum, slots.reshape(-1), weights.reshape(-1))
    for u in range(num_agents):
        for j in range(labels_per_agent):
            c = slots[u, j]
            extra = int(pool_fraction * remaining[c] * weights[u, j] / wsum[c])
            extra = min(extra, counts[c] - ptr[c])  # Float safety only.
            taken[u][j] = np.concatenate(
                [taken[u][j], pools[c][ptr[c] : ptr[c] + extra]]
            )
            ptr[c] += extra
    return [np.concatenate(t) for t in taken]


def _dirichlet_draw(y, num_classes, num_agents, alpha, rng):
    parts = [[] for _ in range(num_agents)]
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(num_agents, alpha))
        cuts = (np.cumsum(p)[:-1] * idx.shape[0]).astype(np.int64)
        for a, chunk in enumerate(np.split(idx, cuts)):
            parts[a].append(chunk)
    return [np.concatenate(p) for p in parts]


def _dirichlet(y, num_classes, num_agents, alpha, cap, n_min, rng):
    pool = np.arange(y.shape[0])
    if cap is not None and cap * num_agents < y.shape[0]:
        pool = np.sort(rng.choice(y.shape[0], cap * num_agents, replace=False))
    y_pool = y[pool]
    for _ in range(_DIRICHLET_TRIES):
        agents = _dirichlet_draw(y_pool, num_classes, num_agents, alpha, rng)
        if min(a.shape[0] for a in agents) >= n_min:
            break
    else:
        # Too many small agents for redrawing: the smallest agents take random
        # samples from the largest ones until each has n_min.
        for a in range(num_agents):
            while agents[a].shape[0] < n_min:
                donor = int(np.argmax([b.shape[0] for b in agents]))
                k = int(rng.integers(agents[donor].shape[0]))
                agents[a] = np.append(agents[a], agents[donor][k])
                agents[donor] = np.delete(agents[donor], k)
    return [pool[a] for a in agents]


def _iid(n, num_agents, cap, rng):
    share = n // num_agents
    if cap is not None:
        share = min(share, cap)
    order = rng.permutation(n)
    return [order[a * share : (a + 1) * share] for a in range(num_agents)]


def stack_partition(x, y, splits, num_classes: int) -> Partition:
    """Stacks per-agent index lists into a padded ``Partition``.

    Args:
      x: float ``[N, *F]`` pool inputs (cast to float32).
      y: int ``[N]`` pool labels in ``[0, num_classes)``.
      splits: A pairs ``(train_idx, test_idx)`` of int indices into the pool;
        every agent needs at least one of each (not checked here; see
        ``demjax.data.split.partition_from_arrays`` for a validated entry).
      num_classes: C.

    Returns:
      A ``Partition``: ``x_train`` float32 ``[A, N_train_max, *F]``, ``y_train``
      int32 ``[A, N_train_max]``, ``n_train`` int32 ``[A]``, the same for test,
      and the pooled test set ``x_all`` float32 ``[M, *F]``, ``y_all`` /
      ``owner_all`` int32 ``[M]`` (all test samples in agent order). Real rows
      come first in each agent's block, in index order; padding rows are zero.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    splits = [(np.asarray(tr, np.int64), np.asarray(te, np.int64)) for tr, te in splits]
    feat = x.shape[1:]
    num_agents = len(splits)
    n_train = np.array([tr.shape[0] for tr, _ in splits], dtype=np.int32)
    n_test = np.array([te.shape[0] for _, te in splits], dtype=np.int32)
    x_train = np.zeros((num_agents, int(n_train.max()), *feat), dtype=np.float32)
    y_train = np.zeros((num_agents, int(n_train.max())), dtype=np.int32)
    x_test = np.zeros((num_agents, int(n_test.max()), *feat), dtype=np.float32)
    y_test = np.zeros((num_agents, int(n_test.max())), dtype=np.int32)
    for a, (tr, te) in enumerate(splits):
        x_train[a, : tr.shape[0]] = x[tr]
        y_train[a, : tr.shape[0]] = y[tr]
        x_test[a, : te.shape[0]] = x[te]
        y_test[a, : te.shape[0]] = y[te]
    test_idx = np.concatenate([te for _, te in splits])
    return Partition(
        x_train=x_train,
        y_train=y_train,
        n_train=n_train,
        x_test=x_test,
        y_test=y_test,
        n_test=n_test,
        x_all=np.asarray(x[test_idx], dtype=np.float32),
        y_all=np.asarray(y[test_idx], dtype=np.int32),
        owner_all=np.repeat(np.arange(num_agents, dtype=np.int32), n_test),
        num_classes=int(num_classes),
    )
