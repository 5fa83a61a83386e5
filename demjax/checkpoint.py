"""Checkpoint and resume with orbax.

A checkpoint holds the full simulation state after a completed round: every
agent's parameters and optimizer state, the group models, the group tree, and
the round count (the PRNG stream is ``fold_in(key(seed), round)``, so the seed
and the round fully determine it). orbax writes each checkpoint to a temporary
directory and renames it when complete, so a crash never leaves a half-written
checkpoint behind. With the arrays, demjax writes a SHA-256 checksum of the
state (item ``demjax`` of the checkpoint: ``{"round", "sha256"}``); the last
``keep_checkpoints`` checkpoints are kept.

Convention (``scripts/run.py --workdir=W``): if ``W`` holds checkpoints of a
run with the same config (``num_rounds``, ``progress``, ``checkpoint_every``,
``eval_every`` and ``keep_checkpoints`` may differ), the run resumes from the
newest readable one; if ``W`` holds results of a different or uncheckpointed
run, it is refused unless ``--overwrite``.

Damaged checkpoints: on resume the newest checkpoint is verified (orbax
metadata, every array read, and the checksum); an unreadable one is reported in
one warning line, moved to ``W/checkpoints_unreadable/`` and the next older one
is tried. The run continues from the newest readable checkpoint (the engines
then drop the records of later rounds, see ``run_output.RunWriter``), so its
final metrics equal an uninterrupted run's. If none is readable:
``ConfigError`` naming the workdir and ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from demjax import multihost
from demjax.errors import ConfigError
from demjax.types import GroupTree

log = logging.getLogger(__name__)

# Fields that may change between a run and its resumption.
RESUMABLE_CHANGES = (
    "num_rounds", "progress", "checkpoint_every", "eval_every", "keep_checkpoints",
)  # fmt: skip
RESULT_FILES = ("metrics.jsonl", "metrics.csv", "timing.jsonl", "tree_final.json")
UNREADABLE = "checkpoints_unreadable"  # damaged checkpoints, moved aside
_ITEM, _SUM = "state", "demjax"  # orbax item names: the state, its checksum


def _dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """The orbax manager of ``<workdir>/checkpoints``, keeping the newest
    ``max_to_keep`` checkpoints (``config.keep_checkpoints``)."""
    return ocp.CheckpointManager(
        _dir(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def has_checkpoint(workdir: str) -> bool:
    d = _dir(workdir)
    return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


def state_digest(payload) -> str | None:
    """SHA-256 over every leaf of ``payload`` (its key path, dtype, shape and
    bytes, in tree order); None in a multi-process job, where no process holds
    every shard."""
    if jax.process_count() > 1:
        return None
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(payload)[0]:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
            leaf.dtype, jax.dtypes.prng_key
        ):
            leaf = jax.random.key_data(leaf)
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_payload(mngr: ocp.CheckpointManager, step: int, payload) -> None:
    """Saves ``payload`` (a pytree of arrays) as checkpoint ``step`` with its
    checksum, blocking until written; a no-op if ``step`` is the newest."""
    if mngr.latest_step() == step:
        return
    meta = {"round": int(step), "sha256": state_digest(payload)}
    mngr.save(
        step,
        args=ocp.args.Composite(
            **{_ITEM: ocp.args.StandardSave(payload), _SUM: ocp.args.JsonSave(meta)}
        ),
    )
    mngr.wait_until_finished()


def _abstract(payload):
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array)
            else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
        ),
        payload,
    )


def _read(mngr: ocp.CheckpointManager, step: int, target):
    """Checkpoint ``step`` restored into ``target`` and verified; raises on any
    damage (orbax / tensorstore errors, or ``ValueError`` for a bad checksum)."""
    step_dir = os.path.join(str(mngr.directory), str(step))
    has_sum = os.path.isdir(os.path.join(step_dir, _SUM))
    if not os.path.isdir(os.path.join(step_dir, _ITEM)) and os.path.isdir(
        os.path.join(step_dir, "default")
    ):  # written by an older demjax: the state alone, without a checksum. Read
        # with a manager of its own: ``mngr`` keeps saving both items.
        old = ocp.CheckpointManager(str(mngr.directory))
        try:
            payload = old.restore(step, args=ocp.args.StandardRestore(target))
        finally:
            old.close()
        has_sum = False
    else:
        got = mngr.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _ITEM: ocp.args.StandardRestore(target),
                    _SUM: ocp.args.JsonRestore(),
                }
            ),
        )
        payload = got[_ITEM]
    if has_sum:
        meta = got[_SUM]
        if meta.get("round") != step:
            raise ValueError(f"checksum record is for round {meta.get('round')}")
        want = meta.get("sha256")
        if want is not None and want != state_digest(payload):
            raise ValueError("state checksum mismatch")
    # The same structure as the target (orbax may return lists for tuples).
    return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(payload))


def _one_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _set_aside(workdir: str, step: int) -> str:
    """Moves checkpoint ``step`` to ``<workdir>/checkpoints_unreadable/``."""
    dest = os.path.join(workdir, UNREADABLE, str(step))
    n = 1
    while os.path.exists(dest):
        dest = os.path.join(workdir, UNREADABLE, f"{step}.{n}")
        n += 1
    if multihost.is_primary():
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(os.path.join(_dir(workdir), str(step)), dest)
    return dest


def restore_payload(mngr: ocp.CheckpointManager, like):
    """The newest readable checkpoint, restored into the structure, shapes,
    dtypes and shardings of ``like``.

    Each unreadable checkpoint (newest first) is reported in one warning line and
    moved to ``<workdir>/checkpoints_unreadable/``, and ``mngr`` reloaded, so the
    run continues from the newest readable one and later saves are not skipped.

    Returns:
      ``(payload, step)``: the state after ``step`` completed rounds.

    Raises:
      ConfigError: no checkpoint is readable (names the workdir and
        ``--overwrite``).
    """
    workdir = os.path.dirname(str(mngr.directory))
    target = _abstract(like)
    moved = []
    try:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                payload = _read(mngr, step, target)
            except Exception as e:  # any damage: orbax, tensorstore, JSON, checksum
                dest = _set_aside(workdir, step)
                moved.append(step)
                log.warning(
                    "checkpoint after round %d in %s is unreadable (%s); moved to %s, "
                    "trying the previous one",
                    step - 1, workdir, _one_line(e), dest,
                )  # fmt: skip
                continue
            log.info("resuming %s after round %d", workdir, step - 1)
            return payload, int(step)
    finally:
        if moved:
            mngr.reload()
    raise ConfigError(
        f"workdir={workdir!r} holds no readable checkpoint (unreadable ones moved "
        f"to {UNREADABLE}/); accepted: --overwrite to start the run afresh, or "
        "another --workdir"
    )


def _payload(state, tree: GroupTree) -> dict:
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "node_params": state.node_params,
        "tree": {
            "agent_parent": np.asarray(tree.agent_parent),
            "node_parent": np.asarray(tree.node_parent),
            "agent_ancestor": np.asarray(tree.agent_ancestor),
        },
    }


def save(mngr: ocp.CheckpointManager, state, tree: GroupTree) -> None:
    """Saves the state after ``state.round`` completed rounds (blocks until done)."""
    save_payload(mngr, int(state.round), _payload(state, tree))


def restore(mngr: ocp.CheckpointManager, state, tree: GroupTree):
    """Restores the newest readable checkpoint into the structure of
    ``(state, tree)`` (see ``restore_payload``).

    Returns:
      ``(state, tree, rounds_done)``.

    Raises:
      ConfigError: no checkpoint is readable.
    """
    got, step = restore_payload(mngr, _payload(state, tree))
    state = state.replace(
        params=got["params"],
        opt_state=got["opt_state"],
        node_params=got["node_params"],
        round=jax.numpy.int32(step),
    )
    t = got["tree"]
    tree = GroupTree(
        agent_parent=np.asarray(t["agent_parent"], np.int32),
        node_parent=np.asarray(t["node_parent"], np.int32),
        agent_ancestor=np.asarray(t["agent_ancestor"], np.int32),
        level_sizes=tree.level_sizes,
    )
    return state, tree, int(step)


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
        shutil.rmtree(os.path.join(workdir, UNREADABLE), ignore_errors=True)
        for name in RESULT_FILES:
            if os.path.exists(os.path.join(workdir, name)):
                os.remove(os.path.join(workdir, name))
        return False
    has_results = os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    if not has_results and not has_checkpoint(workdir):
        return False
    old = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"workdir={workdir!r} holds an unreadable config.json ({e}); "
                "accepted: --overwrite to replace the run, or another --workdir"
            ) from e
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
