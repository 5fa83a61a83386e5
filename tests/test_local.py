"""Vmapped local training vs an explicit per-agent Python loop on unpadded data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from demjax import local, models


def per_agent_reference(
    apply_fn, params, x, y, n, anchor, mu, key, lr, batch_size, epochs
):
    """One agent, no padding: real minibatches (last one smaller), plain SGD (the
    gradient jitted: one program per minibatch size instead of one per op)."""
    perm_key, _ = jax.random.split(key)
    perms = np.asarray(local.epoch_permutations(perm_key, n, x.shape[0], epochs))
    xs, ys = np.asarray(x[:n]), np.asarray(y[:n])

    def loss(p, xb, yb):
        logits = apply_fn(p, xb)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        prox = sum(
            jnp.sum((a - b) ** 2)
            for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(anchor), strict=True)
        )
        return ce + 0.5 * mu * prox

    grad = jax.jit(jax.grad(loss))
    for e in range(epochs):
        order = perms[e, :n]
        assert sorted(order.tolist()) == list(
            range(n)
        )  # a permutation of the real rows
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            g = grad(params, xs[idx], ys[idx])
            params = jax.tree.map(lambda p, gi: p - lr * gi, params, g)
    return params


@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_vmapped_training_equals_per_agent_loop(mu):
    num_agents, n_max, batch_size, epochs, lr = 4, 13, 4, 2, 0.1
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_agents, n_max, 2, 2, 1)).astype(np.float32)
    y = rng.integers(0, 3, size=(num_agents, n_max)).astype(np.int32)
    n = np.array([13, 5, 1, 8], np.int32)
    # Garbage in the padding: it must never reach a gradient.
    for a in range(num_agents):
        x[a, n[a] :] = 1e3
        y[a, n[a] :] = 2
    model = models.make_model("mlr", 3)
    params = models.init_population(jax.random.PRNGKey(0), model, (2, 2, 1), num_agents)
    params = jax.tree.map(
        lambda p: (
            p
            + 0.1
            * jnp.arange(num_agents, dtype=p.dtype).reshape((-1,) + (1,) * (p.ndim - 1))
        ),
        params,
    )
    anchor = jax.tree.map(lambda p: p * 0.5 + 0.2, params)
    apply_fn = lambda p, xb, train=False, key=None: model.apply({"params": p}, xb)  # noqa: E731
    tx = optax.sgd(lr)
    train_one = local.make_train_one(
        apply_fn, tx, batch_size=batch_size, local_epochs=epochs, n_max=n_max
    )
    train_all = jax.jit(local.make_train_all(train_one))
    keys = jax.random.split(jax.random.PRNGKey(1), num_agents)
    opt_state = jax.vmap(tx.init)(params)
    new, _, loss = train_all(keys, params, opt_state, x, y, n, anchor, jnp.float32(mu))
    assert np.all(np.isfinite(loss))
    for a in range(num_agents):
        take = lambda t, a=a: jax.tree.map(lambda p: p[a], t)  # noqa: E731
        ref = per_agent_reference(
            lambda p, xb: apply_fn(p, xb),
            take(params),
            x[a],
            y[a],
            int(n[a]),
            take(anchor),
            mu,
            keys[a],
            lr,
            batch_size,
            epochs,
        )
        for got, want in zip(
            jax.tree.leaves(take(new)), jax.tree.leaves(ref), strict=True
        ):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_optimizer_errors_name_the_field():
    from demjax.errors import ConfigError

    with pytest.raises(ConfigError, match="optimizer='nope'.*accepted: sgd, momentum"):
        local.make_optimizer("nope", 0.1)
    with pytest.raises(ConfigError, match="optimizer"):
        local.make_optimizer("softmax_cross_entropy", 0.1)  # optax, not an optimizer
    # Any optax optimizer by name: one step of adamw moves a parameter by ~lr.
    tx = local.make_optimizer("adamw", 0.01)
    p = jnp.ones(3)
    upd, _ = tx.update(jnp.ones(3), tx.init(p), p)
    np.testing.assert_allclose(upd, -0.01 * (1 + 1e-4), rtol=1e-3)
    with pytest.raises(ConfigError, match="lr"):
        local.make_optimizer("sgd", 0.0)


def test_steps_per_epoch():
    assert local.steps_per_epoch(13, 4) == 4
    assert local.steps_per_epoch(12, 4) == 3


def test_plan_buckets_is_optimal_on_a_small_case():
    steps = np.array([2, 9, 2, 3, 9, 8])
    buckets = local.plan_buckets(steps, 2)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(6))
    # Best 2-bucket split: {2, 2, 3} (3 slots each) + {8, 9, 9}: 9 + 27 = 36 slots.
    assert sorted(sorted(steps[b].tolist()) for b in buckets) == [[2, 2, 3], [8, 9, 9]]
    assert len(local.plan_buckets(steps, 1)) == 1


def _tiny_population(n):
    """Random 2x2 inputs (3 classes) for ``len(n)`` agents with ``n`` real samples
    each, a tiny MLP population, SGD(0.1), its optimizer state and keys."""
    num_agents, n_max = len(n), int(np.max(n))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(num_agents, n_max, 2, 2, 1)).astype(np.float32)
    y = rng.integers(0, 3, size=(num_agents, n_max)).astype(np.int32)
    model = models.make_model("mlp", 3, (5,))
    params = models.init_population(jax.random.PRNGKey(0), model, (2, 2, 1), num_agents)
    apply_fn = lambda p, xb, train=False, key=None: model.apply({"params": p}, xb)  # noqa: E731
    tx = optax.sgd(0.1)
    opt = jax.vmap(tx.init)(params)
    keys = jax.random.split(jax.random.PRNGKey(1), num_agents)
    return x, y, model, params, apply_fn, tx, opt, keys


def test_bucketed_population_training_equals_one_vmap():
    batch_size, epochs = 3, 2
    n = np.array([2, 14, 5, 1, 9, 14, 3], np.int32)
    n_max = int(n.max())
    x, y, model, params, apply_fn, tx, opt, keys = _tiny_population(n)
    anchor = jax.tree.map(lambda p: p + 0.1, params)
    args = (keys, params, opt, x, y, n, anchor, jnp.float32(0.05))
    one = local.make_train_one(
        apply_fn, tx, batch_size=batch_size, local_epochs=epochs, n_max=n_max
    )
    ref = jax.jit(local.make_train_all(one))(*args)
    pop = local.make_train_population(
        apply_fn,
        tx,
        batch_size=batch_size,
        local_epochs=epochs,
        n_train=n,
        num_buckets=3,
    )
    assert len(pop.buckets) == 3
    got = jax.jit(pop)(*args)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    # Blocks of 2 agents (lax.map over blocks, padded last block) change nothing.
    blocked = local.make_train_population(
        apply_fn,
        tx,
        batch_size=batch_size,
        local_epochs=epochs,
        n_train=n,
        num_buckets=1,
        block_size=2,
    )
    got = jax.jit(blocked)(*args)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_blocked_in_place_with_anchor_fn_and_finish():
    """Blocks inside buckets (gathered ids, a last block shifted back over
    trained agents), per-block anchors from a function and a ``finish`` hook
    give the unblocked result."""
    num_agents, batch_size, epochs = 7, 2, 2
    n = np.array([5, 1, 3, 6, 2, 4, 6], np.int32)
    n_max = int(n.max())
    x, y, model, params, apply_fn, tx, opt, keys = _tiny_population(n)
    groups = models.init_population(jax.random.PRNGKey(2), model, (2, 2, 1), 3)
    parent = jnp.array([0, 1, 2, 0, 1, 2, 0], jnp.int32)
    anchor = jax.tree.map(lambda g: g[parent], groups)
    mu = jnp.float32(0.05)
    one = local.make_train_one(
        apply_fn, tx, batch_size=batch_size, local_epochs=epochs, n_max=n_max
    )
    ref_p, ref_o, ref_loss = jax.jit(local.make_train_all(one))(
        keys, anchor, opt, x, y, n, anchor, mu
    )
    ref_p = jax.tree.map(lambda v: 2.0 * v, ref_p)

    def anchor_fn(ids):
        return jax.tree.map(lambda g: g[parent[ids]], groups)

    def finish(ids, new_p, new_o, loss, old_p, old_o, anc):
        return jax.tree.map(lambda v: 2.0 * v, new_p), new_o, (loss, ids)

    for buckets, block in ((1, 3), (3, 2), (2, 0)):
        pop = local.make_train_population(
            apply_fn,
            tx,
            batch_size=batch_size,
            local_epochs=epochs,
            n_train=n,
            num_buckets=buckets,
            block_size=block,
        )

        def run(keys, params, opt, x, y, n, pop=pop):
            return pop(
                keys, params, opt, x, y, n, anchor_fn, mu, start=anchor_fn,
                finish=finish,
            )  # fmt: skip

        got_p, _, (loss, ids) = jax.jit(run, donate_argnums=(1,))(
            keys, jax.tree.map(jnp.copy, params), opt, x, y, n
        )
        np.testing.assert_array_equal(ids, np.arange(num_agents))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for g, r in zip(jax.tree.leaves(got_p), jax.tree.leaves(ref_p), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
