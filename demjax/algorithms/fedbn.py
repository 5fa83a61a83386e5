"""FedBN: Li, Jiang, Zhang, Kamp, Dou, "FedBN: Federated Learning on Non-IID
Features via Local Batch Normalization", ICLR 2021, Algorithm 1.

The model is ``config.model='mlp'`` with batch normalization after every hidden
dense layer (``demjax.models.MLPBN``: dense -> BatchNorm -> ReLU), or
``config.model='cnn4'`` with batch normalization after both convolutions and the
hidden dense layer (``demjax.models.CNN4BN``). Each round
every participating agent k takes the server's dense layers, keeps its own
BatchNorm layers (``scale``, ``bias`` and the running ``mean``/``var``), trains
the whole model on its data for ``local_epochs`` (batch statistics over the
minibatch's real rows, running averages updated at every step), and uploads
only the dense layers; the server sets every dense layer to
``sum_k n_k w_k / sum_k n_k`` over the participants (Alg. 1, line 9, which
writes the plain mean ``1/K``; or the robust ``config.aggregator``). BatchNorm
parameters and statistics never leave the agent. C-SPE / C-GEN evaluate the
server's dense layers with each agent's own BatchNorm layers (running
averages); there is no global model (Global is null).

Local training carries the running statistics through the engine's trainer:
each agent's model is one dict of layers whose ``BatchNorm_i`` entries hold
``scale``, ``bias``, ``mean`` and ``var``; the step's gradient of the
statistics is their change (new minus old) and their optimizer is
``optax.identity`` (``optax.multi_transform``), so a step sets them to the
flax update (to float32 rounding of ``old + (new - old)``) whatever
``config.optimizer`` the other parameters use.

State: ``params [A, ...]`` (the agents' models, statistics included), ``opt
[A, ...]``, ``shared`` the server's dense layers. ``bytes_up`` = ``bytes_down``
= participants x bytes of the dense layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from demjax import local, models
from demjax.algorithms import layer_split
from demjax.algorithms.protocol import Algorithm, Rounds
from demjax.errors import ConfigError

STATS = ("mean", "var")


def check(config) -> None:
    """Raises ``ConfigError`` unless ``config.model`` is ``mlp`` or ``cnn4``."""
    if config.model not in ("mlp", "cnn4"):
        raise ConfigError(
            f"model={config.model!r} is not valid for algorithm='fedbn' (a model "
            "with BatchNorm layers: the MLP or the 4-layer CNN); accepted: mlp, cnn4"
        )


def make_model(ctx):
    """The run's model with BatchNorm layers (``MLPBN`` or ``CNN4BN``)."""
    c = ctx.config
    if c.model == "cnn4":
        plan = ctx.plan
        return models.CNN4BN(
            ctx.num_classes,
            conv_impl=plan.conv_impl if plan is not None else "patches",
            matmul_impl=plan.matmul_impl if plan is not None else "xla",
            param_init=c.init,
        )
    return models.MLPBN(ctx.num_classes, tuple(c.hidden), c.matmul_impl, c.init)


def to_variables(layers) -> dict:
    """A dict of layers -> flax ``{"params": ..., "batch_stats": ...}``."""
    params = {
        k: {n: v for n, v in d.items() if n not in STATS} for k, d in layers.items()
    }
    stats = {
        k: {n: d[n] for n in STATS}
        for k, d in layers.items()
        if k.startswith("BatchNorm")
    }
    return {"params": params, "batch_stats": stats}


def to_layers(variables) -> dict:
    """Flax variables -> one dict of layers (statistics next to scale, bias)."""
    out = {k: dict(d) for k, d in variables["params"].items()}
    for k, d in variables.get("batch_stats", {}).items():
        out[k].update(d)
    return out


def build(ctx) -> Rounds:
    check(ctx.config)
    model = make_model(ctx)

    def init_model(key):
        dummy = jnp.zeros((1, *ctx.input_shape), jnp.float32)
        return to_layers(model.init({"params": key}, dummy, train=False))

    def eval_apply(layers, x, train, key):
        return model.apply(to_variables(layers), x, train=False)

    def grad_fn(layers, xb, yb, mask, anchor, mu, key):
        v = to_variables(layers)

        def loss(params):
            logits, new = model.apply(
                {"params": params, "batch_stats": v["batch_stats"]},
                xb,
                train=True,
                mask=mask,
                mutable=["batch_stats"],
            )
            ce = local.masked_cross_entropy(logits, yb, mask)
            return ce, (ce, new["batch_stats"])

        grads, (ce, stats) = jax.grad(loss, has_aux=True)(v["params"])
        change = jax.tree.map(jnp.subtract, stats, v["batch_stats"])
        return to_layers({"params": grads, "batch_stats": change}), ce

    shapes = jax.eval_shape(init_model, jax.random.PRNGKey(0))
    labels = {
        k: {n: "stats" if n in STATS else "train" for n in d} for k, d in shapes.items()
    }
    tx = optax.multi_transform({"train": ctx.tx, "stats": optax.identity()}, labels)
    train = ctx.trainer(grad_fn=grad_fn, tx=tx, apply_fn=eval_apply)
    dense = tuple(k for k in shapes if not k.startswith("BatchNorm"))
    return layer_split.build_split(
        ctx,
        shared_keys=dense,
        stages=((train, tx),),
        init_model=init_model,
        eval_apply=eval_apply,
    )


ALGORITHM = Algorithm(
    name="fedbn",
    citation="Li et al., ICLR 2021, Algorithm 1 (FedBN)",
    hparams={},
    build=build,
    has_global=False,
    check=check,
)
