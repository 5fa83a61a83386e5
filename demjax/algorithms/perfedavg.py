"""Per-FedAvg: Fallah, Mokhtari, Ozdaglar, "Personalized Federated Learning with
Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS 2020,
Algorithm 1.

Each round every agent i starts from the global model ``w`` and, for every local
step (the engine's shuffled minibatch loop, ``local_epochs`` passes over its data),
takes three independent batches of its training data: ``D`` (the loop's minibatch)
and ``D'``, ``D''`` (``batch_size`` samples drawn without replacement), and does
the MAML step of the meta-objective ``F_i(w) = f_i(w - alpha * grad f_i(w))``
(Eq. 3, the MAML objective)::

    w~ = w - alpha * grad f_i(w; D)                               (Alg. 1 inner step)
    fo: w <- w - beta * grad f_i(w~; D')                          (Per-FedAvg (FO))
    hf: w <- w - beta * (I - alpha * H_i(w; D'')) grad f_i(w~; D')  (Per-FedAvg (HF))

The Hessian-vector product ``H_i(w; D'') v`` is exact (``hvp='exact'``: forward
mode over the gradient, ``jax.jvp`` of ``jax.grad``) or the paper's finite
difference (``hvp='fd'``, Per-FedAvg (HF))::

    [grad f_i(w + delta v; D'') - grad f_i(w - delta v; D'')] / (2 delta).

The outer step is ``config.optimizer`` at rate ``beta`` (``config.lr`` is unused;
with ``optimizer='sgd'`` exactly the rule above). The server averages the local
models (Alg. 1 server step; sample-weighted mean over participating agents, or the
robust ``config.aggregator``; the paper writes the plain mean).

Evaluation (Sec. 5): C-SPE / C-GEN evaluate each agent's personalized model, one
SGD step of rate ``alpha`` from the global model on a ``batch_size`` batch of the
agent's own training data (drawn afresh at every evaluation); Global evaluates
``w`` itself.

Divergence guard: an agent whose local model, optimizer state or loss turn
non-finite keeps its previous optimizer state and gets no weight in the
aggregate (``num_diverged``). Communication per round: every participating agent
downloads ``w`` and every one that did not diverge uploads its local model
(``bytes_down`` / ``bytes_up`` = those agents x model bytes).

State: ``w`` one model (float32, D parameters); ``opt [A, ...]`` the outer
optimizer state of every agent.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from demjax.algorithms.protocol import Algorithm, HParam, Rounds, one_round
from demjax.local import make_optimizer, masked_cross_entropy
from demjax.pytrees import (
    comm_bytes,
    divergence_guard,
    keep_if_finite,
    masked_mean,
    round_counts,
    stack,
    tree_bytes,
)

VARIANTS = ("fo", "hf")
HVPS = ("exact", "fd")


@flax.struct.dataclass
class PerFedAvgState:
    w: object
    opt: object


HPARAMS = {
    "variant": HParam(
        "fo",
        "perfedavg: fo (first-order MAML, Per-FedAvg (FO)) or hf (Hessian-free, "
        "Per-FedAvg (HF)); paper: both",
        choices=VARIANTS,
    ),
    "alpha": HParam(
        0.001,
        "perfedavg: inner (personalization) step size alpha (> 0; paper: 0.001)",
        low=0.0,
        low_open=True,
    ),
    "beta": HParam(
        0.001,
        "perfedavg: outer (meta) step size beta, replaces lr (> 0; paper: 0.001)",
        low=0.0,
        low_open=True,
    ),
    "hvp": HParam(
        "exact",
        "perfedavg: hf Hessian-vector product: exact (jax.jvp of grad) or fd "
        "(the paper's finite difference)",
        choices=HVPS,
    ),
    "delta": HParam(
        0.001,
        "perfedavg: hf finite-difference step delta (> 0; paper: 0.001)",
        low=0.0,
        low_open=True,
    ),
}


def sample_batch(key, x, y, n, batch_size: int):
    """``batch_size`` of one agent's ``n`` real samples, without replacement.

    Args:
      x: ``[N_max, ...]``; y: int32 ``[N_max]``; n: int32 scalar.

    Returns:
      ``(xb [B', ...], yb [B'], mask bool [B'])``, ``B' = min(batch_size, N_max)``;
      ``mask`` marks real rows (fewer than ``B'`` when ``n < B'``).
    """
    n_max = x.shape[0]
    b = min(batch_size, n_max)
    valid = jnp.arange(n_max) < n
    u = jax.random.uniform(key, (n_max,))
    idx = jnp.argsort(jnp.where(valid, u, 2.0))[:b]
    return x[idx], y[idx], jnp.arange(b) < n


def make_meta_grad(apply_fn, alpha: float, variant: str, hvp: str, delta: float):
    """The Per-FedAvg meta-gradient of one agent on given batches.

    Returns:
      ``meta_grad(w, d, d1, d2, key) -> (g, ce)`` with ``d = (x, y, mask)`` etc.
      the batches D, D', D''; ``g`` the params-shaped update direction
      (FO: ``grad f(w~; D')``; HF: ``(I - alpha H(w; D'')) grad f(w~; D')``),
      ``ce`` the loss ``f(w~; D')`` (float32).
    """

    def ce_fn(p, batch, key):
        x, y, mask = batch
        return masked_cross_entropy(apply_fn(p, x, True, key), y, mask)

    grad = jax.grad(ce_fn)
    value_and_grad = jax.value_and_grad(ce_fn)

    def meta_grad(w, d, d1, d2, key):
        k0, k1, k2 = jax.random.split(key, 3)
        g0 = grad(w, d, k0)
        w_tilde = jax.tree.map(lambda p, g: p - alpha * g, w, g0)
        ce, g1 = value_and_grad(w_tilde, d1, k1)
        if variant == "fo":
            return g1, ce
        if hvp == "exact":
            _, hv = jax.jvp(lambda p: grad(p, d2, k2), (w,), (g1,))
        else:
            plus = jax.tree.map(lambda p, v: p + delta * v, w, g1)
            minus = jax.tree.map(lambda p, v: p - delta * v, w, g1)
            gp, gm = grad(plus, d2, k2), grad(minus, d2, k2)
            hv = jax.tree.map(lambda a, b: (a - b) / (2.0 * delta), gp, gm)
        return jax.tree.map(lambda g, h: g - alpha * h, g1, hv), ce

    return meta_grad


def make_grad_fn(apply_fn, batch_size: int, **meta):
    """The trainer's ``grad_fn``: D is the minibatch; D', D'' are drawn from the
    agent's training data passed as ``anchor = {"x", "y", "n"}`` (per agent)."""
    meta_grad = make_meta_grad(apply_fn, **meta)

    def grad_fn(params, xb, yb, mask, anchor, mu, key):
        k1, k2, k3 = jax.random.split(key, 3)
        x, y, n = anchor["x"], anchor["y"], anchor["n"]
        d1 = sample_batch(k1, x, y, n, batch_size)
        d2 = sample_batch(k2, x, y, n, batch_size)
        return meta_grad(params, (xb, yb, mask), d1, d2, k3)

    return grad_fn


def make_personalize(apply_fn, alpha: float, batch_size: int):
    """One agent's evaluation model: ``w - alpha * grad f(w; D)`` on a batch D of
    its training data (Sec. 5).

    Returns:
      ``personalize(w, x [N_max, ...], y [N_max], n, key) -> params``.
    """

    def ce_fn(p, x, y, mask, key):
        return masked_cross_entropy(apply_fn(p, x, True, key), y, mask)

    def personalize(w, x, y, n, key):
        k_batch, k_drop = jax.random.split(key)
        xb, yb, mb = sample_batch(k_batch, x, y, n, batch_size)
        g = jax.grad(ce_fn)(w, xb, yb, mb, k_drop)
        return jax.tree.map(lambda p, gp: p - alpha * gp, w, g)

    return personalize


def build(ctx) -> Rounds:
    hp = ctx.hp
    alpha = float(hp["alpha"])
    batch_size = int(ctx.config.batch_size)
    tx = make_optimizer(str(ctx.config.optimizer), float(hp["beta"]))
    grad_fn = make_grad_fn(
        ctx.apply_fn,
        batch_size,
        alpha=alpha,
        variant=str(hp["variant"]),
        hvp=str(hp["hvp"]),
        delta=float(hp["delta"]),
    )
    train = ctx.trainer(grad_fn=grad_fn, tx=tx)
    personalize = jax.vmap(
        make_personalize(ctx.apply_fn, alpha, batch_size), in_axes=(None, 0, 0, 0, 0)
    )
    num_agents = ctx.num_agents

    def init(key, part):
        w = ctx.init_model(key)
        opt = jax.vmap(tx.init)(stack(w, num_agents))
        return PerFedAvgState(w=w, opt=opt)

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_train, k_agg = jax.random.split(jax.random.fold_in(key, 17))
        w0 = stack(state.w, num_agents)
        data = {"x": part.x_train, "y": part.y_train, "n": part.n_train}
        w_i, opt, loss = train(
            jax.random.split(k_train, num_agents),
            w0,
            state.opt,
            part.x_train,
            part.y_train,
            part.n_train,
            data,
            jnp.float32(0.0),
            max_steps,
        )
        (w_i, opt), ok, diverged = divergence_guard(
            active, (w_i, opt), (w0, state.opt), loss
        )
        weight = ok * part.n_train.astype(jnp.float32)
        w = keep_if_finite(
            ctx.aggregate(w_i, weight, k_agg, reference=state.w), state.w
        )
        new = PerFedAvgState(w=w, opt=opt)
        model = tree_bytes(state.w)
        info = {
            "train_loss": masked_mean(loss, ok.astype(jnp.float32)),
            **round_counts(active, diverged),
            **comm_bytes(model, ok, model, active),
        }
        return new, info

    def personal(state, part, key):
        keys = jax.random.split(jax.random.fold_in(key, 23), num_agents)
        return personalize(state.w, part.x_train, part.y_train, part.n_train, keys)

    return one_round(
        ctx,
        init=init,
        round=round_fn,
        personal=personal,
        global_model=lambda state: state.w,
    )


ALGORITHM = Algorithm(
    name="perfedavg",
    citation="Fallah, Mokhtari, Ozdaglar, NeurIPS 2020, Algorithm 1 (Per-FedAvg), "
    "Eq. 3 (FO / HF)",
    hparams=HPARAMS,
    build=build,
    attackable=True,
)
