"""The one algorithm protocol: every algorithm is a module of pure functions.

A module under ``demjax/algorithms/`` that defines ``ALGORITHM = Algorithm(...)``
is discovered and registered under ``ALGORITHM.name`` (``demjax.algorithms``);
``demjax.train.run`` runs every algorithm with one round loop (data, agent
blocks, participation and fault masks, sharding over the ``agents`` mesh,
multi-process jobs, checkpoints, SIGINT, metrics, TensorBoard, progress).

``Algorithm.build(ctx: Context) -> Rounds``; ``Rounds`` holds pure functions over
one state pytree whose per-agent leaves are stacked ``[A, ...]`` (vectorized: no
Python loop over agents anywhere):

- ``init(key, part) -> state``.
- ``phases``: the round, a sequence of ``Phase``. Each ``Phase.fn(state, part,
  key, t) -> (state, info)`` is jitted by the loop (``key`` the round's PRNG
  key, ``t`` an int32 scalar, ``info`` a dict of scalars, merged over the
  round's phases); the state keeps its pytree structure, shapes and dtypes, so
  no phase recompiles after round 0. ``Phase.host(state, info, t, key) ->
  (state, report)``, optional, runs on the host right after the phase, with the
  phase's ``info`` (device scalars), the Python int ``t`` and the round's key:
  data-dependent decisions between phases (DemLearn's re-grouping by scipy
  linkage every ``tau`` rounds, CFL's cluster split); ``report`` is a dict with
  optional ``"timing"`` (scalars for ``timing.jsonl``) and ``"files"`` (relative
  path -> JSON object, written to the workdir). ``Phase.point`` names the
  measurement point taken after the phase (and its host step), e.g. ``local``
  and ``sync``.
- ``measure(point, state, part, x_gen, y_gen, key, info) -> dict``: the metrics
  record of a point (``c_spe``, ``c_gen``, ``global_acc``, ``train_loss`` and
  the algorithm's own scalars; device or host values, None for null), given the
  round's ``info`` on the host. ``make_measure`` builds the usual one from
  ``personal(state, part, key) -> params [A, ...]`` (the models behind C-SPE and
  C-GEN) and ``global_model(state) -> params`` (one model, behind Global).
- ``final_files(state, t) -> dict`` (optional): files written at the end of the
  run (or on SIGINT), ``t`` the last completed round.

Round-level results an algorithm reports through ``info`` and the loop handles
for every algorithm: ``num_active`` (agents that trained) and ``num_diverged``
(agents whose training turned non-finite: reset, excluded from aggregation,
counted; a warning is logged; ``pytrees.divergence_guard`` and
``pytrees.round_counts``), and ``bytes_up`` / ``bytes_down`` (float32: the bytes
the agents send / receive that round, ``pytrees.comm_bytes``; copied into every
metrics record like the other info scalars).

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

from demjax import metrics
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
class Phase:
    """One jitted phase of a round (see the module docstring).

    Attributes:
      name: the phase's name (its compiled variants are reported under it).
      fn: ``fn(state, part, key, t) -> (state, info)``, pure, jitted by the loop.
      timing: ``timing.jsonl`` key prefix of its seconds (``<timing>_s``;
        phases of one timing name add up).
      donate: the loop donates ``state``'s buffers to ``fn`` (in-place update).
      host: optional ``host(state, info, t: int, key) -> (state, report dict)``.
      point: measurement point after this phase, or None.
    """

    name: str
    fn: Callable
    timing: str = "local"
    donate: bool = False
    host: Callable | None = None
    point: str | None = None


@dataclasses.dataclass(frozen=True)
class Rounds:
    """The pure functions of an algorithm (see the module docstring).

    Attributes:
      init: ``init(key, part) -> state``.
      phases: the round's ``Phase`` sequence.
      measure: ``measure(point, state, part, x_gen, y_gen, key, info) -> dict``.
      jitted: the algorithm's own jitted functions (e.g. evaluation), name ->
        function, whose compiled variants the run reports.
      final_files: optional ``final_files(state, t) -> {path: JSON object}``.
      personal: ``personal(state, part, key) -> params [A, ...]``, the models
        behind C-SPE and C-GEN.
      global_model: ``global_model(state) -> params`` (one model, behind
        Global), or None when the algorithm has none.
      eval_apply: ``(params, x [M, ...], train, key) -> logits [M, C]`` of
        evaluation, or None for the model's own.
    """

    init: Callable
    phases: tuple
    measure: Callable
    jitted: dict = dataclasses.field(default_factory=dict)
    final_files: Callable | None = None
    personal: Callable | None = None
    global_model: Callable | None = None
    eval_apply: Callable | None = None

    @property
    def round(self) -> Callable:
        """The round as one pure function ``(state, part, key, t) -> (state,
        info)`` (jittable), for algorithms without host steps."""
        if any(p.host is not None for p in self.phases):
            raise ValueError("a round with host steps is not one pure function")

        def round_fn(state, part, key, t):
            info = {}
            for p in self.phases:
                state, more = p.fn(state, part, key, t)
                info.update(more)
            return state, info

        return round_fn

    @property
    def points(self) -> tuple[str, ...]:
        """The measurement points of a round, in order."""
        return tuple(p.point for p in self.phases if p.point is not None)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A registered algorithm.

    Attributes:
      name: registry name (``config.algorithm``) and the config group of its
        hyper-parameters.
      citation: the paper (and equation/algorithm) it follows.
      hparams: name -> ``HParam`` (the paper's defaults).
      build: ``build(ctx: Context) -> Rounds``.
      has_global: whether a global model exists (Global metric), else null.
      default_mu: ``config.mu`` when it is None (the proximal coefficient of
        the standard local objective).
      check: optional ``check(config)`` of the config fields the algorithm
        reads beyond its ``hparams``; raises ``ConfigError`` naming the field.
      resources: optional ``resources(config) -> dict`` for the execution plan
        (``donate``: in-place rounds; ``num_group_models``: group models held
        besides the agents'); default no donation and one model.
      attackable: the server aggregates the agents' messages with their
        round-start model (``Context.aggregate(..., reference=...)``), so the
        message attacks (``config.attack``, ``demjax.attacks``) apply; otherwise
        they are refused.
      shard_mapped: local training runs through ``Context.trainer`` (or the
        engine's local phase), so on several devices each device runs the
        measured per-device plan under ``jax.shard_map``; False: the
        algorithm's own vectorized steps (e.g. gossip between local steps),
        left to XLA's partitioner with every device's agents at once.
    """

    name: str
    citation: str
    hparams: dict[str, HParam]
    build: Callable
    has_global: bool = True
    default_mu: float = 0.0
    check: Callable | None = None
    resources: Callable | None = None
    attackable: bool = False
    shard_mapped: bool = True


@dataclasses.dataclass(frozen=True)
class Context:
    """What the loop hands an algorithm's ``build``.

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
      partition: the agents' data on the host (``Partition``; for shapes and
        host-side statistics).
      mu: the resolved proximal coefficient (``config.mu`` or the default).
      plan: the local-training ``demjax.plan.LocalPlan`` (``plan_info`` says
        how it was chosen; ``plan_info["eval"]`` the evaluation plan).
      mesh: the ``agents`` mesh the partition is sharded over (D devices), or
        None; with a mesh ``trainer`` runs each device's A / D agents under
        ``jax.shard_map`` with the plan (``block_size`` is then a per-device
        plan) and ``make_measure`` evaluates each device's agents there.
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
    partition: Any = None
    mu: float = 0.0
    plan: Any = None
    mesh: Any = None

    def trainer(
        self,
        grad_fn: Callable | None = None,
        tx: optax.GradientTransformation | None = None,
        local_epochs: int | None = None,
        apply_fn: Callable | None = None,
    ) -> Callable:
        """The engine's vectorized local training (bucketed by step count, agent
        blocks), optionally with a custom gradient (``local.make_train_one``).

        With ``mesh``, each device trains its own agents under ``jax.shard_map``
        (``local.shard_population``): every argument but ``mu`` must then hold
        the agent axis ``[A, ...]`` (a one-model anchor is stacked, as
        ``pytrees.stack`` does).

        Returns:
          ``train(keys [A], params [A, ...], opt_state [A, ...], x, y, n, anchor,
          mu, max_steps) -> (params, opt_state, loss [A])``.
        """
        from demjax import local

        train = local.make_train_population(
            apply_fn or self.apply_fn,
            tx or self.tx,
            batch_size=int(self.config.batch_size),
            local_epochs=int(local_epochs or self.config.local_epochs),
            n_train=local.shard_counts(self.n_train, self.mesh),
            num_buckets=int(self.config.local_buckets),
            block_size=self.block_size,
            grad_fn=grad_fn,
        )
        return train if self.mesh is None else local.shard_population(train, self.mesh)

    def init_model(self, key: jax.Array):
        """One model's parameters (unstacked)."""
        from demjax import models

        return models.init_params(key, self.model, self.input_shape)

    def init_population(self, key: jax.Array):
        """Every agent starts from one shared initialization: leaves ``[A, ...]``."""
        from demjax import pytrees

        return pytrees.stack(self.init_model(key), self.num_agents)

    def aggregate(self, params, weights: jax.Array, key: jax.Array | None = None,
                  reference=None):  # fmt: skip
        """Server average of agent models with the configured ``aggregator``.

        With a message attack (``config.attack``, ``demjax.attacks.Attack``) the
        Byzantine rows of ``params`` are first replaced by the attack, computed
        on their update ``params - reference``.

        Args:
          params: leaves ``[A, ...]``; weights: float32 ``[A]`` (0 = excluded).
          key: the round's aggregation PRNG key (``noisy_median``, re-drawn
            Byzantine sets, ``gaussian`` noise).
          reference: the model(s) the agents started the round from: leaves
            ``[...]`` (one model) or ``[A, ...]``; needed by message attacks.

        Returns:
          One model (leaves without the agent axis).

        Raises:
          ValueError: a message attack without ``reference``.
        """
        from demjax import attacks, robust

        attack = attacks.Attack.from_config(self.config, self.num_agents)
        if attack is not None:
            if reference is None:
                raise ValueError(
                    f"attack={attack.kind!r} needs Context.aggregate(..., "
                    "reference=round-start model)"
                )
            params = attack(key, params, reference, include=weights > 0)
        return robust.aggregate(
            params,
            weights,
            kind=str(self.config.aggregator),
            trim_fraction=float(self.config.trim_fraction),
            noise_scale=float(self.config.aggregator_noise),
            key=key,
        )


def single_phase(round_fn: Callable, host: Callable | None = None) -> tuple:
    """The phases of an algorithm whose round is one jitted function
    ``round_fn(state, part, key, t) -> (state, info)`` and one optional host step
    ``host(state, info, t) -> state`` after it; measured at ``sync``."""
    wrapped = None
    if host is not None:

        def wrapped(state, info, t, key):
            return host(state, info, t), {}

    return (Phase("round", round_fn, host=wrapped, point="sync"),)


def make_measure(ctx: Context, personal: Callable, global_model: Callable | None,
                 eval_apply: Callable | None = None):  # fmt: skip
    """The usual ``measure`` and its jitted evaluation.

    C-SPE / C-GEN evaluate ``personal(state, part, key) -> params [A, ...]`` on
    the agents' own test sets / the C-GEN set (each device its own agents, under
    ``jax.shard_map``, with ``ctx.mesh``), Global ``global_model(state)``
    (one model) on the pooled test set (null without a global model); the
    record adds the round's ``info`` scalars (``train_loss`` at least; null when
    absent).

    Args:
      eval_apply: ``(params, x [M, ...], train, key) -> logits [M, C]``; default
        ``ctx.eval_apply_fn``.

    Returns:
      ``(measure, {"evaluate": jitted evaluate})``.
    """
    apply = eval_apply or ctx.eval_apply_fn
    eval_batch = int((ctx.plan_info or {}).get("eval", {}).get("eval_batch", 0))

    def evaluate(state, part, x_gen, y_gen, key):
        # Sharded agents: each device evaluates its own (XLA's partitioner made
        # the lax.map over a sharded agent axis about 2x slower than one device).
        out = metrics.client_metrics(
            apply, personal(state, part, key), part, x_gen, y_gen, eval_batch,
            mesh=ctx.mesh,
        )  # fmt: skip
        if global_model is not None:
            g = jax.tree.map(lambda p: p[None], global_model(state))
            correct = metrics.correct_matrix(apply, g, part.x_all, part.y_all, 1)
            out["global_acc"] = jnp.mean(correct)
        return out

    evaluate = jax.jit(evaluate)

    def measure(point, state, part, x_gen, y_gen, key, info):
        m = evaluate(state, part, x_gen, y_gen, key)
        rec = {k: m.get(k) for k in ("c_spe", "c_gen", "global_acc")}
        for k in sorted(info):
            if k not in ("num_active", "num_diverged"):
                rec[k] = info[k]
        rec.setdefault("train_loss", None)
        return rec

    return measure, {"evaluate": evaluate}


def one_round(ctx: Context, *, init: Callable, round: Callable, personal: Callable,
              global_model: Callable | None = None, eval_apply: Callable | None = None,
              host_step: Callable | None = None) -> Rounds:  # fmt: skip
    """``Rounds`` of an algorithm whose round is one jitted function ``round(state,
    part, key, t) -> (state, info)`` (``single_phase``), measured at ``sync`` by
    ``make_measure(ctx, personal, global_model, eval_apply)``."""
    measure, jitted = make_measure(ctx, personal, global_model, eval_apply)
    return Rounds(
        init=init,
        phases=single_phase(round, host_step),
        measure=measure,
        jitted=jitted,
        personal=personal,
        global_model=global_model,
        eval_apply=eval_apply,
    )
