"""Local (personalized) training of agents: written for ONE agent, vmapped over all.

One agent runs ``local_epochs`` passes over its own ``n`` training samples in
shuffled minibatches of ``batch_size`` (the last minibatch of an epoch may be
smaller), exactly what a per-agent PyTorch ``DataLoader(shuffle=True)`` loop
does. Data are padded to a common capacity ``N_max``; the number of scan steps
is static (``local_epochs * ceil(N_max / batch_size)``) and the steps an agent
does not have (``j * batch_size >= n``) leave its parameters and optimizer state
untouched, so padding never contributes to a gradient.

Objective at each step (Nguyen et al., "Self-organizing Democratized Learning",
IEEE TNNLS, arXiv 2007.03278, Eq. of DemLearn-P; FedProx: Li et al., MLSys 2020,
Eq. 2)::

    mean CE(w; minibatch) + mu / 2 * ||w - anchor||^2

whose gradient adds ``mu * (w - anchor)``; ``mu = 0`` gives plain SGD.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from demjax.errors import ConfigError

# Named here for documentation and errors; any optax optimizer factory whose first
# argument is the learning rate is accepted too (adamw, rmsprop, adagrad, lamb, ...).
_NO_LIMIT = 2**30  # max_steps of an agent that is not a straggler

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad")


def _is_optax_optimizer(name: str) -> bool:
    fn = getattr(optax, name, None)
    if not callable(fn) or name.startswith("_"):
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "learning_rate" in params


def make_optimizer(
    name: str, lr: float, momentum: float = 0.9
) -> optax.GradientTransformation:
    """optax optimizer by name, built with learning rate ``lr``.

    ``sgd`` is plain SGD (the DemLearn reference), ``momentum`` is SGD with
    ``momentum``; any other name is looked up in optax (``adam``, ``adamw``,
    ``rmsprop``, ...) and called as ``optax.<name>(learning_rate=lr)``.
    Optimizer state is kept per agent across rounds.

    Raises:
      ConfigError: ``optimizer`` is not an optax optimizer, or ``lr <= 0``.
    """
    if name not in ("sgd", "momentum") and not _is_optax_optimizer(name):
        raise ConfigError(
            f"optimizer={name!r} is not valid; accepted: "
            f"{', '.join(OPTIMIZERS)} or another optax optimizer name"
        )
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        lr_ok = False
    else:
        lr_ok = 0 < lr < math.inf
    if not lr_ok:
        raise ConfigError(f"lr={lr!r} is not valid; accepted: a finite float > 0")
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=momentum)
    return getattr(optax, name)(learning_rate=lr)


def steps_per_epoch(n_max: int, batch_size: int) -> int:
    """Static number of minibatch slots per epoch for padded capacity ``n_max``."""
    return max(1, math.ceil(n_max / batch_size))


def epoch_permutations(key: jax.Array, n: jax.Array, n_max: int, local_epochs: int):
    """Per-epoch shuffles of one agent's ``n`` real samples.

    Returns:
      int32 ``[local_epochs, n_max]``: row e holds a random permutation of
      ``0..n-1`` in its first ``n`` entries (padding indices after them).
    """
    keys = jax.random.split(key, local_epochs)
    valid = jnp.arange(n_max) < n

    def one(k):
        u = jax.random.uniform(k, (n_max,))
        return jnp.argsort(jnp.where(valid, u, 2.0)).astype(jnp.int32)

    return jax.vmap(one)(keys)


def masked_cross_entropy(logits, labels, mask):
    """Mean softmax cross-entropy over the real (``mask``) rows of a minibatch."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    m = mask.astype(ce.dtype)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def make_train_one(
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    batch_size: int,
    local_epochs: int,
    n_max: int,
    perm_size: int | None = None,
    grad_fn: Callable | None = None,
    exact_steps: bool = False,
) -> Callable:
    """Builds one agent's local training function.

    Args:
      apply_fn: ``apply_fn(params, x [B, ...], train: bool, key) -> logits [B, C]``.
      tx: optax optimizer.
      batch_size: minibatch size B.
      local_epochs: passes over the agent's data.
      n_max: padded per-agent training capacity ``N_max``.
      perm_size: length of the random draws behind each epoch's shuffle
        (default ``n_max``). Bucketed training passes the population's ``N_max``
        so an agent's shuffles do not depend on the bucket it lands in.
      grad_fn: replaces the objective's gradient (plug-in algorithms, e.g.
        pFedMe's Moreau envelope or Per-FedAvg's meta-gradient):
        ``grad_fn(params, xb [B, ...], yb [B], mask bool [B], anchor, mu, key)
        -> (grads, ce)``, ``anchor`` any per-agent pytree the algorithm needs.
        Default: the gradient of ``CE + mu / 2 * ||w - anchor||^2``.
      exact_steps: run exactly the agent's own steps in a loop whose trip count
        is the agent's (``min(local_epochs * ceil(n / B), max_steps)``) instead
        of a scan over all ``local_epochs * ceil(N_max / B)`` step slots with the
        surplus masked. Same results (same steps, shuffles and dropout keys);
        for one agent at a time (the ``sequential`` plan), where it skips the
        padded steps; under ``vmap`` the loop runs to the slowest agent anyway.

    Returns:
      ``train_one(key, params, opt_state, x [N_max, ...], y [N_max], n, anchor, mu)
      -> (params, opt_state, mean_loss)``; ``anchor`` is a params-shaped pytree,
      ``mu`` a float32 scalar (0 disables the proximal term).
    """
    spe = steps_per_epoch(n_max, batch_size)
    total_steps = local_epochs * spe
    pad = spe * batch_size - n_max

    def loss_fn(params, xb, yb, mask, anchor, mu, key):
        logits = apply_fn(params, xb, True, key)
        ce = masked_cross_entropy(logits, yb, mask)
        sq = sum(
            jnp.sum(jnp.square(p - a))
            for p, a in zip(
                jax.tree.leaves(params), jax.tree.leaves(anchor), strict=True
            )
        )
        return ce + 0.5 * mu * sq, ce

    if grad_fn is None:
        grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_one(key, params, opt_state, x, y, n, anchor, mu, max_steps=None):
        perm_key, drop_key = jax.random.split(key)
        perms = epoch_permutations(perm_key, n, perm_size or n_max, local_epochs)
        perms = jnp.minimum(perms[:, :n_max], n_max - 1)
        if pad:
            perms = jnp.pad(perms, ((0, 0), (0, pad)))

        def step(carry, s):
            params, opt_state, loss_sum, n_active = carry
            e, j = s // spe, s % spe
            pos = j * batch_size + jnp.arange(batch_size)
            idx = jax.lax.dynamic_slice(perms[e], (j * batch_size,), (batch_size,))
            mask = pos < n
            active = j * batch_size < n
            if max_steps is not None:  # a straggler stops after max_steps steps
                active = active & (n_active < max_steps)
            grads, ce = grad_fn(
                params,
                x[idx],
                y[idx],
                mask,
                anchor,
                mu,
                jax.random.fold_in(drop_key, s),
            )
            updates, new_opt = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
            params = jax.tree.map(keep, new_params, params)
            opt_state = jax.tree.map(keep, new_opt, opt_state)
            loss_sum = loss_sum + jnp.where(active, ce, 0.0)
            return (params, opt_state, loss_sum, n_active + active), None

        init = (params, opt_state, jnp.float32(0.0), jnp.int32(0))
        if exact_steps:
            # Step i of the agent's own steps is slot (e, j) = divmod(i, k).
            k = jnp.maximum((n + batch_size - 1) // batch_size, 1)
            count = jnp.where(n > 0, local_epochs * k, 0)
            if max_steps is not None:
                count = jnp.minimum(count, max_steps)

            def body(i, carry):
                return step(carry, (i // k) * spe + i % k)[0]

            params, opt_state, loss_sum, n_active = jax.lax.fori_loop(
                0, count, body, init
            )
        else:
            (params, opt_state, loss_sum, n_active), _ = jax.lax.scan(
                step, init, jnp.arange(total_steps)
            )
        return params, opt_state, loss_sum / jnp.maximum(n_active, 1)

    return train_one


def make_train_all(train_one: Callable) -> Callable:
    """Vmaps ``train_one`` over the agent axis (``mu`` shared).

    The optional last argument ``max_steps`` (int32 ``[A]``) caps each agent's
    SGD steps (stragglers); by default every agent does all of its steps.

    Returns:
      ``train_all(keys [A], params [A, ...], opt_state [A, ...], x [A, N_max, ...],
      y [A, N_max], n [A], anchor [A, ...], mu) -> (params, opt_state, loss [A])``.
    """
    vmapped = jax.vmap(train_one, in_axes=(0, 0, 0, 0, 0, 0, 0, None, 0))

    def train_all(keys, params, opt_state, x, y, n, anchor, mu, max_steps=None):
        if max_steps is None:
            max_steps = jnp.full(n.shape, _NO_LIMIT, jnp.int32)
        return vmapped(keys, params, opt_state, x, y, n, anchor, mu, max_steps)

    return train_all


def plan_buckets(steps: np.ndarray, num_buckets: int) -> list[np.ndarray]:
    """Splits agents into at most ``num_buckets`` groups of similar step counts.

    Agents sorted by step count are cut into contiguous buckets minimising the
    total number of step slots ``sum_b |b| * max(steps in b)`` (dynamic
    programming, O(num_buckets * A^2)); every agent of a bucket runs that bucket's
    maximum, the surplus steps masked. One bucket is plain vmap over all agents.

    Args:
      steps: int ``[A]`` SGD steps each agent needs.
      num_buckets: upper bound on buckets (>= 1).

    Returns:
      List of int32 index arrays (agent ids), a partition of ``range(A)``.
    """
    order = np.argsort(steps, kind="stable")
    s = np.asarray(steps)[order]
    a = len(s)
    k = max(1, min(int(num_buckets), a))
    if k == 1 or s[0] == s[-1]:
        # One bucket is optimal (and what the search below returns): skips its
        # O(k A^2) work, 45 s for 100,000 agents.
        return [order.astype(np.int32)]
    inf = float("inf")
    # cost[j][i]: best slots covering the first i sorted agents with j buckets.
    cost = np.full((k + 1, a + 1), inf)
    cut = np.zeros((k + 1, a + 1), np.int64)
    cost[0, 0] = 0.0
    for j in range(1, k + 1):
        for i in range(1, a + 1):
            # last bucket = sorted agents [m, i); its max is s[i - 1].
            m = np.arange(0, i)
            c = cost[j - 1, m] + (i - m) * s[i - 1]
            best = int(np.argmin(c))
            cost[j, i], cut[j, i] = c[best], best
    j = int(np.argmin(cost[1:, a])) + 1
    buckets, i = [], a
    while j > 0 and i > 0:
        m = cut[j, i]
        buckets.append(order[m:i].astype(np.int32))
        i, j = m, j - 1
    return buckets[::-1]


def make_train_population(
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    batch_size: int,
    local_epochs: int,
    n_train: np.ndarray,
    num_buckets: int = 4,
    block_size: int = 0,
    grad_fn: Callable | None = None,
) -> Callable:
    """Local training of the whole population, bucketed by step count.

    Agents hold very different amounts of data (the pathological split ranges from
    22 to 176 training samples), and a single vmap runs every agent for the
    largest agent's number of steps. Grouping agents into a few buckets by step
    count (``plan_buckets``), each a vmap with its own static step count and data
    capacity, cut the step slots of the Fashion-MNIST reference setup from 1,800
    to 1,008. Results equal one vmap over all agents: each agent runs exactly its
    own steps with its own shuffles.

    Training runs in place: a ``lax.fori_loop`` over blocks of agents reads one
    block of parameters, optimizer state, data and anchors, trains it (one vmap)
    and writes the result back into the carried ``[A, ...]`` population. Besides
    the (donated) inputs only one block's temporaries are live, never a second
    stacked copy of the population (``lax.map`` stacked its outputs into a new
    buffer, next to the inputs it kept alive).

    Args:
      apply_fn, tx, batch_size, local_epochs: as in ``make_train_one``.
      n_train: host int ``[A]`` training samples per agent (static: the
        compiled function is specific to these counts).
      num_buckets: at most this many buckets (1 = one vmap).
      block_size: if > 0, agents are trained ``block_size`` at a time, bounding
        the memory of the step temporaries (and of the per-block anchors) to one
        block and running all local steps of a block while its weights are hot
        in cache; 0 = the whole bucket at once. 1 is the ``sequential`` plan:
        agents one after another, unvmapped, each running exactly its own
        steps (``exact_steps``), so buckets are not needed (one is used).
      grad_fn: custom gradient of the local objective (``make_train_one``).

    Returns:
      ``train(keys [A], params [A, ...], opt_state [A, ...], x [A, N_max, ...],
      y [A, N_max], n [A], anchor, mu, max_steps=None, *, start=None,
      finish=None) -> (params, opt_state, loss [A])``.

      ``anchor`` is a params-shaped ``[A, ...]`` pytree or a function
      ``anchor(ids int32 [B]) -> [B, ...]`` giving the anchors of the agents
      ``ids`` (e.g. a gather from the group models, so the ``[A, ...]`` anchors
      are never stacked). ``start`` (same kinds, default ``params``): the
      parameters training starts from. ``finish(ids, new_params, new_opt, loss,
      old_params, old_opt, anchor) -> (params, opt_state, aux)`` post-processes
      a trained block (``aux``: a pytree of ``[B]`` arrays, returned stacked
      ``[A]`` in place of ``loss``).
    """
    n_train = np.asarray(n_train)
    num_agents = len(n_train)
    n_max = int(n_train.max())
    steps = local_epochs * np.ceil(n_train / batch_size).astype(np.int64)
    sequential = block_size == 1
    buckets = plan_buckets(steps, 1 if sequential else num_buckets)
    fns = []
    for idx in buckets:
        cap = int(n_train[idx].max())
        one = make_train_one(
            apply_fn,
            tx,
            batch_size=batch_size,
            local_epochs=local_epochs,
            n_max=cap,
            perm_size=n_max,
            grad_fn=grad_fn,
            exact_steps=sequential,
        )
        train_block = _one_at_a_time(one) if sequential else make_train_all(one)
        fns.append((idx, cap, train_block))

    def train(
        keys, params, opt_state, x, y, n, anchor, mu, max_steps=None, *,
        start=None, finish=None,
    ):  # fmt: skip
        if max_steps is None:
            max_steps = jnp.full(n.shape, _NO_LIMIT, jnp.int32)
        if finish is None:
            finish = lambda ids, p, o, loss, *_: (p, o, loss)  # noqa: E731
        carry = (params, opt_state, None)
        for idx, cap, fn in fns:
            carry = _train_bucket(
                fn, idx, cap, block_size, num_agents, carry,
                keys, x, y, n, anchor, mu, max_steps, start, finish,
            )  # fmt: skip
        return carry

    train.buckets = buckets
    return train


def shard_counts(n_train: np.ndarray, mesh) -> np.ndarray:
    """Static training-sample counts of one shard's program: ``[A / D]``, the
    largest count at each position of the D shards of the ``agents`` mesh
    (``n_train`` itself without a mesh). Each agent still runs exactly its own
    count at run time (``n`` is dynamic)."""
    n_train = np.asarray(n_train)
    shards = 1 if mesh is None else int(mesh.devices.size)
    return n_train.reshape(shards, -1).max(axis=0)


def shard_population(train: Callable, mesh) -> Callable:
    """A ``make_train_population`` trainer run under ``jax.shard_map``: each
    device of the ``agents`` mesh trains its own contiguous A / D agents with
    the run's local plan (``train`` compiled for one shard: its static sample
    counts are the largest of each shard position, ``n`` exact per agent at run
    time), as ``demjax.engine.Simulator``'s local phase does for the
    hierarchical family. Without it XLA's partitioner would split a block of
    agents or a loop over agents across devices.

    Args:
      train: ``make_train_population``'s function for A / D agents (with
        ``shard_counts``).
      mesh: the 1-D ``agents`` mesh (``demjax.sharding``) of D devices.

    Returns:
      ``train(keys [A], params [A, ...], opt_state [A, ...], x [A, ...], y [A,
      ...], n [A], anchor [A, ...], mu, max_steps=None) -> (params, opt_state,
      loss [A])``: every argument but ``mu`` (replicated) carries the leading
      agent axis, split over the devices.

    Raises:
      ValueError: ``start``, ``finish`` or an ``anchor`` function (their agent
        ids are global; only the engine's own local phase uses them).
    """
    from jax.sharding import PartitionSpec as P

    from demjax import sharding

    shard = P(sharding.AXIS)

    def body(keys, params, opt_state, x, y, n, anchor, mu, max_steps):
        return train(keys, params, opt_state, x, y, n, anchor, mu, max_steps)

    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(shard,) * 7 + (P(), shard),
        out_specs=(shard, shard, shard),
        check_vma=False,
    )

    def run(keys, params, opt_state, x, y, n, anchor, mu, max_steps=None, *,
            start=None, finish=None):  # fmt: skip
        if start is not None or finish is not None or callable(anchor):
            raise ValueError(
                "a shard-mapped population trainer takes [A, ...] arrays only: "
                "no start, finish or anchor function"
            )
        if max_steps is None:
            max_steps = jnp.full(n.shape, _NO_LIMIT, jnp.int32)
        mu = jax.tree.map(jnp.asarray, mu)
        return fn(keys, params, opt_state, x, y, n, anchor, mu, max_steps)

    run.buckets = train.buckets
    return run


def _one_at_a_time(train_one: Callable) -> Callable:
    """``train_all``'s signature for a block of ONE agent, without ``vmap``:
    the leading axis of size 1 is dropped before ``train_one`` and restored
    after, so the agent's matmuls are plain 2-D GEMMs."""

    def train_block(keys, params, opt_state, x, y, n, anchor, mu, max_steps):
        first = lambda t: jax.tree.map(lambda v: v[0], t)  # noqa: E731
        out = train_one(
            keys[0], first(params), first(opt_state), x[0], y[0], n[0],
            first(anchor), mu, max_steps[0],
        )  # fmt: skip
        return jax.tree.map(lambda v: v[None], out)

    return train_block


def _rows(tree, ids, offset):
    """Rows ``ids`` of every leaf of ``tree``: a ``dynamic_slice`` at ``offset``
    when ``ids`` are contiguous (``offset`` not None), else a gather."""
    if callable(tree):
        return tree(ids)
    if offset is None:
        return jax.tree.map(lambda v: v[ids], tree)
    size = ids.shape[0]
    return jax.tree.map(
        lambda v: jax.lax.dynamic_slice_in_dim(v, offset, size, axis=0), tree
    )


def _set_rows(tree, rows, ids, offset):
    """``tree`` with rows ``ids`` replaced by ``rows`` (in place in a loop carry)."""
    if offset is None:
        return jax.tree.map(lambda v, r: v.at[ids].set(r), tree, rows)
    return jax.tree.map(
        lambda v, r: jax.lax.dynamic_update_slice_in_dim(v, r, offset, axis=0),
        tree,
        rows,
    )


def _train_bucket(fn, idx, cap, block_size, num_agents, carry,
                  keys, x, y, n, anchor, mu, max_steps, start, finish):  # fmt: skip
    """Trains the agents ``idx`` block by block into ``carry = (params,
    opt_state, aux)`` (``aux`` None until the first block fixes its shapes).

    Blocks are ``ids = idx[s : s + B]`` with ``s = min(b * B, len(idx) - B)``:
    the last block is shifted back instead of padded, and its rows that an
    earlier block already trained are written back unchanged.
    """
    size = len(idx)
    bsz = min(block_size, size) if block_size > 0 else size
    num_blocks = -(-size // bsz)
    contiguous = bool(np.array_equal(idx, np.arange(idx[0], idx[0] + size)))
    idx_all = jnp.asarray(idx, jnp.int32)

    def block(b, carry):
        params, opt_state, aux = carry
        s = jnp.minimum(b * bsz, size - bsz)
        ids = jax.lax.dynamic_slice_in_dim(idx_all, s, bsz)
        off = s + int(idx[0]) if contiguous else None
        fresh = s + jnp.arange(bsz) >= b * bsz
        old_p, old_o = _rows(params, ids, off), _rows(opt_state, ids, off)
        anc = _rows(anchor, ids, off)
        p0 = old_p if start is None else _rows(start, ids, off)
        xb, yb = _rows(x, ids, off), _rows(y, ids, off)
        if cap != x.shape[1]:
            xb, yb = xb[:, :cap], yb[:, :cap]
        new_p, new_o, loss = fn(
            _rows(keys, ids, off), p0, old_o, xb, yb, _rows(n, ids, off),
            anc, mu, _rows(max_steps, ids, off),
        )  # fmt: skip
        new_p, new_o, out = finish(ids, new_p, new_o, loss, old_p, old_o, anc)

        def keep(new, old):
            return jnp.where(fresh.reshape((bsz,) + (1,) * (new.ndim - 1)), new, old)

        params = _set_rows(params, jax.tree.map(keep, new_p, old_p), ids, off)
        opt_state = _set_rows(opt_state, jax.tree.map(keep, new_o, old_o), ids, off)
        if aux is not None:
            out = jax.tree.map(keep, out, _rows(aux, ids, off))
            aux = _set_rows(aux, out, ids, off)
        return params, opt_state, aux, out

    params, opt_state, aux = carry
    if aux is None:  # shapes of ``finish``'s aux, from an abstract block
        out = jax.eval_shape(lambda c: block(0, c)[3], (params, opt_state, None))
        aux = jax.tree.map(
            lambda v: jnp.zeros((num_agents,) + v.shape[1:], v.dtype), out
        )
    return jax.lax.fori_loop(
        0, num_blocks, lambda b, c: block(b, c)[:3], (params, opt_state, aux)
    )
