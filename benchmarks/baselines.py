"""The same local training done three ways, side by side in one process.

Workload: MLP 784-100-10, every agent does ``--steps`` SGD steps of batch
``--batch`` on its own data (random Fashion-MNIST-shaped inputs; speed only).

- ``torch_sequential``: a Python loop over agents, each a ``torch.nn`` model with
  ``optim.SGD`` (what the DemLearn authors' code and PFLlib do). Needs torch
  (``pip install 'demjax[bench]'``); skipped with a note when absent.
- ``jax_per_agent_loop``: a Python loop over agents of one jitted per-agent
  training function (``lax.scan`` over the steps).
- ``demjax``: the whole population in one jitted vmap (``local.make_train_population``).

``--agent_block=auto,0`` (default) times demjax twice: with the block the engine
chooses on CPU (``auto``: ``memory.cache_block_size``, agents whose weights total
~8 MiB, each block trained for all its steps while its weights stay in cache; the
``demjax`` record) and with the whole population at once (``demjax_block0``).
Every record carries its GFLOP/s (dense layers, forward + backward) and the
fraction of a float32 4096x4096 GEMM measured in the same process.

Prints one JSON line per implementation and size, then the ratios; writes
``benchmarks/results/baselines.json``::

    python benchmarks/baselines.py --agents=1000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
RESULTS = os.path.join(REPO, "benchmarks", "results")


def make_data(num_agents: int, n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_agents, n, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=(num_agents, n)).astype(np.int32)
    return x, y


def bench_torch(x, y, steps, batch, repeats):
    import torch

    torch.manual_seed(0)
    a = x.shape[0]
    xs = torch.from_numpy(x.reshape(a, x.shape[1], -1))
    ys = torch.from_numpy(y.astype("int64"))
    models = [
        torch.nn.Sequential(
            torch.nn.Linear(784, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10)
        )
        for _ in range(a)
    ]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        for i in range(a):
            m, opt = models[i], opts[i]
            for s in range(steps):
                xb = xs[i, s * batch : (s + 1) * batch]
                yb = ys[i, s * batch : (s + 1) * batch]
                opt.zero_grad()
                loss_fn(m(xb), yb).backward()
                opt.step()

    run()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(
        times
    ), f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def _jax_parts(a, steps, batch):
    import jax
    import optax

    from demjax import local, models

    model = models.make_model("mlp", 10, (100,))

    def apply_fn(p, xb, train, key):
        return model.apply({"params": p}, xb)

    tx = optax.sgd(0.05)
    params = models.init_population(jax.random.PRNGKey(0), model, (28, 28, 1), a)
    opt = jax.vmap(tx.init)(params)
    return local, apply_fn, tx, params, opt


def bench_jax_loop(x, y, steps, batch, repeats):
    import jax
    import jax.numpy as jnp

    a, n = x.shape[:2]
    local, apply_fn, tx, params, opt = _jax_parts(a, steps, batch)
    one = jax.jit(
        local.make_train_one(apply_fn, tx, batch_size=batch, local_epochs=1, n_max=n)
    )
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    plist = [jax.tree.map(lambda v, i=i: v[i], params) for i in range(a)]
    olist = [jax.tree.map(lambda v, i=i: v[i], opt) for i in range(a)]
    keys = jax.random.split(jax.random.PRNGKey(1), a)
    nn = jnp.int32(n)

    def run():
        out = [
            one(keys[i], plist[i], olist[i], xs[i], ys[i], nn, plist[i], jnp.float32(0))
            for i in range(a)
        ]
        jax.block_until_ready(out)

    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times), f"jax {jax.__version__}"


def bench_demjax(x, y, steps, batch, repeats, agent_block):
    """``agent_block``: agents trained at once, 0 = all, ``"auto"`` = the engine's
    CPU choice for this model (``memory.cache_block_size``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from demjax import memory

    a, n = x.shape[:2]
    local, apply_fn, tx, params, opt = _jax_parts(a, steps, batch)
    if agent_block == "auto":
        agent_block = memory.cache_block_size(memory.tree_bytes(params) // a)
    counts = np.full((a,), n, np.int32)
    train = jax.jit(
        local.make_train_population(
            apply_fn, tx, batch_size=batch, local_epochs=1, n_train=counts,
            num_buckets=1, block_size=agent_block,
        )
    )  # fmt: skip
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    keys = jax.random.split(jax.random.PRNGKey(1), a)
    args = (keys, params, opt, xs, ys, jnp.asarray(counts), params, jnp.float32(0))
    t = time.perf_counter()
    jax.block_until_ready(train(*args))
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(train(*args))
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return (
        med,
        f"jax {jax.__version__}, compile {first - med:.1f} s, block {agent_block}",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", default="1000")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--agent_block",
        default="auto,0",
        help="comma list of demjax agent blocks (auto = the engine's CPU choice, "
        "0 = all agents at once, N): the first is the 'demjax' record, the others "
        "'demjax_block<N>' records",
    )
    p.add_argument("--out", default=os.path.join(RESULTS, "baselines.json"))
    args = p.parse_args()
    blocks = [b for b in args.agent_block.split(",") if b]
    if not blocks or not all(b == "auto" or b.isdigit() for b in blocks):
        sys.exit(
            f"error: --agent_block={args.agent_block!r}: accepted: a comma list "
            "of 'auto' and ints >= 0"
        )
    blocks = [b if b == "auto" else int(b) for b in blocks]
    from benchmarks.common import cpu_model
    from benchmarks.scaling import flops_per_agent_step, gemm_gflops

    step_flops = flops_per_agent_step("mlp", args.batch)
    records = []
    for a in (int(s) for s in args.agents.split(",")):
        x, y = make_data(a, args.steps * args.batch)
        runs = {
            ("demjax" if i == 0 else f"demjax_block{b}"): (
                lambda x=x, y=y, b=b: bench_demjax(
                    x, y, args.steps, args.batch, args.repeats, b
                )
            )
            for i, b in enumerate(blocks)
        }
        runs |= {
            "jax_per_agent_loop": lambda x=x, y=y: bench_jax_loop(
                x, y, args.steps, args.batch, args.repeats
            ),
            "torch_sequential": lambda x=x, y=y: bench_torch(
                x, y, args.steps, args.batch, args.repeats
            ),
        }
        per = {}
        for impl, fn in runs.items():
            try:
                sec, note = fn()
            except ImportError as e:
                print(
                    f"skipping {impl}: {e} (pip install 'demjax[bench]')",
                    file=sys.stderr,
                )
                continue
            rate = a * args.steps / sec
            rec = {
                "impl": impl,
                "num_agents": a,
                "steps": args.steps,
                "batch": args.batch,
                "local_s": round(sec, 4),
                "agent_steps_per_s": round(rate, 1),
                "gflops": round(rate * step_flops / 1e9, 2),
                "note": note,
            }
            per[impl] = rec
            records.append(rec)
            print(json.dumps(rec), flush=True)
        # The float32 GEMM peak of this process, measured right after the runs.
        peak = gemm_gflops()
        for rec in per.values():
            rec["gemm_gflops"] = round(peak, 1)
            rec["gemm_fraction"] = round(rec["gflops"] / peak, 4)
            rec["cpu_model"] = cpu_model()
        ratios = {
            f"{d}_over_{k}": round(
                per[d]["agent_steps_per_s"] / v["agent_steps_per_s"], 2
            )
            for d in per
            if d.startswith("demjax")
            for k, v in per.items()
            if not k.startswith("demjax")
        }
        print(json.dumps({"num_agents": a, **ratios}), flush=True)
        records.append({"impl": "ratios", "num_agents": a, **ratios})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
