"""Byzantine agents: the messages (or data) of a chosen set of agents are corrupted.

A Byzantine agent takes part in every round like the others, but what it sends
to the aggregation (its model after local training) is replaced by an attack.
Every attack is written as a change of the agent's *update*
``delta_a = sent_a - start_a`` (``start_a``: the model agent ``a`` began the round
with), vectorized over the agent axis; honest agents' messages are returned
unchanged, bit for bit.

Attacks (``config.attack``):

- ``none``: no attack.
- ``sign_flip``: ``delta_a <- -scale * delta_a`` (the reversed-gradient attack;
  Damaskinos et al., "Asynchronous Byzantine Machine Learning", ICML 2018;
  Allen-Zhu et al., ICLR 2021, Sec. 5).
- ``gaussian``: ``delta_a <- noise_std * N(0, I)``: the update replaced by
  Gaussian noise (Blanchard et al., "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent", NeurIPS 2017, Sec. 5).
- ``scaling``: ``delta_a <- scale * delta_a``: a boosted update; with poisoned
  data (``label_flip`` run first, or a backdoor task) this is model replacement
  (Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020,
  Sec. 3.2, with ``scale = n / eta``).
- ``label_flip``: data poisoning, no message change: the Byzantine agents'
  training labels ``y -> C - 1 - y`` (``flip_labels``; Fang et al., "Local Model
  Poisoning Attacks to Byzantine-Robust Federated Learning", USENIX Security
  2020, Sec. 5).
- ``alie``: "a little is enough" (Baruch, Baruch, Goldberg, NeurIPS 2019,
  Sec. 3, Alg. 3): every Byzantine agent sends ``mu - z * sigma``, the
  coordinate-wise mean and standard deviation of the honest updates shifted by
  ``z = Phi^{-1}((n - s) / n)``, ``s = floor(n / 2 + 1) - f`` (``alie_z``).
  Omniscient: it reads the honest agents' updates of the round.
- ``ipm``: inner-product manipulation (Xie, Koyejo, Gupta, "Fall of Empires:
  Breaking Byzantine-tolerant SGD by Inner Product Manipulation", UAI 2019,
  Sec. 4): every Byzantine agent sends ``-epsilon * mu`` (``mu``: the honest
  mean update), so that the aggregate's inner product with the true update turns
  negative. Omniscient.

In a run (``config.attack``, ``attack_fraction``, ``attack_redraw``, the
strengths ``attack_scale``, ``attack_noise_std``, ``attack_epsilon``,
``attack_alie_z``), ``Attack.from_config`` holds these settings and the server
aggregation corrupts the Byzantine rows of what it receives
(``protocol.Context.aggregate(..., reference=...)`` and the hierarchical
family's ``aggregate_phase``) before the (robust) aggregator. The Byzantine set
is fixed for the run (drawn from ``config.seed``; ``byzantine_set``) or re-drawn
from every round's key (``attack_redraw=True``); ``label_flip`` needs the fixed
set (the labels are flipped once, at data time: ``poison_partition``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import norm

from demjax.errors import ConfigError

ATTACKS = ("none", "sign_flip", "gaussian", "scaling", "label_flip", "alie", "ipm")
MESSAGE_ATTACKS = ("sign_flip", "gaussian", "scaling", "alie", "ipm")
# fold_in salts of the Byzantine draws (kept apart from every other key stream).
_FIXED_SALT = 0x0B7A
_ROUND_SALT = 0x0B7B
_NOISE_SALT = 0x0B7C


def num_byzantine(num_agents: int, fraction: float) -> int:
    """``floor(fraction * num_agents)`` Byzantine agents (10% of 50 agents: 5).

    Raises:
      ConfigError: ``fraction`` outside ``[0, 1)`` (named ``attack_fraction``).
    """
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction < 1.0):
        raise ConfigError(
            f"attack_fraction={fraction!r} is not valid; accepted: a float in [0, 1)"
        )
    return int(math.floor(fraction * num_agents + 1e-9))


def choose_byzantine(key: jax.Array, num_agents: int, fraction: float) -> jax.Array:
    """Draws the Byzantine agents: exactly ``num_byzantine(A, fraction)`` of them.

    Args:
      key: PRNG key (one draw per replica, or per round when re-drawn).
      num_agents: A.
      fraction: in ``[0, 1)``.

    Returns:
      bool ``[A]``, True for the Byzantine agents (uniform without replacement).
    """
    k = num_byzantine(num_agents, fraction)
    order = jax.random.permutation(key, num_agents)
    return jnp.zeros((num_agents,), bool).at[order[:k]].set(True)


def alie_z(num_agents: int, num_bad: int) -> float:
    """The ALIE shift ``z = Phi^{-1}((n - s) / n)``, ``s = floor(n / 2 + 1) - f``.

    Baruch et al., NeurIPS 2019, Sec. 3 (Alg. 3, line 1): ``s`` honest agents
    the attackers need on their side for a majority; ``z`` the largest shift
    that keeps the Byzantine update within the honest spread for them.
    Returns 0.0 when ``s`` would be <= 0 or ``(n - s) / n`` is not in ``(0, 1)``.
    """
    n = num_agents
    s = math.floor(n / 2 + 1) - num_bad
    p = (n - s) / n
    if s <= 0 or not 0.0 < p < 1.0:
        return 0.0
    return float(norm.ppf(p))


def flip_labels(y: jax.Array, byzantine: jax.Array, num_classes: int) -> jax.Array:
    """Label flipping: ``y -> C - 1 - y`` on the Byzantine agents' rows.

    Args:
      y: int32 ``[A, N]`` training labels.
      byzantine: bool ``[A]``.
      num_classes: C.

    Returns:
      int32 ``[A, N]``; honest rows unchanged.
    """
    return jnp.where(byzantine[:, None], num_classes - 1 - y, y).astype(y.dtype)


def _rows(mask, x):
    return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def corrupt(
    key: jax.Array,
    sent,
    start,
    byzantine: jax.Array,
    kind: str,
    *,
    include: jax.Array | None = None,
    scale: float = 1.0,
    noise_std: float = 1.0,
    epsilon: float = 0.1,
    z: float | None = None,
):
    """Replaces the Byzantine agents' messages by the attack ``kind``.

    Args:
      key: PRNG key (``gaussian`` only).
      sent: pytree, leaves float32 ``[A, ...]``: the models the agents send
        (after local training).
      start: pytree like ``sent`` (``[A, ...]``) or without the agent axis: the
        model(s) the agents began the round with.
      byzantine: bool ``[A]``.
      kind: one of ``ATTACKS`` (``none`` and ``label_flip`` return ``sent``).
      include: bool ``[A]`` agents taking part this round (default all); the
        omniscient attacks' honest statistics use the included honest agents.
      scale: ``sign_flip`` / ``scaling`` multiplier (> 0).
      noise_std: ``gaussian`` standard deviation (> 0).
      epsilon: ``ipm`` coefficient (> 0).
      z: ``alie`` shift; default ``alie_z(A, number of Byzantine agents)``
        (needs a concrete ``byzantine``; pass ``z`` under ``jit``).

    Returns:
      pytree like ``sent``: honest rows bit for bit unchanged.

    Raises:
      ConfigError: unknown ``kind`` (named ``attack``).
    """
    if kind not in ATTACKS:
        raise ConfigError(
            f"attack={kind!r} is not valid; accepted: {', '.join(ATTACKS)}"
        )
    if kind in ("none", "label_flip"):
        return sent
    num_agents = byzantine.shape[0]
    include = jnp.ones((num_agents,), bool) if include is None else include
    honest = include & ~byzantine
    n_honest = jnp.maximum(jnp.sum(honest), 1).astype(jnp.float32)
    if kind == "alie" and z is None:
        z = alie_z(num_agents, int(jnp.sum(byzantine)))

    leaves, treedef = jax.tree.flatten(sent)
    start_leaves = treedef.flatten_up_to(start)
    keys = jax.random.split(key, len(leaves))
    out = []
    for x, s, k in zip(leaves, start_leaves, keys, strict=True):
        s = jnp.broadcast_to(s, x.shape)
        delta = x - s
        if kind == "sign_flip":
            bad = -scale * delta
        elif kind == "scaling":
            bad = scale * delta
        elif kind == "gaussian":
            bad = noise_std * jax.random.normal(k, x.shape, x.dtype)
        else:
            w = _rows(honest, delta).astype(delta.dtype)
            mu = jnp.sum(w * delta, axis=0) / n_honest
            if kind == "ipm":
                bad = jnp.broadcast_to(-epsilon * mu, x.shape)
            else:  # alie
                var = jnp.sum(w * (delta - mu) ** 2, axis=0) / n_honest
                bad = jnp.broadcast_to(mu - z * jnp.sqrt(var), x.shape)
        out.append(jnp.where(_rows(byzantine, x), s + bad, x))
    return jax.tree.unflatten(treedef, out)


def byzantine_set(seed: int, num_agents: int, fraction: float) -> np.ndarray:
    """The fixed Byzantine set of a run: ``choose_byzantine`` on a key of ``seed``.

    The same set for the message attacks and for ``label_flip``'s data-time
    poisoning, computed on the host (also when called while tracing).

    Returns:
      bool numpy ``[A]`` with exactly ``num_byzantine(A, fraction)`` True.
    """
    with jax.ensure_compile_time_eval():
        key = jax.random.fold_in(jax.random.PRNGKey(int(seed)), _FIXED_SALT)
        return np.asarray(choose_byzantine(key, num_agents, fraction))


@dataclasses.dataclass(frozen=True)
class Attack:
    """A run's message attack (``config.attack`` in ``MESSAGE_ATTACKS``).

    Attributes:
      kind: one of ``MESSAGE_ATTACKS``.
      num_agents: A; fraction: ``attack_fraction``; redraw: ``attack_redraw``.
      seed: ``config.seed`` (the fixed set).
      scale, noise_std, epsilon, z: the strengths passed to ``corrupt``.
    """

    kind: str
    num_agents: int
    fraction: float
    redraw: bool
    seed: int
    scale: float
    noise_std: float
    epsilon: float
    z: float

    @classmethod
    def from_config(cls, config, num_agents: int) -> Attack | None:
        """The attack of a validated config, None without a message attack.

        Defaults: ``attack_scale`` None -> 1 for ``sign_flip`` and A for
        ``scaling`` (Bagdasaryan et al.'s model replacement ``n / eta`` with
        server rate 1); ``attack_alie_z`` None -> ``alie_z(A, floor(f A))``.
        """
        kind = str(config.get("attack", "none"))
        if kind not in MESSAGE_ATTACKS:
            return None
        fraction = float(config.attack_fraction)
        scale = config.attack_scale
        if scale is None:
            scale = float(num_agents) if kind == "scaling" else 1.0
        z = config.attack_alie_z
        if z is None:
            z = alie_z(num_agents, num_byzantine(num_agents, fraction))
        return cls(
            kind=kind,
            num_agents=int(num_agents),
            fraction=fraction,
            redraw=bool(config.attack_redraw),
            seed=int(config.seed),
            scale=float(scale),
            noise_std=float(config.attack_noise_std),
            epsilon=float(config.attack_epsilon),
            z=float(z),
        )

    def mask(self, key: jax.Array | None) -> jax.Array:
        """bool ``[A]``: the fixed set, or re-drawn from ``key`` (the round's
        aggregation key) with ``redraw``.

        Raises:
          ValueError: ``redraw`` without a key.
        """
        if not self.redraw:
            return jnp.asarray(byzantine_set(self.seed, self.num_agents, self.fraction))
        if key is None:
            raise ValueError("attack_redraw=True needs the aggregation's PRNG key")
        return choose_byzantine(
            jax.random.fold_in(key, _ROUND_SALT), self.num_agents, self.fraction
        )

    def __call__(self, key, sent, start, include: jax.Array | None = None):
        """The messages the server receives: ``sent`` with the Byzantine rows
        corrupted (``corrupt``); honest rows bit for bit unchanged.

        Args:
          key: the aggregation's PRNG key (the re-drawn set, ``gaussian`` noise;
            None: a fixed set and a fixed noise key).
          sent: pytree, leaves float32 ``[A, ...]``.
          start: the round-start model(s): like ``sent`` or one model.
          include: bool ``[A]`` contributing agents (honest statistics).
        """
        noise_key = jax.random.PRNGKey(self.seed) if key is None else key
        return corrupt(
            jax.random.fold_in(noise_key, _NOISE_SALT),
            sent,
            start,
            self.mask(key),
            self.kind,
            include=include,
            scale=self.scale,
            noise_std=self.noise_std,
            epsilon=self.epsilon,
            z=self.z,
        )


def poison_partition(config, part):
    """``label_flip``: the fixed Byzantine agents' training labels flipped
    (``flip_labels``), once, at data time; any other attack: ``part`` itself.

    Args:
      part: ``demjax.types.Partition`` (host or device arrays); ``y_train``
        int32 ``[A, N]``.
    """
    if str(config.get("attack", "none")) != "label_flip":
        return part
    bad = byzantine_set(
        int(config.seed), part.num_agents, float(config.attack_fraction)
    )
    y = np.asarray(part.y_train)
    flipped = np.where(bad[:, None], part.num_classes - 1 - y, y).astype(y.dtype)
    return part.replace(y_train=flipped)


def check_config(config, attackable: bool, algorithm: str) -> None:
    """The attack fields of a run config.

    Args:
      attackable: the algorithm's server aggregates the agents' messages
        through the attack wiring (``Algorithm.attackable``).

    Raises:
      ConfigError: a bad ``attack*`` field, ``label_flip`` with
        ``attack_redraw``, or a message attack on an algorithm without it.
    """
    kind = config.attack
    if kind not in ATTACKS:
        raise ConfigError(
            f"attack={kind!r} is not valid; accepted: {', '.join(ATTACKS)}"
        )
    num_byzantine(int(config.num_agents), config.attack_fraction)
    if not isinstance(config.attack_redraw, bool):
        raise ConfigError(
            f"attack_redraw={config.attack_redraw!r} is not valid; accepted: True "
            "or False"
        )
    for field in ("attack_scale", "attack_noise_std", "attack_epsilon"):
        value = config[field]
        if field == "attack_scale" and value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value < math.inf
        ):
            extra = " or None (default)" if field == "attack_scale" else ""
            raise ConfigError(
                f"{field}={value!r} is not valid; accepted: a finite float > 0{extra}"
            )
    z = config.attack_alie_z
    if z is not None and (
        isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z)
    ):
        raise ConfigError(
            f"attack_alie_z={z!r} is not valid; accepted: a finite number or None "
            "(alie_z of the run)"
        )
    if kind == "label_flip" and config.attack_redraw:
        raise ConfigError(
            "attack_redraw=True is not valid with attack='label_flip'; accepted: "
            "False (the labels are flipped once, at data time)"
        )
    if kind in MESSAGE_ATTACKS and not attackable:
        raise ConfigError(
            f"attack={kind!r} is not valid for algorithm={algorithm!r} (its messages "
            "do not pass the server aggregation); accepted: none, label_flip"
        )
