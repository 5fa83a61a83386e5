"""pFedMe: Dinh, Tran, Nguyen, "Personalized Federated Learning with Moreau
Envelopes", NeurIPS 2020, Algorithm 1.

Each round the server sends the global model ``w`` to every agent; agent i sets
``w_i <- w`` and its personalized model ``theta_i <- w`` and, for every local step
(one minibatch ``D`` of the engine's shuffled minibatch loop, ``local_epochs``
passes over its data),

1. approximately solves the personalized problem (Alg. 1, the Moreau-envelope
   subproblem ``h_i(theta; w_i)``)::

       theta_i = argmin_theta  f_i(theta; D) + lam / 2 * ||theta - w_i||^2

   with ``K`` gradient steps of rate ``personal_lr`` on the same minibatch,
   warm-started from the previous step's ``theta_i`` (the authors' code);
2. moves its local model towards it (Alg. 1, local update)::

       w_i <- w_i - lr * lam * (w_i - theta_i)

   (``lr`` = ``config.lr``; with ``optimizer='sgd'`` exactly this, another
   ``config.optimizer`` is fed the gradient ``lam * (w_i - theta_i)``);

and the server sets (Alg. 1, global update)::

    w <- (1 - beta) * w + beta * aggregate(w_i)

with ``aggregate`` the sample-weighted mean over participating agents (the
authors' code; the paper writes the plain mean over the sampled agents) or the
robust ``config.aggregator``. C-SPE / C-GEN evaluate the personalized models
``theta_i`` as left by the round's local training, Global the model ``w``.

Divergence guard: an agent whose ``w_i``, ``theta_i``, optimizer state or loss
turn non-finite keeps its previous ``theta_i`` and state and gets no weight in
the aggregate (``num_diverged``). Communication per round: every participating
agent downloads ``w`` and every one that did not diverge uploads ``w_i``
(``bytes_down`` / ``bytes_up`` = those agents x model bytes); ``theta_i`` stays
on the agent.

State (leaves stacked over A agents where marked): ``w`` one model (float32,
D parameters); ``theta [A, ...]``; ``opt [A, ...]`` the local optimizer state.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from demjax.algorithms.protocol import Algorithm, HParam, Rounds, one_round
from demjax.local import masked_cross_entropy
from demjax.pytrees import (
    comm_bytes,
    divergence_guard,
    keep_if_finite,
    masked_mean,
    round_counts,
    stack,
    tree_bytes,
)


@flax.struct.dataclass
class PFedMeState:
    w: object
    theta: object
    opt: object


HPARAMS = {
    "lam": HParam(
        15.0,
        "pfedme: Moreau-envelope weight lambda (> 0; paper: 15 on MNIST and "
        "Synthetic, Sec. 5)",
        low=0.0,
        low_open=True,
    ),
    "K": HParam(
        5,
        "pfedme: gradient steps solving the personalized problem per local step "
        "(>= 1; paper: 5)",
        low=1,
    ),
    "personal_lr": HParam(
        0.09,
        "pfedme: step size of the K inner steps (> 0; paper: 0.09 MNIST, "
        "0.01 Synthetic)",
        low=0.0,
        low_open=True,
    ),
    "beta": HParam(
        1.0,
        "pfedme: server mixing w <- (1-beta) w + beta mean(w_i) (> 0; paper: 1, "
        "or 2 for faster convergence)",
        low=0.0,
        low_open=True,
    ),
}


def make_inner_solver(apply_fn, lam: float, k: int, personal_lr: float):
    """K gradient steps on the personalized problem of one agent (Alg. 1).

    Returns:
      ``solve(theta, w, xb [B, ...], yb [B], mask bool [B], key) -> (theta, ce)``:
      ``theta <- theta - personal_lr * (grad f(theta; D) + lam * (theta - w))``
      K times on one minibatch; ``ce`` float32 the minibatch loss at the last
      iterate whose gradient was taken.
    """

    def ce_fn(theta, xb, yb, mask, key):
        return masked_cross_entropy(apply_fn(theta, xb, True, key), yb, mask)

    grad_ce = jax.value_and_grad(ce_fn)

    def solve(theta, w, xb, yb, mask, key):
        def step(theta, i):
            ce, g = grad_ce(theta, xb, yb, mask, jax.random.fold_in(key, i))
            theta = jax.tree.map(
                lambda t, gt, wt: t - personal_lr * (gt + lam * (t - wt)), theta, g, w
            )
            return theta, ce

        theta, ces = jax.lax.scan(step, theta, jnp.arange(k))
        return theta, ces[-1]

    return solve


def make_grad_fn(apply_fn, lam: float, k: int, personal_lr: float):
    """The trainer's ``grad_fn`` over ``params = {"w": w_i, "theta": theta_i}``.

    Returns ``grads = {"w": lam * (w - theta'), "theta": theta - theta'}`` with
    ``theta'`` the inner solution; the optimizer applies the first with the local
    optimizer (rate ``lr``: Alg. 1 local update) and the second with a step of -1, which
    sets ``theta <- theta'``.
    """
    solve = make_inner_solver(apply_fn, lam, k, personal_lr)

    def grad_fn(params, xb, yb, mask, anchor, mu, key):
        w, theta = params["w"], params["theta"]
        new_theta, ce = solve(theta, w, xb, yb, mask, key)
        g_w = jax.tree.map(lambda a, b: lam * (a - b), w, new_theta)
        g_theta = jax.tree.map(lambda a, b: a - b, theta, new_theta)
        return {"w": g_w, "theta": g_theta}, ce

    return grad_fn


def make_tx(outer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``outer`` on ``w``; ``theta <- theta - g_theta`` (copies the inner solution)."""
    return optax.multi_transform(
        {"w": outer, "theta": optax.scale(-1.0)},
        lambda p: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in p.items()},
    )


def build(ctx) -> Rounds:
    lam = float(ctx.hp["lam"])
    k = int(ctx.hp["K"])
    personal_lr = float(ctx.hp["personal_lr"])
    beta = float(ctx.hp["beta"])
    tx = make_tx(ctx.tx)
    train = ctx.trainer(grad_fn=make_grad_fn(ctx.apply_fn, lam, k, personal_lr), tx=tx)
    num_agents = ctx.num_agents

    def init(key, part):
        w = ctx.init_model(key)
        theta = stack(w, num_agents)
        opt = jax.vmap(tx.init)({"w": theta, "theta": theta})
        return PFedMeState(w=w, theta=theta, opt=opt)

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_train, k_agg = jax.random.split(jax.random.fold_in(key, 17))
        w0 = stack(state.w, num_agents)
        params = {"w": w0, "theta": w0}  # Alg. 1: w_i, theta_i <- w
        out, opt, loss = train(
            jax.random.split(k_train, num_agents),
            params,
            state.opt,
            part.x_train,
            part.y_train,
            part.n_train,
            w0,  # anchor unused by grad_fn
            jnp.float32(0.0),
            max_steps,
        )
        (out, opt), ok, diverged = divergence_guard(
            active, (out, opt), ({"w": w0, "theta": state.theta}, state.opt), loss
        )
        weight = ok * part.n_train.astype(jnp.float32)
        mean_w = ctx.aggregate(out["w"], weight, k_agg, reference=state.w)
        w = jax.tree.map(lambda g, m: (1.0 - beta) * g + beta * m, state.w, mean_w)
        new = PFedMeState(w=keep_if_finite(w, state.w), theta=out["theta"], opt=opt)
        model = tree_bytes(state.w)
        info = {
            "train_loss": masked_mean(loss, ok.astype(jnp.float32)),
            **round_counts(active, diverged),
            **comm_bytes(model, ok, model, active),
        }
        return new, info

    return one_round(
        ctx,
        init=init,
        round=round_fn,
        personal=lambda state, part, key: state.theta,
        global_model=lambda state: state.w,
    )


ALGORITHM = Algorithm(
    name="pfedme",
    citation="Dinh, Tran, Nguyen, NeurIPS 2020, Algorithm 1 (pFedMe)",
    hparams=HPARAMS,
    build=build,
    attackable=True,
)
