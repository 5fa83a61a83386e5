"""Agents one after another: a host loop of compiled per-agent programs vs loops
inside one compiled program, with each dense weight-gradient form.

The same SGD step (MLP 784-100-10, batch 20, ``--steps`` steps per agent, plain
JAX, the stacked ``[A, ...]`` parameters updated in place) run three ways:

- ``host``: a Python loop over agents, each call one jitted per-agent program
  (a ``fori_loop`` over the agent's steps; the parameters donated);
- ``nested``: one jitted program, a ``fori_loop`` over agents around a
  ``fori_loop`` over steps (what ``local_plan="sequential"`` compiles to);
- ``flat``: one jitted program, one ``fori_loop`` over all (agent, step)
  pairs, the current agent's parameters carried and written back after its
  last step (no nested loop);

each with ``models.matmul`` ``xla`` and ``wgrad_t`` (``--matmul``). The forms are
timed in interleaved repeats; printed per form: agent-steps/s of the best and
the median repeat and the process CPU time per agent (all threads). One JSON
line per form, with the CPU model, JAX version and load average::

    python benchmarks/loop_overhead.py --agents=100 --repeats=8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_forms(num_agents: int, steps: int, batch: int, matmul_impl: str):
    """``{name: run}``: each ``run()`` trains every agent for ``steps`` steps."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from demjax.models import matmul

    a, s_, b = num_agents, steps, batch
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(a, s_ * b, 784)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, size=(a, s_ * b)).astype(np.int32))

    def init(k):
        k1, k2 = jax.random.split(k)
        return {
            "w1": jax.random.normal(k1, (784, 100)) * 0.03,
            "b1": jnp.zeros(100),
            "w2": jax.random.normal(k2, (100, 10)) * 0.1,
            "b2": jnp.zeros(10),
        }

    def loss(p, xb, yb):
        h = jax.nn.relu(matmul(xb, p["w1"], matmul_impl) + p["b1"])
        logits = matmul(h, p["w2"], matmul_impl) + p["b2"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], 1))

    def step(p, xa, ya, s):
        xb = jax.lax.dynamic_slice_in_dim(xa, s * b, b)
        yb = jax.lax.dynamic_slice_in_dim(ya, s * b, b)
        g = jax.grad(loss)(p, xb, yb)
        return jax.tree.map(lambda v, d: v - 0.05 * d, p, g)

    def row(tree, i):
        return jax.tree.map(lambda v: v[i], tree)

    def put(tree, i, p):
        return jax.tree.map(lambda v, u: v.at[i].set(u), tree, p)

    def agent(params, i, x, y):
        p = row(params, i)
        p = jax.lax.fori_loop(0, s_, lambda s, p: step(p, x[i], y[i], s), p)
        return put(params, i, p)

    host_fn = jax.jit(agent, donate_argnums=0)

    @jax.jit
    def nested(params, x, y):
        return jax.lax.fori_loop(0, a, lambda i, q: agent(q, i, x, y), params)

    @jax.jit
    def flat(params, x, y):
        def body(t, c):
            q, p = c
            i, s = t // s_, t % s_
            p = jax.lax.cond(s == 0, lambda: row(q, i), lambda: p)
            p = step(p, x[i], y[i], s)
            q = jax.lax.cond(s == s_ - 1, lambda: put(q, i, p), lambda: q)
            return q, p

        return jax.lax.fori_loop(0, a * s_, body, (params, row(params, 0)))[0]

    state = {"p": jax.jit(jax.vmap(init))(jax.random.split(jax.random.PRNGKey(0), a))}

    def run_host():
        p = state["p"]
        for i in range(a):
            p = host_fn(p, np.int32(i), x, y)
        state["p"] = jax.block_until_ready(p)

    def program(fn):
        def run():
            state["p"] = jax.block_until_ready(fn(state["p"], x, y))

        return run

    return {"host": run_host, "nested": program(nested), "flat": program(flat)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--matmul", default="xla,wgrad_t")
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args(argv)

    import jax

    from benchmarks.common import environment

    runs = {}
    for mm in args.matmul.split(","):
        for name, run in make_forms(args.agents, args.steps, args.batch, mm).items():
            run()  # compile, first call
            runs[f"{name}/{mm}"] = run
    names = list(runs)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    load = [os.getloadavg()[0]]
    for r in range(args.repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            runs[n]()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    load.append(os.getloadavg()[0])
    env = environment()
    done = args.agents * args.steps
    for n in names:
        w, c = sorted(wall[n]), sorted(cpu[n])
        print(json.dumps({
            "form": n, "agents": args.agents, "steps": args.steps,
            "agent_steps_per_s": round(done / w[0], 1),
            "agent_steps_per_s_median": round(done / w[len(w) // 2], 1),
            "cpu_ms_per_agent_min": round(1e3 * c[0] / args.agents, 3),
            "cpu_ms_per_agent_median": round(1e3 * c[len(c) // 2] / args.agents, 3),
            "repeats": args.repeats, "load_avg_1min": [round(v, 2) for v in load],
            "cpu_model": env["cpu_model"], "jax": jax.__version__,
        }))  # fmt: skip


if __name__ == "__main__":
    main()
