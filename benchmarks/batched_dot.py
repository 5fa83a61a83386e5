"""Batched dots of vmapped agents on XLA:CPU: HLO inspection and micro-benchmarks.

Prints one JSON line per record (CPU model, JAX version, XLA_FLAGS included).
Variants of one part run in ONE process, interleaved, ``--repeats`` times; the
records give the median and the minimum over repeats (the machines are shared).

Parts:
  hlo    which dots/convolutions of one SGD step (forward + backward + update)
         become library fusions (YNNPACK ``__ynn_fusion``, oneDNN) or stay plain
         XLA dots, for one agent and for vmapped blocks of k agents.
  dots   GFLOP/s of the MLP's first-layer dots batched over k agents: forward
         ``[k,B,784] x [k,784,100]``, weight gradient ``x^T g`` in several
         dimension orders, the same FLOPs as one packed GEMM, torch.bmm.
  step   agent-steps/s of one SGD step of k agents: vmap, ``lax.map`` over agents
         (one jit), ``lax.map(batch_size=8)``, a Python loop over a jitted
         per-agent step; ``matmul_impl`` xla vs wgrad_t (and conv impls).
  train  agent-steps/s of the local training function (``local.make_train_one``:
         a scan of masked SGD steps) for k agents: vmap vs ``lax.map``.

XLA flags act per process: run the script once per ``XLA_FLAGS`` setting, e.g.
``--flags-sweep`` reruns each part under each flag set of ``FLAG_SETS``,
interleaved over ``--rounds``.

Usage:
  python benchmarks/batched_dot.py --part hlo
  python benchmarks/batched_dot.py --part step --model mlp --ks 8,32,256,1000
  python benchmarks/batched_dot.py --part train --model cnn --ks 8,32
  python benchmarks/batched_dot.py --part step --flags-sweep --rounds 2
  python benchmarks/batched_dot.py --part replicas --model cnn --ks 50 --repeats 3
  python benchmarks/batched_dot.py --part replica_rounds --model cnn --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FLAG_SETS = {
    "default": "",
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "onednn_dot": "--xla_cpu_use_onednn=true"
    " --xla_cpu_experimental_onednn_fusion_type=dot"
    " --xla_cpu_experimental_ynn_fusion_type=",
}


def _env():
    from common import environment

    e = environment()
    e["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    e["date"] = time.strftime("%Y-%m-%d")
    return e


def emit(rec: dict, env: dict) -> None:
    print(json.dumps({**rec, **env}), flush=True)


def timeit(fns: dict, args: dict, repeats: int, inner: int = 3) -> dict:
    """Median and min seconds per call of each fn, variants interleaved."""
    import jax
    import numpy as np

    for name, f in fns.items():
        jax.block_until_ready(f(*args[name]))
    times = {n: [] for n in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                out = f(*args[name])
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / inner)
    return {n: (float(np.median(t)), float(np.min(t))) for n, t in times.items()}


# ----------------------------------------------------------------- models / steps


def model_setup(name: str, conv_impl: str = "patches", matmul_impl: str = "xla"):
    import jax
    import jax.numpy as jnp

    from demjax import models
    from demjax.local import masked_cross_entropy

    batch = 20 if name in ("mlp", "mlr") else 10
    model = models.make_model(name, 10, (100,), conv_impl, matmul_impl)
    params = models.init_params(jax.random.PRNGKey(0), model, (28, 28, 1))

    def apply_fn(p, x, train, key):
        rngs = {"dropout": key} if train else {}
        return model.apply({"params": p}, x, train=train, rngs=rngs)

    def loss(p, x, y, key):
        logits = apply_fn(p, x, True, key)
        return masked_cross_entropy(logits, y, jnp.ones(y.shape, bool))

    def step(p, x, y, key):
        g = jax.grad(loss)(p, x, y, key)
        return jax.tree.map(lambda a, b: a - 0.05 * b, p, g)

    return model, params, apply_fn, step, batch


def stacked_inputs(params, k: int, batch: int, seed: int = 0):
    import jax

    key = jax.random.PRNGKey(seed)
    kp, kx, ky, kd = jax.random.split(key, 4)
    leaves, tree = jax.tree.flatten(params)
    noise = jax.random.split(kp, len(leaves))
    stacked = [
        leaf[None] + 0.01 * jax.random.normal(n, (k, *leaf.shape))
        for leaf, n in zip(leaves, noise, strict=True)
    ]
    p = jax.tree.unflatten(tree, stacked)
    x = jax.random.normal(kx, (k, batch, 28, 28, 1))
    y = jax.random.randint(ky, (k, batch), 0, 10)
    return p, x, y, jax.random.split(kd, k)


def classify_hlo(text: str) -> list[dict]:
    """Every dot / convolution of an optimized HLO module and what runs it."""
    comps, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if m and line.rstrip().endswith("{"):
            cur = m.group(1)
            comps[cur] = []
        elif cur is not None:
            comps[cur].append(line)
    callers = {}
    for lines in comps.values():
        for line in lines:
            m = re.search(r"calls=%([\w.\-]+)", line)
            if m:
                kind = re.search(r'"kind":"(\w+)"', line)
                callers[m.group(1)] = kind.group(1) if kind else "loop_fusion"
    out = []
    for cname, lines in comps.items():
        for line in lines:
            m = re.search(r"= (f32\[[^\]]*\])\S* (dot|convolution)\((.*?)\)", line)
            if not m:
                continue
            dims = re.findall(r"(\w+_(?:batch|contracting)_dims=\{[\d,]*\})", line)
            op = re.search(r'op_name="([^"]*)"', line)
            out.append({
                "shape": m.group(1),
                "op": m.group(2),
                "runs_as": callers.get(cname, "plain"),
                "dims": " ".join(dims),
                "jax_op": (op.group(1).split("/", 1)[-1] if op else ""),
            })  # fmt: skip
    return out


def part_hlo(args, env):
    import jax

    for model_name in args.models:
        for mm in ("xla", "wgrad_t"):
            for conv in ("patches", "xla") if model_name != "mlp" else ("patches",):
                _, params, _, step, batch = model_setup(model_name, conv, mm)
                for k in [0, 1, 8, 32, 1000]:
                    if k == 0:
                        p, x, y, keys = stacked_inputs(params, 1, batch)
                        a = jax.tree.map(lambda v: v[0], (p, x, y, keys))
                        text = jax.jit(step).lower(*a).compile().as_text()
                    else:
                        a = stacked_inputs(params, k, batch)
                        text = jax.jit(jax.vmap(step)).lower(*a).compile().as_text()
                    ops = classify_hlo(text)
                    emit({
                        "part": "hlo", "model": model_name, "conv_impl": conv,
                        "matmul_impl": mm, "k": k or "single",
                        "transposes": len(re.findall(r" transpose\(", text)),
                        "copies": len(re.findall(r" copy\(", text)),
                        "ops": ops,
                    }, env)  # fmt: skip


# ----------------------------------------------------------------------- dots


def part_dots(args, env):
    import jax
    import jax.numpy as jnp

    b, i, o = 20, 784, 100
    for k in args.ks:
        kx, kw, kg = jax.random.split(jax.random.PRNGKey(k), 3)
        x = jax.random.normal(kx, (k, b, i))
        w = jax.random.normal(kw, (k, i, o))
        g = jax.random.normal(kg, (k, b, o))
        bar = jax.lax.optimization_barrier
        fns = {
            "fwd kbi,kio->kbo": lambda x, w, g: jnp.einsum("kbi,kio->kbo", x, w),
            "fwd packed [kb,i]x[i,o]": lambda x, w, g: x.reshape(-1, i) @ w[0],
            "dW kbi,kbo->kio": lambda x, w, g: jnp.einsum("kbi,kbo->kio", x, g),
            "dW kbo,kbi->koi": lambda x, w, g: jnp.einsum("kbo,kbi->koi", g, x),
            "dW (x^T materialized) kib,kbo->kio": lambda x, w, g: jnp.einsum(
                "kib,kbo->kio",
                bar(jnp.swapaxes(x, 1, 2)),  # noqa: B023
                g,
            ),
            "dW packed [i,kb]x[kb,o]": lambda x, w, g: jnp.einsum(
                "bi,bo->io", x.reshape(-1, i), g.reshape(-1, o)
            ),
        }
        jit = {n: jax.jit(f) for n, f in fns.items()}
        res = timeit(jit, {n: (x, w, g) for n in fns}, args.repeats)
        flops = 2 * k * b * i * o
        for n, (med, best) in res.items():
            emit({"part": "dots", "k": k, "variant": n,
                  "gflops_median": round(flops / med / 1e9, 1),
                  "gflops_best": round(flops / best / 1e9, 1)}, env)  # fmt: skip
        try:
            import torch
        except ImportError:
            continue
        torch.set_num_threads(os.cpu_count() or 1)
        tx, tw, tg = (torch.from_numpy(jax.device_get(a).copy()) for a in (x, w, g))
        tfns = {
            "torch.bmm fwd": lambda: torch.bmm(tx, tw),  # noqa: B023
            "torch.bmm dW": lambda: torch.bmm(tx.transpose(1, 2), tg),  # noqa: B023
        }
        for n, f in tfns.items():
            f()
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for _ in range(3):
                    f()
                ts.append((time.perf_counter() - t0) / 3)
            ts.sort()
            emit({"part": "dots", "k": k, "variant": n,
                  "gflops_median": round(flops / ts[len(ts) // 2] / 1e9, 1),
                  "gflops_best": round(flops / ts[0] / 1e9, 1)}, env)  # fmt: skip


# ----------------------------------------------------------------------- step


def _variants(model_name):
    if model_name == "mlp":
        return [("patches", "xla"), ("patches", "wgrad_t")]
    return [("patches", "xla"), ("patches", "wgrad_t"), ("xla", "xla")]


def part_step(args, env):
    import jax

    for k in args.ks:
        fns, fargs = {}, {}
        for conv, mm in _variants(args.model):
            _, params, _, step, batch = model_setup(args.model, conv, mm)
            a = stacked_inputs(params, k, batch)
            tag = f"{conv}/{mm}"
            fns[f"vmap {tag}"] = jax.jit(jax.vmap(step))
            fns[f"lax.map {tag}"] = jax.jit(lambda *a, s=step: jax.lax.map(
                lambda t: s(*t), a))  # fmt: skip
            if k >= 8:
                fns[f"lax.map(batch_size=8) {tag}"] = jax.jit(
                    lambda *a, s=step: jax.lax.map(lambda t: s(*t), a, batch_size=8)
                )
            one = jax.jit(step)
            slices = [jax.tree.map(lambda v, j=j: v[j], a) for j in range(k)]
            fns[f"python loop {tag}"] = lambda *_, f=one, sl=slices: [f(*s) for s in sl]
            for n in list(fns):
                fargs.setdefault(n, a)
        ref = fns[f"vmap {_variants(args.model)[0][0]}/xla"](*fargs["vmap patches/xla"])
        res = timeit(fns, fargs, args.repeats, inner=1 if k >= 256 else 3)
        for n, (med, best) in res.items():
            out = fns[n](*fargs[n])
            if isinstance(out, list):
                out = jax.tree.map(lambda *v: jax.numpy.stack(v), *out)
            err = max(
                float(abs(u - v).max())
                for u, v in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True)
            )
            emit({"part": "step", "model": args.model, "k": k, "variant": n,
                  "agent_steps_per_s_median": round(k / med),
                  "agent_steps_per_s_best": round(k / best),
                  "max_abs_diff_vs_vmap_xla": err}, env)  # fmt: skip


# ---------------------------------------------------------------------- train


def part_train(args, env):
    import jax
    import jax.numpy as jnp
    import optax

    from demjax import local

    n_max, epochs = args.samples, args.epochs
    for k in args.ks:
        fns, fargs = {}, {}
        for conv, mm in _variants(args.model):
            _, params, apply_fn, _, batch = model_setup(args.model, conv, mm)
            tx = optax.sgd(0.05)
            one = local.make_train_one(
                apply_fn, tx, batch_size=batch, local_epochs=epochs, n_max=n_max
            )
            p, _, _, keys = stacked_inputs(params, k, batch)
            opt = jax.vmap(tx.init)(p)
            kx, ky = jax.random.split(jax.random.PRNGKey(1))
            x = jax.random.normal(kx, (k, n_max, 28, 28, 1))
            y = jax.random.randint(ky, (k, n_max), 0, 10)
            n = jnp.full((k,), n_max, jnp.int32)
            a = (keys, p, opt, x, y, n, p, jnp.float32(0.0))
            tag = f"{conv}/{mm}"
            fns[f"vmap {tag}"] = jax.jit(
                jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0, 0, None))
            )
            fns[f"lax.map {tag}"] = jax.jit(lambda *a, f=one: jax.lax.map(
                lambda t: f(*t, a[-1]), a[:-1]))  # fmt: skip
            for nm in (f"vmap {tag}", f"lax.map {tag}"):
                fargs[nm] = a
        ref = fns["vmap patches/xla"](*fargs["vmap patches/xla"])
        res = timeit(fns, fargs, args.repeats, inner=1)
        steps = epochs * -(-n_max // (20 if args.model == "mlp" else 10))
        for nm, (med, best) in res.items():
            out = fns[nm](*fargs[nm])
            err = max(
                float(abs(u - v).max())
                for u, v in zip(
                    jax.tree.leaves(out[0]), jax.tree.leaves(ref[0]), strict=True
                )
            )
            emit({"part": "train", "model": args.model, "k": k, "variant": nm,
                  "steps_per_agent": steps,
                  "agent_steps_per_s_median": round(k * steps / med),
                  "agent_steps_per_s_best": round(k * steps / best),
                  "max_abs_diff_vs_vmap_xla": err}, env)  # fmt: skip


def part_replicas(args, env):
    """Local training of R replicas of A agents (``--ks`` gives A, the
    ``sequential`` plan, im2col + ``wgrad_t`` for the CNN) run the two ways
    ``demjax.plan.over_replicas`` can: vmapped over the replicas, and one
    replica after another (in-place ``fori_loop``); beside them R calls of the
    one-replica program. Agents hold 40..180 samples (seeded), as in the
    paper split."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from demjax import local, plan

    conv, mm = ("patches", "wgrad_t") if args.model == "cnn" else ("patches", "xla")
    _, params, apply_fn, _, batch = model_setup(args.model, conv, mm)
    tx = local.make_optimizer("sgd", 0.05)
    reps = args.replicas
    for a in args.ks:
        rng = np.random.default_rng(0)
        n = rng.integers(40, 181, size=a)
        x = jnp.asarray(rng.normal(size=(a, int(n.max()), 28, 28, 1)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 10, size=(a, int(n.max()))), jnp.int32)
        part = {"x": x, "y": y, "n": jnp.asarray(n, jnp.int32)}
        pop = local.make_train_population(
            apply_fn, tx, batch_size=batch, local_epochs=args.epochs, n_train=n,
            num_buckets=1, block_size=1,
        )  # fmt: skip

        def phase(state, part, key, t, a=a, pop=pop):
            p, o = state
            keys = jax.random.split(key, a)
            p, o, loss = pop(keys, p, o, part["x"], part["y"], part["n"], p, 0.0)
            return (p, o), {"loss": loss}

        p1 = jax.tree.map(
            lambda v, a=a: jnp.broadcast_to(v, (a, *v.shape)) + 0.0, params
        )
        state1 = (p1, jax.vmap(tx.init)(p1))
        state_r = jax.tree.map(lambda v: jnp.stack([v] * reps), state1)
        keys = jax.random.split(jax.random.PRNGKey(2), reps)
        one = jax.jit(phase)

        def calls(s, p, k, t, one=one):
            return [one(plan.take_replica(s, r), p, k[r], t) for r in range(reps)]

        fns = {
            "replicas vmapped": jax.jit(plan.over_replicas(phase, None, False)),
            "replicas one after another": jax.jit(
                plan.over_replicas(phase, None, True)),
            f"{reps} calls of one replica": calls,
        }  # fmt: skip
        fargs = {nm: (state_r, part, keys, jnp.int32(0)) for nm in fns}
        res = timeit(fns, fargs, args.repeats, inner=1)
        outs = {nm: fns[nm](*fargs[nm]) for nm in fns}
        ref = [o[0][0] for o in outs[f"{reps} calls of one replica"]]
        steps = int((args.epochs * np.ceil(n / batch)).sum()) * reps
        for nm, (med, best) in res.items():
            if nm.startswith("replicas"):
                got = [plan.take_replica(outs[nm][0][0], r)
                       for r in range(reps)]  # fmt: skip
                err = max(float(jnp.abs(u - v).max())
                          for g, w in zip(got, ref, strict=True)
                          for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(w),
                                          strict=True))  # fmt: skip
            else:
                err = 0.0
            emit({"part": "replicas", "model": args.model, "agents": a,
                  "replicas": reps, "variant": nm, "agent_steps": steps,
                  "agent_steps_per_s_median": round(steps / med, 1),
                  "agent_steps_per_s_best": round(steps / best, 1),
                  "max_abs_diff_vs_calls": err}, env)  # fmt: skip


def part_replica_rounds(args, env):
    """Whole rounds of ``configs/fmnist_paper.py`` (DemLearn-P, ``--model``: the
    paper CNN with ``cnn``, else the MLP) with ``--replicas`` R replicas,
    ``local_plan=sequential``, run with ``replica_plan`` vmap and one_at_a_time
    alternately (twice each), ``--rounds`` rounds per run: local training
    seconds per round (round 0 includes compilation) and the final sync
    C-SPE per replica (equal between the modes to float tolerance)."""
    import shutil
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import fmnist_paper
    from demjax import train
    from demjax.run_output import read_jsonl

    for mode in ("one_at_a_time", "vmap") * 2:
        c = fmnist_paper.get_config()
        c.mu, c.num_replicas, c.num_rounds = 0.002, args.replicas, args.rounds
        c.eval_every, c.checkpoint_every, c.progress = 10_000, 0, False
        c.local_plan, c.replica_plan = "sequential", mode
        if args.model != "cnn":
            c.model = "mlp"
        else:
            c.conv_impl, c.matmul_impl = "patches", "wgrad_t"
        wd = tempfile.mkdtemp()
        try:
            out = train.run(c, wd)
            timing = read_jsonl(os.path.join(wd, "timing.jsonl"))
        finally:
            shutil.rmtree(wd, ignore_errors=True)
        last = max(r["round"] for r in out["records"])
        emit({"part": "replica_rounds", "model": c.model, "replicas": args.replicas,
              "replica_plan": mode,
              "local_s": [round(t["local_s"], 2) for t in timing if t["round"] >= 0],
              "c_spe_final": [round(r["c_spe"], 6) for r in out["records"]
                              if r["round"] == last and r["point"] == "sync"]},
             env)  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", required=True, choices=(
        "hlo", "dots", "step", "train", "replicas", "replica_rounds"))  # fmt: skip
    ap.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--ks", default="8,32,256,1000")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--samples", type=int, default=100, help="train: samples/agent")
    ap.add_argument("--epochs", type=int, default=2, help="train: local epochs")
    ap.add_argument("--flags-sweep", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=3, help="replicas: R")
    args = ap.parse_args()
    if args.flags_sweep:
        argv = [a for a in sys.argv[1:] if a != "--flags-sweep"]
        for _ in range(args.rounds):
            for flags in FLAG_SETS.values():
                env = {**os.environ, "XLA_FLAGS": flags}
                subprocess.run([sys.executable, __file__, *argv], env=env, check=True)
        return
    args.ks = [int(v) for v in args.ks.split(",")]
    args.models = args.models.split(",")
    env = _env()
    {"hlo": part_hlo, "dots": part_dots, "step": part_step, "train": part_train,
     "replicas": part_replicas,
     "replica_rounds": part_replica_rounds}[args.part](args, env)  # fmt: skip


if __name__ == "__main__":
    main()
