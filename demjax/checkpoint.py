"""Checkpoint and resume with orbax.

A checkpoint holds an algorithm's whole state pytree after a completed round
(every agent's parameters and optimizer state, group/global models, group tree
or clusters), at the step of the round count (the PRNG stream is
``fold_in(key(seed), round)``, so the seed and the round fully determine it).
orbax writes each checkpoint to a temporary directory and renames it when
complete, so a crash never leaves a half-written checkpoint behind.

Convention (``scripts/run.py --workdir=W``): if ``W`` holds checkpoints of a
run with the same config (``num_rounds``, ``progress`` and ``checkpoint_every``
may differ), the run resumes from the last one; if ``W`` holds results of a
different or uncheckpointed run, it is refused unless ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from demjax.errors import ConfigError

# Fields that may change between a run and its resumption.
RESUMABLE_CHANGES = ("num_rounds", "progress", "checkpoint_every", "eval_every")
RESULT_FILES = ("metrics.jsonl", "metrics.csv", "timing.jsonl", "tree_final.json")


def _dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        _dir(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def has_checkpoint(workdir: str) -> bool:
    d = _dir(workdir)
    return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


def save(mngr: ocp.CheckpointManager, state, step: int) -> None:
    """Saves an algorithm's whole state after ``step`` completed rounds (blocks
    until written; a step already saved is kept)."""
    if mngr.latest_step() == step:
        return
    mngr.save(step, args=ocp.args.StandardSave({"state": state}))
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, state):
    """Restores the latest checkpoint into the structure, shapes, dtypes and
    shardings of ``state``.

    Returns:
      ``(state, rounds_done)``.
    """
    step = mngr.latest_step()
    target = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array)
            else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
        ),
        {"state": state},
    )
    got = mngr.restore(step, args=ocp.args.StandardRestore(target))
    return got["state"], int(step)


def prepare_workdir(
    workdir: str,
    config_json: dict,
    overwrite: bool,
    defaults: dict | None = None,
    delete: bool = True,
) -> bool:
    """Applies the resume convention; returns True when the run should resume.

    A field absent from the stored config (written by an older demjax) counts
    as unchanged when the new value is its default (``defaults``), so adding a
    config field never orphans existing checkpoints. ``delete=False`` (processes
    other than 0 of a multi-process job, which share the workdir) makes the same
    decision without removing anything for ``overwrite``.

    Raises:
      ConfigError: ``workdir`` holds results that would be lost (different
        config, or no checkpoint) and ``overwrite`` is False.
    """
    path = os.path.join(workdir, "config.json")
    if overwrite and not delete:
        return False
    if overwrite:
        shutil.rmtree(_dir(workdir), ignore_errors=True)
        for name in RESULT_FILES:
            if os.path.exists(os.path.join(workdir, name)):
                os.remove(os.path.join(workdir, name))
        return False
    has_results = os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    if not has_results and not has_checkpoint(workdir):
        return False
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    defaults = defaults or {}
    diff = sorted(
        k
        for k in set(old) | set(config_json)
        if k not in RESUMABLE_CHANGES
        and old.get(k, defaults.get(k)) != config_json.get(k)
    )
    if has_checkpoint(workdir) and not diff:
        return True
    why = (
        f"a run with a different config (fields: {', '.join(diff)})"
        if diff
        else "results without a checkpoint to resume from"
    )
    raise ConfigError(
        f"workdir={workdir!r} holds {why}; accepted: --overwrite to replace them, "
        "or another --workdir"
    )
