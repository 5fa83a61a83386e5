"""FedAMP: Huang, Chu, Zhou, Wang, Liu, Pei, Zhang, "Personalized Cross-Silo
Federated Learning on Non-IID Data", AAAI 2021 (arXiv 2007.03797), Eq. 5-8.

Attentive message passing. Each round, for the participating agents P:

1. the server builds one aggregated ("cloud") model per agent (Eq. 6-7)::

       u_i = sum_j xi_ij w_j,
       xi_ij = alpha_k * A'(d(w_i, w_j))   for j != i, j in P,
       xi_ii = 1 - sum_{j != i} xi_ij,
       A'(d) = exp(-d / sigma) / sigma     (A(d) = 1 - exp(-d / sigma)),

   with ``d`` the squared Euclidean distance ``||w_i - w_j||^2`` (the paper) or
   the cosine distance ``1 - cos(w_i, w_j)`` (``attention="cosine"``), both from
   ``demjax.cluster.pairwise_distances``. Every row of ``xi`` sums to 1; ``xi_ii``
   is the self-attention of the authors' code (``coef_self``). ``xi_ii`` stays
   non-negative while ``alpha_k * (|P| - 1) / sigma <= 1`` (true for the defaults
   up to 101 agents); beyond that nearby models can make it negative, as in the
   paper's formula;
2. each participating agent minimizes (Eq. 8)::

       F_i(w) + lam / (2 * alpha_k) * ||w - u_i||^2

   by ``local_epochs`` of the configured optimizer, starting from its own model
   ``w_i`` (the authors' code), i.e. the engine's proximal objective with
   ``mu = lam / alpha_k`` and anchor ``u_i``.

Agents that do not participate keep ``w_i``; ``xi`` only attends over
participants. The personal model (C-SPE, C-GEN) is ``w_i``. FedAMP has no global
model (Global is null); the mean of the ``w_i`` is not a model the paper uses.

Divergence guard: an agent whose model, optimizer state or loss turn non-finite
keeps its previous ``w_i`` (the server's copy stays finite, so no cloud model
is poisoned) and state (``num_diverged``). Communication per round: every
participating agent downloads its cloud model ``u_i`` and every one that did not
diverge uploads its trained ``w_i`` (the server's copy used by the next round's
attention): ``bytes_down`` / ``bytes_up`` = those agents x model bytes.

State (leaves stacked over A agents): ``w [A, ...]`` personal models,
``opt [A, ...]`` their optimizer states.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from demjax import cluster
from demjax.algorithms.protocol import Algorithm, HParam, Rounds, one_round
from demjax.pytrees import (
    agent_bytes,
    comm_bytes,
    divergence_guard,
    masked_mean,
    round_counts,
)

ATTENTIONS = ("euclidean", "cosine")


@flax.struct.dataclass
class FedAMPState:
    w: object
    opt: object


HPARAMS = {
    "alpha_k": HParam(
        0.01,
        "fedamp: attention step size alpha_k (> 0; xi_ij = alpha_k exp(-d/sigma)/"
        "sigma, prox weight lam/alpha_k; the paper tunes it per data set on "
        "1e-2..1e3 scales, 0.01 here)",
        low=0.0,
        low_open=True,
    ),
    "lam": HParam(
        0.01,
        "fedamp: regularization lambda (>= 0; local prox weight lam/alpha_k, "
        "Eq. 8; 0.01 default)",
        low=0.0,
    ),
    "sigma": HParam(
        1.0,
        "fedamp: attention scale sigma of A(d) = 1 - exp(-d/sigma) (> 0; paper 1)",
        low=0.0,
        low_open=True,
    ),
    "attention": HParam(
        "euclidean",
        "fedamp: distance d of the attention: euclidean (squared, the paper) or "
        "cosine (1 - cos)",
        choices=ATTENTIONS,
    ),
}


def model_distances(w, attention: str, block_size: int = 0) -> jax.Array:
    """The distances ``d(w_i, w_j)`` the attention uses.

    Args:
      w: stacked models, leaves ``[A, ...]``.
      attention: ``"euclidean"`` (squared Euclidean ``||w_i - w_j||^2``, Eq. 7)
        or ``"cosine"`` (``1 - cos(w_i, w_j)``).
      block_size: ``config.distance_block`` (Gram matrix over column blocks).

    Returns:
      float32 ``[A, A]``, symmetric, zero diagonal.
    """
    metric = "cosine" if attention == "cosine" else "euclidean"
    d = cluster.pairwise_distances(cluster.flatten_params(w), metric, block_size)
    return jnp.square(d) if metric == "euclidean" else d


def attention_weights(
    dist: jax.Array, active: jax.Array, alpha_k: float, sigma: float
) -> jax.Array:
    """FedAMP's attention matrix ``xi`` (Eq. 7 and the authors' ``coef_self``).

    Args:
      dist: float32 ``[A, A]`` distances ``d(w_i, w_j)``.
      active: bool ``[A]`` participating agents (only they are attended to).
      alpha_k, sigma: the step size and the scale of ``A'(d) = exp(-d/sigma)/sigma``.

    Returns:
      float32 ``[A, A]``: ``xi_ij = alpha_k A'(d_ij)`` for ``j != i`` active,
      0 for inactive ``j``, ``xi_ii = 1 - sum_{j != i} xi_ij``; rows sum to 1.
    """
    num = dist.shape[0]
    off = alpha_k * jnp.exp(-dist / sigma) / sigma
    attend = active[None, :] & ~jnp.eye(num, dtype=bool)
    off = jnp.where(attend, off, 0.0).astype(jnp.float32)
    return off + jnp.diag(1.0 - jnp.sum(off, axis=1))


def cloud_models(xi: jax.Array, w):
    """``u_i = sum_j xi_ij w_j`` (Eq. 6) for every agent.

    Args:
      xi: float32 ``[A, A]``; w: stacked models, leaves ``[A, ...]``.

    Returns:
      Stacked models ``u``, leaves ``[A, ...]``.
    """
    hi = jax.lax.Precision.HIGHEST
    return jax.tree.map(
        lambda p: jnp.tensordot(xi, p, axes=1, precision=hi).astype(p.dtype), w
    )


def build(ctx) -> Rounds:
    alpha_k, lam = float(ctx.hp["alpha_k"]), float(ctx.hp["lam"])
    sigma, attention = float(ctx.hp["sigma"]), str(ctx.hp["attention"])
    block = int(ctx.config.distance_block)
    mu = lam / alpha_k
    train = ctx.trainer()
    num_agents = ctx.num_agents

    def init(key, part):
        w = ctx.init_population(key)
        return FedAMPState(w=w, opt=jax.vmap(ctx.tx.init)(w))

    def round_fn(state, part, key, t):
        active, max_steps = ctx.round_masks(key, part.n_train)
        xi = attention_weights(
            model_distances(state.w, attention, block), active, alpha_k, sigma
        )
        u = cloud_models(xi, state.w)
        k_train = jax.random.fold_in(key, 17)
        w, opt, loss = train(
            jax.random.split(k_train, num_agents),
            state.w,
            state.opt,
            part.x_train,
            part.y_train,
            part.n_train,
            u,
            jnp.float32(mu),
            max_steps,
        )
        (w, opt), ok, diverged = divergence_guard(
            active, (w, opt), (state.w, state.opt), loss
        )
        new = FedAMPState(w=w, opt=opt)
        act = active.astype(jnp.float32)
        model = agent_bytes(state.w)
        info = {
            "train_loss": masked_mean(loss, ok.astype(jnp.float32)),
            "self_attention": masked_mean(jnp.diagonal(xi), act),
            **round_counts(active, diverged),
            **comm_bytes(model, ok, model, active),
        }
        return new, info

    return one_round(
        ctx,
        init=init,
        round=round_fn,
        personal=lambda state, part, key: state.w,
        global_model=None,
    )


ALGORITHM = Algorithm(
    name="fedamp",
    citation="Huang et al., AAAI 2021 (FedAMP), Eq. 5-8",
    hparams=HPARAMS,
    build=build,
    has_global=False,
)
