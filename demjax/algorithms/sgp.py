"""SGP: Assran, Loizou, Ballas, Rabbat, "Stochastic Gradient Push for Distributed
Deep Learning", ICML 2019, Algorithm 1 (push-sum SGD over directed, time-varying
graphs).

Every agent i keeps parameters ``x_i`` and a push-sum weight ``omega_i`` (1 at
the start). At each local step k (``local_epochs`` passes of minibatches of
``batch_size`` per round), with ``P^(k)`` the column-stochastic mixing matrix of
the step's active graph (``demjax.network``, ``config.network*``)::

    z_i   = x_i / omega_i                          (de-biased parameters)
    x_i  <- x_i - lr * grad F_i(z_i; minibatch)     (gradient step, at z_i)
    x    <- P^(k) x,  omega <- P^(k) omega          (push-sum mixing)

i.e. the gradient step first, then the mixing (Algorithm 1's order). With
``config.optimizer="sgd"`` the update is exactly SGP's; another optax optimizer
(state kept per agent, not mixed) replaces ``- lr * grad``. Agents that do not
train in a round (participation, dropout) or run out of steps (stragglers,
fewer samples) skip the gradient step but still mix.

Divergence guard: a gradient step that turns an agent's ``x_i``, optimizer
state or loss non-finite is undone, the agent takes no more steps that round
(``num_diverged``) and mixes its last finite ``x_i``: no non-finite mass reaches
its neighbours. Communication: every mixing step, each agent pushes ``x_i`` and
``omega_i`` (model bytes + 4) to each of its active out-neighbours (self-loops
excluded); ``bytes_up`` = ``bytes_down`` = the round's pushes x (model bytes +
4) (every push sent is received).

C-SPE / C-GEN evaluate each agent's de-biased ``z_i``; Global evaluates the
mean of ``z`` over agents.

State: ``x [A, ...]``, ``omega`` float32 ``[A]``, ``opt [A, ...]``.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from demjax import local, network
from demjax.algorithms.protocol import Algorithm, HParam, Rounds, one_round
from demjax.pytrees import agent_bytes, comm_bytes, divergence_guard, round_counts


@flax.struct.dataclass
class SGPState:
    x: object
    omega: jax.Array
    opt: object


HPARAMS = {
    "mix_every": HParam(
        1,
        "sgp: push-sum mixing after every k-th local step (>= 1; SGP Alg. 1: 1)",
        low=1,
    ),
}


def minibatch_plan(key, n, n_max: int, batch_size: int, local_epochs: int):
    """Per-agent shuffled minibatches of one round (``local.epoch_permutations``).

    Args:
      key: PRNG key; n: int32 ``[A]`` real samples per agent; n_max: padded
        capacity.

    Returns:
      ``(idx int32 [S, A, B], mask bool [S, A, B], has_step bool [S, A])`` with
      ``S = local_epochs * ceil(n_max / B)``: sample rows of each step, which of
      them are real, and whether the agent has that step at all.
    """
    spe = local.steps_per_epoch(n_max, batch_size)
    a = n.shape[0]
    perms = jax.vmap(lambda k, m: local.epoch_permutations(k, m, n_max, local_epochs))(
        jax.random.split(key, a), n
    )  # [A, E, n_max]
    pad = spe * batch_size - n_max
    if pad:
        perms = jnp.pad(perms, ((0, 0), (0, 0), (0, pad)))
    idx = perms.reshape(a, local_epochs * spe, batch_size).transpose(1, 0, 2)
    pos = (jnp.arange(local_epochs * spe) % spe)[:, None] * batch_size
    pos = pos + jnp.arange(batch_size)[None, :]  # [S, B]
    mask = pos[:, None, :] < n[None, :, None]
    has_step = pos[:, None, 0] < n[None, :]
    return jnp.minimum(idx, n_max - 1), mask, has_step


def gather_batch(x, y, idx):
    """Rows ``idx [A, B]`` of per-agent data ``x [A, N, ...]``, ``y [A, N]``."""
    take = jax.vmap(lambda xa, ia: xa[ia])
    return take(x, idx), take(y, idx)


def make_sgp_steps(net: network.Network, tx, loss_fn, batch_size, local_epochs,
                   mix_every: int = 1):  # fmt: skip
    """One round of SGP steps on an arbitrary per-agent loss.

    Args:
      net: the communication graph.
      tx: optax optimizer (per-agent state).
      loss_fn: ``loss_fn(z, aux_i, xb [B, ...], yb [B], mask [B], key) -> (loss,
        ce)`` for ONE agent (vmapped here); ``aux_i`` per-agent extras (e.g.
        PDBO's hyper-parameters) that are not trained.
      batch_size, local_epochs: minibatching of each round.
      mix_every: mix after every k-th step.

    Returns:
      ``steps(x, omega, opt, aux, x_data, y_data, n, key, train_mask [A],
      max_steps [A]) -> (x, omega, opt, mean_ce [A], diverged [A], messages)``:
      ``diverged`` bool, the agents whose gradient step turned ``x``, its
      optimizer state or the loss non-finite (that step is undone and the agent
      takes no more steps this round, but keeps mixing its finite ``x``, so no
      non-finite mass is pushed); ``messages`` int32, the pushes ``i -> j`` (j !=
      i, active edges) of the round's mixing steps.
    """
    grad_fn = jax.vmap(jax.grad(loss_fn, has_aux=True))
    update = jax.vmap(tx.update)
    others = np.asarray(net.senders != net.receivers)  # static: no self-loop

    def steps(x, omega, opt, aux, x_data, y_data, n, key, train_mask, max_steps):
        k_plan, k_loop = jax.random.split(key)
        idx, mask, has_step = minibatch_plan(
            k_plan, n, x_data.shape[1], batch_size, local_epochs
        )
        num_agents = n.shape[0]

        def step(carry, s):
            x, omega, opt, ce_sum, count, diverged, messages = carry
            k_s = jax.random.fold_in(k_loop, s)
            k_drop, k_net = jax.random.split(k_s)
            xb, yb = gather_batch(x_data, y_data, idx[s])
            z = network.debias(x, omega)
            grads, ce = grad_fn(
                z, aux, xb, yb, mask[s], jax.random.split(k_drop, num_agents)
            )
            updates, new_opt = update(grads, opt, z)
            act = has_step[s] & train_mask & (count < max_steps) & ~diverged
            (x, opt), act, bad = divergence_guard(
                act, (jax.tree.map(jnp.add, x, updates), new_opt), (x, opt), ce
            )
            diverged = diverged | bad

            def mix(args):
                xx, oo = args
                w = net.sample(k_net)
                sent = jnp.sum((w > 0) & others).astype(jnp.int32)
                return net.mix(w, xx), net.mix(w, oo), sent

            if mix_every == 1:
                x, omega, sent = mix((x, omega))
            else:
                x, omega, sent = jax.lax.cond(
                    (s + 1) % mix_every == 0,
                    mix,
                    lambda a: (*a, jnp.int32(0)),
                    (x, omega),
                )
            ce_sum = ce_sum + jnp.where(act, ce, 0.0)
            carry = (x, omega, opt, ce_sum, count + act, diverged, messages + sent)
            return carry, None

        zeros = jnp.zeros((num_agents,), jnp.float32)
        init = (
            x,
            omega,
            opt,
            zeros,
            jnp.zeros((num_agents,), jnp.int32),
            jnp.zeros((num_agents,), bool),
            jnp.int32(0),
        )
        (x, omega, opt, ce_sum, count, diverged, messages), _ = jax.lax.scan(
            step, init, jnp.arange(idx.shape[0])
        )
        return x, omega, opt, ce_sum / jnp.maximum(count, 1), diverged, messages

    return steps


def build(ctx) -> Rounds:
    net = network.from_config(ctx.config, ctx.num_agents)
    num_agents = ctx.num_agents

    def loss_fn(z, aux, xb, yb, mask, key):
        ce = local.masked_cross_entropy(ctx.apply_fn(z, xb, True, key), yb, mask)
        return ce, ce

    steps = make_sgp_steps(
        net,
        ctx.tx,
        loss_fn,
        int(ctx.config.batch_size),
        int(ctx.config.local_epochs),
        int(ctx.hp["mix_every"]),
    )

    def init(key, part):
        x = ctx.init_population(key)
        x = jax.tree.map(jnp.array, x)
        return SGPState(
            x=x,
            omega=network.push_sum_weights(num_agents),
            opt=jax.vmap(ctx.tx.init)(x),
        )

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        aux = jnp.zeros((num_agents,), jnp.float32)
        x, omega, opt, ce, diverged, messages = steps(
            state.x,
            state.omega,
            state.opt,
            aux,
            part.x_train,
            part.y_train,
            part.n_train,
            jax.random.fold_in(key, 23),
            active,
            max_steps,
        )
        act = (active & ~diverged).astype(jnp.float32)
        # Every push carries the sender's x_i and omega_i (float32).
        push = agent_bytes(state.x) + 4
        info = {
            "train_loss": jnp.sum(ce * act) / jnp.maximum(jnp.sum(act), 1.0),
            "omega_min": jnp.min(omega),
            **round_counts(active, diverged),
            **comm_bytes(push, messages, push, messages),
        }
        return SGPState(x=x, omega=omega, opt=opt), info

    def personal(state, part, key):
        return network.debias(state.x, state.omega)

    def global_model(state):
        z = network.debias(state.x, state.omega)
        return jax.tree.map(lambda p: jnp.mean(p, axis=0), z)

    return one_round(
        ctx,
        init=init, round=round_fn, personal=personal, global_model=global_model
    )


ALGORITHM = Algorithm(
    name="sgp",
    citation="Assran et al., ICML 2019, Algorithm 1 (Stochastic Gradient Push)",
    hparams=HPARAMS,
    build=build,
    shard_mapped=False,  # its own gossip steps, not Context.trainer
)

__all__ = ["ALGORITHM", "SGPState", "gather_batch", "make_sgp_steps", "minibatch_plan"]
