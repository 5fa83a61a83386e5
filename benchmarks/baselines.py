"""One workload's local training done every way, side by side in one process.

For one workload and each ``--agents`` size, every implementation below trains
every agent for its own number of SGD steps (``local_epochs`` passes over its
samples in shuffled minibatches of ``batch``, the last one of an epoch smaller),
the same model, optimizer (SGD) and data. The JAX programs are compiled ahead of
time (``prepare_s``), then the implementations are timed in interleaved repeats
(each repeat runs every implementation once, in a rotated order), so load that
other processes put on a shared machine hits them alike; one slower than
``--slow_s`` in the first repeat is timed only once. A record's
``agent_steps_per_s`` is the agents' real SGD steps (padding slots are not
counted) over the fastest repeat (the one least disturbed by other load); the
median is stored too.

Workloads (``--model``):

- ``mlp``: MLP 784-100-10 on random Fashion-MNIST-shaped inputs (speed only),
  every agent ``--steps`` steps of batch ``--batch`` over ``--samples`` samples
  (``steps * batch / samples`` epochs; default 20 steps of 20 over 100 samples).
- ``cnn``: the paper's CNN (``configs/fmnist_paper.py``: 28x28x1, batch 10,
  2 local epochs, lr 0.05) on the real pathological Fashion-MNIST split of that
  config (``demjax.data.make_partition``; 50 agents hold 22 to 176 training
  samples, 804 SGD steps in all).

Implementations (``impl`` of a record):

- ``auto``: the plan the engine picks (``memory.memory_cap`` then
  ``engine.choose_plan``, the real search, with an empty temporary
  ``DEMJAX_CACHE_DIR`` and a 100-round config, ``--search_rounds``). Its record
  repeats the timings of the explicit plan it chose, and carries the search's
  cost: ``search_s`` (candidates timed) and ``plan_s`` (the whole choice:
  memory probe, search, compilations). With ``--search_runs=N`` the choice is
  made N times in a row on the same cache, as N consecutive runs of the
  workload make it (a search cut by its budget is resumed by the next run):
  ``auto`` is the last run's choice, ``auto:run1`` the first's.
- ``demjax:<plan>[/<conv>][/<matmul>]``: every plan of ``--plans`` (``all``,
  ``sequential``, ``block:K``, plus the auto choice with its own kernels), with
  every convolution of ``--conv_impls`` and weight-gradient form of
  ``--matmul_impls`` (``models.matmul``; suffix omitted for ``xla``), with the
  engine's trainer (``local.make_train_population``, ``local_buckets``
  buckets, the population donated and updated in place). A plan that trains
  more agents at once than ``memory.memory_cap`` allows is capped as the
  engine caps it.
- ``demjax@<D>dev:<plan>...`` (with ``--cpu_devices=D`` > 1, or 0 = one per
  core, when D divides A): the same plans with the agents sharded over D CPU
  devices, each device running the plan on its own agents under
  ``jax.shard_map`` (the engine's local phase on a mesh, ``scripts/run.py
  --cpu_devices``); never counted among the one-device plans the auto plan is
  compared with. ``auto@<D>dev`` is the choice ``scripts/run.py`` makes with D
  CPU devices (``engine.choose_plan`` on the sharded population with
  ``num_devices=0``: one device or all, measured, ``plan.resolve_devices``),
  compared with every plan of both kinds (``over_best_other_plan``).
- ``jax_per_agent_loop``: a Python loop over agents, each call one jitted
  per-agent training function (``local.make_train_one`` running exactly the
  agent's steps; it reads its agent's rows of the stacked data and
  parameters and writes its parameters back in place). The CNN loop uses
  ``lax.conv`` (``flax.linen.Conv``, what a per-agent loop is written with);
  ``jax_per_agent_loop/patches`` the im2col form; ``/wgrad_t`` with that
  weight-gradient form (``--matmul_impls``).
- ``torch_sequential``: a Python loop over agents, each a ``torch.nn`` model of
  the same architecture (dropout included) with ``optim.SGD``, the same data
  (shared with JAX, no copy), steps and shuffled minibatches,
  ``torch.set_num_threads(os.cpu_count())``; ``torch_sequential/1thread`` the
  same with one thread (``--torch_threads``: on a loaded machine PyTorch's
  OpenMP threads wait for each other, and one thread can be many times faster;
  the ratios are against the faster). ``--torch_agents=N`` times them on the
  first N agents only. Needs torch (``pip install 'demjax[bench]'``); skipped
  with a note when absent.

Prints one JSON line per record and per size the ratios (``over_jax_loop``,
``over_torch``); stores them under ``<model>/<agents>`` with the date, commit,
CPU and the 1-minute load average before and after the timed repeats in
``benchmarks/results/baselines.json`` and regenerates
``benchmarks/results/baselines.md``::

    python benchmarks/baselines.py --model=cnn --agents=50
    python benchmarks/baselines.py --model=mlp --agents=100,1000
    python benchmarks/baselines.py --model=mlp --agents=10000 --repeats=3
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
RESULTS = os.path.join(REPO, "benchmarks", "results")

DEFAULT_PLANS = {
    "mlp": "auto,all,sequential,block:8,block:32,block:128",
    "cnn": "auto,all,sequential,block:4",
}
LOOP = "jax_per_agent_loop"
TORCH = "torch_sequential"


# ---------------------------------------------------------------------------
# Workloads


def mlp_workload(num_agents: int, steps: int, batch: int, samples: int) -> dict:
    """Random Fashion-MNIST-shaped data; every agent ``steps`` steps of ``batch``."""
    import numpy as np

    from configs import default

    if samples <= 0 or (steps * batch) % samples or samples % batch:
        raise SystemExit(
            f"--samples={samples} must be a multiple of --batch={batch} dividing "
            f"steps * batch = {steps * batch}"
        )
    c = default.get_config()
    c.model, c.hidden, c.batch_size = "mlp", (100,), batch
    c.local_epochs = steps * batch // samples
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_agents, samples, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=(num_agents, samples)).astype(np.int32)
    n = np.full((num_agents,), samples, np.int32)
    return {
        "config": c,
        "x": x,
        "y": y,
        "n_train": n,
        "num_classes": 10,
        "data": f"random 28x28x1, {samples} samples per agent",
    }


def cnn_workload(num_agents: int) -> dict:
    """The paper's Fashion-MNIST split (``configs/fmnist_paper.py``)."""
    from configs import fmnist_paper
    from demjax import data

    c = fmnist_paper.get_config()
    c.num_agents = num_agents
    part = data.make_partition(c)
    return {
        "config": c,
        "x": part.x_train,
        "y": part.y_train,
        "n_train": part.n_train,
        "num_classes": part.num_classes,
        "data": "Fashion-MNIST, configs/fmnist_paper.py partition",
    }


def agent_steps(n_train, batch: int, epochs: int):
    """Real SGD steps of each agent: ``epochs * ceil(n / batch)``."""
    import numpy as np

    return epochs * np.ceil(np.asarray(n_train) / batch).astype(np.int64)


def flops_per_sample(model: str, hidden: int = 100) -> int:
    """Forward + backward (3x forward) flops of one training sample: the dense
    layers and the convolutions (pooling, activations and the optimizer not
    counted)."""
    if model == "mlp":
        macs = 784 * hidden + hidden * 10
    else:  # the paper CNN: conv 32@5x5 on 28x28x1, conv 32@5x5 on 14x14x32
        macs = 28 * 28 * 25 * 32 + 14 * 14 * 25 * 32 * 32 + 7 * 7 * 32 * 512 + 5120
    return 3 * 2 * macs


def _partition(work):
    """A host ``Partition`` of the workload (the test rows only size memory)."""
    import numpy as np

    from demjax.types import Partition

    a = len(work["n_train"])
    x1 = np.zeros((a, 1) + work["x"].shape[2:], np.float32)
    y1 = np.zeros((a, 1), np.int32)
    return Partition(
        x_train=work["x"],
        y_train=work["y"],
        n_train=np.asarray(work["n_train"]),
        x_test=x1,
        y_test=y1,
        n_test=np.ones((a,), np.int32),
        x_all=x1[:, 0],
        y_all=y1[:, 0],
        owner_all=np.arange(a, dtype=np.int32),
        num_classes=work["num_classes"],
    )


def choose_auto(work, rounds: int, runs: int = 1, mesh=None) -> dict:
    """The engine's plan choice, measured from an empty plan cache.

    With ``mesh`` (several CPU devices), the agents are sharded over it with
    ``num_devices=0``, so the choice includes the device choice
    (``plan.resolve_devices``: one device or all, measured); ``devices`` is
    the chosen count and ``device_table`` the two timings.

    With ``runs`` > 1 the choice is made that many times in a row on the same
    (temporary) cache, as consecutive runs of one workload make it: a search
    its budget cut is resumed by the next (``plan.search``'s ``prior``), and
    once complete the next ones read the cache.

    Returns:
      dict with the last run's ``plan``, ``conv_impl``, ``cap``, ``source``,
      ``complete`` and the search's ``table``; ``budget_s`` (one run's),
      ``search_s`` (candidates timed, summed over the runs), ``plan_s``
      (memory probe + search of the first run); ``runs``: per run its
      ``plan``, ``conv_impl``, ``matmul_impl``, ``source``, ``search_s``,
      ``budget_s`` and ``complete``.
    """
    from demjax import engine, local, models
    from demjax.config import validate

    c = work["config"].copy_and_resolve_references()
    c.num_rounds, c.local_plan, c.conv_impl = rounds, "auto", "auto"
    c.progress = False
    validate(c)
    part = _partition(work)
    if mesh is not None:
        from demjax import sharding

        c.num_devices = 0
        part = sharding.shard_partition(part, mesh)
    tx = local.make_optimizer(c.optimizer, c.lr)
    model = models.make_model(c.model, part.num_classes, c.hidden)
    saved = os.environ.get("DEMJAX_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="baselines_plans_") as tmp:
        os.environ["DEMJAX_CACHE_DIR"] = tmp
        try:
            t0 = time.perf_counter()
            from demjax import memory

            cap_probe = memory.memory_cap(
                c,
                part,
                model,
                tx,
                donate=True,
                num_group_models=int(sum(engine.tree_capacity(c))),
            )
            history = []
            for _ in range(max(1, runs)):
                plan, info = engine.choose_plan(
                    c, part, tx, 0.0, cap_probe=cap_probe, algorithm=c.algorithm
                )
                history.append(
                    {"plan": plan.name, "block_size": plan.block_size,
                     "conv_impl": plan.conv_impl, "matmul_impl": plan.matmul_impl,
                     "source": info["source"], "search_s": info.get("search_s"),
                     "budget_s": info.get("budget_s"),
                     "complete": info.get("complete")}
                )  # fmt: skip
                if len(history) == 1:
                    plan_s = time.perf_counter() - t0
        finally:
            if saved is None:
                os.environ.pop("DEMJAX_CACHE_DIR", None)
            else:
                os.environ["DEMJAX_CACHE_DIR"] = saved
    return {
        "plan": plan.name,
        "block_size": plan.block_size,
        "conv_impl": plan.conv_impl,
        "matmul_impl": plan.matmul_impl,
        "cap": int(info["cap"]),
        "source": info["source"],
        # a run's budget (the same in every run) and the search's time over
        # all runs
        "budget_s": next(
            (h["budget_s"] for h in history if h.get("budget_s") is not None), None
        ),
        "search_s": (
            round(sum(h["search_s"] or 0.0 for h in history), 3)
            if any(h["search_s"] is not None for h in history)
            else None
        ),
        "plan_s": round(plan_s, 3),
        "probe_run_s": round(float(cap_probe[1]["run_s"]), 6),
        "complete": info.get("complete"),
        "table": info.get("table", []),
        "runs": history,
        "devices": int((info.get("devices") or {}).get("chosen", 1)),
        "device_table": (info.get("devices") or {}).get("table"),
    }


# ---------------------------------------------------------------------------
# Implementations: each ``run()`` trains every agent once (all its steps).


class Shared:
    """The JAX implementations' state: one stacked population (params and
    optimizer state) threaded through every call, updated in place (donated),
    the data on the device, and one agent's initial params as the anchor."""

    def __init__(self, work):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from demjax import local, models

        c = work["config"]
        self.work, self.config = work, c
        self.a = len(work["n_train"])
        self.batch, self.epochs = int(c.batch_size), int(c.local_epochs)
        self.n_host = np.asarray(work["n_train"])
        self.tx = local.make_optimizer(c.optimizer, c.lr)
        self.shape = tuple(work["x"].shape[2:])
        model = models.make_model(c.model, work["num_classes"], c.hidden)

        def build(key):  # one compiled program (no eager op compiles per leaf)
            one = models.init_params(key, model, self.shape)
            params = jax.tree.map(
                lambda v: jnp.broadcast_to(v, (self.a,) + v.shape), one
            )
            return one, params, jax.vmap(self.tx.init)(params)

        self.one, self.params, self.opt = jax.jit(build)(jax.random.PRNGKey(0))
        self.x = jnp.asarray(work["x"])
        self.y = jnp.asarray(work["y"])
        self.n = jnp.asarray(self.n_host, jnp.int32)
        self.keys = jax.random.split(jax.random.PRNGKey(1), self.a)
        self.mu = jnp.float32(0.0)

    def apply_fn(self, conv_impl: str, matmul_impl: str = "xla"):
        from demjax import models

        c = self.config
        model = models.make_model(
            c.model, self.work["num_classes"], c.hidden, conv_impl, matmul_impl
        )

        def apply_fn(params, x, train, key):  # the engine's (Simulator)
            rngs = {"dropout": key} if train else {}
            return model.apply({"params": params}, x, train=train, rngs=rngs)

        return apply_fn


def population_step(sh: Shared, block: int, conv_impl: str, matmul_impl: str,
                    n_train):  # fmt: skip
    """``step(params, opt, keys, x, y, n, one, mu) -> (params, opt)``: the
    engine's trainer (``local.make_train_population``) for plan ``block`` over
    agents with the static sample counts ``n_train``, every agent anchored to
    one shared model (a root-only tree), given per block as the engine gives
    its parent models."""
    import jax
    import jax.numpy as jnp

    from demjax import local

    train = local.make_train_population(
        sh.apply_fn(conv_impl, matmul_impl), sh.tx, batch_size=sh.batch,
        local_epochs=sh.epochs, n_train=n_train,
        num_buckets=int(sh.config.local_buckets), block_size=block,
    )  # fmt: skip

    def step(params, opt, keys, x, y, n, one, mu):
        def anchor(ids):
            return jax.tree.map(
                lambda v: jnp.broadcast_to(v, (ids.shape[0],) + v.shape), one
            )

        params, opt, _ = train(keys, params, opt, x, y, n, anchor, mu)
        return params, opt

    return step


def demjax_runner(sh: Shared, block: int, conv_impl: str, matmul_impl: str = "xla"):
    """The engine's trainer for plan ``block`` (0 all, 1 sequential, K)."""
    import jax

    step = population_step(sh, block, conv_impl, matmul_impl, sh.n_host)
    jitted, fn = jax.jit(step, donate_argnums=(0, 1)), []

    def args():
        return (sh.params, sh.opt, sh.keys, sh.x, sh.y, sh.n, sh.one, sh.mu)

    def run():
        sh.params, sh.opt = fn[0](*args())
        jax.block_until_ready(sh.params)

    run.prepare = lambda: fn.append(jitted.lower(*args()).compile())
    return run


def sharded_runner(sh: Shared, block: int, conv_impl: str, matmul_impl: str,
                   mesh):  # fmt: skip
    """The engine's trainer for plan ``block`` under ``jax.shard_map`` over the
    ``agents`` mesh: each device trains its own A / D agents (the engine's
    local phase with several devices, ``engine._sharded``). Every sharded
    runner shares one sharded copy of the population and data (as the
    one-device runners share theirs), updated in place."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from demjax import sharding

    d = int(mesh.devices.size)
    n_static = sh.n_host.reshape(d, -1).max(axis=0)
    step = population_step(sh, block, conv_impl, matmul_impl, n_static)

    a = P(sharding.AXIS)
    fn = jax.shard_map(step, mesh=mesh, in_specs=(a, a, a, a, a, a, P(), P()),
                       out_specs=(a, a), check_vma=False)  # fmt: skip
    jitted, compiled = jax.jit(fn, donate_argnums=(0, 1)), []
    if getattr(sh, "sharded", None) is None:  # one copy for every sharded runner
        put = lambda t: jax.device_put(t, NamedSharding(mesh, a))  # noqa: E731
        sh.sharded = {
            "st": {"p": put(sh.params), "o": put(sh.opt)},
            "data": (put(sh.keys), put(sh.x), put(sh.y), put(sh.n)),
            "rest": (jax.device_put(sh.one, NamedSharding(mesh, P())),
                     jax.device_put(sh.mu, NamedSharding(mesh, P()))),
        }  # fmt: skip
    st, data, rest = sh.sharded["st"], sh.sharded["data"], sh.sharded["rest"]

    def run():
        st["p"], st["o"] = compiled[0](st["p"], st["o"], *data, *rest)
        jax.block_until_ready(st["p"])

    run.prepare = lambda: compiled.append(
        jitted.lower(st["p"], st["o"], *data, *rest).compile()
    )
    return run


def jax_loop_runner(sh: Shared, conv_impl: str, matmul_impl: str = "xla"):
    """A Python loop over agents of one jitted per-agent training function."""
    import jax
    import numpy as np

    from demjax import local

    one = local.make_train_one(
        sh.apply_fn(conv_impl, matmul_impl),
        sh.tx,
        batch_size=sh.batch,
        local_epochs=sh.epochs,
        n_max=int(sh.x.shape[1]),
        exact_steps=True,
    )

    def train_agent(params, opt, i, keys, x, y, n, anchor, mu):
        row = lambda t: jax.tree.map(  # noqa: E731
            lambda v: jax.lax.dynamic_index_in_dim(v, i, keepdims=False), t
        )
        p, o, _ = one(keys[i], row(params), row(opt), x[i], y[i], n[i], anchor, mu)
        put = lambda t, r: jax.tree.map(  # noqa: E731
            lambda v, u: jax.lax.dynamic_update_index_in_dim(v, u, i, 0), t, r
        )
        return put(params, p), put(opt, o)

    jitted, fn = jax.jit(train_agent, donate_argnums=(0, 1)), []
    ids = [np.int32(i) for i in range(sh.a)]

    def run():
        params, opt, f = sh.params, sh.opt, fn[0]
        for i in ids:
            params, opt = f(params, opt, i, sh.keys, sh.x, sh.y, sh.n, sh.one, sh.mu)
        sh.params, sh.opt = params, opt
        jax.block_until_ready(sh.params)

    def prepare():
        fn.append(
            jitted.lower(
                sh.params, sh.opt, ids[0], sh.keys, sh.x, sh.y, sh.n, sh.one, sh.mu
            ).compile()
        )

    run.prepare = prepare
    return run


def torch_models(model: str, num_classes: int, hidden: int = 100):
    """The same architecture in torch.nn (``demjax.models`` MLP / paper CNN)."""
    import torch.nn as nn

    if model == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.4),
        nn.Conv2d(32, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.4),
        nn.Flatten(),
        nn.Linear(7 * 7 * 32, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def torch_runner(sh: Shared, threads: int, max_agents: int = 0):
    """Per-agent PyTorch loop on the JAX data buffers (DLPack, no copy) with
    ``threads`` intra-op threads, over the first ``max_agents`` agents (0: all).

    Returns:
      ``(run, agents timed)``.
    """
    import torch

    torch.manual_seed(0)
    c = sh.config
    xs = torch.from_dlpack(sh.x)  # [A, N, H, W, C]
    if xs.shape[-1] == 1:
        xs = xs.reshape(xs.shape[:2] + (1,) + xs.shape[2:4])  # NCHW, a view
    else:
        xs = xs.permute(0, 1, 4, 2, 3)
    ys = torch.from_dlpack(sh.y).long()
    m_agents = sh.a if max_agents <= 0 else min(max_agents, sh.a)
    hidden = int(c.hidden[0]) if c.model == "mlp" else 0
    nets = [
        torch_models(c.model, sh.work["num_classes"], hidden) for _ in range(m_agents)
    ]
    for m in nets:
        m.train()
    opts = [torch.optim.SGD(m.parameters(), lr=float(c.lr)) for m in nets]
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    ns = [int(v) for v in sh.n_host]
    b, epochs = sh.batch, sh.epochs

    def run(agents=m_agents):
        torch.set_num_threads(threads)
        for i in range(agents):
            m, opt, n = nets[i], opts[i], ns[i]
            xi, yi = xs[i], ys[i]
            for _ in range(epochs):
                perm = torch.randperm(n, generator=gen)
                for s in range(0, n, b):
                    idx = perm[s : s + b]
                    opt.zero_grad()
                    loss_fn(m(xi[idx]), yi[idx]).backward()
                    opt.step()
            opt.zero_grad()  # frees the agent's gradients (set_to_none)

    run.prepare = lambda: run(1)  # lazy initialisations: train agent 0 once
    return run, m_agents


# ---------------------------------------------------------------------------
# Timing


def time_interleaved(runners: dict, repeats: int, slow_s: float, log=print) -> dict:
    """Prepares each runner (``prepare_s``: the JAX programs compiled ahead of
    time, PyTorch's lazy initialisation), then ``repeats`` rounds, each calling
    every runner once in a rotated order. A runner that took more than
    ``slow_s`` seconds in the first round is not repeated.

    Returns:
      ``{name: {"prepare_s", "times": [...]}}``.
    """
    out = {}
    for name, run in runners.items():
        t0 = time.perf_counter()
        run.prepare()
        out[name] = {"prepare_s": time.perf_counter() - t0, "times": []}
        log(f"  prepared {name}: {out[name]['prepare_s']:.2f} s")
    names = list(runners)
    for r in range(repeats):
        k = r % len(names)
        todo = [
            n for n in names[k:] + names[:k] if r == 0 or out[n]["times"][0] <= slow_s
        ]
        for name in todo:
            t0 = time.perf_counter()
            runners[name]()
            out[name]["times"].append(time.perf_counter() - t0)
        log(
            f"  repeat {r + 1}/{repeats}: "
            + ", ".join(f"{n} {out[n]['times'][-1]:.2f}" for n in names if n in todo)
        )
    return out


def jax_devices() -> list:
    """The CPU (or default backend's) devices of this process."""
    import jax

    return jax.devices()


def _plan_name(k: int, conv: str, matmul: str, conv_impls) -> str:
    """A demjax runner's name: plan, conv impl (CNNs), matmul form if not xla."""
    from demjax import plan as plan_lib

    name = f"demjax:{plan_lib.LocalPlan(k).name}"
    if len(conv_impls) > 1:
        name += f"/{conv}"
    return name + (f"/{matmul}" if matmul != "xla" else "")


def effective_block(block: int, a: int, cap: int) -> int:
    """The block a plan trains with for ``a`` agents of which ``cap`` fit at
    once (0 = all), as ``plan.resolve`` caps an explicit plan."""
    want = a if block == 0 else min(block, a)
    want = min(want, cap)
    return 0 if want >= a else want


def parse_plans(text: str) -> list[str]:
    """``--plans``: a comma list of auto, all, sequential, block:K."""
    from demjax import plan as plan_lib
    from demjax.errors import ConfigError

    out = [p.strip() for p in text.split(",") if p.strip()]
    try:
        for p in out:
            plan_lib.parse_plan(p)
    except ConfigError as e:
        raise SystemExit(f"error: --plans={text!r}: {e}") from None
    if not out:
        raise SystemExit("error: --plans is empty")
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                REPO,
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "demjax",
                "benchmarks/baselines.py",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def one_size(args, a: int, plans: list[str], log=print) -> dict:
    """Every implementation for ``a`` agents; the stored entry."""

    from benchmarks.common import environment
    from demjax import engine
    from demjax import plan as plan_lib

    if args.model == "cnn":
        work = cnn_workload(a)
    else:
        work = mlp_workload(a, args.steps, args.batch, args.samples)
    c = work["config"]
    batch, epochs = int(c.batch_size), int(c.local_epochs)
    steps = agent_steps(work["n_train"], batch, epochs)
    total = int(steps.sum())
    flops = flops_per_sample(c.model, int(c.hidden[0]))
    conv_impls = ("patches", "xla") if c.model.startswith("cnn") else ("patches",)

    auto = None
    if "auto" in plans:
        log(
            f"{args.model} {a} agents: engine.choose_plan (empty cache, "
            f"{args.search_rounds} rounds)"
        )
        auto = choose_auto(work, args.search_rounds, args.search_runs)
        log("  auto: " + json.dumps({k: v for k, v in auto.items() if k != "table"}))
        cap = auto["cap"]
    auto_dev, devices = None, jax_devices()
    if auto is not None and len(devices) > 1 and a % len(devices) == 0:
        import numpy as np
        from jax.sharding import Mesh

        # The choice scripts/run.py makes with one device per core: the
        # plan search with the device choice (one device or all, measured).
        auto_dev = choose_auto(
            work, args.search_rounds, args.search_runs,
            mesh=Mesh(np.asarray(devices), ("agents",)),
        )  # fmt: skip
        log(f"  auto@{len(devices)}dev: " + json.dumps(
            {k: v for k, v in auto_dev.items() if k != "table"}))  # fmt: skip
    else:
        from demjax import local, models

        tx = local.make_optimizer(c.optimizer, c.lr)
        model = models.make_model(c.model, work["num_classes"], c.hidden)
        from demjax import memory

        cap = memory.memory_cap(
            c,
            _partition(work),
            model,
            tx,
            donate=True,
            num_group_models=int(sum(engine.tree_capacity(c))),
        )[0]

    # Explicit plans (capped by memory as the engine caps them), each conv impl.
    blocks = []
    for p in plans + ([auto["plan"]] if auto else []):
        if p == "auto":
            continue
        k = effective_block(plan_lib.parse_plan(p), a, cap)
        if k not in blocks:
            blocks.append(k)
    blocks.sort(key=lambda k: (k == 0, k))

    # --conv_impls narrows the explicit plans' convolutions (the auto plan's
    # is always timed); names keep the conv suffix of CNN runs.
    timed_convs = [
        i for i in conv_impls
        if len(conv_impls) == 1 or i in args.conv_impls.split(",")
        or (auto is not None and i == auto["conv_impl"])
    ]  # fmt: skip
    sh = Shared(work)
    del work["x"], work["y"]  # on the device now (the torch loop shares it)
    gc.collect()
    runners, notes = {}, {}
    combos = [
        (k, conv, mm) for k in blocks for conv in timed_convs
        for mm in args.matmul_impls.split(",")
    ]  # fmt: skip
    for ch in (auto["runs"] if auto is not None else []) + (
        [auto_dev] if auto_dev is not None else []
    ):
        # every run's choice with its own kernels (the device-aware choice's
        # block is per device when it shards: the sharded runners' too)
        k = effective_block(ch["block_size"], a, cap)
        if (k, ch["conv_impl"], ch["matmul_impl"]) not in combos:
            combos.append((k, ch["conv_impl"], ch["matmul_impl"]))
    for k, conv, mm in combos:
        name = _plan_name(k, conv, mm, conv_impls)
        runners[name] = demjax_runner(sh, k, conv, mm)
        notes[name] = {"plan": plan_lib.LocalPlan(k).name, "conv_impl": conv,
                       "matmul_impl": mm}  # fmt: skip
    # Several CPU devices (--cpu_devices): the same plans with the agents
    # sharded over them (A divisible by D), named demjax@Ddev:..., compared
    # with the references but never counted among the one-device plans.
    if len(devices) > 1 and a % len(devices) == 0:
        import numpy as np
        from jax.sharding import Mesh

        mesh = Mesh(np.asarray(devices), ("agents",))
        for k, conv, mm in combos:
            base = _plan_name(k, conv, mm, conv_impls)
            name = base.replace("demjax:", f"demjax@{len(devices)}dev:", 1)
            runners[name] = sharded_runner(sh, k, conv, mm, mesh)
            notes[name] = dict(notes[base], devices=len(devices))
    elif len(devices) > 1:
        log(f"{a} agents not divisible by {len(devices)} devices: no sharded plans")
    loop_impls = ("xla", "patches") if len(conv_impls) > 1 else ("patches",)
    loop_impls = tuple(i for i in loop_impls if i in timed_convs)
    for impl in loop_impls:
        for mm in args.matmul_impls.split(","):
            name = f"{LOOP}/{impl}" if len(conv_impls) > 1 and impl != "xla" else LOOP
            name += f"/{mm}" if mm != "xla" else ""
            runners[name] = jax_loop_runner(sh, impl, mm)
            notes[name] = dict(
                {"conv_impl": impl} if len(conv_impls) > 1 else {}, matmul_impl=mm
            )
    torch_note, timed_steps = None, {}
    threads = sorted(
        {
            (os.cpu_count() or 1) if t == "cores" else int(t)
            for t in args.torch_threads.split(",")
            if t
        },
        reverse=True,
    )
    if threads and not args.no_torch:
        try:
            import torch

            torch_note = f"torch {torch.__version__}"
            for t in threads:
                name = TORCH if t == (os.cpu_count() or 1) else f"{TORCH}/{t}thread"
                runners[name], m = torch_runner(sh, t, args.torch_agents)
                timed_steps[name] = int(steps[:m].sum())
                notes[name] = {"threads": t, "agents_timed": m}
        except ImportError as e:
            print(
                f"skipping {TORCH}: {e} (pip install 'demjax[bench]')", file=sys.stderr
            )
    log(
        f"{args.model} {a} agents ({total} agent-steps per run): "
        f"{len(runners)} implementations, {args.repeats} interleaved repeats"
    )
    from demjax.plan import CpuMeter

    load_before = os.getloadavg()
    meter = CpuMeter()
    timed = time_interleaved(runners, args.repeats, args.slow_s, log)
    outside = meter.outside_share()
    load_after = os.getloadavg()

    env = environment()
    records = {}
    for name, t in timed.items():
        best, med = min(t["times"]), statistics.median(t["times"])
        done = timed_steps.get(name, total)
        rate = done / best
        records[name] = {
            "impl": name,
            "model": c.model,
            "num_agents": a,
            **notes[name],
            "agent_steps": done,
            "best_s": round(best, 4),
            "median_s": round(med, 4),
            "prepare_s": round(t["prepare_s"], 3),
            "repeats": len(t["times"]),
            "agent_steps_per_s": round(rate, 1),
            "agent_steps_per_s_median": round(done / med, 1),
            "gflops": round(rate * flops * batch / 1e9, 2),
            "cpu_model": env["cpu_model"],
        }
    if auto is not None:
        k = effective_block(auto["block_size"], a, cap)
        src = _plan_name(k, auto["conv_impl"], auto["matmul_impl"], conv_impls)
        rec = dict(records[src], impl="auto", same_as=src)
        rec.update(
            {
                k2: auto[k2]
                for k2 in (
                    "plan",
                    "conv_impl",
                    "matmul_impl",
                    "source",
                    "search_s",
                    "plan_s",
                    "budget_s",
                    "cap",
                )
            }
        )

        def over_others(rec, src):
            others = [
                r for n, r in records.items() if n.startswith("demjax:") and n != src
            ]  # fmt: skip
            if others:
                top = max(others, key=lambda r: r["agent_steps_per_s"])
                rec["best_other_plan"] = top["impl"]
                rec["over_best_other_plan"] = round(
                    rec["agent_steps_per_s"] / top["agent_steps_per_s"], 3
                )

        over_others(rec, src)
        first = {}
        if len(auto["runs"]) > 1:  # the first run's choice, from an empty cache
            ch = auto["runs"][0]
            k1 = effective_block(ch["block_size"], a, cap)
            src1 = _plan_name(k1, ch["conv_impl"], ch["matmul_impl"], conv_impls)
            r1 = dict(records[src1], impl="auto:run1", same_as=src1)
            keys = ("plan", "conv_impl", "matmul_impl", "source", "search_s",
                    "complete")  # fmt: skip
            r1.update({x: ch[x] for x in keys})
            over_others(r1, src1)
            first = {"auto:run1": r1}
        if auto_dev is not None:  # the device-aware choice, over every plan
            d = len(devices)
            k = effective_block(auto_dev["block_size"], a, cap)
            src = _plan_name(k, auto_dev["conv_impl"], auto_dev["matmul_impl"],
                             conv_impls)  # fmt: skip
            if auto_dev["devices"] > 1:
                src = src.replace("demjax:", f"demjax@{d}dev:", 1)
            rd = dict(records[src], impl=f"auto@{d}dev", same_as=src)
            rd.update({x: auto_dev[x] for x in ("plan", "conv_impl", "matmul_impl",
                                                "source", "search_s", "plan_s",
                                                "devices", "device_table")})
            others = [r for n, r in records.items()
                      if n.startswith(("demjax:", f"demjax@{d}dev:")) and n != src]
            if others:
                top = max(others, key=lambda r: r["agent_steps_per_s"])
                rd["best_other_plan"] = top["impl"]
                rd["over_best_other_plan"] = round(
                    rd["agent_steps_per_s"] / top["agent_steps_per_s"], 3
                )  # fmt: skip
            first[f"auto@{d}dev"] = rd
        records = {"auto": rec, **first, **records}
    # References: the fastest per-agent JAX loop and the fastest PyTorch loop.
    refs = {}
    for key, prefix in (("over_jax_loop", LOOP), ("over_torch", TORCH)):
        cands = [r for n, r in records.items() if n.split("/")[0] == prefix]
        if cands:
            refs[key] = max(cands, key=lambda r: r["agent_steps_per_s"])
    for rec in records.values():
        for key, ref in refs.items():
            rec[key] = round(rec["agent_steps_per_s"] / ref["agent_steps_per_s"], 3)
        log(json.dumps(rec))
    best_plan = max(
        (r for n, r in records.items() if n.startswith("demjax:")),
        key=lambda r: r["agent_steps_per_s"],
    )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "environment": dict(env, torch=torch_note),
        "workload": {
            "model": c.model,
            "num_agents": a,
            "batch": batch,
            "local_epochs": epochs,
            "lr": float(c.lr),
            "data": work["data"],
            "samples_min": int(sh.n_host.min()),
            "samples_max": int(sh.n_host.max()),
            "agent_steps": total,
            "steps_min": int(steps.min()),
            "steps_max": int(steps.max()),
            "local_buckets": int(c.local_buckets),
            "memory_cap": int(cap),
            "repeats": args.repeats,
            "search_rounds": args.search_rounds,
            "search_runs": args.search_runs,
        },
        "auto": auto,
        "best_plan": best_plan["impl"],
        "references": {k: r["impl"] for k, r in refs.items()},
        "records": list(records.values()),
        "peak_rss_gb": peak_rss_gb(),
        "load_avg_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        # share of the machine's CPU time other work (steal included) took
        # during the timed repeats (demjax.plan.CpuMeter; None: not measured)
        "outside_load": None if outside is None else round(outside, 3),
    }


# ---------------------------------------------------------------------------
# Report


def _fmt(v, nd=2):
    return "-" if v is None else f"{v:,.{nd}f}"


def report(results: dict, path: str) -> None:
    """``baselines.md``: one table per workload and size, newest first."""
    lines = [
        "# Local training side by side: demjax plans, a per-agent JAX loop, PyTorch",
        "",
        "Generated by `benchmarks/baselines.py` from "
        f"`{os.path.splitext(os.path.basename(path))[0]}.json`. Agent-steps/s "
        "from the fastest of the interleaved repeats (median in brackets); ratios "
        "against the fastest per-agent jitted JAX loop (`jax_per_agent_loop*`) and "
        "the fastest sequential PyTorch loop (`torch_sequential*`, with as many "
        "threads as cores or one) of the same run.",
        "",
    ]
    for key in sorted(
        results["runs"], key=lambda k: (k.split("/")[0], int(k.split("/")[1]))
    ):
        e = results["runs"][key]
        w, env = e["workload"], e["environment"]
        lines += [
            f"## {w['model']}, {w['num_agents']:,} agents",
            "",
            f"{e['date']}, commit {e['commit']}, {env['cpu_model']}, "
            f"{env['cpu_count']} cores, JAX {env['jax']}"
            + (f", {env['torch']}" if env.get("torch") else "")
            + ". "
            f"{w['data']}; batch {w['batch']}, {w['local_epochs']} local epochs, "
            f"{w['samples_min']}-{w['samples_max']} samples and "
            f"{w['steps_min']}-{w['steps_max']} steps per agent, "
            f"{w['agent_steps']:,} agent-steps per run; {w['repeats']} repeats; "
            f"memory cap {w['memory_cap']:,} agents at once; "
            f"peak RSS {e.get('peak_rss_gb', '-')} GB"
            + (
                f"; 1-minute load average {e['load_avg_1min'][0]} before and "
                f"{e['load_avg_1min'][1]} after the timed repeats"
                if e.get("load_avg_1min")
                else ""
            )
            + (
                f"; other work took {e['outside_load']:.0%} of the machine's CPU "
                "time during them"
                if e.get("outside_load") is not None
                else ""
            )
            + ".",
            "",
        ]
        a = e.get("auto")
        if a:
            rec = next(r for r in e["records"] if r["impl"] == "auto")
            lines += [
                f"Auto plan: `{a['plan']}`"
                + (f" / `{a['conv_impl']}`" if w["model"] != "mlp" else "")
                + f" / matmul `{a.get('matmul_impl', 'xla')}`"
                + f" ({a['source']}; search {_fmt(a['search_s'])} s "
                + (
                    f"in {sum(h['search_s'] is not None for h in a['runs'])} of "
                    f"{len(a['runs'])} runs (the others read the cache), each "
                    "within its "
                    if len(a.get("runs", [])) > 1
                    else "of a "
                )
                + f"{_fmt(a['budget_s'])} s budget, whole choice "
                f"{_fmt(a['plan_s'])} s"
                + (" in the first" if len(a.get("runs", [])) > 1 else "")
                + f" for {w['search_rounds']} rounds); fastest plan measured here: "
                f"`{e['best_plan']}`"
                + (
                    f"; auto over the best other plan "
                    f"{rec['over_best_other_plan']:.2f}x"
                    if "over_best_other_plan" in rec
                    else ""
                )
                + ".",
                "",
            ]
            for rd in e["records"]:  # the device-aware choice (--cpu_devices)
                if not rd["impl"].startswith("auto@"):
                    continue
                timed = "; ".join(
                    f"{t['devices']} device(s) `{t['plan']}` "
                    f"{t['agent_steps_per_s']:.0f} agent-steps/s"
                    for t in rd.get("device_table") or []
                ) or "nothing timed: one device"
                lines += [
                    f"Auto plan with one device per core (`{rd['impl']}`, as "
                    f"`scripts/run.py` chooses): {rd['devices']} device(s), "
                    f"`{rd['plan']}`"
                    + f" / matmul `{rd.get('matmul_impl', 'xla')}` (device timing: "
                    + timed + ")"
                    + (
                        f"; over the best other plan of either kind "
                        f"(`{rd['best_other_plan']}`) "
                        f"{rd['over_best_other_plan']:.2f}x"
                        if "over_best_other_plan" in rd
                        else ""
                    )
                    + ".",
                    "",
                ]
            if len(a.get("runs", [])) > 1:
                lines += [
                    f"Plan choice of {len(a['runs'])} consecutive runs on one "
                    "cache (each search within its own budget; a search cut by "
                    "it is resumed by the next run): "
                    + "; ".join(
                        f"run {i} `{h['plan']}`"
                        + (f" / `{h['matmul_impl']}`" if h["matmul_impl"] != "xla"
                           else "")
                        + f" ({h['source']}"
                        + (f", {h['search_s']:.1f} s" if h.get("search_s") else "")
                        + (", cut by the budget" if h.get("complete") is False
                           else "")
                        + ")"
                        for i, h in enumerate(a["runs"], 1)
                    )
                    + ".",
                    "",
                ]  # fmt: skip
        lines += [
            "| implementation | agent-steps/s | GFLOP/s | vs JAX loop | vs PyTorch "
            "| repeats | prepare s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in e["records"]:
            name = r["impl"] + (f" (= {r['same_as']})" if r.get("same_as") else "")
            lines.append(
                f"| {name} | {r['agent_steps_per_s']:,.0f} "
                f"({r['agent_steps_per_s_median']:,.0f}) | {_fmt(r['gflops'], 1)} "
                f"| {_fmt(r.get('over_jax_loop'))} | {_fmt(r.get('over_torch'))} "
                f"| {r['repeats']} | {_fmt(r['prepare_s'], 1)} |"
            )
        if a and a.get("table"):
            lines += [
                "",
                "Search table (candidates in the order timed; *at scale*: a "
                "finalist timed again on one equal, larger population at the "
                "run's own steps per agent, the choice made among those; "
                "*earlier run*: timed by an earlier run of the search, which "
                "this run resumed):",
                "",
                "| plan | conv | matmul | agents | steps | compile s "
                "| agent-steps/s (first timing) | search s so far |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for t in a["table"]:
                first = t.get("first_agent_steps_per_s")
                mark = (" *at scale*" if t.get("at_scale") else
                        " *earlier run*" if t.get("resumed") else "")  # fmt: skip
                lines.append(
                    f"| {t['plan']}{mark} "
                    f"| {t['conv_impl']} | {t.get('matmul_impl', 'xla')} "
                    f"| {t['agents']} | {t['steps']} "
                    f"| {t['compile_s']:.2f} | {t['agent_steps_per_s']:,.0f}"
                    + (f" ({first:,.0f})" if first is not None else "")
                    + f" | {t['search_s']:.1f} |"
                )
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    p.add_argument(
        "--agents", default=None, help="comma list (default: mlp 1000, cnn 50)"
    )
    p.add_argument("--steps", type=int, default=20, help="mlp: steps per agent")
    p.add_argument("--batch", type=int, default=20, help="mlp: batch size")
    p.add_argument(
        "--samples",
        type=int,
        default=100,
        help="mlp: samples per agent (steps * batch / samples epochs)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--plans",
        default=None,
        help="comma list of auto, all, sequential, block:K (default: "
        + "; ".join(f"{k} {v}" for k, v in DEFAULT_PLANS.items())
        + ")",
    )
    p.add_argument(
        "--search_rounds",
        type=int,
        default=100,
        help="num_rounds of the config the auto search sizes its budget by",
    )
    p.add_argument(
        "--search_runs",
        type=int,
        default=1,
        help="consecutive plan choices on one cache: a search cut by its "
        "budget is resumed by the next; the auto record is the last one's "
        "choice, auto:run1 the first's (from an empty cache)",
    )
    p.add_argument(
        "--slow_s",
        type=float,
        default=120.0,
        help="an implementation slower than this (s) in the first repeat is timed once",
    )
    p.add_argument(
        "--conv_impls",
        default="patches,xla",
        help="cnn: comma list of the convolutions the explicit plans and the "
        "per-agent loop are timed with (the auto plan's is always timed)",
    )
    p.add_argument(
        "--matmul_impls",
        default="xla",
        help="comma list of the dense weight-gradient forms (models.matmul: xla, "
        "wgrad_t) the explicit plans are timed with (the auto plan's is always "
        "timed)",
    )
    p.add_argument("--no_torch", action="store_true")
    p.add_argument(
        "--torch_threads",
        default="cores,1",
        help="comma list of PyTorch intra-op thread counts, one record each "
        "(cores = os.cpu_count()); ratios are against the fastest",
    )
    p.add_argument(
        "--torch_agents",
        type=int,
        default=0,
        help="time the PyTorch loops on the first N agents only (0: all)",
    )
    p.add_argument(
        "--cpu_devices",
        type=int,
        default=1,
        help="CPU devices JAX exposes (0 = one per core); with several, every "
        "explicit plan is also timed with the agents sharded over them "
        "(demjax@Ddev:PLAN, as scripts/run.py --cpu_devices runs it) and the "
        "device-aware automatic choice as auto@Ddev",
    )
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--out", default=os.path.join(RESULTS, "baselines.json"))
    args = p.parse_args(argv)
    if args.cpu_devices != 1 and not args.report_only:
        from demjax import sharding

        sharding.set_cpu_devices(args.cpu_devices)  # before any JAX operation

    from benchmarks.common import load_results, save_results

    results = load_results(args.out)
    if "runs" not in results:  # an older flat list of records
        results = {"runs": {}}
    md = os.path.splitext(args.out)[0] + ".md"
    if args.report_only:
        report(results, md)
        return
    plans = parse_plans(args.plans or DEFAULT_PLANS[args.model])
    sizes = [
        int(s)
        for s in (args.agents or ("50" if args.model == "cnn" else "1000")).split(",")
    ]
    for a in sizes:
        entry = one_size(args, a, plans, log=lambda s: print(s, flush=True))
        results["runs"][f"{args.model}/{a}"] = entry
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        save_results(args.out, results)
        report(results, md)
        gc.collect()


if __name__ == "__main__":
    main()
