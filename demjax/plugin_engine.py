"""Runs a plug-in algorithm (``demjax.algorithms.plugin``) end to end.

The same data, participation/fault masks, evaluation, workdir outputs, SIGINT
handling and checkpoints as the tree engine (``demjax.train.run``), with one
measurement point per round, ``sync``: the models each agent uses after the
round's communication (``Rounds.personal``). ``metrics.jsonl`` records carry
``round``, ``point``, ``c_spe``, ``c_gen``, ``global_acc`` (null without a global
model), ``train_loss`` and the algorithm's own ``info`` scalars (e.g.
``num_clusters``), flushed every round. A plug-in's optional
``Rounds.host_step`` runs on the host after each round, before evaluation.
"""

from __future__ import annotations

import logging
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from demjax import checkpoint, local, metrics, models
from demjax.algorithms import get_plugin
from demjax.algorithms.plugin import Context
from demjax.config import plugin_hparams
from demjax.engine import choose_eval_plan, choose_plan, make_round_masks, memory_cap
from demjax.run_output import (
    GracefulStop,
    Interrupted,
    RunWriter,
    log_plan,
    plan_record,
    prepare_run,
    rounded,
)

log = logging.getLogger(__name__)


def build(config, part):
    """``(plugin, ctx, rounds)`` for a validated config and a device partition."""
    plugin = get_plugin(config.algorithm)
    tx = local.make_optimizer(config.optimizer, config.lr)
    # The execution plan of local training, as for the tree algorithms (timed
    # with the standard local objective's step on the run's model and shapes).
    plain = models.make_model(config.model, part.num_classes, config.hidden)
    cap_probe = memory_cap(config, part, plain, tx, donate=False, num_group_models=1)
    plan, plan_info = choose_plan(
        config, part, tx, float(config.mu or 0.0), cap_probe=cap_probe,
        algorithm=config.algorithm,
    )  # fmt: skip
    model = models.make_model(
        config.model, part.num_classes, config.hidden, plan.conv_impl,
        plan.matmul_impl, init=config.init,
    )  # fmt: skip
    eval_batch, eval_conv, plan_info["eval"] = choose_eval_plan(
        config, part, probe=cap_probe[1], points=1
    )
    apply_fn = models.make_apply(model)
    eval_apply_fn = models.make_eval_apply(
        models.make_model(config.model, part.num_classes, config.hidden, eval_conv)
    )

    ctx = Context(
        config=config,
        hp=plugin_hparams(config),
        num_agents=part.num_agents,
        num_classes=part.num_classes,
        input_shape=tuple(part.input_shape),
        model=model,
        apply_fn=apply_fn,
        eval_apply_fn=eval_apply_fn,
        tx=tx,
        n_train=np.asarray(part.n_train),
        round_masks=make_round_masks(config, part.num_agents),
        block_size=plan.block_size,
        plan_info=plan_info,
    )
    return plugin, ctx, plugin.build(ctx)


def make_evaluate(plugin, ctx, rounds, eval_batch: int):
    """Jitted ``evaluate(state, part, x_gen, y_gen, key) -> dict`` of C-SPE, C-GEN,
    and Global (when the algorithm has a global model)."""
    apply = rounds.eval_apply or ctx.eval_apply_fn

    def evaluate(state, part, x_gen, y_gen, key):
        personal = rounds.personal(state, part, key)
        out = metrics.client_metrics(apply, personal, part, x_gen, y_gen, eval_batch)
        if plugin.has_global and rounds.global_model is not None:
            g = jax.tree.map(lambda p: p[None], rounds.global_model(state))
            correct = metrics.correct_matrix(apply, g, part.x_all, part.y_all, 1)
            out["global_acc"] = jnp.mean(correct)
        return out

    return jax.jit(evaluate)


def _save(mngr, state, step: int) -> None:
    checkpoint.save_payload(mngr, step, {"state": state})


def _restore(mngr, state):
    got, step = checkpoint.restore_payload(mngr, {"state": state})
    return got["state"], step


def run(
    config,
    workdir: str,
    progress: bool | None = None,
    overwrite: bool = False,
    partition=None,
):
    """Runs ``config.algorithm`` (a plug-in); outputs and ``partition`` as
    ``demjax.train.run``.

    Returns:
      ``{"final": {"sync": record}, "records": [...], "wall_s": float,
      "eval_samples": S or None, "compilations": {"round": n, "evaluate": n}}``.

    Raises:
      ConfigError, DataNotFoundError: as ``demjax.train.run``.
    """

    setup = prepare_run(config, workdir, overwrite, partition)
    part_np, part, resume = setup.part_np, setup.part, setup.resume
    x_gen, y_gen, t_start = setup.x_gen, setup.y_gen, setup.t_start

    plugin, ctx, rounds = build(config, part_np)
    eval_batch = ctx.plan_info["eval"]["eval_batch"]
    round_fn = jax.jit(rounds.round)
    evaluate = make_evaluate(plugin, ctx, rounds, eval_batch)

    key = jax.random.PRNGKey(int(config.seed))
    init_key, run_key = jax.random.split(key)
    state = rounds.init(init_key, part)
    every = int(config.checkpoint_every)
    keep = int(config.keep_checkpoints)
    mngr = checkpoint.manager(workdir, keep) if (every or resume) else None
    start = 0
    if resume:  # the newest readable checkpoint (damaged ones are set aside)
        state, start = _restore(mngr, state)
    writer = RunWriter(workdir, keep_rounds_below=start if resume else None)
    writer.json("config.json", setup.config_json)
    log_plan(ctx.plan_info)
    writer.timing(plan_record(ctx.plan_info))
    if config.tensorboard:
        writer.tensorboard()
    records: list[dict] = list(writer.kept)
    num_rounds = int(config.num_rounds)
    bar = None
    steps = range(start, num_rounds)
    show = config.progress if progress is None else progress
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(
            steps,
            desc=config.algorithm,
            unit="round",
            file=sys.stderr,
            initial=start,
            total=num_rounds,
        )
        steps = bar
    stop = GracefulStop()
    done = start
    try:
        for t in steps:
            t0 = time.perf_counter()
            round_key = jax.random.fold_in(run_key, t)
            state, info = round_fn(state, part, round_key, jnp.int32(t))
            if rounds.host_step is not None:  # host-side decisions (e.g. CFL splits)
                state = rounds.host_step(state, info, t)
            jax.block_until_ready(state)
            timing = {"round": t, "local_s": time.perf_counter() - t0}
            done = t + 1
            last = t == num_rounds - 1
            if t % int(config.eval_every) == 0 or last:
                t2 = time.perf_counter()
                eval_key = jax.random.fold_in(round_key, 7)
                m = evaluate(state, part, x_gen, y_gen, eval_key)
                m, info_h = jax.device_get((m, info))
                timing["eval_s"] = time.perf_counter() - t2
                rec = {"round": t, "point": "sync"}
                for k in ("c_spe", "c_gen", "global_acc"):
                    v = m.get(k)
                    rec[k] = None if v is None else round(float(v), 6)
                for k in sorted(info_h):
                    rec[k] = round(float(info_h[k]), 6)
                rec.setdefault("train_loss", None)
                records.append(rec)
                writer.metrics(rec)
                if bar is not None:
                    bar.set_postfix(
                        c_spe=f"{rec['c_spe']:.3f}", c_gen=f"{rec['c_gen']:.3f}"
                    )
            if every and (done % every == 0 or last):
                _save(mngr, state, done)
            timing["round_s"] = time.perf_counter() - t0
            writer.timing(rounded(timing))
            if stop.requested:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        stop.restore()
        if bar is not None:
            bar.close()
        if every:
            _save(mngr, state, done)
            how = "rerun the same command to resume from it (checkpoint saved)"
        else:
            how = "set checkpoint_every > 0 to resume; rerun with --overwrite"
        writer.close()
        raise Interrupted(
            f"interrupted (SIGINT) after round {done - 1}; results are in {workdir}; "
            f"{how}"
        ) from None
    finally:
        stop.restore()
    if bar is not None:
        bar.close()
    writer.close()
    if mngr is not None:
        mngr.close()
    return {
        "final": {"sync": records[-1]},
        "records": records,
        "wall_s": time.perf_counter() - t_start,
        "eval_samples": len(setup.eval_idx) if setup.subsampled else None,
        "agent_block": ctx.block_size,
        "local_plan": ctx.plan_info,
        "compilations": {
            "round": round_fn._cache_size(),
            "evaluate": evaluate._cache_size(),
        },
        "state": state,
    }


__all__ = ["build", "make_evaluate", "run"]
