"""Runs every registered algorithm several ways in one process and prints one JSON
line per algorithm (driven by ``tests/test_registry.py`` in a subprocess with 8
forced CPU devices, so the XLA flags apply from the first JAX call).

For each algorithm, on 8 agents and 2 rounds:

- ``ref``: one device, agents trained in blocks of 3 (``local_plan='block:3'``);
- ``sharded``: the state sharded over the 8 devices (``num_devices=8``), every
  device's agents trained one after another under ``jax.shard_map``
  (``local_plan='sequential'``; ``shard_mapped``: how many local-training
  programs were traced under it);
- ``resumed``: as ``ref`` with a checkpoint every round, stopped by SIGINT after
  round 0 (checkpoint saved), then resumed to the end.

Each line holds the records of ``ref`` and ``sharded``, whether
``resumed``'s ``metrics.jsonl`` equals ``ref``'s byte for byte, and the compiled
variants of every jitted phase of each run.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/registry_check.py DIR [ALGORITHM ...]

With ``--process HOST:PORT ID DIR``, one process of a 2-process job (4 forced CPU
devices each): every algorithm as ``sharded``, over the 8 devices of both
processes; process 0 prints the records.
"""

from __future__ import annotations

import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from helpers import tiny_config  # noqa: E402

from demjax import engine, local, run_output, train  # noqa: E402

MAPPED = []  # local-training programs traced under shard_map


def _counted(fn):
    def wrapped(*a, **k):
        MAPPED.append(1)
        return fn(*a, **k)

    return wrapped


engine._sharded = _counted(engine._sharded)  # the hierarchical family
local.shard_population = _counted(local.shard_population)  # plug-ins
from demjax.algorithms import ALGORITHMS, layer_split  # noqa: E402


def config(algorithm: str, **kw):
    base = dict(
        algorithm=algorithm,
        num_agents=8,
        num_rounds=2,
        local_plan="block:3",
        matmul_impl="xla",
        eval_batch=4,
        num_devices=1,
        checkpoint_every=0,
    )
    if algorithm in layer_split.ALGORITHMS:  # a model with a body under its head
        base["model"] = "mlp"
    base.update(kw)
    return tiny_config(**base)


def interrupted_then_resumed(c, workdir: str) -> None:
    """SIGINT after round 0 (the handler stops the run at the round's end, after
    its checkpoint), then the same run resumed."""
    original = run_output.RunWriter.timing

    def timing(self, record):
        original(self, record)
        if record.get("round") == 0:
            signal.raise_signal(signal.SIGINT)

    run_output.RunWriter.timing = timing
    try:
        train.run(c, workdir)
        raise AssertionError("the SIGINT did not stop the run")
    except run_output.Interrupted:
        pass
    finally:
        run_output.RunWriter.timing = original
    train.run(c, workdir)


def main(out_dir: str, names=()) -> None:
    for name in names or ALGORITHMS:
        d = os.path.join(out_dir, name)
        ref = train.run(config(name), os.path.join(d, "ref"))
        MAPPED.clear()
        sharded = train.run(
            config(name, num_devices=8, local_plan="sequential"),
            os.path.join(d, "sharded"),
        )
        mapped = len(MAPPED)
        resumed = config(name, checkpoint_every=1)
        interrupted_then_resumed(resumed, os.path.join(d, "resumed"))

        def metrics(run, d=d):
            with open(os.path.join(d, run, "metrics.jsonl"), "rb") as f:
                return f.read()

        line = {
            "algorithm": name,
            "ref": ref["records"],
            "sharded": sharded["records"],
            "sharded_devices": sharded["params_devices"],
            "shard_mapped": mapped,
            "resumed_equal": metrics("resumed") == metrics("ref"),
            "compilations": [r["compilations"] for r in (ref, sharded)],
        }
        print(json.dumps(line), flush=True)


def process(address: str, process_id: int, out_dir: str, names=()) -> None:
    from demjax import multihost

    multihost.initialize(address, 2, process_id)
    for name in names or ALGORITHMS:
        c = config(name, num_devices=0, local_plan="all")
        r = train.run(c, os.path.join(out_dir, name, "two_processes"))
        if process_id == 0:
            print(json.dumps({"algorithm": name, "records": r["records"]}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--process":
        process(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])
    else:
        main(sys.argv[1], sys.argv[2:])
