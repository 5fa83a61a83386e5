"""MOON: Li, He, Song, "Model-Contrastive Federated Learning", CVPR 2021,
Algorithm 1 and Eq. 3-4.

FedAvg whose local objective adds a model-contrastive term. Each round every
participating agent i starts from the global model ``w`` and trains (``local_epochs``
of ``config.optimizer`` at ``config.lr``, the engine's minibatch loop) on (Eq. 4)::

    l = CE(w_i; x, y) + mu * l_con(z, z_glob, z_prev)

averaged over the minibatch, with the model-contrastive loss (Eq. 3)::

    l_con = -log( exp(sim(z, z_glob) / tau)
                  / (exp(sim(z, z_glob) / tau) + exp(sim(z, z_prev) / tau)) )

where ``z``, ``z_glob``, ``z_prev`` are the representations of ``x`` by the model
being trained, the round's global model (the positive pair) and the agent's own
model from its previous local training (the negative pair; the initial model
before it first trains), and ``sim`` the cosine similarity
``<a, b> / max(||a|| ||b||, 1e-8)``. The representation is the models'
``return_features`` output, the input of the last dense layer (the paper adds a
projection head; for ``model='mlr'`` it is the flattened input, the same for the
three models, so the term is the constant ``log 2`` and MOON is FedAvg). The
global and previous models are evaluated in evaluation mode (no dropout) and
receive no gradient.

The server sets ``w <- aggregate(w_i)``, the sample-weighted mean over the
participants of Alg. 1 (or the robust ``config.aggregator``), and every
participant keeps its trained model as its next ``z_prev`` model. Agents
download ``w`` and upload ``w_i``: one model each way per participant. An agent
whose model turns non-finite keeps its previous model and optimizer state, is
left out of the mean and counted in ``num_diverged``.

C-SPE / C-GEN evaluate the global model ``w`` (what every agent holds entering
the next round), Global the same model.

State (leaves stacked over A agents where marked): ``w`` one model (float32, D
parameters); ``prev [A, ...]`` the agents' previous local models; ``opt [A, ...]``
the local optimizer state.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from demjax.algorithms.protocol import Algorithm, HParam, Rounds, one_round
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
class MoonState:
    w: object
    prev: object
    opt: object


HPARAMS = {
    "mu": HParam(
        1.0,
        "moon: weight mu of the model-contrastive loss (>= 0; paper tunes over "
        "{0.1, 1, 5, 10}: 5 on CIFAR-10, 1 on CIFAR-100 and Tiny-ImageNet)",
        low=0.0,
    ),
    "tau": HParam(
        0.5,
        "moon: temperature tau of the contrastive loss (> 0; paper: 0.5)",
        low=0.0,
        low_open=True,
    ),
}


def cosine(a, b):
    """Row-wise cosine similarity ``[B, F], [B, F] -> [B]`` (norm product floored
    at 1e-8, as ``torch.nn.CosineSimilarity``)."""
    num = jnp.sum(a * b, axis=-1)
    den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return num / jnp.maximum(den, 1e-8)


def contrastive(z, z_glob, z_prev, tau: float):
    """Eq. 3 per sample: ``[B, F]`` x 3 -> float32 ``[B]``."""
    pos = cosine(z, z_glob) / tau
    neg = cosine(z, z_prev) / tau
    return jnp.logaddexp(pos, neg) - pos


def make_loss(feat_apply, mu: float, tau: float):
    """One minibatch's MOON loss (Eq. 4).

    ``feat_apply(params, x, train, key) -> (logits [B, C], feats [B, F])``.

    Returns:
      ``loss(params, xb, yb, mask, glob, prev, key) -> (total, ce)``; ``glob`` and
      ``prev`` are models (params-shaped), held constant.
    """

    def loss(params, xb, yb, mask, glob, prev, key):
        logits, z = feat_apply(params, xb, True, key)
        _, z_glob = feat_apply(jax.lax.stop_gradient(glob), xb, False, None)
        _, z_prev = feat_apply(jax.lax.stop_gradient(prev), xb, False, None)
        ce = masked_cross_entropy(logits, yb, mask)
        m = mask.astype(z.dtype)
        con = jnp.sum(contrastive(z, z_glob, z_prev, tau) * m) / jnp.maximum(
            jnp.sum(m), 1.0
        )
        return ce + mu * con, ce

    return loss


def feature_apply(model):
    """``(params, x, train, key) -> (logits, feats)`` of a demjax model."""

    def feat_apply(params, x, train, key):
        rngs = {"dropout": key} if (train and key is not None) else {}
        return model.apply(
            {"params": params}, x, train=train, rngs=rngs, return_features=True
        )

    return feat_apply


def build(ctx) -> Rounds:
    mu, tau = float(ctx.hp["mu"]), float(ctx.hp["tau"])
    grad_loss = jax.grad(make_loss(feature_apply(ctx.model), mu, tau), has_aux=True)

    def grad_fn(params, xb, yb, mask, anchor, mu_, key):
        return grad_loss(params, xb, yb, mask, anchor["glob"], anchor["prev"], key)

    train = ctx.trainer(grad_fn=grad_fn)
    num_agents = ctx.num_agents

    def init(key, part):
        w = ctx.init_model(key)
        prev = stack(w, num_agents)
        return MoonState(w=w, prev=prev, opt=jax.vmap(ctx.tx.init)(prev))

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_train, k_agg = jax.random.split(jax.random.fold_in(key, 17))
        w0 = stack(state.w, num_agents)
        local, opt, loss = train(
            jax.random.split(k_train, num_agents),
            w0,
            state.opt,
            part.x_train,
            part.y_train,
            part.n_train,
            {"glob": w0, "prev": state.prev},
            jnp.float32(0.0),
            max_steps,
        )
        finite = finite_agents(local)
        trained = active & finite
        prev = where_agents(trained, local, state.prev)  # no NaN reaches the mean
        weight = trained * part.n_train.astype(jnp.float32)
        mean = ctx.aggregate(prev, weight, k_agg)
        any_trained = jnp.any(trained)
        w = jax.tree.map(lambda m, o: jnp.where(any_trained, m, o), mean, state.w)
        new = MoonState(w=w, prev=prev, opt=where_agents(trained, opt, state.opt))
        one_model = tree_bytes(state.w)
        info = {
            "train_loss": masked_mean(
                jnp.where(trained, loss, 0.0), trained.astype(jnp.float32)
            ),
            **round_counts(active, active & ~finite),
            **comm_bytes(one_model, active, one_model, active),
        }
        return new, info

    return one_round(
        ctx,
        init=init,
        round=round_fn,
        personal=lambda state, part, key: stack(state.w, num_agents),
        global_model=lambda state: state.w,
    )


ALGORITHM = Algorithm(
    name="moon",
    citation="Li, He, Song, CVPR 2021, Algorithm 1, Eq. 3-4 (MOON)",
    hparams=HPARAMS,
    build=build,
)


__all__ = ["ALGORITHM", "contrastive", "cosine", "feature_apply", "make_loss"]
