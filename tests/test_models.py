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
