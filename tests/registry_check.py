"""Runs every registered algorithm several ways in one process and prints one JSON
line per algorithm (driven by ``tests/test_registry.py`` in a subprocess with 8
forced CPU devices, so the XLA flags apply from the first JAX call).

For each algorithm, on 8 agents and 2 rounds:

- ``ref``: one device, agents trained in blocks of 3 (``local_plan='block:3'``),
  a checkpoint every round;
- ``all``: one device, every agent at once (``local_plan='all'``);
- ``sharded``: the state sharded over the 8 devices (``num_devices=8``);
- ``resumed``: as ``ref``, stopped by SIGINT after round 0 (checkpoint saved),
  then resumed to the end.

Each line holds the records of ``ref``, ``all`` and ``sharded``, whether
``resumed``'s ``metrics.jsonl`` equals ``ref``'s byte for byte, and the compiled
variants of every jitted phase of each run.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/registry_check.py DIR [ALGORITHM ...]
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

from demjax import run_output, train  # noqa: E402
from demjax.algorithms import ALGORITHMS  # noqa: E402


def config(algorithm: str, **kw):
    base = dict(
        algorithm=algorithm,
        num_agents=8,
        num_rounds=2,
        local_plan="block:3",
        matmul_impl="xla",
        eval_batch=4,
        num_devices=1,
        checkpoint_every=1,
    )
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
        every = train.run(config(name, local_plan="all"), os.path.join(d, "all"))
        sharded = train.run(
            config(name, num_devices=8, local_plan="all"), os.path.join(d, "sharded")
        )
        interrupted_then_resumed(config(name), os.path.join(d, "resumed"))

        def metrics(run, d=d):
            with open(os.path.join(d, run, "metrics.jsonl"), "rb") as f:
                return f.read()

        line = {
            "algorithm": name,
            "ref": ref["records"],
            "all": every["records"],
            "sharded": sharded["records"],
            "sharded_devices": sharded["params_devices"],
            "resumed_equal": metrics("resumed") == metrics("ref"),
            "compilations": [
                r["compilations"] for r in (ref, every, sharded)
            ],
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
