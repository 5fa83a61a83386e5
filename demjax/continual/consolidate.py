"""Data-Agnostic Consolidation (DAC) with Projected Latent Distillation (PLD).

Carta, Cossu, Lomonaco, Bacciu, van de Weijer, "Projected Latent Distillation for
Data-Agnostic Consolidation in Distributed Continual Learning" (arXiv 2303.15888),
Sec. 4. After task ``t`` the server holds the previous consolidated model
``theta_{t-1}`` (teacher of the OLD classes, those of tasks ``< t``) and the task's
agents' models ``theta^a_t`` (teachers of the NEW classes of task ``t``), and
trains a student ``theta_t`` on proxy data ``x ~ P`` only (``proxy.ProxySource``)::

    L = L_logit + alpha * L_PLD

- Double logit distillation (Sec. 4, "Double Knowledge Distillation", the loss of
  Deep Model Consolidation: Zhang et al., "Class-incremental Learning via Deep
  Model Consolidation", WACV 2020, Sec. 3.3, ``L_dd``): for a class subset ``S``
  let ``c_S(z) = (z_k - mean_{j in S} z_j)_{k in S}`` (mean-centring on the
  subset). The target ``y_hat`` is the concatenation of the teachers' centred
  logits, ``c_old(z_prev)`` on the old classes and ``mean_a c_new(z_a)`` on the
  new classes (with several agents per task the centred agent logits are averaged
  - a demjax choice, the paper has one model per task); the student's RAW logits
  ``z_s`` regress on it, ``L_dd = mean over the |old| + |new| active classes of
  (z_s,k - y_hat_k)^2`` (``logit_loss``). Classes not seen yet take no part.
  ``student_logits="centred"`` (not the published method, kept as an ablation)
  centres the student's logits per subset too, ``c_old(z_s) + c_new(z_s)``, which
  makes the loss blind to any constant added to all old-class or all new-class
  student logits.
- PLD (Sec. 4, "Projected Latent Distillation"): a linear projector
  ``P_i(h) = h W_i + b_i`` per teacher maps the student's latent features
  ``h_s`` (``return_features=True``, ``[B, F]``) to teacher ``i``'s features
  ``h_i``; ``L_PLD = sum_i w_i mean_{b,f} (P_i(h_s) - h_i)^2 / sum_i w_i`` with
  ``w_prev = 0`` for the first task (no old model) and 1 otherwise. Projectors
  and student are trained jointly with one optax optimizer (Adam).

Choices the paper leaves open, exposed as config fields: ``student_init``
(``previous`` model, the ``agents``' mean, or the FedAvg-style ``average`` of
both), ``projector_init`` (``identity`` or ``lecun`` normal), ``alpha``,
``consolidation_steps``, ``proxy_batch``, ``consolidation_lr``. All models are
applied in inference mode (no dropout) during consolidation.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from demjax.continual.config import PROJECTOR_INITS, STUDENT_INITS, STUDENT_LOGITS
from demjax.continual.proxy import ProxySource
from demjax.errors import check_arg


def centred(z: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean-centres logits on a class subset, zero outside it.

    Args:
      z: float ``[..., C]`` logits.
      mask: bool ``[C]``, the subset S.

    Returns:
      float ``[..., C]``: ``z_k - mean_{j in S} z_j`` for ``k in S``, 0 elsewhere.
    """
    m = mask.astype(z.dtype)
    mean = jnp.sum(z * m, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(m), 1.0)
    return (z - mean) * m


def logit_targets(z_prev, z_agents, old_mask, new_mask):
    """Routed DAC logit targets.

    Args:
      z_prev: float ``[B, C]`` logits of the previous consolidated model.
      z_agents: float ``[A, B, C]`` logits of the task's agents.
      old_mask, new_mask: bool ``[C]``, disjoint class subsets.

    Returns:
      float ``[B, C]``: ``c_old(z_prev)`` on old classes, the agents' mean of
      ``c_new(z_a)`` on new classes, 0 elsewhere.
    """
    return centred(z_prev, old_mask) + jnp.mean(centred(z_agents, new_mask), axis=0)


def logit_loss(z_student, target, old_mask, new_mask, student_logits: str = "raw"):
    """DMC's double distillation loss ``L_dd`` (Zhang et al., WACV 2020, Sec. 3.3).

    Args:
      z_student: float ``[B, C]`` student logits.
      target: float ``[B, C]`` (``logit_targets``).
      old_mask, new_mask: bool ``[C]``, disjoint class subsets.
      student_logits: ``raw`` (the published loss: the student's logits as they
        are) or ``centred`` (the student's logits mean-centred per subset too, an
        ablation).

    Returns:
      float scalar: the squared error between the student's (raw or centred)
      logits and the targets, averaged over the batch and the ``|old| + |new|``
      active classes.

    Raises:
      ValueError: unknown ``student_logits``.
    """
    check_arg("student_logits", student_logits, STUDENT_LOGITS)
    active = (old_mask | new_mask).astype(z_student.dtype)
    if student_logits == "centred":
        s = centred(z_student, old_mask) + centred(z_student, new_mask)
    else:
        s = z_student
    sq = jnp.square(s - target) * active
    return jnp.sum(sq) / (z_student.shape[0] * jnp.maximum(jnp.sum(active), 1.0))


class Projectors(NamedTuple):
    """Linear projectors, one per teacher: kernel ``[T, F, F]``, bias ``[T, F]``."""

    kernel: jax.Array
    bias: jax.Array


def init_projectors(key, num_teachers: int, dim_in: int, dim_out: int, how: str):
    """``num_teachers`` projectors ``R^dim_in -> R^dim_out`` (``identity``: the
    identity on the first ``min`` dims; ``lecun``: LeCun-normal), zero bias."""
    check_arg("how", how, PROJECTOR_INITS)
    if how == "identity":
        k = jnp.tile(jnp.eye(dim_in, dim_out)[None], (num_teachers, 1, 1))
    else:
        init = nn.initializers.lecun_normal()
        k = jax.vmap(lambda kk: init(kk, (dim_in, dim_out)))(
            jax.random.split(key, num_teachers)
        )
    return Projectors(k, jnp.zeros((num_teachers, dim_out)))


def pld_loss(proj: Projectors, h_student, h_teachers, weights):
    """Projected latent distillation.

    Args:
      proj: ``Projectors`` with T teachers.
      h_student: float ``[B, F_s]``; h_teachers: float ``[T, B, F_t]``.
      weights: float ``[T]`` teacher weights (0 drops a teacher).

    Returns:
      ``(loss, per_teacher [T])``: per teacher the mean over batch and features of
      ``(h_s W_i + b_i - h_i)^2``; loss their ``weights``-weighted mean.
    """
    pred = jnp.einsum("bf,tfg->tbg", h_student, proj.kernel) + proj.bias[:, None]
    per = jnp.mean(jnp.square(pred - h_teachers), axis=(1, 2))
    return jnp.sum(weights * per) / jnp.maximum(jnp.sum(weights), 1e-12), per


def average_params(prev, agents, prev_weight):
    """FedAvg-style ``(w * prev + sum_a agent_a) / (w + A)`` (``agents`` stacked
    ``[A, ...]``; ``prev_weight`` w, e.g. the number of tasks ``prev`` has seen
    times A so that every task weighs the same)."""
    a = jax.tree.leaves(agents)[0].shape[0]
    return jax.tree.map(
        lambda p, q: (prev_weight * p + jnp.sum(q, axis=0)) / (prev_weight + a),
        prev,
        agents,
    )


class Consolidator:
    """The server's consolidation step (DAC, or logit-only with ``alpha = 0``).

    Its only data argument is a ``ProxySource``: agent data cannot reach it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int,
        batch: int,
        lr: float,
        alpha: float,
        student_init: str = "average",
        projector_init: str = "identity",
        student_logits: str = "raw",
    ):
        check_arg("student_init", student_init, STUDENT_INITS)
        check_arg("projector_init", projector_init, PROJECTOR_INITS)
        check_arg("student_logits", student_logits, STUDENT_LOGITS)
        for name, v in (("steps", steps), ("batch", batch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(
                    f"{name}={v!r} is not valid; accepted: an integer >= 1"
                )
        if not (isinstance(alpha, (int, float)) and alpha >= 0):
            raise ValueError(f"alpha={alpha!r} is not valid; accepted: a float >= 0")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr={lr!r} is not valid; accepted: a float > 0")
        self.model = model
        self.steps, self.batch = steps, batch
        self.alpha, self.student_init = float(alpha), student_init
        self.projector_init = projector_init
        self.student_logits = student_logits
        self.tx = optax.adam(lr)
        self._jitted = {}

    def _fwd(self, params, x):
        return self.model.apply(
            {"params": params}, x, train=False, return_features=True
        )

    def _build(self, proxy: ProxySource):
        def run(key, prev, agents, old_mask, new_mask, has_prev, bank):
            num_agents = jax.tree.leaves(agents)[0].shape[0]
            prev_w = has_prev.astype(jnp.float32)
            if self.student_init == "previous":
                student = prev
            elif self.student_init == "agents":
                student = jax.tree.map(lambda q: jnp.mean(q, 0), agents)
            else:
                student = average_params(prev, agents, prev_w * num_agents)
            k_proj, k_data = jax.random.split(key)
            x0 = proxy.sample(k_data, 2, bank)
            f_s = self._fwd(student, x0)[1].shape[-1]
            f_t = f_s  # teachers share the student's architecture
            proj = init_projectors(
                k_proj, 1 + num_agents, f_s, f_t, self.projector_init
            )
            weights = jnp.concatenate([prev_w[None], jnp.ones((num_agents,))])
            trainable = (student, proj)
            opt = self.tx.init(trainable)

            def loss_fn(tr, x):
                st, pj = tr
                z_s, h_s = self._fwd(st, x)
                z_p, h_p = self._fwd(prev, x)
                z_a, h_a = jax.vmap(lambda p: self._fwd(p, x))(agents)
                target = logit_targets(z_p, z_a, old_mask, new_mask)
                l_logit = logit_loss(
                    z_s, target, old_mask, new_mask, self.student_logits
                )
                h_t = jnp.concatenate([h_p[None], h_a], axis=0)
                l_pld, _ = pld_loss(pj, h_s, h_t, weights)
                return l_logit + self.alpha * l_pld, (l_logit, l_pld)

            def step(carry, s):
                tr, o = carry
                x = proxy.sample(jax.random.fold_in(k_data, s), self.batch, bank)
                (_, (l_logit, l_pld)), g = jax.value_and_grad(loss_fn, has_aux=True)(
                    tr, x
                )
                upd, o = self.tx.update(g, o, tr)
                return (optax.apply_updates(tr, upd), o), (l_logit, l_pld)

            (trainable, _), (h_logit, h_pld) = jax.lax.scan(
                step, (trainable, opt), jnp.arange(self.steps)
            )
            return trainable[0], trainable[1], h_logit, h_pld

        return jax.jit(run)

    def __call__(self, key, prev, agents, old_mask, new_mask, has_prev, proxy):
        """Consolidates one task.

        Args:
          key: PRNG key.
          prev: the previous consolidated model's params (one model).
          agents: the task's agents' params, leaves ``[A, ...]``.
          old_mask, new_mask: bool ``[C]`` old (tasks ``< t``) and new classes.
          has_prev: bool scalar, False for the first task (no old teacher).
          proxy: the ``ProxySource`` (the only data consolidation may use).

        Returns:
          ``(student params, Projectors, loss_logit [steps], loss_pld [steps])``.

        Raises:
          TypeError: ``proxy`` is not a ``ProxySource``.
        """
        if not isinstance(proxy, ProxySource):
            raise TypeError(
                f"consolidation takes a ProxySource, got {type(proxy).__name__}"
            )
        fn = self._jitted.get(id(proxy))
        if fn is None:
            fn = self._jitted[id(proxy)] = self._build(proxy)
        bank = proxy.bank if proxy.bank is not None else jnp.zeros((1, 1, 1, 1))
        return fn(
            key,
            prev,
            agents,
            jnp.asarray(old_mask, bool),
            jnp.asarray(new_mask, bool),
            jnp.asarray(has_prev, bool),
            bank,
        )
