"""C-GEN evaluation on one CPU device against the agents sharded over several.

Times ``metrics.correct_matrix`` (A agent models, each on the same ``S``
evaluation samples, ``k`` models at once inside ``lax.map``) for each ``k``:

- ``one_device_s``: the jitted program on one device;
- ``devices_s``: the same per device under ``jax.shard_map`` (each of the D
  CPU devices evaluates its own A / D models, the samples replicated), as the
  engine and the plug-ins evaluate a sharded population;

best of ``--repeats`` calls (at least 2, ``plan.best_time``) after a warm-up
call, one side then the other for each ``k``. Prints one JSON line per ``k``
with the ratio and the CPU model; the answer it gives is whether evaluation
gains from a second device (local training does: ``docs/performance.md``
section 8)::

    python benchmarks/eval_devices.py --model=mlp --agents=200 --samples=2000
    python benchmarks/eval_devices.py --model=cnn --agents=50 --samples=1000 --ks=1,2

Random weights and inputs (speed only). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", help="mlp, cnn, cnn4, mlr")
    p.add_argument("--hidden", default="100", help="MLP hidden widths, comma list")
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--ks", default="1,4,16,64", help="models at once, comma list")
    p.add_argument("--cpu_devices", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.cpu_devices < 2:
        sys.exit(
            f"error: --cpu_devices={args.cpu_devices} is not valid; accepted: >= 2"
        )
    if args.agents % args.cpu_devices:
        sys.exit(f"error: --agents={args.agents} is not valid; accepted: a multiple "
                 f"of --cpu_devices={args.cpu_devices}")  # fmt: skip
    ks = [int(k) for k in args.ks.split(",") if k]
    if not ks or min(ks) < 1:
        sys.exit(f"error: --ks={args.ks!r} is not valid; accepted: integers >= 1")

    from demjax import sharding

    devices = sharding.set_cpu_devices(args.cpu_devices)
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from demjax import metrics, models, plan, pytrees

    hidden = tuple(int(h) for h in args.hidden.split(",") if h)
    shape = (28, 28, 1)
    model = models.make_model(args.model, 10, hidden, "xla")  # evaluation's conv
    apply = models.make_eval_apply(model)
    one = models.init_params(jax.random.PRNGKey(0), model, shape)
    agents = pytrees.stack(one, args.agents)
    x = jax.random.normal(jax.random.PRNGKey(1), (args.samples, *shape))
    y = jnp.arange(args.samples) % 10
    mesh = sharding.make_mesh(devices, args.agents)
    split = jax.device_put(agents, NamedSharding(mesh, P(sharding.AXIS)))
    whole = NamedSharding(mesh, P())
    xs, ys = jax.device_put(x, whole), jax.device_put(y, whole)
    for k in ks:

        def matrix(ps, x_, y_, k=k):
            return metrics.correct_matrix(apply, ps, x_, y_, k)

        on_one = jax.jit(matrix)
        on_all = jax.jit(jax.shard_map(
            matrix, mesh=mesh, in_specs=(P(sharding.AXIS), P(), P()),
            out_specs=P(sharding.AXIS), check_vma=False,
        ))  # fmt: skip
        timed = {}
        for side, fn, inputs in (("one", on_one, (agents, x, y)),
                                 ("all", on_all, (split, xs, ys))):  # fmt: skip
            jax.block_until_ready(fn(*inputs))  # compile and warm up
            timed[side] = plan.best_time(fn, *inputs, min_total_s=float("inf"),
                                         max_calls=args.repeats)  # fmt: skip
        t_one, t_all = timed["one"], timed["all"]
        print(json.dumps({
            "model": args.model, "agents": args.agents, "samples": args.samples,
            "k": k, "one_device_s": round(t_one, 6), "devices": devices,
            "devices_s": round(t_all, 6), "ratio": round(t_one / t_all, 3),
            "cpu_model": plan.cpu_model(), "jax": jax.__version__,
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
