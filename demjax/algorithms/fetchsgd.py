"""FetchSGD: Rothchild, Panda, Ullah, Ivkin, Stoica, Braverman, Gonzalez, Arora,
"FetchSGD: Communication-Efficient Federated Learning with Sketching", ICML 2020,
Algorithm 1.

Each round every participating agent i starts from the global model ``w``,
trains locally (``local_epochs`` of the run's optimizer, a fresh optimizer state:
agents keep no state), and sends the Count Sketch ``S(g_i)`` of its update
``g_i = w - w_i`` (flat ``[D]``): a float32 table ``[rows, cols]`` with
``S(g)[r, c] = sum_{j: h_r(j) = c} s_r(j) g_j``. The server (Algorithm 1)::

    S   = (1 / W) sum_i S(g_i)            (linearity: the sketch of the mean;
                                           config.aggregator, mean by default)
    S_u = rho S_u + S                     (momentum, in sketch space)
    S_e = S_e + lr S_u                    (error feedback, in sketch space)
    Delta = Top-k(U(S_e))                 (unsketch: estimate every coordinate
                                           as the median over rows of
                                           s_r(j) S_e[r, h_r(j)], keep the k
                                           largest in magnitude)
    S_u, S_e = 0 at the buckets h_r(j) of the k coordinates (every row)
    w = w - Delta

``W`` counts the agents that trained and stayed finite; a robust
``config.aggregator`` (median, trimmed mean) combines the sketches bucket by
bucket instead of the mean. The zeroing step is momentum-factor masking and error
reset in sketch space, as in the authors' code: every bucket a chosen coordinate
hashes to is cleared in both sketches (Algorithm 1 writes the error step as
``S_e = S_e - S(Delta)``). ``lr`` multiplies deltas that already carry the local
learning rate (1: the mean update itself). The hash functions ``h_r`` (uniform
buckets) and signs ``s_r`` (uniform +-1) are drawn from the run's key at
``init`` and fixed for the run. Every agent's sketch is computed at once: one
``segment_sum`` per row over the hashed buckets, vmapped over rows.

C-SPE / C-GEN / Global evaluate the global model ``w`` (every agent uses it).
Communication per participating agent: one sketch up (``rows * cols * 4``
bytes); down, an agent joining a round needs the current model, which it may not
have seen for many rounds: ``download='model'`` counts the whole model
(``tree_bytes(w)``), ``'changed'`` the coordinates changed since the agent last
took part (a value and an int32 index each; the whole model when that is smaller,
or when the agent never took part).

State: ``w`` one model; ``mom``, ``err`` float32 ``[rows, cols]``; ``buckets``
int32 ``[rows, D]``; ``signs`` float32 ``[rows, D]``; ``changed`` int32 ``[D]``
the last round each coordinate changed (-1: never); ``seen`` int32 ``[A]`` the
last round each agent took part (-1: never).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from demjax.algorithms.protocol import Algorithm, HParam, Rounds, one_round
from demjax.errors import ConfigError
from demjax.pytrees import finite_agents, masked_mean, stack, tree_bytes

DOWNLOADS = ("model", "changed")


@flax.struct.dataclass
class FetchSGDState:
    w: object
    mom: jax.Array
    err: jax.Array
    buckets: jax.Array
    signs: jax.Array
    changed: jax.Array
    seen: jax.Array


HPARAMS = {
    "rows": HParam(
        5, "fetchsgd: Count Sketch rows (>= 1; the authors' code: 5)", low=1
    ),
    "cols": HParam(
        0,
        "fetchsgd: Count Sketch columns (>= 0; 0 = 10 k, the ratio of the authors' "
        "defaults 500,000 / 50,000)",
        low=0,
    ),
    "k": HParam(
        0,
        "fetchsgd: coordinates unsketched per round (>= 0, at most D; 0 = "
        "ceil(D / 100))",
        low=0,
    ),
    "rho": HParam(
        0.9, "fetchsgd: momentum rho (in [0, 1]; paper: 0.9)", low=0.0, high=1.0
    ),
    "download": HParam(
        "model",
        "fetchsgd: download bytes counted: model (the whole model per participant) "
        "or changed (coordinates changed since it last took part, value + index)",
        choices=DOWNLOADS,
    ),
    "lr": HParam(
        1.0,
        "fetchsgd: server learning rate on the mean local delta (> 0; 1 = the delta)",
        low=0.0,
        low_open=True,
    ),
}


def sizes(hp, num_params: int) -> tuple[int, int, int]:
    """``(rows, cols, k)`` resolved for a model of ``num_params`` (D) parameters.

    Raises:
      ConfigError: ``k`` larger than D.
    """
    k = int(hp["k"]) or math.ceil(num_params / 100)
    if k > num_params:
        raise ConfigError(
            f"fetchsgd.k={k} is not valid; accepted: an integer in [0, {num_params}] "
            f"(the model has D={num_params} parameters; 0 = ceil(D / 100))"
        )
    cols = int(hp["cols"]) or 10 * k
    return int(hp["rows"]), cols, k


def make_hashes(key, rows: int, cols: int, num_params: int):
    """``(buckets int32 [rows, D] in [0, cols), signs float32 [rows, D] in +-1)``."""
    kb, ks = jax.random.split(key)
    buckets = jax.random.randint(kb, (rows, num_params), 0, cols, jnp.int32)
    signs = jax.random.rademacher(ks, (rows, num_params), jnp.float32)
    return buckets, signs


def sketch(vecs, buckets, signs, cols: int):
    """Count Sketches of many vectors at once.

    Args:
      vecs: float32 ``[A, D]``; buckets: int32 ``[rows, D]``; signs: ``[rows, D]``.

    Returns:
      float32 ``[A, rows, cols]``: ``out[a, r, c] = sum_{j: buckets[r, j] = c}
      signs[r, j] vecs[a, j]``.
    """

    def row(b, s):  # [D], [D] -> [cols, A]
        return jax.ops.segment_sum((vecs * s).T, b, num_segments=cols)

    return jnp.transpose(jax.vmap(row)(buckets, signs), (2, 0, 1))


def unsketch(table, buckets, signs):
    """Every coordinate's estimate from one sketch: float32 ``[D]``, the median
    over rows of ``signs[r, j] * table[r, buckets[r, j]]``."""
    return jnp.median(jnp.take_along_axis(table, buckets, axis=1) * signs, axis=0)


def build(ctx) -> Rounds:
    num_agents = ctx.num_agents
    rho, lr = float(ctx.hp["rho"]), float(ctx.hp["lr"])
    template = ctx.init_model(jax.random.PRNGKey(0))
    flat_t, unravel = ravel_pytree(template)
    num_params = int(flat_t.size)
    rows, cols, k = sizes(ctx.hp, num_params)
    up_bytes = rows * cols * 4
    down_bytes = tree_bytes(template)
    pair_bytes = flat_t.dtype.itemsize + 4  # one value and its int32 index
    sparse_down = str(ctx.hp["download"]) == "changed"
    train = ctx.trainer()

    def init(key, part):
        k_model, k_hash = jax.random.split(key)
        buckets, signs = make_hashes(k_hash, rows, cols, num_params)
        zeros = jnp.zeros((rows, cols), jnp.float32)
        return FetchSGDState(
            w=ctx.init_model(k_model), mom=zeros, err=zeros, buckets=buckets,
            signs=signs, changed=jnp.full((num_params,), -1, jnp.int32),
            seen=jnp.full((num_agents,), -1, jnp.int32),
        )  # fmt: skip

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        k_train, k_agg = jax.random.split(jax.random.fold_in(key, 17))
        w0 = stack(state.w, num_agents)
        trained, _, loss = train(
            jax.random.split(k_train, num_agents),
            w0,
            jax.vmap(ctx.tx.init)(w0),
            part.x_train,
            part.y_train,
            part.n_train,
            w0,
            jnp.float32(0.0),
            max_steps,
        )
        ok = finite_agents(trained)
        use = active & ok
        flat_w = ravel_pytree(state.w)[0]
        flat_k = jax.vmap(lambda p: ravel_pytree(p)[0])(trained)
        g = jnp.where(use[:, None], flat_w[None] - flat_k, 0.0)  # [A, D]
        tables = sketch(g, state.buckets, state.signs, cols)  # [A, rows, cols]
        n_use = jnp.sum(use).astype(jnp.float32)
        s = ctx.aggregate(tables, use.astype(jnp.float32), k_agg)  # [rows, cols]
        mom = rho * state.mom + s
        err = state.err + lr * mom
        est = unsketch(err, state.buckets, state.signs)
        _, idx = jax.lax.top_k(jnp.abs(est), k)
        delta = jnp.zeros_like(est).at[idx].set(est[idx])
        hit = (
            jnp.zeros((rows, cols), bool)
            .at[jnp.arange(rows)[:, None], state.buckets[:, idx]]
            .set(True)
        )
        mom, err = jnp.where(hit, 0.0, mom), jnp.where(hit, 0.0, err)
        w = unravel(flat_w - delta)
        # A round without usable updates (or a non-finite step) leaves the server.
        good = (n_use > 0) & jnp.all(jnp.isfinite(delta)) & jnp.all(jnp.isfinite(err))
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(good, n, o), new, old
        )
        changed = jnp.where(good & (delta != 0), t, state.changed)
        new = state.replace(
            w=keep(w, state.w), mom=keep(mom, state.mom), err=keep(err, state.err),
            changed=changed, seen=jnp.where(active, t, state.seen),
        )  # fmt: skip
        num_active = jnp.sum(active)
        senders = num_active.astype(jnp.float32)
        senders_ok = use.astype(jnp.float32)
        if sparse_down:  # per agent: coordinates changed in rounds >= seen
            order = jnp.sort(state.changed)
            fresh = num_params - jnp.searchsorted(order, state.seen, side="left")
            each = jnp.where(
                state.seen >= 0,
                jnp.minimum(fresh * pair_bytes, down_bytes),
                down_bytes,
            )
            down = jnp.sum(jnp.where(active, each, 0)).astype(jnp.float32)
        else:
            down = senders * jnp.float32(down_bytes)
        info = {
            "train_loss": masked_mean(jnp.where(use, loss, 0.0), senders_ok),
            "num_active": num_active,
            "num_diverged": jnp.sum(active & ~ok),
            "bytes_up": senders * jnp.float32(up_bytes),
            "bytes_down": down,
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
    name="fetchsgd",
    citation="Rothchild et al., ICML 2020, Algorithm 1 (FetchSGD)",
    hparams=HPARAMS,
    build=build,
)


__all__ = ["ALGORITHM", "make_hashes", "sizes", "sketch", "unsketch"]
