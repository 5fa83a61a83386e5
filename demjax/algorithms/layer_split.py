"""Personalized FL by splitting the model into a shared and a personal part.

The library behind FedPer, FedRep, LG-FedAvg, FedBABU and FedBN
(``fedper.py``, ``fedrep.py``, ``lg_fedavg.py``, ``fedbabu.py``, ``fedbn.py``):
the head/body rule, optimizers that freeze a part, and the one round they share.

**Head/body rule.** A model's parameters are a dict of layers (flax module names:
``Dense_0``, ``Dense_1``, ..., ``conv0``, ``embed``, ``lstm0``, ...). The *head*
is the ``head_layers`` dense layers ``Dense_i`` with the highest indices (the
last ``Dense`` layer for ``head_layers=1``: the classifier of every model in
``demjax.models``); the *body* is every other layer (convolutions, embeddings,
LSTMs, the lower dense layers). The split is by whole layers, so each part is a
sub-dict of the parameters and merging is a dict union (no masks at run time).

**The round** (``build_split``), vectorized over the A agents (leaves
``[A, ...]``, no Python loop over agents): the participants start from the
server's shared part and their own personal part, train locally (``train``: one
``ctx.trainer`` or a sequence of them, each freezing a part through
``optax.multi_transform`` with ``optax.set_to_zero``), and the server replaces
the shared part with the sample-weighted mean (or the robust ``aggregator``) of
the participants' shared parts. Agents whose trained parameters are non-finite
are reset to their old state, left out of the mean and counted
(``num_diverged``). ``bytes_up`` / ``bytes_down``: every participant uploads and
downloads the shared part once per round (float32 bytes of one shared part times
the participants).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from demjax.algorithms.protocol import HParam, Rounds, one_round
from demjax.errors import ConfigError
from demjax.pytrees import (
    comm_bytes,
    finite_agents,
    keep_if_finite,
    masked_mean,
    round_counts,
    stack,
    tree_bytes,
    where_agents,
)

_DENSE = re.compile(r"Dense_(\d+)$")
# The algorithms built on this module: they need a model with layers below its
# last dense layer (``model='mlr'`` has none; FedBN needs ``model='mlp'``).
ALGORITHMS = ("fedbabu", "fedbn", "fedper", "fedrep", "lg_fedavg")


def head_layers_hparam(alg: str, what: str, default: int = 1) -> HParam:
    """The ``<alg>.head_layers`` hyper-parameter (an int >= 1); ``what`` says
    what the head is in ``alg``."""
    return HParam(
        default,
        f"{alg}: dense layers in the head ({what}), the last ones of the model "
        "(>= 1, fewer than the model's dense layers)",
        low=1,
    )


def head_keys(params, head_layers: int = 1, field: str = "head_layers") -> tuple:
    """The names of the head's layers: the ``head_layers`` top-level ``Dense_i``
    entries of ``params`` with the highest ``i``.

    Args:
      params: one model's (or a stacked population's) parameters, a dict of layers.
      head_layers: the number of dense layers in the head (>= 1).
      field: the config field named in errors (e.g. ``fedper.head_layers``).

    Returns:
      The head's layer names (a tuple of str); the body is every other layer.

    Raises:
      ConfigError: ``head_layers`` leaves no body (the model has at most
        ``head_layers`` dense layers and nothing else).
    """
    dense = sorted((int(m.group(1)), k) for k in params if (m := _DENSE.match(str(k))))
    others = [k for k in params if not _DENSE.match(str(k))]
    most = len(dense) - (0 if others else 1)
    if head_layers < 1 or head_layers > most:
        accepted = (
            f"an integer in [1, {most}] for this model"
            if most >= 1
            else "a model with a body below its last dense layer (mlp, cnn, cnn4, "
            "cnn_cifar, char_rnn)"
        )
        raise ConfigError(
            f"{field}={head_layers!r} is not valid for a model with {len(dense)} "
            f"dense layer(s); accepted: {accepted}"
        )
    return tuple(k for _, k in dense[-head_layers:])


def pick(params, keys) -> dict:
    """The sub-dict of ``params`` with the layers ``keys`` (leaves untouched)."""
    return {k: params[k] for k in params if k in keys}


def drop(params, keys) -> dict:
    """The sub-dict of ``params`` without the layers ``keys``."""
    return {k: params[k] for k in params if k not in keys}


def merge(*parts) -> dict:
    """The union of layer sub-dicts (later parts win)."""
    out = {}
    for p in parts:
        out.update(p)
    return out


def freeze(
    tx: optax.GradientTransformation, params, frozen
) -> optax.GradientTransformation:
    """``tx`` on every layer but ``frozen``, whose updates are zero (and whose
    optimizer state is empty), so frozen parameters never move, whatever
    ``tx`` (momentum, Adam, weight decay).

    Args:
      tx: the local optimizer.
      params: one model's parameters (the structure of the labels).
      frozen: the names of the frozen layers.
    """
    labels = {
        k: jax.tree.map(lambda _, f=(k in frozen): "freeze" if f else "train", v)
        for k, v in params.items()
    }
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


@flax.struct.dataclass
class SplitState:
    """State of a split algorithm.

    Attributes:
      params: the agents' models, leaves ``[A, ...]`` (their personal part is
        theirs; their shared part is the one they last trained).
      opt: the agents' optimizer states ``[A, ...]`` (a tuple: one per
        training stage).
      shared: one model whose shared layers are the server's (its other layers
        are the initial ones, FedBABU's fixed head).
    """

    params: object
    opt: tuple
    shared: object


def build_split(
    ctx,
    *,
    shared_keys: tuple,
    stages: tuple,
    personal: Callable | None = None,
    global_model: Callable | None = None,
    init_model: Callable | None = None,
    eval_apply: Callable | None = None,
) -> Rounds:
    """The ``Rounds`` of an algorithm that averages only the layers ``shared_keys``.

    Args:
      ctx: the protocol's ``Context``.
      shared_keys: the layers the server averages and sends.
      stages: ``(train, tx)`` pairs run in order each round: ``train`` a
        ``ctx.trainer`` whose optimizer is ``tx`` (the stage's optimizer state
        is ``vmap(tx.init)``); each stage starts from the previous one's models.
      personal: ``personal(state, part, key) -> params [A, ...]``; default: the
        server's shared layers with each agent's own other layers.
      global_model: ``global_model(state) -> params`` or None.
      init_model: ``init_model(key) -> one model`` (default ``ctx.init_model``).
      eval_apply: the evaluation ``(params, x, train, key) -> logits`` (default
        the model's own).
    """
    num_agents = ctx.num_agents

    def init(key, part):
        w = (init_model or ctx.init_model)(key)
        params = stack(w, num_agents)
        opt = tuple(jax.vmap(tx.init)(params) for _, tx in stages)
        return SplitState(params=params, opt=opt, shared=w)

    def start_models(state):
        return merge(state.params, pick(stack(state.shared, num_agents), shared_keys))

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_train, k_agg = jax.random.split(jax.random.fold_in(key, 23))
        params = start_models(state)
        opts, losses = [], []
        for i, (train, _) in enumerate(stages):
            params, opt, loss = train(
                jax.random.split(jax.random.fold_in(k_train, i), num_agents),
                params,
                state.opt[i],
                part.x_train,
                part.y_train,
                part.n_train,
                params,
                jnp.float32(0.0),
                max_steps,
            )
            opts.append(opt)
            losses.append(loss)
        finite = finite_agents(params)
        ok = active & finite
        weight = ok * part.n_train.astype(jnp.float32)
        params = where_agents(ok, params, state.params)  # finite everywhere
        avg = ctx.aggregate(pick(params, shared_keys), weight, k_agg)
        shared = merge(state.shared, avg)
        new = SplitState(
            params=params,
            opt=tuple(
                where_agents(ok, o, old) for o, old in zip(opts, state.opt, strict=True)
            ),
            shared=keep_if_finite(shared, state.shared),
        )
        message = tree_bytes(pick(state.shared, shared_keys))
        info = {
            "train_loss": masked_mean(losses[-1], ok.astype(jnp.float32)),
            **round_counts(active, active & ~finite),
            **comm_bytes(message, active, message, active),
        }
        return new, info

    if personal is None:

        def personal(state, part, key):
            return start_models(state)

    return one_round(
        ctx,
        init=init,
        round=round_fn,
        personal=personal,
        global_model=global_model,
        eval_apply=eval_apply,
    )


def split_keys(ctx, alg: str) -> tuple[tuple, tuple]:
    """``(head, body)`` layer names of the run's model for ``<alg>.head_layers``.

    Raises:
      ConfigError: naming ``<alg>.head_layers`` (see ``head_keys``).
    """
    shapes = jax.eval_shape(ctx.init_model, jax.random.PRNGKey(0))
    head = head_keys(shapes, int(ctx.hp["head_layers"]), f"{alg}.head_layers")
    body = tuple(k for k in shapes if k not in head)
    return head, body


def frozen_trainer(ctx, frozen: tuple, local_epochs: int | None = None):
    """``(train, tx)``: a ``ctx.trainer`` over ``local_epochs`` whose optimizer
    is ``ctx.tx`` with the layers ``frozen`` frozen (``freeze``)."""
    shapes = jax.eval_shape(ctx.init_model, jax.random.PRNGKey(0))
    tx = freeze(ctx.tx, shapes, frozen) if frozen else ctx.tx
    return ctx.trainer(tx=tx, local_epochs=local_epochs), tx
