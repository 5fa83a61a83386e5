"""FedGKT: He, Annavaram, Avestimehr, "Group Knowledge Transfer: Federated
Learning of Large CNNs at the Edge", NeurIPS 2020, Algorithm 1 and Eq. 4-7.

Every agent keeps its own small edge model (the configured model: a feature
extractor and its classifier, the last dense layer; F features); the server
keeps one larger model on the features, an MLP ``F -> server_hidden -> ReLU ->
C``. No model is averaged: knowledge moves as per-sample logits.

Each round (Alg. 1):

1. Every participating agent i trains its edge model (``local_epochs`` of
   ``config.optimizer`` at ``config.lr``, the engine's minibatch loop) on
   (Eq. 5)::

       CE(f_i(x), y) + alpha * KD(z_s, f_i(x))

   averaged over the minibatch, ``z_s`` the server's logits for the same samples
   (received in an earlier round; an agent that never received any trains on CE
   alone) and ``KD(t, s) = T^2 KL(softmax(t / T) || softmax(s / T))``.
2. It sends the features ``H_i`` ``[n_i, F]``, logits ``z_i`` ``[n_i, C]`` and
   labels of its training rows (computed without dropout).
3. The server trains its model for ``server_epochs`` passes over the uploaded
   rows (shuffled, minibatches of ``server_batch``, SGD with momentum 0.9 at
   ``server_lr``) on (Eq. 6-7)::

       CE(f_s(H), y) + alpha * KD(z_i, f_s(H))

4. and sends back its logits ``f_s(H_i)`` for every uploaded row (Eq. 4's
   transfer), stored per agent for step 1 of later rounds.

Communication per participant, exact for its ``n_i`` rows (float32 features and
logits, int32 labels): up ``n_i (F + C + 1) * 4`` bytes, down ``n_i C * 4``. An
agent whose edge model turns non-finite keeps its model and optimizer state,
sends nothing the server uses and receives no logits, and is counted in
``num_diverged``.

Defaults: ``temperature`` 3 and ``alpha`` 1 as the authors' implementation
(FedML ``fedgkt``), whose server optimizer is SGD with momentum 0.9 at lr 0.001.

C-SPE / C-GEN evaluate the agents' edge models. No Global metric (null): the
server model acts on edge features, not on inputs, so it is no single model of
the inputs.

State: ``edge [A, ...]`` the edge models and ``opt [A, ...]`` their optimizer
state; ``server``, ``server_opt`` the server model and its optimizer state;
``logits`` float32 ``[A, N_max, C]`` the server's last logits per training row;
``has_logits`` bool ``[A]``.
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
from demjax.pytrees import finite_agents, masked_mean, where_agents


@flax.struct.dataclass
class FedGKTState:
    edge: object
    opt: object
    server: object
    server_opt: object
    logits: jax.Array
    has_logits: jax.Array


HPARAMS = {
    "alpha": HParam(
        1.0,
        "fedgkt: weight alpha of the distillation loss on both sides (>= 0; "
        "authors' code: 1)",
        low=0.0,
    ),
    "temperature": HParam(
        3.0,
        "fedgkt: distillation temperature T (> 0; authors' code: 3)",
        low=0.0,
        low_open=True,
    ),
    "server_lr": HParam(
        0.001,
        "fedgkt: server SGD (momentum 0.9) learning rate (> 0; authors' code: "
        "0.001)",
        low=0.0,
        low_open=True,
    ),
    "server_epochs": HParam(
        1, "fedgkt: server passes over the uploaded rows per round (>= 1)", low=1
    ),
    "server_batch": HParam(
        64, "fedgkt: server minibatch size (>= 1; authors' code: 64)", low=1
    ),
    "server_hidden": HParam(
        256, "fedgkt: hidden width of the server model (>= 1)", low=1
    ),
}


class ServerModel(nn.Module):
    """``f_s(H [B, F]) -> logits [B, C]``: dense(hidden), ReLU, dense(C)."""

    hidden: int
    num_classes: int

    @nn.compact
    def __call__(self, h):
        h = nn.relu(nn.Dense(self.hidden)(h))  # Dense_0
        return nn.Dense(self.num_classes)(h)  # Dense_1


def kd(teacher, student, temperature: float):
    """Per-row ``T^2 KL(softmax(t/T) || softmax(s/T))``: ``[B, C]`` x 2 -> ``[B]``."""
    lt = jax.nn.log_softmax(teacher / temperature, axis=-1)
    ls = jax.nn.log_softmax(student / temperature, axis=-1)
    return temperature**2 * jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)


def server_batches(key, valid, epochs: int, batch: int):
    """Minibatch rows of the server's training: ``(idx int32 [E * S, B], mask bool
    [E * S, B])`` over ``valid`` bool ``[R]``; each epoch a fresh shuffle with the
    valid rows first, ``S = ceil(R / B)`` steps (a step without rows is skipped)."""
    rows = valid.shape[0]
    steps = -(-rows // batch)
    pad = steps * batch - rows

    def one(k):
        order = jnp.argsort(jnp.where(valid, jax.random.uniform(k, (rows,)), 2.0))
        order = jnp.pad(order, (0, pad))
        mask = jnp.pad(valid[order[:rows]], (0, pad))
        return order.reshape(steps, batch), mask.reshape(steps, batch)

    idx, mask = jax.vmap(one)(jax.random.split(key, epochs))
    return idx.reshape(-1, batch).astype(jnp.int32), mask.reshape(-1, batch)


def build(ctx) -> Rounds:
    hp = ctx.hp
    alpha, temp = float(hp["alpha"]), float(hp["temperature"])
    epochs, sbatch = int(hp["server_epochs"]), int(hp["server_batch"])
    num_agents, num_classes = ctx.num_agents, ctx.num_classes
    model = ctx.model

    def feat_apply(params, x, train, key):
        rngs = {"dropout": key} if (train and key is not None) else {}
        return model.apply(
            {"params": params}, x, train=train, rngs=rngs, return_features=True
        )

    n_feat = int(
        jax.eval_shape(
            lambda p: feat_apply(p, jnp.zeros((1, *ctx.input_shape)), False, None),
            jax.eval_shape(ctx.init_model, jax.random.PRNGKey(0)),
        )[1].shape[-1]
    )
    server_model = ServerModel(int(hp["server_hidden"]), num_classes)
    server_tx = optax.sgd(float(hp["server_lr"]), momentum=0.9)
    apply_fn = ctx.apply_fn

    def edge_loss(params, xb, rows, mask, anchor, a, key):
        """``rows``: the minibatch's row indices (the trainer's labels)."""
        logits = apply_fn(params, xb, True, key)
        yb = anchor["y"][rows]
        ce = masked_cross_entropy(logits, yb, mask)
        m = mask.astype(logits.dtype) * anchor["has"].astype(logits.dtype)
        dist = kd(anchor["logits"][rows], logits, temp)
        return ce + a * jnp.sum(dist * m) / jnp.maximum(jnp.sum(mask), 1.0), ce

    train = ctx.trainer(grad_fn=jax.grad(edge_loss, has_aux=True))

    def server_loss(s, h, y, z, m):
        out = server_model.apply({"params": s}, h)
        ce = masked_cross_entropy(out, y, m)
        mf = m.astype(out.dtype)
        return ce + alpha * jnp.sum(kd(z, out, temp) * mf) / jnp.maximum(
            jnp.sum(mf), 1.0
        )

    server_grad = jax.value_and_grad(server_loss)

    def init(key, part):
        k_e, k_s = jax.random.split(key)
        edge = ctx.init_population(k_e)
        server = server_model.init(k_s, jnp.zeros((1, n_feat)))["params"]
        n_max = part.x_train.shape[1]
        return FedGKTState(
            edge=edge,
            opt=jax.vmap(ctx.tx.init)(edge),
            server=server,
            server_opt=server_tx.init(server),
            logits=jnp.zeros((num_agents, n_max, num_classes), jnp.float32),
            has_logits=jnp.zeros((num_agents,), bool),
        )

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_train, k_server = jax.random.split(jax.random.fold_in(key, 23))
        n_max = part.x_train.shape[1]
        rows = jnp.broadcast_to(jnp.arange(n_max, dtype=jnp.int32),
                                (num_agents, n_max))  # fmt: skip
        anchor = {"y": part.y_train, "logits": state.logits,
                  "has": state.has_logits}  # fmt: skip
        local, opt, loss = train(
            jax.random.split(k_train, num_agents), state.edge, state.opt,
            part.x_train, rows, part.n_train, anchor, jnp.float32(alpha), max_steps,
        )  # fmt: skip
        finite = finite_agents(local)
        trained = active & finite
        edge = where_agents(trained, local, state.edge)

        # upload: features and logits of every training row (no dropout)
        logits_e, feats = jax.vmap(lambda p, x: feat_apply(p, x, False, None))(
            edge, part.x_train
        )
        real = jnp.arange(n_max)[None] < part.n_train[:, None]
        valid = (real & trained[:, None]).reshape(-1)
        keep = valid[:, None]  # rows of diverged or absent agents: zeros
        h = jnp.where(keep, feats.reshape(-1, n_feat), 0.0)
        y = part.y_train.reshape(-1)
        z = jnp.where(keep, logits_e.reshape(-1, num_classes), 0.0)
        idx, mask = server_batches(k_server, valid, epochs, sbatch)

        def step(carry, im):
            s, s_opt = carry
            i, m = im
            value, grads = server_grad(s, h[i], y[i], z[i], m)
            upd, new_opt = server_tx.update(grads, s_opt, s)
            new = (optax.apply_updates(s, upd), new_opt)
            go = jnp.any(m)
            carry = jax.tree.map(lambda a, b: jnp.where(go, a, b), new, (s, s_opt))
            return carry, (value * go, go)

        (server, server_opt), (vals, went) = jax.lax.scan(
            step, (state.server, state.server_opt), (idx, mask)
        )
        # download: the server's logits for the uploaded rows
        out = server_model.apply({"params": server}, h).reshape(
            num_agents, n_max, num_classes
        )
        logits = jnp.where(trained[:, None, None], out, state.logits)
        new = FedGKTState(
            edge=edge,
            opt=where_agents(trained, opt, state.opt),
            server=server,
            server_opt=server_opt,
            logits=logits,
            has_logits=state.has_logits | trained,
        )
        num_active = jnp.sum(active).astype(jnp.int32)
        rows_active = jnp.sum(jnp.where(active, part.n_train, 0)).astype(jnp.float32)
        info = {
            "train_loss": masked_mean(
                jnp.where(trained, loss, 0.0), trained.astype(jnp.float32)
            ),
            "server_loss": jnp.sum(vals) / jnp.maximum(jnp.sum(went), 1),
            "num_active": num_active,
            "num_diverged": jnp.sum(active & ~finite).astype(jnp.int32),
            "bytes_up": rows_active * jnp.float32((n_feat + num_classes + 1) * 4),
            "bytes_down": rows_active * jnp.float32(num_classes * 4),
        }
        return new, info

    return one_round(
        ctx,
        init=init,
        round=round_fn,
        personal=lambda state, part, key: state.edge,
        global_model=None,
    )


def check(config) -> None:
    """The edge model needs a feature output: the LSTM model is not supported."""
    if str(config.model) == "char_rnn":
        raise ConfigError(
            "model='char_rnn' is not valid with algorithm=fedgkt; accepted: mlr, "
            "mlp, cnn, cnn4, cnn_cifar"
        )


ALGORITHM = Algorithm(
    name="fedgkt",
    citation="He, Annavaram, Avestimehr, NeurIPS 2020, Algorithm 1, Eq. 4-7 "
    "(FedGKT)",
    hparams=HPARAMS,
    build=build,
    has_global=False,
    check=check,
)


__all__ = ["ALGORITHM", "ServerModel", "kd", "server_batches"]
