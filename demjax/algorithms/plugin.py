"""Plug-in algorithms: one module of pure functions, registered by name.

The tree engine (``demjax.engine``) runs DemLearn and its special cases (FedAvg,
FedProx, local). Algorithms whose round has another shape (two models per agent,
per-agent aggregation, cluster models, prototypes, peer-to-peer mixing) are
plug-ins: a module under ``demjax/algorithms/`` that defines ``PLUGIN = Plugin(...)``
is discovered and registered under ``PLUGIN.name``; ``demjax.plugin_engine`` runs it
with the same data, masks, evaluation (C-SPE, C-GEN, Global), outputs and
checkpoints as the tree engine.

A plug-in's ``build(ctx)`` returns ``Rounds``, four pure functions over a state
pytree whose per-agent leaves are stacked ``[A, ...]`` (vectorized: no Python loop
over agents anywhere):

- ``init(key, part) -> state``
- ``round(state, part, key, t) -> (state, info)``: one communication round, jitted
  by the engine; ``t`` is an int32 scalar; ``info`` a dict of float32 scalars
  (``train_loss`` at least) written to ``metrics.jsonl``.
- ``personal(state, part, key) -> params [A, ...]``: the models evaluated for C-SPE
  and C-GEN (e.g. Per-FedAvg personalizes with one step first).
- ``global_model(state) -> params`` (unstacked) or None: the model behind Global.
- ``host_step(state, info, t) -> state`` (optional, None by default): a host-side
  (not jitted) step the engine calls after every round, before evaluation and
  checkpointing, with the round's ``state``, its ``info`` (device scalars) and the
  Python int ``t``; for data-dependent decisions that change no shapes (e.g. CFL's
  cluster split, scipy linkage). It must return a state of the same pytree
  structure, shapes and dtypes, so the jitted round never recompiles.

Hyper-parameters live in the config under the algorithm's name
(``--config.<name>.<field>=...``, e.g. ``--config.ditto.lam=0.1``), declared as
``HParam`` with the paper's defaults, validated and documented from the
declaration (the config table, docs/config.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from demjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class HParam:
    """One hyper-parameter of a plug-in algorithm.

    Attributes:
      default: the paper's default value (its type sets the accepted type:
        float, int, bool or str).
      doc: one line: meaning, accepted values, and the paper's default.
      low, high: inclusive bounds for numbers (None: unbounded).
      choices: accepted values for strings.
      low_open: ``low`` itself is excluded (e.g. a positive rate).
    """

    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    low_open: bool = False

    def check(self, field: str, value) -> None:
        """Raises ``ConfigError`` naming ``field`` if ``value`` is not accepted."""
        kind = type(self.default)
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(
                    f"{field}={value!r} is not valid; accepted: True or False"
                )
            return
        if kind is str:
            if self.choices is not None and value not in self.choices:
                ok = ", ".join(self.choices)
                raise ConfigError(f"{field}={value!r} is not valid; accepted: {ok}")
            if not isinstance(value, str):
                raise ConfigError(f"{field}={value!r} is not valid; accepted: a string")
            return
        ok_type = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_type):
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"{field}={value!r} is not valid; accepted: {what}")
        bad_low = self.low is not None and (
            value <= self.low if self.low_open else value < self.low
        )
        bad_high = self.high is not None and value > self.high
        if bad_low or bad_high or (kind is float and not np.isfinite(value)):
            lo = "-inf" if self.low is None else self.low
            hi = "inf)" if self.high is None else f"{self.high}]"
            bracket = "(" if self.low_open or self.low is None else "["
            what = "a finite number" if kind is float else "an integer"
            raise ConfigError(
                f"{field}={value!r} is not valid; accepted: {what} in {bracket}{lo}, "
                f"{hi}"
            )


@dataclasses.dataclass(frozen=True)
class Rounds:
    """The pure functions of a plug-in algorithm (see the module docstring)."""

    init: Callable
    round: Callable
    personal: Callable
    global_model: Callable | None = None
    # (params, x [M, ...], train, key) -> logits [M, C]; default: the model's.
    eval_apply: Callable | None = None
    # (state, info, t: int) -> state, on the host after every round; None: none.
    host_step: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Plugin:
    """A registered plug-in algorithm.

    Attributes:
      name: registry name (``config.algorithm``) and the config group of its
        hyper-parameters.
      citation: the paper (and equation/algorithm) it follows.
      hparams: name -> ``HParam`` (the paper's defaults).
      build: ``build(ctx: Context) -> Rounds``.
      has_global: whether a global model exists (Global metric), else null.
    """

    name: str
    citation: str
    hparams: dict[str, HParam]
    build: Callable
    has_global: bool = True


@dataclasses.dataclass(frozen=True)
class Context:
    """What the engine hands a plug-in's ``build``.

    Attributes:
      config: the validated run config.
      hp: the algorithm's resolved hyper-parameters (name -> value).
      num_agents: A; num_classes: C; input_shape: one sample's shape.
      model: the flax module (training conv implementation).
      apply_fn: ``apply_fn(params, x [B, ...], train, key) -> logits [B, C]``.
      eval_apply_fn: the same for evaluation (fast conv implementation).
      tx: the local optax optimizer from ``config.optimizer`` / ``config.lr``.
      n_train: host int ``[A]`` training samples per agent.
      round_masks: ``round_masks(key, n_train) -> (active bool [A], max_steps
        int32 [A])`` from participation / dropout / stragglers.
      block_size: agents trained at once (0 = all, 1 = one after another),
        the run's execution plan (``demjax.plan``).
      plan_info: how the plan was chosen and its timing table.
    """

    config: Any
    hp: dict
    num_agents: int
    num_classes: int
    input_shape: tuple
    model: Any
    apply_fn: Callable
    eval_apply_fn: Callable
    tx: optax.GradientTransformation
    n_train: np.ndarray
    round_masks: Callable
    block_size: int = 0
    plan_info: dict | None = None

    def trainer(
        self,
        grad_fn: Callable | None = None,
        tx: optax.GradientTransformation | None = None,
        local_epochs: int | None = None,
        apply_fn: Callable | None = None,
    ) -> Callable:
        """The engine's vectorized local training (bucketed by step count, agent
        blocks), optionally with a custom gradient (``local.make_train_one``).

        Returns:
          ``train(keys [A], params [A, ...], opt_state [A, ...], x, y, n, anchor,
          mu, max_steps) -> (params, opt_state, loss [A])``.
        """
        from demjax import local

        return local.make_train_population(
            apply_fn or self.apply_fn,
            tx or self.tx,
            batch_size=int(self.config.batch_size),
            local_epochs=int(local_epochs or self.config.local_epochs),
            n_train=self.n_train,
            num_buckets=int(self.config.local_buckets),
            block_size=self.block_size,
            grad_fn=grad_fn,
        )

    def init_model(self, key: jax.Array):
        """One model's parameters (unstacked)."""
        from demjax import models

        return models.init_params(key, self.model, self.input_shape)

    def init_population(self, key: jax.Array):
        """Every agent starts from one shared initialization: leaves ``[A, ...]``."""
        one = self.init_model(key)
        return stack(one, self.num_agents)

    def aggregate(self, params, weights: jax.Array, key: jax.Array | None = None):
        """Server average of agent models with the configured ``aggregator``.

        Args:
          params: leaves ``[A, ...]``; weights: float32 ``[A]`` (0 = excluded).
          key: PRNG key (``noisy_median`` only).

        Returns:
          One model (leaves without the agent axis).
        """
        from demjax import robust

        return robust.aggregate(
            params,
            weights,
            kind=str(self.config.aggregator),
            trim_fraction=float(self.config.trim_fraction),
            noise_scale=float(self.config.aggregator_noise),
            key=key,
        )


def stack(tree, num: int):
    """Leaves ``[...]`` -> ``[num, ...]`` copies."""
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (num, *p.shape)), tree)


def where_agents(mask: jax.Array, new, old):
    """Per-agent select: ``mask`` bool ``[A]``; pytrees with leaves ``[A, ...]``."""

    def f(n, o):
        return jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(f, new, old)


def tree_sq_dist(a, b) -> jax.Array:
    """``||a - b||^2`` summed over all leaves (one model each)."""
    return sum(
        jnp.sum(jnp.square(x - y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
