"""FedProto: Tan, Long, Liu, Zhou, Lu, Jiang, Zhang, "FedProto: Federated Prototype
Learning across Heterogeneous Clients", AAAI 2022, Algorithm 1.

No model is averaged: every agent keeps its own model; only class prototypes (mean
embeddings, the model's ``return_features`` output ``[B, F]``) are communicated.
Each round every participating agent i

1. trains its model (``local_epochs`` of the engine's minibatch loop) on
   (the local objective)::

       CE(F_i(x), y) + lam * d(f_i(x), C_bar[y])

   averaged over the minibatch, where ``C_bar [C, F]`` are the global prototypes
   and ``d`` the squared distance: ``distance='mse'`` ``||.||^2 / F`` (the
   authors' code, ``nn.MSELoss``) or ``'sq_l2'`` ``||.||^2``. Samples whose class
   has no global prototype yet (round 0) get no regularizer;
2. computes its local prototypes, ``C_i[j] = mean f_i(x)`` over its
   training samples of class j (model in evaluation mode, after training);

and the server forms the global prototypes, weighted by the class counts
``|D_ij|``::

    C_bar[j] = sum_i |D_ij| C_i[j] / sum_i |D_ij|

over participating agents holding class j (a class nobody uploaded this round
keeps its previous prototype).

Inference (``inference='proto'``, the paper's Sec. "Inference"): a sample is
assigned the class of the nearest global prototype to its embedding,
``argmin_j ||f_i(x) - C_bar[j]||^2`` (classes without a prototype are never
predicted); ``inference='model'`` uses the model's own classifier head instead.
C-SPE / C-GEN evaluate every agent's own model this way. There is no global model
(``has_global=False``: ``global_acc`` is null).

Divergence guard: an agent whose model, optimizer state, loss or local
prototypes turn non-finite keeps its previous model and state and uploads no
prototypes (``num_diverged``). Communication per round (float32): every
participating agent downloads the global prototypes ``[C, F]`` and their class
counts ``[C]`` (which classes have one), and every one that did not diverge
uploads its local prototypes ``[C, F]`` and class counts ``|D_ij|`` ``[C]`` (the
aggregation weights): ``bytes_down`` / ``bytes_up`` = those agents x ``4 C (F +
1)``; no model leaves an agent.

State: ``params [A, ...]``, ``opt [A, ...]`` every agent's model and optimizer
state; ``protos`` float32 ``[C, F]`` global prototypes; ``count`` float32 ``[C]``
the samples behind each (0: no prototype yet).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from demjax import models
from demjax.algorithms.protocol import Algorithm, HParam, Rounds, one_round
from demjax.local import masked_cross_entropy
from demjax.pytrees import (
    comm_bytes,
    divergence_guard,
    masked_mean,
    round_counts,
    stack,
    tree_bytes,
)

DISTANCES = ("mse", "sq_l2")
INFERENCES = ("proto", "model")


@flax.struct.dataclass
class FedProtoState:
    params: object
    opt: object
    protos: jax.Array
    count: jax.Array


HPARAMS = {
    "lam": HParam(
        1.0,
        "fedproto: prototype regularizer weight lambda (>= 0; paper/code: 1)",
        low=0.0,
    ),
    "distance": HParam(
        "mse",
        "fedproto: regularizer distance: mse (||.||^2 / F, the authors' code) or "
        "sq_l2 (||.||^2)",
        choices=DISTANCES,
    ),
    "inference": HParam(
        "proto",
        "fedproto: proto (nearest global prototype, the paper) or model (the "
        "model's classifier head)",
        choices=INFERENCES,
    ),
}


def class_sums(feats, y, mask, num_classes: int):
    """Per-class feature sums and counts of one agent (a one-hot matmul).

    Args:
      feats: float32 ``[N, F]``; y: int32 ``[N]``; mask: bool ``[N]`` real rows.

    Returns:
      ``(sums float32 [C, F], counts float32 [C])``.
    """
    onehot = jax.nn.one_hot(y, num_classes, dtype=feats.dtype) * mask[:, None]
    return onehot.T @ feats, jnp.sum(onehot, axis=0)


def aggregate_protos(sums, counts, weight, old_protos, old_count):
    """Global prototypes (server prototype aggregation), count-weighted over agents.

    Args:
      sums: float32 ``[A, C, F]`` per-agent class feature sums; counts: float32
        ``[A, C]``; weight: float32 ``[A]`` (1 participating, 0 not);
      old_protos: ``[C, F]``; old_count: ``[C]``.

    Returns:
      ``(protos [C, F], count [C])``: ``sum_a w_a sums[a, j] / sum_a w_a
      counts[a, j]`` where that count is > 0, else the old prototype and count.
    """
    # Excluded agents' rows may be non-finite (diverged): never multiplied in.
    use = weight > 0
    sums = jnp.where(use[:, None, None], sums, 0.0)
    counts = jnp.where(use[:, None], counts, 0.0)
    total = jnp.einsum("a,acf->cf", weight, sums)
    count = weight @ counts
    got = count > 0
    protos = jnp.where(got[:, None], total / jnp.maximum(count, 1e-12)[:, None], 0.0)
    return (
        jnp.where(got[:, None], protos, old_protos),
        jnp.where(got, count, old_count),
    )


def proto_distances(feats, protos, count, distance: str = "sq_l2"):
    """``d(f, C_bar[j])`` for every sample and class: ``[B, F], [C, F] -> [B, C]``;
    ``+inf`` for classes without a prototype (``count == 0``)."""
    d = jnp.sum(jnp.square(feats[:, None, :] - protos[None, :, :]), axis=-1)
    if distance == "mse":
        d = d / feats.shape[-1]
    return jnp.where(count[None, :] > 0, d, jnp.inf)


def make_loss(feat_apply, lam: float, distance: str):
    """One minibatch's FedProto loss (the local objective).

    ``feat_apply(params, x, train, key) -> (logits [B, C], feats [B, F])``.

    Returns:
      ``loss(params, xb, yb, mask, protos [C, F], count [C], key) -> (total, ce)``.
    """

    def loss(params, xb, yb, mask, protos, count, key):
        logits, feats = feat_apply(params, xb, True, key)
        ce = masked_cross_entropy(logits, yb, mask)
        d = jnp.sum(jnp.square(feats - protos[yb]), axis=-1)
        if distance == "mse":
            d = d / feats.shape[-1]
        use = (mask & (count[yb] > 0)).astype(d.dtype)
        reg = jnp.sum(d * use) / jnp.maximum(jnp.sum(mask.astype(d.dtype)), 1.0)
        return ce + lam * reg, ce

    return loss


def _feature_apply(model):
    def feat_apply(params, x, train, key):
        rngs = {"dropout": key} if (train and key is not None) else {}
        return model.apply(
            {"params": params}, x, train=train, rngs=rngs, return_features=True
        )

    return feat_apply


def build(ctx) -> Rounds:
    lam = float(ctx.hp["lam"])
    distance = str(ctx.hp["distance"])
    inference = str(ctx.hp["inference"])
    num_agents, num_classes = ctx.num_agents, ctx.num_classes
    feat_apply = _feature_apply(ctx.model)
    cfg = ctx.config
    eval_model = models.make_model(cfg.model, num_classes, cfg.hidden, "xla")
    eval_feat_apply = _feature_apply(eval_model)
    loss = make_loss(feat_apply, lam, distance)
    grad_loss = jax.grad(loss, has_aux=True)

    def grad_fn(params, xb, yb, mask, anchor, mu, key):
        return grad_loss(params, xb, yb, mask, anchor["protos"], anchor["count"], key)

    train = ctx.trainer(grad_fn=grad_fn)
    map_batch = min(int(ctx.block_size) or 8, num_agents)

    def agent_sums(args):
        p, x, y, n = args
        _, feats = eval_feat_apply(p, x, False, None)
        return class_sums(feats, y, jnp.arange(y.shape[0]) < n, num_classes)

    def message_bytes():
        """Bytes of one prototype message: prototypes [C, F] and class counts
        [C], float32."""
        one = jax.eval_shape(ctx.init_model, jax.random.PRNGKey(0))
        x1 = jax.ShapeDtypeStruct((1, *ctx.input_shape), jnp.float32)
        feats = jax.eval_shape(lambda p, x: feat_apply(p, x, False, None), one, x1)[1]
        return tree_bytes(
            (
                jax.ShapeDtypeStruct((num_classes, feats.shape[-1]), jnp.float32),
                jax.ShapeDtypeStruct((num_classes,), jnp.float32),
            )
        )

    message = message_bytes()

    def init(key, part):
        params = ctx.init_population(key)
        one = jax.tree.map(lambda p: p[0], params)
        x1 = jnp.zeros((1, *ctx.input_shape), jnp.float32)
        feat_dim = jax.eval_shape(lambda p: feat_apply(p, x1, False, None), one)[1]
        protos = jnp.zeros((num_classes, feat_dim.shape[-1]), jnp.float32)
        return FedProtoState(
            params=params,
            opt=jax.vmap(ctx.tx.init)(params),
            protos=protos,
            count=jnp.zeros((num_classes,), jnp.float32),
        )

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_train = jax.random.fold_in(key, 17)
        anchor = {
            "protos": stack(state.protos, num_agents),
            "count": stack(state.count, num_agents),
        }
        params, opt, ce = train(
            jax.random.split(k_train, num_agents),
            state.params,
            state.opt,
            part.x_train,
            part.y_train,
            part.n_train,
            anchor,
            jnp.float32(0.0),
            max_steps,
        )
        sums, counts = jax.lax.map(
            agent_sums,
            (params, part.x_train, part.y_train, part.n_train),
            batch_size=map_batch,
        )
        (params, opt), ok, diverged = divergence_guard(
            active, (params, opt), (state.params, state.opt), ce, sums
        )
        protos, count = aggregate_protos(
            sums, counts, ok.astype(jnp.float32), state.protos, state.count
        )
        new = FedProtoState(params=params, opt=opt, protos=protos, count=count)
        info = {
            "train_loss": masked_mean(ce, ok.astype(jnp.float32)),
            "num_protos": jnp.sum(count > 0).astype(jnp.float32),
            **round_counts(active, diverged),
            **comm_bytes(message, ok, message, active),
        }
        return new, info

    def proto_logits(personal, x, train, key):
        _, feats = eval_feat_apply(personal["model"], x, False, None)
        return -proto_distances(feats, personal["protos"], personal["count"])

    if inference == "proto":

        def personal(state, part, key):
            return {
                "model": state.params,
                "protos": stack(state.protos, num_agents),
                "count": stack(state.count, num_agents),
            }

        eval_apply = proto_logits
    else:

        def personal(state, part, key):
            return state.params

        eval_apply = None

    return one_round(
        ctx,
        init=init,
        round=round_fn,
        personal=personal,
        global_model=None,
        eval_apply=eval_apply,
    )


ALGORITHM = Algorithm(
    name="fedproto",
    citation="Tan et al., AAAI 2022, Algorithm 1 (FedProto)",
    hparams=HPARAMS,
    build=build,
    has_global=False,
)


__all__ = [
    "ALGORITHM",
    "aggregate_protos",
    "class_sums",
    "make_loss",
    "proto_distances",
]
