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

        return jax.jit(jax.vmap(jax.value_and_grad(f)))(pop, x, y)

    (la, ga), (lb, gb) = loss(a), loss(b)
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-6)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(v, u, rtol=1e-4, atol=1e-6)


# Fan-in of every layer (kernel [in, out] or [kh, kw, in, out]), by hand from the
# architectures: (model, input shape) -> {layer: fan_in}.
FAN_IN = {
    ("mlr", (28, 28, 1)): {"Dense_0": 784},
    ("mlp", (28, 28, 1)): {"Dense_0": 784, "Dense_1": 100},
    ("cnn", (28, 28, 1)): {"conv0": 25, "conv1": 800, "Dense_0": 1568, "Dense_1": 512},
    ("cnn4", (28, 28, 1)): {"conv0": 25, "conv1": 800, "Dense_0": 3136,
                            "Dense_1": 512},
    ("cnn_cifar", (32, 32, 3)): {"conv0": 27, "conv1": 144, "conv2": 288,
                                 "Dense_0": 1024, "Dense_1": 512, "Dense_2": 64},
}  # fmt: skip


@pytest.mark.parametrize(
    "name, shape, impl",
    [(n, s, "xla") for n, s in FAN_IN] + [("cnn", (28, 28, 1), "patches")],
)
def test_torch_init_bounds_and_std(name, shape, impl):
    """init="torch": kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's
    nn.Linear / nn.Conv2d default (kaiming_uniform a=sqrt(5): gain sqrt(1/3),
    bound sqrt(3) * gain / sqrt(fan_in)); std = bound / sqrt(3)."""
    matmul = "wgrad_t" if impl == "patches" else "xla"
    model = models.make_model(name, 10, (100,), impl, matmul, init="torch")
    params = models.init_params(jax.random.PRNGKey(0), model, shape)
    assert set(params) == set(FAN_IN[name, shape])
    for layer, fan_in in FAN_IN[name, shape].items():
        bound = 1.0 / np.sqrt(fan_in)
        k = np.asarray(params[layer]["kernel"]).ravel()
        b = np.asarray(params[layer]["bias"]).ravel()
        assert np.abs(k).max() <= bound * (1 + 1e-6), layer
        assert np.abs(b).max() <= bound * (1 + 1e-6), layer
        assert np.abs(b).max() > 0, layer  # not flax's zero bias
        # The sample std of n uniform draws: relative standard error ~ 0.9/sqrt(n).
        tol = 5 * 0.9 / np.sqrt(k.size)
        assert k.std() == pytest.approx(bound / np.sqrt(3), rel=tol), layer
        assert np.abs(k).max() > bound * (1 - 20 / k.size), layer


def test_torch_init_matches_torch_layers():
    """The same statistics as torch.nn.Linear / torch.nn.Conv2d's own init."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(1568, 512), torch.nn.Conv2d(32, 32, 5)
    model = models.make_model("cnn", 10, init="torch")
    params = models.init_params(jax.random.PRNGKey(1), model, (28, 28, 1))
    for ours, theirs in (
        (params["Dense_0"], lin), (params["conv1"], conv)
    ):  # fmt: skip
        wk = theirs.weight.detach().numpy().ravel()
        wb = theirs.bias.detach().numpy()
        k, b = np.asarray(ours["kernel"]).ravel(), np.asarray(ours["bias"])
        assert k.size == wk.size and b.size == wb.size
        assert k.std() == pytest.approx(wk.std(), rel=0.03)
        assert np.abs(k).max() == pytest.approx(np.abs(wk).max(), rel=0.01)
        assert np.abs(b).max() == pytest.approx(np.abs(wb).max(), rel=0.15)
        assert b.std() == pytest.approx(wb.std(), rel=0.3)


class _PlainMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(100)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


def test_flax_init_is_flax_default():
    """init="flax" (the default) gives exactly flax's nn.Dense defaults (LeCun
    normal kernel, zero bias) for the same key."""
    model = models.make_model("mlp", 10, (100,))
    ours = models.init_params(jax.random.PRNGKey(4), model, (28, 28, 1))
    ref = _PlainMLP().init(jax.random.PRNGKey(4), jnp.zeros((1, 28, 28, 1)))
    jax.tree.map(np.testing.assert_array_equal, ours, ref["params"])


def test_bad_init_names_field():
    from demjax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"init='he' is not valid; accepted: flax, "
                       r"torch"):  # fmt: skip
        models.make_model("mlp", 10, init="he")
