"""Models: the im2col convolution equals flax's Conv; shared initialization."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from demjax import models


@pytest.mark.parametrize("k,c,f", [(5, 1, 4), (3, 3, 2), (4, 2, 3)])
def test_patch_conv_equals_flax_conv(k, c, f):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 6, c))
    ref = nn.Conv(f, (k, k), padding="SAME")
    params = ref.init(jax.random.PRNGKey(1), x)
    got = models.PatchConv(f, k).apply(params, x)  # same parameter tree
    np.testing.assert_allclose(got, ref.apply(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, size",
    [("cnn", 834_922), ("cnn4", 1_663_370)],  # DemLearn paper CNN; FedAvg paper CNN
)
def test_cnn_conv_impls_agree_and_have_paper_size(name, size):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 28, 28, 1))
    a = models.make_model(name, 10, conv_impl="patches")
    b = models.make_model(name, 10, conv_impl="xla")
    params = models.init_params(jax.random.PRNGKey(2), a, (28, 28, 1))
    assert models.num_params(params, stacked=False) == size
    np.testing.assert_allclose(
        a.apply({"params": params}, x), b.apply({"params": params}, x), atol=1e-4
    )


def test_population_is_one_shared_init():
    model = models.make_model("mlp", 10, (7,))
    pop = models.init_population(jax.random.PRNGKey(0), model, (8, 8, 1), 5)
    for leaf in jax.tree.leaves(pop):
        assert leaf.shape[0] == 5
        np.testing.assert_array_equal(leaf, jnp.broadcast_to(leaf[:1], leaf.shape))
    assert models.num_params(pop) == 64 * 7 + 7 + 7 * 10 + 10


@pytest.mark.parametrize("h,w", [(8, 6), (7, 5)])
def test_max_pool_2x2_equals_flax_max_pool(h, w):
    x = jax.random.normal(jax.random.PRNGKey(3), (2, h, w, 3))
    ref = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    np.testing.assert_array_equal(models.max_pool_2x2(x), ref)


def test_matmul_wgrad_t_equals_xla_under_vmap():
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(4), 3)
    x = jax.random.normal(kx, (3, 5, 7))
    w = jax.random.normal(kw, (3, 7, 4))
    g = jax.random.normal(kg, (3, 5, 4))

    def vjp(impl):
        def f(x, w):
            return jax.vjp(lambda x, w: models.matmul(x, w, impl), x, w)

        y, back = jax.vmap(f)(x, w)
        return y, jax.vmap(lambda b, g: b(g))(back, g)

    (y0, (dx0, dw0)), (y1, (dx1, dw1)) = vjp("xla"), vjp("wgrad_t")
    np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw1, dw0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw0[1], x[1].T @ g[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mlr", "mlp", "cnn", "cnn4"])
def test_matmul_impls_same_params_loss_and_grads(name):
    """``matmul_impl`` changes neither the parameter tree (names, shapes, initial
    values) nor the loss or its gradient, vmapped over agents."""
    a = models.make_model(name, 10, (16,), matmul_impl="xla")
    b = models.make_model(name, 10, (16,), matmul_impl="wgrad_t")
    pa = models.init_params(jax.random.PRNGKey(5), a, (28, 28, 1))
    pb = models.init_params(jax.random.PRNGKey(5), b, (28, 28, 1))
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    for u, v in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(u, v)
    pop = models.init_population(jax.random.PRNGKey(5), a, (28, 28, 1), 2)
    pop = jax.tree.map(
        lambda p: p + 0.01 * jax.random.normal(jax.random.PRNGKey(6), p.shape), pop
    )
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 4, 28, 28, 1))
    y = jnp.arange(8).reshape(2, 4) % 10

    def loss(model):
        def f(p, x, y):
            logits = model.apply({"params": p}, x, train=True,
                                 rngs={"dropout": jax.random.PRNGKey(8)})  # fmt: skip
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])

        return jax.vmap(jax.value_and_grad(f))(pop, x, y)

    (la, ga), (lb, gb) = loss(a), loss(b)
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-6)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(v, u, rtol=1e-4, atol=1e-6)
