"""pFedHN: Shamsian, Navon, Fetaya, Chechik, "Personalized Federated Learning
using Hypernetworks", ICML 2021, Algorithm 1, Eq. 3-4 (and pFedHN-PC, Sec. 3.3).

A server hypernetwork ``h(v; phi)`` maps a learned embedding ``v_i`` of agent i
to agent i's model ``theta_i = h(v_i; phi)``. Each round every participating
agent i

1. receives ``theta_i = h(v_i; phi)`` and trains it locally (``local_epochs`` of
   the run's optimizer, a fresh optimizer state every round, as the authors'
   code) -> ``theta~_i``;
2. sends ``delta_i = theta_i - theta~_i``;

and the server takes one step of its optimizer on the vector-Jacobian products
(Eq. 4)::

    grad_phi = R( sum_i (d theta_i / d phi)^T delta_i ),
    grad_v_i = (d theta_i / d v_i)^T delta_i,

``R`` the mean over the agents that trained (``server_reduce='mean'``; with one
agent per round, Algorithm 1's update) or the sum (``'sum'``). One ``jax.vjp`` of
the hypernetwork vmapped over all embeddings gives every term at once (rows of
agents that did not train get a zero cotangent). The server optimizer is the
authors' code's: global-norm clipping of the gradient at ``clip``, SGD with
momentum 0.9 and weight decay ``wd``, learning rate ``lr`` for ``phi`` and
``embed_lr`` for the embeddings.

The hypernetwork (the authors' code): ``v`` (float32 ``[E]``, ``E = embed_dim``,
0 = ``1 + A / 4``) -> a linear layer to ``hidden`` units, then ``n_hidden`` times
(ReLU, linear ``hidden -> hidden``), then one linear head to every target
parameter (flat ``[D]``, unraveled into the model's pytree). Layers are
initialized as PyTorch's ``nn.Linear`` (weights and biases uniform in
``+-1/sqrt(fan_in)``), embeddings as ``nn.Embedding`` (standard normal).

pFedHN-PC (``personal_classifier=True``): the hypernetwork produces the body
(every parameter but the output layer, the model's last ``Dense_*``) and each
agent keeps its own output layer, trained jointly during the local steps and
never sent.

C-SPE / C-GEN evaluate ``h(v_i; phi)`` (with agent i's own output layer for
pFedHN-PC). There is no global model (``has_global=False``: ``global_acc`` is
null). Communication per participating agent: ``theta_i`` down and ``delta_i``
up, each the size of one model (of the body for pFedHN-PC).

State: ``phi`` (hypernetwork, no agent axis); ``emb`` float32 ``[A, E]``;
``opt`` the server optimizer's state of ``(phi, emb)``; ``head`` the personal
output layers ``[A, ...]`` (pFedHN-PC; None otherwise).
"""

from __future__ import annotations

import math
import re

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from demjax.algorithms.protocol import Algorithm, HParam, Rounds, one_round
from demjax.errors import ConfigError
from demjax.pytrees import finite_agents, masked_mean, tree_bytes, where_agents

REDUCES = ("mean", "sum")
_DENSE = re.compile(r"^Dense_(\d+)$")


@flax.struct.dataclass
class PFedHNState:
    phi: object
    emb: jax.Array
    opt: object
    head: object


HPARAMS = {
    "embed_dim": HParam(
        0,
        "pfedhn: agent embedding size E (>= 0; 0 = 1 + A / 4, the authors' code)",
        low=0,
    ),
    "hidden": HParam(
        100, "pfedhn: hypernetwork hidden width (>= 1; paper/code: 100)", low=1
    ),
    "n_hidden": HParam(
        3,
        "pfedhn: hidden->hidden layers of the hypernetwork (>= 0; paper/code: 3)",
        low=0,
    ),
    "lr": HParam(
        0.01,
        "pfedhn: server SGD learning rate of phi (> 0; paper/code: 0.01)",
        low=0.0,
        low_open=True,
    ),
    "embed_lr": HParam(
        0.0,
        "pfedhn: server learning rate of the embeddings (>= 0; 0 = pfedhn.lr, the "
        "authors' code)",
        low=0.0,
    ),
    "momentum": HParam(
        0.9,
        "pfedhn: server SGD momentum (in [0, 0.999]; code: 0.9)",
        low=0.0,
        high=0.999,
    ),
    "wd": HParam(0.001, "pfedhn: server weight decay (>= 0; code: 0.001)", low=0.0),
    "clip": HParam(
        50.0,
        "pfedhn: global-norm clip of the server gradient (>= 0, 0 = off; code: 50)",
        low=0.0,
    ),
    "server_reduce": HParam(
        "mean",
        "pfedhn: phi's gradient over the round's agents: mean (one agent: Alg. 1) "
        "or sum",
        choices=REDUCES,
    ),
    "personal_classifier": HParam(
        False,
        "pfedhn: pFedHN-PC, each agent keeps its own output layer (True/False; "
        "default False)",
    ),
}


def classifier_name(params) -> str:
    """The output layer of a model's parameters: the top-level ``Dense_<i>`` with
    the largest ``i``.

    Raises:
      ConfigError: no such layer, or nothing else (``model=mlr``).
    """
    dense = [k for k in params if _DENSE.match(k)]
    if not dense or len(params) < 2:
        raise ConfigError(
            "pfedhn.personal_classifier=True needs a model with layers before its "
            "output layer; accepted: model=mlp, cnn, cnn4 or cnn_cifar"
        )
    return max(dense, key=lambda k: int(_DENSE.match(k).group(1)))


def split_head(params, name: str):
    """``(body, head)``: the parameters without and with only ``name``."""
    body = {k: v for k, v in params.items() if k != name}
    return body, params[name]


def merge_head(body, head, name: str):
    """The full parameter dict of ``body`` plus the output layer ``head``."""
    return {**body, name: head}


def _linear_init(key, fan_in: int, fan_out: int):
    bound = 1.0 / math.sqrt(fan_in)
    kw, kb = jax.random.split(key)
    return {
        "w": jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound),
        "b": jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound),
    }


def init_hypernet(key, embed_dim: int, hidden: int, n_hidden: int, out_dim: int):
    """Hypernetwork parameters: ``{"mlp": [layer...], "head": layer}``, each layer
    ``{"w": [in, out], "b": [out]}`` (float32, PyTorch ``nn.Linear`` init)."""
    keys = jax.random.split(key, n_hidden + 2)
    dims = [embed_dim] + [hidden] * (n_hidden + 1)
    mlp = [_linear_init(keys[i], dims[i], dims[i + 1]) for i in range(n_hidden + 1)]
    return {"mlp": mlp, "head": _linear_init(keys[-1], hidden, out_dim)}


def hypernet_apply(phi, v):
    """``h(v; phi)``: one embedding float32 ``[E]`` -> flat parameters ``[D]``."""
    h = v
    for i, layer in enumerate(phi["mlp"]):
        if i:
            h = jax.nn.relu(h)
        h = h @ layer["w"] + layer["b"]
    return h @ phi["head"]["w"] + phi["head"]["b"]


def server_optimizer(hp) -> optax.GradientTransformation:
    """Clip (global norm), weight decay, momentum; learning rates ``lr`` for
    ``phi`` and ``embed_lr`` for the embeddings (PyTorch SGD with two parameter
    groups). Acts on ``{"phi": ..., "emb": ...}``."""
    lr = float(hp["lr"])
    embed_lr = float(hp["embed_lr"]) or lr
    clip = float(hp["clip"])
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    parts += [
        optax.add_decayed_weights(float(hp["wd"])),
        optax.trace(decay=float(hp["momentum"])),
        optax.multi_transform(
            {"phi": optax.scale(-lr), "emb": optax.scale(-embed_lr)},
            {"phi": "phi", "emb": "emb"},
        ),
    ]
    return optax.chain(*parts)


def build(ctx) -> Rounds:
    hp = ctx.hp
    num_agents = ctx.num_agents
    embed_dim = int(hp["embed_dim"]) or int(1 + num_agents / 4)
    hidden, n_hidden = int(hp["hidden"]), int(hp["n_hidden"])
    pc = bool(hp["personal_classifier"])
    mean = str(hp["server_reduce"]) == "mean"
    tx = server_optimizer(hp)
    train = ctx.trainer()

    template = ctx.init_model(jax.random.PRNGKey(0))
    name = classifier_name(template) if pc else None
    body_t = split_head(template, name)[0] if pc else template
    flat_t, unravel = ravel_pytree(body_t)
    out_dim = int(flat_t.size)
    msg_bytes = tree_bytes(body_t)

    def generate(phi, emb):
        """Flat bodies ``[A, D]`` of every agent: the hypernetwork vmapped."""
        return jax.vmap(hypernet_apply, in_axes=(None, 0))(phi, emb)

    def assemble(flat, head):
        body = jax.vmap(unravel)(flat)
        return merge_head(body, head, name) if pc else body

    def init(key, part):
        k_phi, k_emb, k_head = jax.random.split(key, 3)
        phi = init_hypernet(k_phi, embed_dim, hidden, n_hidden, out_dim)
        emb = jax.random.normal(k_emb, (num_agents, embed_dim), jnp.float32)
        head = None
        if pc:
            one = split_head(ctx.init_model(k_head), name)[1]
            head = jax.tree.map(lambda p: jnp.broadcast_to(p, (num_agents, *p.shape)),
                                one)  # fmt: skip
        opt = tx.init({"phi": phi, "emb": emb})
        return PFedHNState(phi=phi, emb=emb, opt=opt, head=head)

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_train = jax.random.fold_in(key, 17)
        flat, vjp = jax.vjp(generate, state.phi, state.emb)
        params = assemble(flat, state.head)
        trained, _, loss = train(
            jax.random.split(k_train, num_agents),
            params,
            jax.vmap(ctx.tx.init)(params),
            part.x_train,
            part.y_train,
            part.n_train,
            params,
            jnp.float32(0.0),
            max_steps,
        )
        ok = finite_agents(trained)
        use = active & ok
        if pc:
            body, head = split_head(trained, name)
        else:
            body, head = trained, None
        new_flat = jax.vmap(lambda p: ravel_pytree(p)[0])(body)
        delta = jnp.where(use[:, None], flat - new_flat, 0.0)  # theta - theta~
        g_phi, g_emb = vjp(delta)
        n_use = jnp.sum(use).astype(jnp.float32)
        if mean:
            g_phi = jax.tree.map(lambda g: g / jnp.maximum(n_use, 1.0), g_phi)
        server = {"phi": state.phi, "emb": state.emb}
        updates, opt = tx.update({"phi": g_phi, "emb": g_emb}, state.opt, server)
        new_server = optax.apply_updates(server, updates)
        # A round without usable updates (or a non-finite step) leaves the server.
        good = (n_use > 0) & jnp.all(
            jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_server)])
        )
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(good, n, o), new, old
        )
        new_server, opt = keep(new_server, server), keep(opt, state.opt)
        new = PFedHNState(
            phi=new_server["phi"],
            emb=new_server["emb"],
            opt=opt,
            head=where_agents(use, head, state.head) if pc else None,
        )
        num_active = jnp.sum(active)
        use_f = use.astype(jnp.float32)
        sent = num_active.astype(jnp.float32) * jnp.float32(msg_bytes)
        info = {
            "train_loss": masked_mean(jnp.where(use, loss, 0.0), use_f),
            "num_active": num_active,
            "num_diverged": jnp.sum(active & ~ok),
            "bytes_up": sent,
            "bytes_down": sent,
        }
        return new, info

    def personal(state, part, key):
        return assemble(generate(state.phi, state.emb), state.head)

    return one_round(ctx, init=init, round=round_fn, personal=personal)


def check(config) -> None:
    """The server step is a sum of VJPs (no model averaging, so no robust
    ``aggregator``); pFedHN-PC needs a model with a body before its output
    layer."""
    if str(config.aggregator) != "mean":
        raise ConfigError(
            f"aggregator={config.aggregator!r} is not valid with algorithm='pfedhn' "
            "(its server step sums vector-Jacobian products); accepted: mean"
        )
    if bool(config.pfedhn.personal_classifier) and str(config.model) == "mlr":
        raise ConfigError(
            "pfedhn.personal_classifier=True with model='mlr' is not valid (the model "
            "is only its output layer); accepted: model=mlp, cnn, cnn4 or cnn_cifar"
        )


ALGORITHM = Algorithm(
    name="pfedhn",
    citation="Shamsian et al., ICML 2021, Algorithm 1, Eq. 3-4 (pFedHN, pFedHN-PC)",
    hparams=HPARAMS,
    build=build,
    has_global=False,
    check=check,
)


__all__ = [
    "ALGORITHM",
    "classifier_name",
    "hypernet_apply",
    "init_hypernet",
    "server_optimizer",
]
