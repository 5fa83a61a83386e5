"""FedGen: Zhu, Hong, Zhou, "Data-Free Knowledge Distillation for Heterogeneous
Federated Learning", ICML 2021, Algorithm 1 and Eq. 4-6.

FedAvg whose agents distil knowledge from a server-side generator. The model is
split into a feature extractor and its head, the last dense layer (the models'
``return_features`` output is the head's input, F features). The server keeps a
generator ``G_g(z, y)``: a flax MLP ``[z, onehot(y)] -> dense(hidden) -> ReLU ->
dense(F)`` (noise ``z ~ N(0, I)`` of ``noise_dim``), producing feature-space
samples conditioned on a label.

Each round (Alg. 1):

1. Every participating agent i starts from the global model ``w`` and trains
   (``local_epochs`` of ``config.optimizer`` at ``config.lr``) on (Eq. 6)::

       CE(w_i; x, y) + alpha * mean_b CE(head(w_i; G_g(z_b, yhat_b)), yhat_b)

   per minibatch, with ``yhat_b ~ p(y)`` (the agents' pooled label distribution)
   and one fresh ``z_b`` per sample, as many generated samples as the batch size.
   The generator receives no gradient. Round 0 trains without the term (``alpha``
   applies from round 1, as the authors' code: the generator is untrained).
2. The server trains the generator for ``gen_steps`` Adam steps (``gen_lr``) on
   batches of ``gen_batch`` labels ``y ~ p_t(y)`` (the pooled label distribution
   of the agents that trained) minimizing (Eq. 4 with the diversity regularizer of
   the authors' code)::

       sum_i W[i, y] CE(head(w_i; G_g(z, y)), y)  averaged over the batch
       + eta * exp(-mean_{a,b} |G(z_a) - G(z_b)|_1/F * |z_a - z_b|^2/noise_dim)

   where ``W[i, y] = n_i(y) / sum_j n_j(y)`` over the agents that trained (the
   label-count-weighted ensemble of their new heads; 0 for the others).
3. The server sets ``w <- aggregate(w_i)`` (sample-weighted mean, or the robust
   ``config.aggregator``).

Communication per participant: down the model, the generator and ``p(y)``
(float32 ``[C]``); up the model and its label counts (int32 ``[C]``). An agent
whose model turns non-finite keeps its optimizer state, is left out of the mean
and the generator's ensemble, and is counted in ``num_diverged``.

Differences from the authors' code: no batch normalization in the generator, no
exponential decay of ``alpha``, and no latent-matching term (``generative_beta``);
Gaussian noise as in the paper.

Hyper-parameter defaults: the authors' code (``utils/model_config.py``,
``RUNCONFIGS``/``GENERATORCONFIGS``): generative_alpha 10, ensemble_lr 3e-4,
ensemble_batch_size 128, ensemble_eta 1, ensemble_epochs 50 (50 generator steps a
round), hidden 256, noise_dim 32.

C-SPE / C-GEN evaluate the global model ``w``, Global the same model.

State: ``w`` one model (float32, D parameters); ``gen`` the generator parameters
and ``gen_opt`` its Adam state; ``opt [A, ...]`` the local optimizer state.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from demjax.algorithms.protocol import Algorithm, HParam, Rounds, one_round
from demjax.errors import ConfigError
from demjax.local import masked_cross_entropy
from demjax.pytrees import (
    comm_bytes,
    finite_agents,
    masked_mean,
    round_counts,
    stack,
    tree_bytes,
    where_agents,
)


@flax.struct.dataclass
class FedGenState:
    w: object
    gen: object
    gen_opt: object
    opt: object


HPARAMS = {
    "alpha": HParam(
        10.0,
        "fedgen: weight alpha of the generated-feature loss in local training "
        "(>= 0; authors' code: generative_alpha 10)",
        low=0.0,
    ),
    "eta": HParam(
        1.0,
        "fedgen: weight eta of the generator's diversity loss (>= 0; authors' "
        "code: ensemble_eta 1)",
        low=0.0,
    ),
    "gen_lr": HParam(
        3e-4,
        "fedgen: Adam learning rate of the generator (> 0; authors' code: "
        "ensemble_lr 3e-4)",
        low=0.0,
        low_open=True,
    ),
    "gen_steps": HParam(
        50,
        "fedgen: generator Adam steps per round (>= 1; authors' code: 50)",
        low=1,
    ),
    "gen_batch": HParam(
        128,
        "fedgen: labels per generator step (>= 1; authors' code: "
        "ensemble_batch_size 128)",
        low=1,
    ),
    "noise_dim": HParam(
        32, "fedgen: generator noise dimension (>= 1; authors' code: 32)", low=1
    ),
    "hidden": HParam(
        256, "fedgen: generator hidden width (>= 1; authors' code: 256)", low=1
    ),
}


class Generator(nn.Module):
    """``G(z [B, noise_dim], y1h [B, C]) -> features float32 [B, F]``."""

    hidden: int
    features: int

    @nn.compact
    def __call__(self, z, y1h):
        h = nn.relu(nn.Dense(self.hidden)(jnp.concatenate([z, y1h], axis=-1)))
        return nn.Dense(self.features)(h)


def head_name(params) -> str:
    """The head of a demjax model: its last top-level ``Dense_i`` layer."""
    names = [k for k in params if k.startswith("Dense_")]
    if not names:
        raise ConfigError("fedgen needs a model with a dense head; accepted: "
                          "model=mlr, mlp, cnn, cnn4, cnn_cifar")  # fmt: skip
    return max(names, key=lambda k: int(k.split("_")[1]))


def head_apply(params, feats, name: str):
    """Logits ``[..., C]`` of the head ``params[name]`` on features ``[..., F]``."""
    p = params[name]
    return feats @ p["kernel"] + p["bias"]


def local_draws(key, log_py, batch: int, noise_dim: int):
    """Generated-sample draws of one local step: ``(yhat int32 [B], z [B, noise])``
    with ``yhat ~ p(y)`` (``log_py`` float32 ``[C]``) and ``z ~ N(0, I)``."""
    ky, kz = jax.random.split(key)
    y = jax.random.categorical(ky, log_py, shape=(batch,))
    return y.astype(jnp.int32), jax.random.normal(kz, (batch, noise_dim))


def gen_draws(key, log_py, steps: int, batch: int, noise_dim: int):
    """The generator training's draws: ``(y int32 [S, B], z [S, B, noise])``."""
    ky, kz = jax.random.split(key)
    y = jax.random.categorical(ky, log_py, shape=(steps, batch))
    return y.astype(jnp.int32), jax.random.normal(kz, (steps, batch, noise_dim))


def diversity(z, feats):
    """The authors' diversity loss ``exp(-mean(d1(feats) * d2(z)))`` over all
    pairs: ``d1`` mean absolute, ``d2`` mean squared difference. Scalar."""
    d_f = jnp.mean(jnp.abs(feats[:, None] - feats[None]), axis=-1)
    d_z = jnp.mean(jnp.square(z[:, None] - z[None]), axis=-1)
    return jnp.exp(-jnp.mean(d_f * d_z))


def label_counts(y, n, num_classes: int):
    """float32 ``[A, C]`` label counts of the agents' real rows."""
    real = jnp.arange(y.shape[1])[None] < n[:, None]
    one = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
    return jnp.sum(one * real[..., None], axis=1)


def log_dist(counts):
    """``log(counts / sum)`` (``-inf`` for absent labels); ``counts [C]``."""
    return jnp.log(counts / jnp.maximum(jnp.sum(counts), 1.0))


def make_gen_loss(gen_model, name: str, eta: float, num_classes: int):
    """Eq. 4 + diversity: ``loss(g, heads, weights [A, C], z [B, n], y [B])``;
    ``heads`` the agents' models (leaves ``[A, ...]``)."""

    def loss(g, models, weights, z, y):
        feats = gen_model.apply({"params": g}, z, jax.nn.one_hot(y, num_classes))
        logits = jax.vmap(lambda p: head_apply(p, feats, name))(models)  # [A,B,C]
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(logp, jnp.broadcast_to(
            y[None, :, None], logp.shape[:2] + (1,)), axis=-1)[..., 0]  # fmt: skip
        teacher = jnp.mean(jnp.sum(weights[:, y] * ce, axis=0))
        return teacher + eta * diversity(z, feats)

    return loss


def build(ctx) -> Rounds:
    hp = ctx.hp
    alpha, eta = float(hp["alpha"]), float(hp["eta"])
    noise_dim, steps, gbatch = int(hp["noise_dim"]), int(hp["gen_steps"]), int(
        hp["gen_batch"]
    )
    num_classes, num_agents = ctx.num_classes, ctx.num_agents
    batch = int(ctx.config.batch_size)
    probe = jax.eval_shape(ctx.init_model, jax.random.PRNGKey(0))
    name = head_name(probe)
    n_feat = int(probe[name]["kernel"].shape[0])
    gen_model = Generator(int(hp["hidden"]), n_feat)
    gen_tx = optax.adam(float(hp["gen_lr"]))
    apply_fn = ctx.apply_fn

    def local_loss(params, xb, yb, mask, anchor, a, key):
        logits = apply_fn(params, xb, True, key)
        ce = masked_cross_entropy(logits, yb, mask)
        yh, z = local_draws(jax.random.fold_in(key, 7), anchor["log_py"], batch,
                            noise_dim)  # fmt: skip
        g = jax.lax.stop_gradient(anchor["gen"])
        feats = gen_model.apply({"params": g}, z, jax.nn.one_hot(yh, num_classes))
        reg = optax.softmax_cross_entropy_with_integer_labels(
            head_apply(params, feats, name), yh
        ).mean()
        return ce + a * reg, ce

    train = ctx.trainer(grad_fn=jax.grad(local_loss, has_aux=True))
    gen_loss = jax.value_and_grad(make_gen_loss(gen_model, name, eta, num_classes))

    def init(key, part):
        k_w, k_g = jax.random.split(key)
        w = ctx.init_model(k_w)
        gen = gen_model.init(
            k_g, jnp.zeros((1, noise_dim)), jnp.zeros((1, num_classes))
        )["params"]
        opt = jax.vmap(ctx.tx.init)(stack(w, num_agents))
        return FedGenState(w=w, gen=gen, gen_opt=gen_tx.init(gen), opt=opt)

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_train, k_gen, k_agg = jax.random.split(jax.random.fold_in(key, 17), 3)
        counts = label_counts(part.y_train, part.n_train, num_classes)
        log_py = log_dist(jnp.sum(counts, axis=0))
        w0 = stack(state.w, num_agents)
        anchor = {"gen": stack(state.gen, num_agents), "log_py": stack(log_py,
                  num_agents)}  # fmt: skip
        a = jnp.where(t > 0, alpha, 0.0).astype(jnp.float32)
        local, opt, loss = train(
            jax.random.split(k_train, num_agents), w0, state.opt, part.x_train,
            part.y_train, part.n_train, anchor, a, max_steps,
        )  # fmt: skip
        finite = finite_agents(local)
        trained = active & finite
        models = where_agents(trained, local, w0)  # no NaN reaches the server
        any_trained = jnp.any(trained)

        # server: the generator against the ensemble of the new heads (Eq. 4)
        c_t = counts * trained[:, None].astype(jnp.float32)
        weights = c_t / jnp.maximum(jnp.sum(c_t, axis=0, keepdims=True), 1.0)
        ys, zs = gen_draws(k_gen, log_dist(jnp.sum(c_t, axis=0)), steps, gbatch,
                           noise_dim)  # fmt: skip

        def gen_step(carry, yz):
            g, g_opt = carry
            value, grads = gen_loss(g, models, weights, yz[1], yz[0])
            upd, g_opt = gen_tx.update(grads, g_opt, g)
            return (optax.apply_updates(g, upd), g_opt), value

        (gen, gen_opt), gl = jax.lax.scan(gen_step, (state.gen, state.gen_opt),
                                          (ys, zs))  # fmt: skip
        keep = lambda n, o: jnp.where(any_trained, n, o)  # noqa: E731
        gen, gen_opt = jax.tree.map(keep, (gen, gen_opt), (state.gen,
                                    state.gen_opt))  # fmt: skip

        weight = trained * part.n_train.astype(jnp.float32)
        mean = ctx.aggregate(models, weight, k_agg)
        w = jax.tree.map(keep, mean, state.w)
        new = FedGenState(w=w, gen=gen, gen_opt=gen_opt,
                          opt=where_agents(trained, opt, state.opt))  # fmt: skip
        model_b = tree_bytes(state.w)
        down = model_b + tree_bytes(state.gen) + num_classes * 4
        up = model_b + num_classes * 4
        info = {
            "train_loss": masked_mean(
                jnp.where(trained, loss, 0.0), trained.astype(jnp.float32)
            ),
            "gen_loss": jnp.where(any_trained, gl[-1], jnp.nan),
            **round_counts(active, active & ~finite),
            **comm_bytes(up, active, down, active),
        }
        return new, info

    return one_round(
        ctx,
        init=init,
        round=round_fn,
        personal=lambda state, part, key: stack(state.w, num_agents),
        global_model=lambda state: state.w,
    )


def check(config) -> None:
    """FedGen's head is a dense layer: the LSTM model is not supported."""
    if str(config.model) == "char_rnn":
        raise ConfigError(
            "model='char_rnn' is not valid with algorithm=fedgen; accepted: mlr, "
            "mlp, cnn, cnn4, cnn_cifar"
        )


ALGORITHM = Algorithm(
    name="fedgen",
    citation="Zhu, Hong, Zhou, ICML 2021, Algorithm 1, Eq. 4-6 (FedGen)",
    hparams=HPARAMS,
    build=build,
    check=check,
)


__all__ = [
    "ALGORITHM",
    "Generator",
    "diversity",
    "gen_draws",
    "head_apply",
    "head_name",
    "label_counts",
    "local_draws",
    "make_gen_loss",
]
