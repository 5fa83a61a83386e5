"""Flax models and the stacked population of agent parameters.

Every model maps float32 inputs ``[B, H, W, C]`` to float32 logits ``[B, classes]``;
with ``return_features=True`` it returns ``(logits, features)`` where ``features``
``[B, F]`` is the embedding fed to the final dense layer (the flattened input for
MLR), used by prototype and distillation methods (FedProto, continual learning).
The population is one pytree whose leaves have a leading agent axis ``[A, ...]``,
all agents starting from one shared initialization (Nguyen et al., "Self-organizing
Democratized Learning", IEEE TNNLS, arXiv 2007.03278, Sec. V: a shared random
initialization at round 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from demjax.errors import ConfigError, check_choice

MODELS = ("mlr", "mlp", "cnn", "cnn4", "cnn_cifar", "char_rnn")
CONV_IMPLS = ("patches", "xla")
MATMUL_IMPLS = ("xla", "wgrad_t")
INITS = ("flax", "torch")


def initializers(init: str, fan_in: int):
    """``(kernel_init, bias_init)`` of a dense or convolution layer.

    ``flax``: flax's defaults, LeCun normal kernel (truncated normal, variance
    ``1 / fan_in``) and zero bias. ``torch``: PyTorch's default ``nn.Linear`` /
    ``nn.Conv2d`` initialisation (``reset_parameters``: ``kaiming_uniform_`` with
    ``a = sqrt(5)``, i.e. kernel ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and bias ~
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))); the kernel draw is
    ``variance_scaling(1/3, "fan_in", "uniform")``, whose bound is
    ``sqrt(3 * (1/3) / fan_in)``.

    Args:
      init: ``flax`` or ``torch``.
      fan_in: inputs per output unit: ``in`` for a dense kernel ``[in, out]``,
        ``kh * kw * in`` for a convolution kernel ``[kh, kw, in, out]``.

    Raises:
      ConfigError: unknown ``init``.
    """
    check_choice("init", init, INITS)
    if init == "flax":
        return nn.initializers.lecun_normal(), nn.initializers.zeros
    bound = 1.0 / float(fan_in) ** 0.5

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    kernel_init = jax.nn.initializers.variance_scaling(1.0 / 3, "fan_in", "uniform")
    return kernel_init, bias_init


def _wgrad_t_fwd(x, w):
    return x @ w, (x, w)


def _wgrad_t_bwd(res, g):
    x, w = res
    # The weight gradient x^T g contracts over the minibatch, the MAJOR dimension
    # of x: XLA:CPU leaves such a dot to its generic (Eigen) kernel, batched over
    # agents under vmap. Materializing x^T first (a copy of the small activation,
    # fenced by an optimization barrier so XLA does not fold the transpose back
    # into the dot) makes it a plain row-major GEMM that the YNNPACK/XNNPACK
    # library fusion accepts.
    xt = jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))
    return g @ w.T, xt @ g


@jax.custom_vjp
def _matmul_wgrad_t(x, w):
    return x @ w


_matmul_wgrad_t.defvjp(_wgrad_t_fwd, _wgrad_t_bwd)


def matmul(x, w, impl: str = "xla"):
    """``x [N, K] @ w [K, F]``; ``impl`` picks how its weight gradient is formed.

    ``xla``: JAX's own transpose rule (``dot_general`` contracting ``x`` over its
    leading dimension). ``wgrad_t``: the same product with the gradient
    ``dw = (x^T) @ g`` computed from an explicitly transposed ``x`` (see
    ``docs/performance.md``). Values and gradients agree to float rounding.
    """
    if impl == "xla":
        return x @ w
    return _matmul_wgrad_t(x, w)


class Dense(nn.Module):
    """``flax.linen.Dense`` (same ``kernel [in, out]``/``bias [out]`` parameters and
    initializers, ``initializers(init, in)``) whose matmul is
    ``matmul(..., impl)``."""

    features: int
    matmul_impl: str = "xla"
    param_init: str = "flax"

    @nn.compact
    def __call__(self, x):
        kernel_init, bias_init = initializers(self.param_init, x.shape[-1])
        kernel = self.param("kernel", kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", bias_init, (self.features,))
        lead = x.shape[:-1]
        y = matmul(x.reshape(-1, x.shape[-1]), kernel, self.matmul_impl)
        return y.reshape(*lead, self.features) + bias


def _dense(impl: str, features: int, index: int, init: str = "flax"):
    """Dense layer ``Dense_{index}`` (the name flax gives the index-th nn.Dense),
    initialized as ``initializers(init, in)`` (a function of the input ``x``)."""
    if impl != "xla":
        return Dense(features, impl, init, name=f"Dense_{index}")

    def layer(x):
        kernel_init, bias_init = initializers(init, x.shape[-1])
        return nn.Dense(
            features, kernel_init=kernel_init, bias_init=bias_init,
            name=f"Dense_{index}",
        )(x)  # fmt: skip

    return layer


class PatchConv(nn.Module):
    """A stride-1 'SAME' 2-D convolution as shifted slices + one matmul (im2col).

    Mathematically identical to ``flax.linen.Conv(features, (k, k), padding="SAME")``
    with the same parameter names and shapes (``kernel [k, k, C, F]``, ``bias
    [F]``), so the two are interchangeable. Why: on XLA:CPU a convolution whose
    weights are vmapped over agents lowers to a grouped convolution, and a
    convolution inside a ``lax.scan``/``while`` body loses the fast library path;
    both ran 7-20x slower than this form, which XLA lowers to a batched GEMM
    (measured: 50 agents x 36 SGD steps of batch 10, the paper's CNN:
    5.2 s vs 0.75 s per vmapped step). See ``docs/benchmarks.md``.
    """

    features: int
    kernel_size: int = 5
    matmul_impl: str = "xla"
    param_init: str = "flax"

    @nn.compact
    def __call__(self, x):
        _, h, w, c = x.shape
        k = self.kernel_size
        kernel_init, bias_init = initializers(self.param_init, k * k * c)
        lo, hi = (k - 1) // 2, k // 2
        xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
        patches = jnp.concatenate(
            [xp[:, i : i + h, j : j + w, :] for i in range(k) for j in range(k)],
            axis=-1,
        )
        kernel = self.param("kernel", kernel_init, (k, k, c, self.features))
        bias = self.param("bias", bias_init, (self.features,))
        flat = patches.reshape(-1, k * k * c)
        y = matmul(flat, kernel.reshape(k * k * c, self.features), self.matmul_impl)
        return y.reshape(*patches.shape[:-1], self.features) + bias


def max_pool_2x2(x):
    """2x2 max-pool, stride 2, ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]``.

    Equal to ``nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")``; for even H
    and W it is a reshape + max, whose gradient XLA:CPU runs faster than the
    select-and-scatter of ``reduce_window`` (about 15% of a vmapped CNN step).
    """
    _, h, w, c = x.shape
    if h % 2 or w % 2:
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    return x.reshape(x.shape[0], h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _pool(impl: str, x):
    # Both are the same function; the reshape form is faster inside vmapped
    # training steps, reduce_window is faster in one-model-at-a-time evaluation.
    if impl == "patches":
        return max_pool_2x2(x)
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


def _conv(
    impl: str, features: int, k: int, name: str, matmul_impl: str = "xla",
    init: str = "flax",
):  # fmt: skip
    """``k x k`` 'SAME' convolution (a function of ``x [B, H, W, C]``),
    initialized as ``initializers(init, k * k * C)``."""
    if impl == "patches":
        return PatchConv(features, k, matmul_impl, init, name=name)

    def layer(x):
        kernel_init, bias_init = initializers(init, k * k * x.shape[-1])
        return nn.Conv(
            features, (k, k), padding="SAME", kernel_init=kernel_init,
            bias_init=bias_init, name=name,
        )(x)  # fmt: skip

    return layer


class MLR(nn.Module):
    """Multinomial logistic regression: one dense layer on the flattened input."""

    num_classes: int = 10
    matmul_impl: str = "xla"
    param_init: str = "flax"

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x = x.reshape((x.shape[0], -1))
        logits = _dense(self.matmul_impl, self.num_classes, 0, self.param_init)(x)
        return (logits, x) if return_features else logits


class MLP(nn.Module):
    """Multi-layer perceptron with ReLU hidden layers (e.g. 784-100-10)."""

    num_classes: int = 10
    hidden: Sequence[int] = (100,)
    matmul_impl: str = "xla"
    param_init: str = "flax"

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(_dense(self.matmul_impl, width, i, self.param_init)(x))
        logits = _dense(
            self.matmul_impl, self.num_classes, len(self.hidden), self.param_init
        )(x)
        return (logits, x) if return_features else logits


class MLPBN(nn.Module):
    """MLP with batch normalization after every hidden dense layer (dense ->
    BatchNorm -> ReLU): the model of FedBN (``demjax/algorithms/fedbn.py``).

    ``BatchNorm_i`` has ``params`` ``scale``/``bias`` ``[width]`` and
    ``batch_stats`` ``mean``/``var`` ``[width]`` (running averages, momentum 0.9
    and epsilon 1e-5: PyTorch's ``BatchNorm1d`` defaults; the running variance
    is the biased batch variance). ``train=True`` normalizes with the batch
    statistics of the rows where ``mask`` (bool ``[B]``) holds and needs
    ``mutable=["batch_stats"]``; ``train=False`` uses the running averages.
    """

    num_classes: int = 10
    hidden: Sequence[int] = (100,)
    matmul_impl: str = "xla"
    param_init: str = "flax"

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False,
                 mask=None):  # fmt: skip
        x = x.reshape((x.shape[0], -1))
        rows = None if mask is None else mask[:, None]
        for i, width in enumerate(self.hidden):
            x = _dense(self.matmul_impl, width, i, self.param_init)(x)
            x = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5,
                name=f"BatchNorm_{i}",
            )(x, mask=rows)  # fmt: skip
            x = nn.relu(x)
        logits = _dense(
            self.matmul_impl, self.num_classes, len(self.hidden), self.param_init
        )(x)
        return (logits, x) if return_features else logits


class CNN(nn.Module):
    """The DemLearn paper's MNIST / Fashion-MNIST CNN.

    conv 32@5x5 (SAME) + ReLU, max-pool 2, dropout 0.4, conv 32@5x5 + ReLU,
    max-pool 2, dropout 0.4, dense 512 + ReLU, dense ``num_classes``
    (834,922 parameters on 28x28x1 inputs). Source: the authors' code for
    Nguyen et al., IEEE TNNLS (arXiv 2007.03278), Sec. V-A.
    """

    num_classes: int = 10
    dropout: float = 0.4
    conv_impl: str = "patches"
    matmul_impl: str = "xla"
    param_init: str = "flax"

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        for i in range(2):
            x = nn.relu(_conv(
                self.conv_impl, 32, 5, f"conv{i}", self.matmul_impl, self.param_init
            )(x))
            x = _pool(self.conv_impl, x)
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(_dense(self.matmul_impl, 512, 0, self.param_init)(x))
        logits = _dense(self.matmul_impl, self.num_classes, 1, self.param_init)(x)
        return (logits, x) if return_features else logits


class CNN4(nn.Module):
    """The 4-layer CNN of the personalized-FL comparisons
    (``benchmarks/compare_personalized.py``).

    conv 32@5x5 (SAME) + ReLU, max-pool 2, conv 64@5x5 + ReLU, max-pool 2,
    dense 512 + ReLU, dense ``num_classes`` (1,663,370 parameters on 28x28x1):
    McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017, Sec. 3 ("CNN"), the model pFedMe, Per-FedAvg,
    FedProto and PFLlib use on (Fashion-)MNIST.
    """

    num_classes: int = 10
    conv_impl: str = "patches"
    matmul_impl: str = "xla"
    param_init: str = "flax"

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        for i, width in enumerate((32, 64)):
            conv = _conv(
                self.conv_impl, width, 5, f"conv{i}", self.matmul_impl, self.param_init
            )
            x = nn.relu(conv(x))
            x = _pool(self.conv_impl, x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(_dense(self.matmul_impl, 512, 0, self.param_init)(x))
        logits = _dense(self.matmul_impl, self.num_classes, 1, self.param_init)(x)
        return (logits, x) if return_features else logits


class CNN4BN(nn.Module):
    """``CNN4`` with batch normalization after both convolutions and the hidden
    dense layer (conv -> BatchNorm -> ReLU -> max-pool, dense -> BatchNorm ->
    ReLU): FedBN's convolutional model (``demjax/algorithms/fedbn.py``; Li et
    al., ICLR 2021, Sec. 5, put BatchNorm after every convolution and hidden
    fully connected layer).

    ``BatchNorm_0`` / ``BatchNorm_1`` normalize each channel over the batch
    and both spatial axes (``[32]`` / ``[64]``), ``BatchNorm_2`` each of the
    512 hidden units; momentum 0.9, epsilon 1e-5 (PyTorch's defaults), running
    variance the biased batch variance. ``train=True`` uses the batch
    statistics of the rows where ``mask`` (bool ``[B]``) holds and needs
    ``mutable=["batch_stats"]``; ``train=False`` the running averages.
    """

    num_classes: int = 10
    conv_impl: str = "patches"
    matmul_impl: str = "xla"
    param_init: str = "flax"

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False,
                 mask=None):  # fmt: skip
        def norm(x, i):
            rows = None if mask is None else mask.reshape((-1,) + (1,) * (x.ndim - 1))
            return nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5,
                name=f"BatchNorm_{i}",
            )(x, mask=rows)  # fmt: skip

        for i, width in enumerate((32, 64)):
            conv = _conv(
                self.conv_impl, width, 5, f"conv{i}", self.matmul_impl, self.param_init
            )
            x = _pool(self.conv_impl, nn.relu(norm(conv(x), i)))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(norm(_dense(self.matmul_impl, 512, 0, self.param_init)(x), 2))
        logits = _dense(self.matmul_impl, self.num_classes, 1, self.param_init)(x)
        return (logits, x) if return_features else logits


class CNNCifar(nn.Module):
    """The DemLearn paper's CIFAR-10 CNN: conv 16/32/64@3x3, pooling, dense 512, 64."""

    num_classes: int = 10
    conv_impl: str = "patches"
    matmul_impl: str = "xla"
    param_init: str = "flax"

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        for i, width in enumerate((16, 32, 64)):
            conv = _conv(
                self.conv_impl, width, 3, f"conv{i}", self.matmul_impl, self.param_init
            )
            x = nn.relu(conv(x))
            x = _pool(self.conv_impl, x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(_dense(self.matmul_impl, 512, 0, self.param_init)(x))
        x = nn.relu(_dense(self.matmul_impl, 64, 1, self.param_init)(x))
        logits = _dense(self.matmul_impl, self.num_classes, 2, self.param_init)(x)
        return (logits, x) if return_features else logits


class CharRNN(nn.Module):
    """Next-character model: embedding 8, stacked LSTMs, dense over the vocabulary.

    The LEAF Shakespeare model (Caldas et al., "LEAF: A Benchmark for Federated
    Settings", arXiv 1812.01097, Sec. 4; also McMahan et al., AISTATS 2017,
    Sec. 3): characters embedded in 8 dimensions, LSTM layers (``hidden`` widths;
    LEAF uses (256, 256)), the last step's output through a dense layer of
    ``num_classes`` logits. Input: float32 ``[B, L]`` character ids (exact
    integers, cast to int32), vocabulary size ``num_classes``.
    """

    num_classes: int = 81
    hidden: Sequence[int] = (256, 256)
    embed_dim: int = 8
    matmul_impl: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        ids = x.reshape((x.shape[0], -1)).astype(jnp.int32)
        h = nn.Embed(self.num_classes, self.embed_dim, name="embed")(ids)
        for i, width in enumerate(self.hidden):
            h = nn.RNN(nn.OptimizedLSTMCell(width), name=f"lstm{i}")(h)
        h = h[:, -1]
        logits = _dense(self.matmul_impl, self.num_classes, 0)(h)
        return (logits, h) if return_features else logits


def make_model(
    name: str,
    num_classes: int,
    hidden: Sequence[int] = (100,),
    conv_impl: str = "patches",
    matmul_impl: str = "xla",
    init: str = "flax",
) -> nn.Module:
    """Builds a model by name.

    Args:
      name: one of ``mlr``, ``mlp``, ``cnn``, ``cnn4``, ``cnn_cifar``,
        ``char_rnn``.
      num_classes: number of output classes C (``char_rnn``: the vocabulary).
      hidden: hidden widths of the MLP, LSTM widths of ``char_rnn``.
      conv_impl: ``patches`` (im2col GEMM, fast for vmapped agents on CPU) or
        ``xla`` (``lax.conv``); identical results and parameters.
      matmul_impl: how dense layers and im2col convolutions form their weight
        gradient (``matmul``); identical results and parameters.
      init: parameter initialisation of every dense and convolution layer,
        ``flax`` (LeCun normal kernels, zero biases) or ``torch`` (PyTorch's
        default layer init); see ``initializers``. Only ``init_params`` reads it.

    Raises:
      ConfigError: unknown ``model``, ``conv_impl``, ``matmul_impl`` or ``init``.
    """
    check_choice("model", name, MODELS)
    check_choice("conv_impl", conv_impl, CONV_IMPLS)
    check_choice("matmul_impl", matmul_impl, MATMUL_IMPLS)
    check_choice("init", init, INITS)
    if name == "mlr":
        return MLR(num_classes, matmul_impl, init)
    if name == "mlp":
        return MLP(num_classes, tuple(hidden), matmul_impl, init)
    kw = {"conv_impl": conv_impl, "matmul_impl": matmul_impl, "param_init": init}
    if name == "cnn":
        return CNN(num_classes, **kw)
    if name == "cnn4":
        return CNN4(num_classes, **kw)
    if name == "char_rnn":
        if init != "flax":
            raise ConfigError(
                f"init={init!r} is not available for model='char_rnn'; accepted: flax"
            )
        return CharRNN(num_classes, tuple(hidden), matmul_impl=matmul_impl)
    return CNNCifar(num_classes, **kw)


def make_apply(model: nn.Module):
    """``apply(params, x [B, ...], train, key) -> logits [B, C]`` of ``model``:
    dropout (where the model has it) draws from ``key`` when ``train`` and a
    key is given."""

    def apply(params, x, train, key):
        rngs = {"dropout": key} if (train and key is not None) else {}
        return model.apply({"params": params}, x, train=train, rngs=rngs)

    return apply


def make_eval_apply(model: nn.Module):
    """``apply(params, x, train, key) -> logits``, always in evaluation mode."""

    def apply(params, x, train, key):
        return model.apply({"params": params}, x, train=False)

    return apply


def init_params(key: jax.Array, model: nn.Module, input_shape: Sequence[int]):
    """Initializes ONE agent's parameters for inputs of shape ``(H, W, C)``."""
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    return model.init({"params": key}, dummy, train=False)["params"]


def init_population(
    key: jax.Array, model: nn.Module, input_shape: Sequence[int], num_agents: int
):
    """Stacks one shared initialization for all agents.

    Returns:
      A pytree whose leaves are float32 ``[A, ...]``, identical along the agent axis.
    """
    params = init_params(key, model, input_shape)
    return jax.tree.map(
        lambda p: jnp.tile(p[None], (num_agents,) + (1,) * p.ndim), params
    )


def num_params(params, stacked: bool = True) -> int:
    """Number of parameters D of one agent (``stacked``: leaves carry an agent axis)."""
    leaves = jax.tree.leaves(params)
    if stacked:
        return int(sum(leaf[0].size for leaf in leaves))
    return int(sum(leaf.size for leaf in leaves))
