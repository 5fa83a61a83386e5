"""``run(config, workdir)``: a distributed class-incremental run, task after task.

Self-centred distributed continual learning (Carta et al., "Projected Latent
Distillation for Data-Agnostic Consolidation in Distributed Continual Learning",
arXiv 2303.15888, Sec. 3-4): for each task ``t`` in turn,

1. the task's ``A`` agents start from the current consolidated model (forward
   transfer), train on their own data only (one ``jax.vmap`` over the agent axis,
   ``demjax.local``), and send their models once;
2. the server consolidates the previous model and the agents' models
   (``config.method``): DAC / logit-only distillation on proxy data only
   (``demjax.continual.consolidate``), or the FedAvg-style ``average``; the
   ``finetune`` and ``joint`` baselines train a single model on the pooled data.

With ``forward_transfer`` the same agents are also trained from a fresh random
initialization in the same vmap (``2A`` models), to compare own-task accuracy.

The workdir receives, through the run writer shared with the simulation
(``demjax.run_output.RunWriter``: each line flushed when written, the workdir
locked for the run's duration):

- ``config.json``: the config.
- ``metrics.jsonl``: one object per consolidation step: ``task``, ``classes``,
  ``acc`` (accuracy of the consolidated model on each task ``j <= t``, argmax over
  the classes seen so far), ``avg_acc`` (on all seen classes' test data),
  ``agent_acc`` / ``scratch_acc`` (each agent's own-task accuracy, argmax over its
  task's classes, started from the consolidated model / from scratch),
  ``task_acc`` (the same with the argmax over task j's own classes: task-aware,
  i.e. without the old-vs-new class competition), ``agent_loss``, ``loss_logit``
  / ``loss_pld`` (first and last consolidation step), ``wall_s``.
- ``metrics.csv``: the same records, one row each (list values as JSON text).
- ``timing.jsonl``: one object per task: ``task``, ``train_s`` (the agents'
  local training, or the single model's for ``finetune`` / ``joint``; the first
  includes compilation), ``consolidate_s`` (0 for ``finetune`` / ``joint``),
  ``wall_s``.
- ``tensorboard/`` (``tensorboard=True`` or ``--tensorboard``): the records'
  numbers as scalar series, step = task (``avg_acc``, ``acc/<j>``, ...).
- ``summary.json``: ``acc_matrix`` ``[T][T]`` (row i: after consolidating task
  i; null above the diagonal), ``final_avg_acc``, ``forgetting`` (mean over tasks
  j < T-1 of ``max_{i<T-1} R[i, j] - R[T-1, j]``), ``forward_transfer``,
  ``task_aware_acc_matrix`` and ``task_aware_final_avg_acc`` (from ``task_acc``).
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from demjax.config import validate
from demjax.continual.consolidate import Consolidator, average_params
from demjax.continual.proxy import make_proxy
from demjax.continual.scenario import make_scenario
from demjax.errors import ConfigError
from demjax.local import make_optimizer, make_train_all, make_train_one
from demjax.models import init_params, make_model
from demjax.run_output import RunWriter, check_workdir, lock_workdir, unlock_workdir

log = logging.getLogger(__name__)


def make_trainer(model, tx, batch_size: int, local_epochs: int):
    """Vmapped local training of ``A`` models on their own data.

    Returns:
      jitted ``train(key, params [A, ...], x [A, N, ...], y [A, N], n [A],
      class_mask bool [C]) -> (params [A, ...], mean loss [A])``; logits outside
      ``class_mask`` are set to -1e9 (the cross-entropy covers only the mask).
      Fresh optimizer state per call (agents send their model once).
    """

    @jax.jit
    def train(key, params, x, y, n, class_mask):
        def apply_fn(p, xb, is_train, k):
            z = model.apply({"params": p}, xb, train=is_train, rngs={"dropout": k})
            return jnp.where(class_mask, z, -1e9)

        one = make_train_one(
            apply_fn,
            tx,
            batch_size=batch_size,
            local_epochs=local_epochs,
            n_max=x.shape[1],
        )
        opt = jax.vmap(tx.init)(params)
        keys = jax.random.split(key, x.shape[0])
        p, _, loss = make_train_all(one)(
            keys, params, opt, x, y, n, params, jnp.float32(0.0)
        )
        return p, loss

    return train


def make_accuracy(model):
    """jitted ``acc(params, x [M, ...], y [M], class_mask [C]) -> float32``:
    accuracy of the argmax over the classes in ``class_mask``."""

    @jax.jit
    def acc(params, x, y, class_mask):
        z = model.apply({"params": params}, x, train=False)
        z = jnp.where(class_mask, z, -jnp.inf)
        return jnp.mean((jnp.argmax(z, -1) == y).astype(jnp.float32))

    return acc


def make_logits(model):
    """jitted ``logits(params, x [M, ...]) -> float32 [M, C]`` (inference mode)."""

    @jax.jit
    def logits(params, x):
        return model.apply({"params": params}, x, train=False)

    return logits


def forgetting(r: np.ndarray) -> float | None:
    """Average forgetting of an accuracy matrix ``r [T, T]`` (row i after task i):
    ``mean_{j < T-1} (max_{j <= i < T-1} r[i, j] - r[T-1, j])`` (Chaudhry et al.,
    "Riemannian Walk for Incremental Learning", ECCV 2018, Eq. 4); None if T = 1."""
    t = r.shape[0]
    if t < 2:
        return None
    return float(np.mean([np.max(r[j : t - 1, j]) - r[t - 1, j] for j in range(t - 1)]))


def _stack(tree, k):
    return jax.tree.map(lambda p: jnp.broadcast_to(p[None], (k, *p.shape)), tree)


def _mask(classes, c):
    m = np.zeros(c, bool)
    m[list(classes)] = True
    return m


def _r(v):
    return None if v is None else round(float(v), 6)


def _timing(task: int, train_s: float, consolidate_s: float, wall_s: float) -> dict:
    """A ``timing.jsonl`` record."""
    return {
        "task": task,
        "train_s": round(train_s, 3),
        "consolidate_s": round(consolidate_s, 3),
        "wall_s": wall_s,
    }


SUMMARY_FILE = "summary.json"


def run(config, workdir: str, overwrite: bool = False) -> dict:
    """Runs one continual scenario with ``config.method`` and writes the workdir.

    Args:
      config: a continual config (``demjax.continual.config.get_config``);
        validated first (``demjax.config.validate``).
      workdir: output directory (created); locked for the run
        (``run_output.lock_workdir``).
      overwrite: replace a finished run's results (``summary.json``) instead of
        refusing.

    Returns:
      The summary dict (also ``<workdir>/summary.json``) plus ``records``.

    Raises:
      ConfigError: bad config field or workdir, the workdir holds a finished run
        and ``overwrite`` is False, or it is in use by another run.
      DataNotFoundError: the data set is not available offline.
    """
    validate(config)
    check_workdir(workdir)
    lock_workdir(workdir)  # released by RunWriter.close (or below on an error)
    try:
        return _run(config, workdir, overwrite)
    finally:
        unlock_workdir(workdir)


def _open_writer(config, workdir: str, overwrite: bool) -> RunWriter:
    """The run writer on ``workdir``, after refusing (or, with ``overwrite``,
    removing) a finished run's ``summary.json``."""
    summary = os.path.join(workdir, SUMMARY_FILE)
    if os.path.exists(summary):
        if not overwrite:
            raise ConfigError(
                f"workdir={workdir!r} already holds a continual run ({SUMMARY_FILE}); "
                "accepted: a new workdir, or --overwrite to replace it"
            )
        os.remove(summary)
    writer = RunWriter(workdir, step="task")
    writer.json("config.json", json.loads(config.to_json()))
    if config.tensorboard:
        writer.tensorboard()
    return writer


def _run(config, workdir: str, overwrite: bool) -> dict:
    t_start = time.perf_counter()
    writer = _open_writer(config, workdir, overwrite)
    try:
        summary, records = _tasks(config, writer, t_start)
        writer.json(SUMMARY_FILE, summary)
    finally:
        writer.close()
    return {**summary, "records": records}


def _tasks(config, writer: RunWriter, t_start: float) -> tuple[dict, list[dict]]:
    """Every task in turn; each task's record written (and flushed) when done.
    Returns ``(summary, records)``."""
    scenario = make_scenario(config)
    c, num_tasks, a = scenario.num_classes, scenario.num_tasks, scenario.agents_per_task
    model = make_model(
        config.model, c, tuple(config.hidden), config.conv_impl, init=config.init
    )
    key = jax.random.PRNGKey(int(config.seed))
    k_init, k_run = jax.random.split(key)
    shape = scenario.input_shape
    current = init_params(k_init, model, shape)
    tx = make_optimizer(config.optimizer, config.lr)
    train = make_trainer(model, tx, int(config.batch_size), int(config.local_epochs))
    acc_agents = jax.jit(jax.vmap(make_accuracy(model), in_axes=(0, None, None, None)))
    logits = make_logits(model)
    method = config.method
    proxy, consolidator = None, None
    if method in ("dac", "logit"):
        proxy = make_proxy(config, shape)
        consolidator = Consolidator(
            model,
            steps=int(config.consolidation_steps),
            batch=int(config.proxy_batch),
            lr=float(config.consolidation_lr),
            alpha=0.0 if method == "logit" else float(config.alpha),
            student_init=config.student_init,
            projector_init=config.projector_init,
            student_logits=config.student_logits,
        )
    r = np.full((num_tasks, num_tasks), np.nan)
    r_task = np.full((num_tasks, num_tasks), np.nan)  # argmax within task j's classes
    seen = np.zeros(c, bool)
    records = []
    tests = [scenario.test_data(j) for j in range(num_tasks)]
    all_classes = _mask([k for t in scenario.tasks for k in t], c)
    # Every task's test data in one fixed-shape array: one compiled evaluation.
    x_test = np.concatenate([xt for xt, _ in tests])
    y_test = np.concatenate([yt for _, yt in tests])
    task_of = np.concatenate([np.full(len(yt), j) for j, (_, yt) in enumerate(tests)])

    task_masks = np.stack([_mask(classes, c) for classes in scenario.tasks])

    def evaluate_row(t, params, seen_mask):
        """Fills ``r[t, :t+1]`` (argmax over ``seen_mask``: class-incremental) and
        ``r_task[t, :t+1]`` (argmax over task j's classes: task-aware); returns the
        class-incremental accuracy on tasks ``<= t``' test data pooled."""
        z = np.asarray(logits(params, x_test))
        correct = np.argmax(np.where(seen_mask, z, -np.inf), -1) == y_test
        own = np.argmax(np.where(task_masks[task_of], z, -np.inf), -1) == y_test
        for j in range(t + 1):
            r[t, j] = float(np.mean(correct[task_of == j]))
            r_task[t, j] = float(np.mean(own[task_of == j]))
        return float(np.mean(correct[task_of <= t]))

    pool_max = max(int(np.sum(scenario.agent_data(j).n)) for j in range(num_tasks))
    if method == "joint":
        t0 = time.perf_counter()
        pooled = [scenario.pooled_task(j) for j in range(num_tasks)]
        x = np.concatenate([p[0] for p in pooled])[None]
        y = np.concatenate([p[1] for p in pooled])[None]
        params, loss = train(
            k_run, _stack(current, 1), x, y, jnp.array([x.shape[1]]), all_classes
        )
        current = jax.block_until_ready(jax.tree.map(lambda p: p[0], params))
        train_s = time.perf_counter() - t0
        avg = evaluate_row(num_tasks - 1, current, all_classes)
        rec = {
            "task": num_tasks - 1,
            "classes": sorted(int(k) for k in np.flatnonzero(all_classes)),
            "acc": [_r(v) for v in r[num_tasks - 1]],
            "task_acc": [_r(v) for v in r_task[num_tasks - 1]],
            "avg_acc": _r(avg),
            "agent_loss": [_r(loss[0])],
            "wall_s": round(time.perf_counter() - t0, 2),
        }
        records.append(rec)
        writer.metrics(rec)
        writer.timing(_timing(num_tasks - 1, train_s, 0.0, rec["wall_s"]))
    for t in range(num_tasks if method != "joint" else 0):
        t0 = time.perf_counter()
        k_t = jax.random.fold_in(k_run, t)
        new_mask = _mask(scenario.tasks[t], c)
        old_mask = seen.copy()
        rec = {"task": t, "classes": list(scenario.tasks[t])}
        if method == "finetune":
            x, y = scenario.pooled_task(t)
            n_t = x.shape[0]
            # Padded to the largest task (masked rows): one compilation.
            x = np.concatenate([x, np.zeros((pool_max - n_t, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pool_max - n_t, y.dtype)])
            params, loss = train(
                k_t,
                _stack(current, 1),
                x[None],
                y[None],
                jnp.array([n_t]),
                np.ones(c, bool),
            )
            current = jax.block_until_ready(jax.tree.map(lambda p: p[0], params))
            train_s, t_cons = time.perf_counter() - t0, time.perf_counter()
            rec["agent_loss"] = [_r(v) for v in np.asarray(loss)]
        else:
            td = scenario.agent_data(t)
            head = new_mask if config.agent_head == "masked" else np.ones(c, bool)
            starts = _stack(current, a)
            x, y, n = td.x, td.y, td.n
            if config.forward_transfer:
                scratch = init_params(jax.random.fold_in(k_init, t + 1), model, shape)
                starts = jax.tree.map(
                    lambda p, q: jnp.concatenate([p, q]), starts, _stack(scratch, a)
                )
                x, y, n = (np.concatenate([v, v]) for v in (x, y, n))
            params, loss = train(jax.random.fold_in(k_t, 0), starts, x, y, n, head)
            jax.block_until_ready(params)
            train_s = time.perf_counter() - t0
            del td, x, y, n  # agent data are not used past this point
            agents = jax.tree.map(lambda p: p[:a], params)
            xt, yt = tests[t]
            rec["agent_acc"] = [
                _r(v) for v in np.asarray(acc_agents(agents, xt, yt, new_mask))
            ]
            if config.forward_transfer:
                rec["scratch_acc"] = [
                    _r(v)
                    for v in np.asarray(
                        acc_agents(
                            jax.tree.map(lambda p: p[a:], params), xt, yt, new_mask
                        )
                    )
                ]
            rec["agent_loss"] = [_r(v) for v in np.asarray(loss)[:a]]
            t_cons = time.perf_counter()
            if method == "average":
                w = t * a if config.average_weighting == "tasks" else min(t, 1)
                current = average_params(current, agents, jnp.float32(w))
            else:
                current, _, h_logit, h_pld = consolidator(
                    jax.random.fold_in(k_t, 1),
                    current,
                    agents,
                    old_mask,
                    new_mask,
                    t > 0,
                    proxy,
                )
                h_logit, h_pld = np.asarray(h_logit), np.asarray(h_pld)
                rec["loss_logit"] = [_r(h_logit[0]), _r(h_logit[-1])]
                rec["loss_pld"] = [_r(h_pld[0]), _r(h_pld[-1])]
        current = jax.block_until_ready(current)
        consolidate_s = 0.0 if method == "finetune" else time.perf_counter() - t_cons
        seen |= new_mask
        avg = evaluate_row(t, current, seen)
        rec["acc"] = [_r(v) for v in r[t, : t + 1]]
        rec["task_acc"] = [_r(v) for v in r_task[t, : t + 1]]
        rec["avg_acc"] = _r(avg)
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        records.append(rec)
        writer.metrics(rec)
        writer.timing(_timing(t, train_s, consolidate_s, rec["wall_s"]))
        log.info(
            "task %d/%d (%s): avg_acc %.4f, acc %s",
            t + 1,
            num_tasks,
            method,
            avg,
            rec["acc"],
        )
    ft = None
    if records and "scratch_acc" in records[0]:
        ft = {
            "agent_acc_from_consolidated": [
                float(np.mean(q["agent_acc"])) for q in records
            ],
            "agent_acc_from_scratch": [
                float(np.mean(q["scratch_acc"])) for q in records
            ],
        }
        ft["mean_gain"] = (
            float(
                np.mean(
                    np.array(ft["agent_acc_from_consolidated"][1:])
                    - np.array(ft["agent_acc_from_scratch"][1:])
                )
            )
            if num_tasks > 1
            else None
        )
    summary = {
        "method": method,
        "dataset": config.dataset,
        "tasks": [list(t) for t in scenario.tasks],
        "final_avg_acc": records[-1]["avg_acc"],
        "acc_matrix": [[None if np.isnan(v) else _r(v) for v in row] for row in r],
        "forgetting": None if method == "joint" else _r(forgetting(r)),
        "task_aware_acc_matrix": [
            [None if np.isnan(v) else _r(v) for v in row] for row in r_task
        ],
        "task_aware_final_avg_acc": _r(np.mean(r_task[-1])),
        "forward_transfer": ft,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    return summary, records
