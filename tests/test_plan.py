"""Execution plans of local training: every plan gives the same results, the
search keeps the fastest within its budget, the choice is cached, recorded and
validated."""

import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config as base_config
from test_local import per_agent_reference

from demjax import config as config_lib
from demjax import data, local, models, plan, train
from demjax.errors import ConfigError

tiny_config = functools.partial(base_config, num_agents=6, num_rounds=2, num_levels=2)


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path, monkeypatch):
    """Each test gets an empty plan cache of its own, searches count as
    uncontended (the suite itself runs other processes beside them), and a
    candidate is timed on the fewest calls (two after its warm-up): the tests
    check what is searched, recorded and cached, not timing precision."""
    monkeypatch.setenv("DEMJAX_CACHE_DIR", str(tmp_path / "plan_cache"))
    monkeypatch.setattr(plan.CpuMeter, "outside_share", lambda self: 0.0)
    monkeypatch.setattr(plan, "TIME_S", 0.0)
    monkeypatch.setattr(plan, "RETIME_S", 0.0)
    monkeypatch.setattr(plan, "MIN_CALL_S", 0.0)


def _population(model_name, n, shape, num_classes=3, hidden=(5,), impl="patches"):
    num_agents, n_max = len(n), int(np.max(n))
    rng = np.random.default_rng(7)
    x = rng.normal(size=(num_agents, n_max, *shape)).astype(np.float32)
    y = rng.integers(0, num_classes, size=(num_agents, n_max)).astype(np.int32)
    for a in range(num_agents):  # garbage padding must never reach a gradient
        x[a, n[a] :] = 1e3
    model = models.make_model(model_name, num_classes, hidden, impl)
    params = models.init_population(jax.random.PRNGKey(0), model, shape, num_agents)
    params = jax.tree.map(
        lambda p: (
            p
            + 0.05
            * jnp.arange(num_agents, dtype=p.dtype).reshape((-1,) + (1,) * (p.ndim - 1))
        ),
        params,
    )
    return x, y, model, params


@pytest.mark.parametrize("block", [0, 1, 2, 4])
@pytest.mark.parametrize("mu", [0.0, 0.2])
def test_every_plan_equals_the_per_agent_reference(block, mu):
    """all / sequential / block:2 / block:4 (last block shifted back) with four
    buckets of step counts, against one agent at a time on unpadded data."""
    n = np.array([9, 1, 4, 7, 3], np.int32)
    batch_size, epochs, lr = 2, 2, 0.1
    x, y, model, params = _population("mlp", n, (2, 2, 1))
    apply_fn = lambda p, xb, train=False, key=None: model.apply({"params": p}, xb)  # noqa: E731
    tx = optax.sgd(lr)
    opt = jax.vmap(tx.init)(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(n))
    anchor = jax.tree.map(lambda p: 0.5 * p, params)
    pop = local.make_train_population(
        apply_fn, tx, batch_size=batch_size, local_epochs=epochs, n_train=n,
        num_buckets=4, block_size=block,
    )  # fmt: skip
    got, _, loss = jax.jit(pop)(keys, params, opt, x, y, n, anchor, jnp.float32(mu))
    assert loss.shape == (len(n),) and np.all(np.isfinite(loss))
    for a in range(len(n)):
        row = lambda t, a=a: jax.tree.map(lambda p: p[a], t)  # noqa: E731
        ref = per_agent_reference(
            apply_fn,
            row(params),
            x[a], y[a], int(n[a]),
            row(anchor),
            mu, keys[a], lr, batch_size, epochs,
        )  # fmt: skip
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(g[a], r, rtol=1e-5, atol=1e-6)


def test_sequential_plan_runs_exact_steps_with_stragglers_and_empty_agents():
    """The sequential plan's own-length loop equals the masked scan, including an
    agent with no data and stragglers capped at a few steps."""
    n = np.array([6, 0, 3, 5], np.int32)
    x, y, model, params = _population("mlp", n, (2, 2, 1))
    apply_fn = lambda p, xb, train=False, key=None: model.apply({"params": p}, xb)  # noqa: E731
    tx = optax.sgd(0.1)
    opt = jax.vmap(tx.init)(params)
    keys = jax.random.split(jax.random.PRNGKey(4), len(n))
    max_steps = jnp.array([2, 5, 100, 1], jnp.int32)
    out = {}
    for block in (0, 1):
        pop = local.make_train_population(
            apply_fn, tx, batch_size=2, local_epochs=3, n_train=n, num_buckets=1,
            block_size=block,
        )  # fmt: skip
        out[block] = jax.jit(pop)(
            keys, params, opt, x, y, n, params, jnp.float32(0.0), max_steps
        )
    for g, r in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[0]), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    # The empty agent is untouched; a capped straggler moved.
    for p0, p1 in zip(jax.tree.leaves(params), jax.tree.leaves(out[1][0]), strict=True):
        np.testing.assert_array_equal(p1[1], p0[1])
        assert not np.allclose(p1[3], p0[3])


def _dot_batch_dims(jaxpr):
    """Batch dimensions of every dot_general in a (closed) jaxpr, recursively."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (_, _), (lb, rb) = eqn.params["dimension_numbers"]
            out.append((tuple(lb), tuple(rb)))
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    out += _dot_batch_dims(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    out += _dot_batch_dims(sub)
    return out


def test_sequential_plan_has_no_batched_matmul():
    """One agent at a time means plain 2-D dots: no dot_general with a batch
    dimension in the program (vmap's batched dots are what it avoids)."""
    n = np.array([4, 4, 4], np.int32)
    x, y, model, params = _population("mlp", n, (2, 2, 1))
    apply_fn = lambda p, xb, train=False, key=None: model.apply({"params": p}, xb)  # noqa: E731
    tx = optax.sgd(0.1)
    opt = jax.vmap(tx.init)(params)
    keys = jax.random.split(jax.random.PRNGKey(4), len(n))

    def dots(block):
        pop = local.make_train_population(
            apply_fn, tx, batch_size=2, local_epochs=1, n_train=n, block_size=block
        )
        jaxpr = jax.make_jaxpr(pop)(keys, params, opt, x, y, n, params, 0.0)
        return _dot_batch_dims(jaxpr.jaxpr)

    seq, vm = dots(1), dots(0)
    assert len(seq) >= 3 and all(d == ((), ()) for d in seq), seq
    assert any(d != ((), ()) for d in vm), vm


def test_cnn_plans_and_kernel_variants_agree():
    """The paper CNN: sequential with lax.conv, and block:2 with im2col and the
    transposed weight gradient, equal all agents at once with im2col patches."""
    n = np.array([3, 2, 4], np.int32)
    x, y, _, params = _population("cnn", n, (28, 28, 1), num_classes=10)
    tx = optax.sgd(0.05)
    opt = jax.vmap(tx.init)(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(n))

    def run(block, conv, matmul="xla"):
        model = models.make_model("cnn", 10, (), conv, matmul)

        def apply_fn(p, xb, train=False, key=None):
            return model.apply({"params": p}, xb)

        pop = local.make_train_population(
            apply_fn, tx, batch_size=2, local_epochs=1, n_train=n, block_size=block
        )
        return jax.jit(pop)(keys, params, opt, x, y, n, params, jnp.float32(0.0))

    ref = run(0, "patches")
    for block, impl, matmul in ((1, "xla", "xla"), (2, "patches", "wgrad_t")):
        got = run(block, impl, matmul)
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(
    "value, block",
    [("auto", None), ("all", 0), ("sequential", 1), ("block:1", 1), ("block:37", 37)],
)
def test_parse_plan(value, block):
    assert plan.parse_plan(value) == block


@pytest.mark.parametrize("value", ["block:0", "block:-2", "blocks:4", "fast", ""])
def test_bad_plan_names_the_field(value):
    with pytest.raises(
        ConfigError, match=r"local_plan=.*accepted: auto, all, sequential, block:K"
    ):
        config_lib.validate(tiny_config(local_plan=value))


def test_bad_conv_impl_names_the_field():
    with pytest.raises(
        ConfigError, match=r"conv_impl='cudnn'.*accepted: auto, patches, xla"
    ):
        config_lib.validate(tiny_config(conv_impl="cudnn"))
    with pytest.raises(
        ConfigError, match=r"matmul_impl='fast'.*accepted: auto, xla, wgrad_t"
    ):
        config_lib.validate(tiny_config(matmul_impl="fast"))


def test_block_candidates():
    assert plan.block_candidates(50, 50) == [1, 2, 4, 8, 16, 32, 50]
    assert plan.block_candidates(1000, 100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert plan.block_candidates(5, 1) == [1]


def _fake_measure(speeds, calls, cost=0.0):
    """``measure`` with given agent-steps/s per (block, impl); records calls."""

    def measure(k, impl, floor=0.0):
        calls.append((k, impl))
        if cost:
            import time

            time.sleep(cost)
        return {"plan": plan.LocalPlan(k if k < 50 else 0).name,
                "conv_impl": impl[0], "matmul_impl": impl[1],
                "agents": k, "steps": 1, "compile_s": 0.0, "run_s": 1.0,
                "agent_steps_per_s": speeds[(k, impl)]}  # fmt: skip

    return measure


def _clocked_measure(monkeypatch, speeds, cost_s):
    """``_fake_measure`` on a fake clock of ``plan``: each measurement costs
    ``cost_s`` of it. Returns ``(measure, calls)``."""
    now = [0.0]
    monkeypatch.setattr(
        plan, "time", types.SimpleNamespace(perf_counter=lambda: now[0])
    )
    fake = _fake_measure(speeds, calls := [])

    def measure(k, impl, floor=0.0):
        now[0] += cost_s
        return fake(k, impl, floor)

    return measure, calls


def test_search_keeps_the_fastest_and_stops_past_the_peak():
    v = ("patches", "xla")
    speeds = {(k, v): s for k, s in
              [(1, 10), (2, 30), (4, 60), (8, 50), (16, 20), (32, 5), (50, 8)]}  # fmt: skip
    calls = []
    best, table, complete = plan.search(
        _fake_measure(speeds, calls), num_agents=50, cap=50,
        variants=(v,), budget_s=100.0,
    )  # fmt: skip
    assert complete
    assert best == plan.LocalPlan(4, "patches", "xla")
    # sequential and all first, then 2, 4, 8 (slower), 16 (slower by > 15%:
    # stop after 2 worse)
    assert calls == [(1, v), (50, v), (2, v), (4, v), (8, v), (16, v)]
    assert [r["plan"] for r in table] == ["sequential", "all", "block:2", "block:4",
                                          "block:8", "block:16"]  # fmt: skip


def test_search_over_kernel_variants():
    variants = (("patches", "xla"), ("xla", "xla"), ("patches", "wgrad_t"))
    speeds = {(k, v): s for v, f in zip(variants, (1.0, 3.0, 2.0), strict=True)
              for k, s in [(1, 10 * f), (2, 12 * f), (3, 11 * f)]}  # fmt: skip
    calls = []
    best, _, _ = plan.search(
        _fake_measure(speeds, calls), num_agents=3, cap=3,
        variants=variants, budget_s=100.0,
    )  # fmt: skip
    assert best == plan.LocalPlan(2, "xla", "xla")
    assert len(calls) == 9


def test_search_respects_its_budget(monkeypatch):
    v = ("patches", "xla")
    speeds = {(k, v): float(k) for k in (1, 2, 4, 8, 16, 32, 50)}
    measure, calls = _clocked_measure(monkeypatch, speeds, cost_s=0.05)
    _, _, complete = plan.search(
        measure, num_agents=50, cap=50, variants=(v,), budget_s=0.17
    )
    # three fit (0.10 spent + 0.05 predicted <= 0.17), a fourth would not
    assert len(calls) == 3 and not complete
    calls.clear()
    plan.search(measure, num_agents=50, cap=50, variants=(v,), budget_s=0.0)
    # sequential is timed whatever the budget
    assert calls == [(1, v)]


def test_search_retimes_the_near_best_interleaved():
    """Candidates within 2x of the fastest are timed again in interleaved
    rounds and the best of all their timings decides; the others are not."""
    v = ("patches", "xla")
    first = {1: 100.0, 2: 95.0, 4: 45.0, 8: 40.0, 16: 30.0}
    again = {1: [90.0, 91.0, 92.0], 2: [120.0, 99.0, 98.0], 4: [500.0] * 3}
    order = []

    def measure(k, impl, floor=0.0):
        it = iter(again.get(k, []))

        def retime():
            order.append(k)
            return next(it)

        return {"plan": plan.LocalPlan(k if k < 16 else 0).name,
                "conv_impl": impl[0], "matmul_impl": impl[1], "agents": k,
                "steps": 1, "compile_s": 0.0, "run_s": 1.0,
                "agent_steps_per_s": first[k], "_retime": retime}  # fmt: skip

    best, table, _ = plan.search(
        measure, num_agents=16, cap=16, variants=(v,), budget_s=100.0
    )
    assert best == plan.LocalPlan(2, "patches", "xla")
    assert order == [1, 2, 2, 1, 1, 2]  # rotated each round; 4 never re-timed
    rec = {r["plan"]: r for r in table}
    assert rec["block:2"]["agent_steps_per_s"] == 120.0
    assert rec["block:2"]["first_agent_steps_per_s"] == 95.0
    assert rec["sequential"]["agent_steps_per_s"] == 100.0
    assert rec["sequential"]["retimed"] == 3 and "retimed" not in rec["block:4"]
    assert all(not k.startswith("_") for r in table for k in r)


def test_run_records_the_plan_and_reuses_the_cache(tmp_path, monkeypatch):
    """A run long enough to search measures candidates, writes the plan and
    its table as timing.jsonl's first record, and caches it; the next run with
    the same shapes takes the plan from the cache without measuring."""
    monkeypatch.setattr(plan, "SEARCH_FRACTION", 1e6)  # search whatever it costs
    calls = []
    real = plan.measure_local

    def counting(*a, **k):
        calls.append(k["block_size"])
        return real(*a, **k)

    monkeypatch.setattr(plan, "measure_local", counting)
    a = train.run(tiny_config(num_agents=3, eval_batch=8, matmul_impl="xla"),
                  str(tmp_path / "a"))  # fmt: skip
    first = json.loads((tmp_path / "a" / "timing.jsonl").read_text().splitlines()[0])
    assert first["round"] == -1 and first["plan_source"] == "measured"
    assert first["local_plan"] == a["local_plan"]["plan"]
    names = [r["plan"] for r in first["plan_table"]]
    assert names[:2] == ["sequential", "all"] and len(calls) == len(names)
    best = max(first["plan_table"], key=lambda r: r["agent_steps_per_s"])["plan"]
    assert first["local_plan"] == best
    calls.clear()
    b = train.run(tiny_config(num_agents=3, eval_batch=8, matmul_impl="xla"),
                  str(tmp_path / "b"))  # fmt: skip
    assert calls == [] and b["local_plan"]["source"] == "cache"
    assert b["local_plan"]["plan"] == a["local_plan"]["plan"]


def test_short_run_skips_the_search(tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "SEARCH_FRACTION", 0.0)
    monkeypatch.setattr(plan, "measure_local", None)  # must not be called
    r = train.run(tiny_config(), str(tmp_path))
    assert r["local_plan"]["source"] == "prior" and r["local_plan"]["plan"] == "all"
    assert r["local_plan"]["matmul_impl"] == "xla"


def test_search_budget_counts_every_replica(tmp_path, monkeypatch):
    """R replicas train R populations: the local and evaluation searches may
    spend R times one population's share (10% of the estimated time)."""
    from demjax import memory

    probe = {"compile_s": 1e6, "run_s": 1.0, "bytes": 0}
    monkeypatch.setattr(memory, "memory_cap", lambda *a, **k: (6, dict(probe)))
    monkeypatch.setattr(plan, "measure_local", None)  # too short: no search
    got = {}
    part = data.make_split(tiny_config()).partition
    for reps in (1, 3):
        c = tiny_config(num_replicas=reps, eval_batch=8)
        config_lib.validate(c)
        got[reps] = train.build(c, part)[1].plan_info  # plan chosen, nothing run
        assert got[reps]["source"] == "prior"
    assert got[1]["budget_s"] > 1.0
    np.testing.assert_allclose(got[3]["budget_s"], 3 * got[1]["budget_s"], rtol=1e-3)


@pytest.mark.parametrize("algorithm", ["demlearn_p", "ditto"])
def test_explicit_plans_give_the_same_run(algorithm, tmp_path):
    """A tree algorithm and a plug-in: all and sequential give the same metrics
    to float tolerance, and each run reports its plan (blocks: test_memory)."""
    runs = {}
    for p in ("all", "sequential"):
        runs[p] = train.run(
            tiny_config(algorithm=algorithm, local_plan=p, matmul_impl="xla"),
            str(tmp_path / p.replace(":", "_")),
        )
        assert runs[p]["local_plan"]["plan"] == p
        assert runs[p]["local_plan"]["source"] == "config"
    for p in ("sequential",):
        for ra, rb in zip(runs["all"]["records"], runs[p]["records"], strict=True):
            for k, v in ra.items():
                if isinstance(v, float):
                    assert rb[k] == pytest.approx(v, abs=2e-5), (p, k)


def test_plan_cache_survives_a_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DEMJAX_CACHE_DIR", str(tmp_path))
    (tmp_path / "plans.json").write_text("{not json")
    assert plan.cache_get("k") is None
    plan.cache_put("k", {"plan": {"block_size": 3, "conv_impl": "xla"}})
    assert plan.cache_get("k")["plan"] == {"block_size": 3, "conv_impl": "xla"}


def test_root_only_sync_evaluation_equals_evaluating_every_agent():
    """When every agent holds the root model, evaluating the root once gives
    the C-SPE / C-GEN / Global of evaluating the A copies."""
    from demjax import data, engine
    from demjax.algorithms import hierarchical

    c = tiny_config(algorithm="fedavg", num_agents=5, eval_samples=40)
    config_lib.validate(c)
    part = jax.tree.map(jnp.asarray, data.make_partition(c))
    sim = hierarchical.simulator(c, part)
    state = sim.init(jax.random.PRNGKey(3), part)
    root = jax.tree.map(
        lambda p: p[-1] + 0.3 * jax.random.normal(jax.random.PRNGKey(5), p[-1].shape),
        state.node_params,
    )
    nodes = jax.tree.map(lambda p: p[None], root)
    agents = jax.tree.map(lambda p: jnp.broadcast_to(p, (5,) + p.shape), root)
    tree = engine.placeholder_tree(5, sim.level_sizes)
    x_gen, y_gen = part.x_all[:40], part.y_all[:40]
    full = sim.evaluate(agents, nodes, jnp.ones((1,)), jax.tree.map(jnp.asarray, tree),
                        part, x_gen, y_gen)  # fmt: skip
    once = sim.evaluate_root(nodes, part, x_gen, y_gen)
    for k in ("c_spe", "c_gen", "global_acc"):
        assert float(once[k]) == pytest.approx(float(full[k]), abs=1e-6), k
    assert 0.0 < float(once["c_gen"]) < 1.0


def test_eval_plan_search_and_cache(tmp_path, monkeypatch):
    """eval_batch=0 on a run long enough measures candidate batches, records
    them, and the next run reads the cache; eval_batch > 0 is taken as given."""
    monkeypatch.setattr(plan, "SEARCH_FRACTION", 1e6)
    monkeypatch.setattr(plan, "EVAL_BATCHES", (1, 2))
    fixed = dict(num_agents=3, local_plan="all", matmul_impl="xla")
    a = train.run(tiny_config(**fixed), str(tmp_path / "a"))
    ev = a["local_plan"]["eval"]
    assert ev["source"] == "measured"
    assert [r["eval_batch"] for r in ev["table"]] == [1, 2]
    best = max(ev["table"], key=lambda r: r["models_per_s"])["eval_batch"]
    assert ev["eval_batch"] == best
    b = train.run(tiny_config(**fixed), str(tmp_path / "b"))
    assert b["local_plan"]["eval"]["source"] == "cache"
    c = train.run(tiny_config(**fixed, eval_batch=2), str(tmp_path / "c"))
    assert c["local_plan"]["eval"] == {"eval_batch": 2, "conv_impl": "xla",
                                       "source": "config"}  # fmt: skip
    for ra, rc in zip(a["records"], c["records"], strict=True):
        assert ra == rc


def test_contended_searches_are_used_but_not_cached(tmp_path, monkeypatch):
    """A search during which other work took more than OUTSIDE_LOAD_MAX of the
    machine's CPU time is used, recorded with its outside load, and not cached:
    the next run measures again."""
    monkeypatch.setattr(plan, "SEARCH_FRACTION", 1e6)
    monkeypatch.setattr(plan, "EVAL_BATCHES", (1, 2))
    monkeypatch.setattr(plan.CpuMeter, "outside_share", lambda self: 0.6)
    cfg = dict(num_agents=3, matmul_impl="xla")
    a = train.run(tiny_config(**cfg), str(tmp_path / "a"))
    assert a["local_plan"]["source"] == "measured"
    assert a["local_plan"]["outside_load"] == 0.6
    assert a["local_plan"]["eval"]["outside_load"] == 0.6
    first = json.loads((tmp_path / "a" / "timing.jsonl").read_text().splitlines()[0])
    assert first["plan_outside_load"] == 0.6 == first["eval_plan_outside_load"]
    b = train.run(tiny_config(**cfg), str(tmp_path / "b"))
    assert b["local_plan"]["source"] == "measured"
    assert b["local_plan"]["eval"]["source"] == "measured"
    # At the threshold, or unmeasured, a choice is cached (the uncontended runs
    # of test_run_records_the_plan_and_reuses_the_cache read it back).
    assert plan._cacheable("local plan", plan.OUTSIDE_LOAD_MAX, "all")
    assert plan._cacheable("local plan", None, "all")
    assert not plan._cacheable("local plan", plan.OUTSIDE_LOAD_MAX + 0.01, "all")


def test_cpu_meter_sees_a_busy_process(monkeypatch):
    """CpuMeter against hand-made /proc/stat samples: (busy - own) / total, and
    None without /proc/stat."""
    monkeypatch.undo()  # the real outside_share (the fixture's stub removed)
    samples = iter([(1.0, 10.0, 40.0), (3.0, 22.0, 60.0)])
    monkeypatch.setattr(plan, "_cpu_sample", lambda: next(samples))
    meter = plan.CpuMeter()
    # own 2 s, machine busy 12 s of 20 s: others took 10 / 20.
    assert meter.outside_share() == pytest.approx(0.5)
    monkeypatch.setattr(plan, "_cpu_sample", lambda: None)
    assert plan.CpuMeter().outside_share() is None
    monkeypatch.undo()
    # The real counters: own time counted, the share in [0, 1].
    sample = plan._cpu_sample()
    if sample is None:
        pytest.skip("no /proc/stat")
    own, busy, total = sample
    assert 0.0 <= own and 0.0 < busy <= total


def test_candidates_are_timed_on_enough_agents_after_a_warm_up():
    """measure_local times whole blocks of at least min_agents agents (at most
    A), all agents for the 'all' plan, and never from the first (cold) call."""
    calls = []

    def make_trainer(block, conv, matmul, n_train, epochs=1):
        def train(keys, params, opt, xs, ys, ns, anchor, mu):
            calls.append(xs.shape[0])
            return params

        return train

    x = np.zeros((5, 4, 3), np.float32)
    y = np.zeros((5, 4), np.int32)
    common = dict(
        make_trainer=make_trainer, init_params=lambda impl: {"w": jnp.ones(3)},
        tx=optax.sgd(0.1), x=x, y=y, conv_impl="patches", batch_size=2, steps=2,
        mu=0.0,
    )  # fmt: skip
    got = {}
    for block, min_agents, num_agents in [
        (4, 20, 100),
        (3, 20, 100),
        (1, 8, 100),
        (2, 1, 100),
        (4, 20, 10),
        (0, 50, 30),
    ]:
        rec = plan.measure_local(
            **common, block_size=block, num_agents=num_agents, min_agents=min_agents
        )
        got[(block, min_agents, num_agents)] = rec["agents"]
    assert got == {
        (4, 20, 100): 20, (3, 20, 100): 21, (1, 8, 100): 8, (2, 1, 100): 8,
        (4, 20, 10): 10, (0, 50, 30): 30,
    }  # fmt: skip
    assert len(calls) == len(got)  # one trace per candidate


def test_timings_at_scale_take_the_runs_own_shape():
    """With ``samples``, measure_local trains every agent on that many rows for
    ``epochs`` epochs (the run's shape), not on steps x batch rows for one
    epoch; steps that do not match that shape are refused."""
    shapes = []

    def make_trainer(block, conv, matmul, n_train, epochs=1):
        def train(keys, params, opt, xs, ys, ns, anchor, mu):
            shapes.append((xs.shape[:2], int(n_train[0]), epochs))
            return params

        return train

    common = dict(
        make_trainer=make_trainer, init_params=lambda impl: {"w": jnp.ones(3)},
        tx=optax.sgd(0.1), x=np.zeros((5, 7, 3), np.float32),
        y=np.zeros((5, 7), np.int32), conv_impl="patches", batch_size=2, mu=0.0,
        block_size=4, num_agents=8, min_agents=8,
    )  # fmt: skip
    rec = plan.measure_local(**common, steps=6, samples=5, epochs=2)
    assert shapes[-1] == ((8, 5), 5, 2) and rec["steps"] == 6
    plan.measure_local(**common, steps=4)  # exploration: 4 x 2 rows, one epoch
    assert shapes[-1] == ((8, 8), 8, 1)
    with pytest.raises(ValueError, match="steps=8 is not epochs"):
        plan.measure_local(**common, steps=8, samples=5, epochs=2)  # 2 x 3 != 8


def test_run_time_ignores_the_cold_first_call():
    """A program whose first call is slow (allocation, page faults) is timed on
    the warm calls: the cold call neither counts nor triggers the early exit."""
    import time

    durations = iter([0.04] + [0.01] * 50)

    def program():
        time.sleep(next(durations))
        return jnp.zeros(())

    # floor: 100 units/s; the cold call alone (1 unit / 0.04 s = 25/s) would be
    # below half of it and end the timing there.
    got = plan._run_time(program, (), units=1.0, floor=100.0, min_total_s=0.05)
    assert 0.009 <= got < 0.035


def test_run_time_stops_after_a_hopeless_warm_up():
    """A candidate whose warm-up call already runs below ``HOPELESS_BELOW`` of
    the best speed is not called again (lax.conv on a CPU where im2col is 10x
    faster: seconds per call); one just above it is timed on warm calls."""
    import time

    calls = []

    def program(cold_s):
        def run():
            time.sleep(cold_s if not calls else 0.005)
            calls.append(1)
            return jnp.zeros(())

        return run

    # floor 100 units/s: 1 unit in 0.2 s is 5/s, 0.05 of the floor (< 0.125)
    got = plan._run_time(program(0.2), (), units=1.0, floor=100.0, min_total_s=0.0)
    assert len(calls) == 1 and 0.19 <= got < 0.5
    calls.clear()
    # 1 unit in 0.06 s is 16.7/s, 0.167 of the floor: timed again (warm 5 ms)
    got = plan._run_time(program(0.06), (), units=1.0, floor=100.0, min_total_s=0.0)
    assert len(calls) >= 3 and got < 0.03


def test_retiming_fits_the_budget_left():
    """The near-best candidates are re-timed only as far as the budget left
    pays for (``RETIME_ROUNDS`` x ``retime_cost_s`` each): the slowest are
    dropped first, and with fewer than two left nothing is re-timed."""
    order = []

    def rec(k, speed, run_s):
        return {"plan": f"block:{k}", "agent_steps_per_s": speed, "run_s": run_s,
                "_retime": lambda: (order.append(k), speed)[1]}  # fmt: skip

    def recs():
        return [rec(1, 100.0, 1.0), rec(2, 90.0, 1.0), rec(4, 80.0, 1.0)]

    # 3 rounds x 2 s per candidate: all three cost 18 s, two 12 s
    plan._retime_near_best(recs(), budget_s=18.0)
    assert sorted(order) == [1, 1, 1, 2, 2, 2, 4, 4, 4]
    order.clear()
    plan._retime_near_best(recs(), budget_s=17.0)
    assert sorted(order) == [1, 1, 1, 2, 2, 2]
    order.clear()
    plan._retime_near_best(recs(), budget_s=11.0)
    assert order == []


def test_finalists_are_timed_again_at_scale_when_the_budget_pays(monkeypatch):
    """On a small population block:8 wins; on 128 agents at the run's own 20
    steps block:32 does (weights and data fall out of cache). The fastest
    candidate and the next two larger block sizes of its series are timed
    again on one equal, larger population and the choice is made on those
    timings; with data too large the search keeps its small-population
    choice; a budget that pays for only some of the timings at scale leaves
    the search incomplete, and the run resuming it times the rest."""
    v = ("patches", "xla")
    small = {1: 50.0, 2: 60.0, 4: 70.0, 8: 100.0, 16: 65.0, 32: 90.0, 64: 40.0}
    large = {8: 80.0, 16: 85.0, 32: 95.0, 64: 70.0}
    calls = []

    def measure(k, impl, floor=0.0):
        agents = max(8, 2 * k)
        calls.append(("explore", k, agents))
        return {"plan": plan.LocalPlan(k if k < 1000 else 0).name,
                "conv_impl": impl[0], "matmul_impl": impl[1], "agents": agents,
                "steps": 8, "compile_s": 0.0, "run_s": 0.01,
                "agent_steps_per_s": small.get(k, 10.0)}  # fmt: skip

    now = [0.0]  # a fake clock: a timing at scale costs what the model predicts
    monkeypatch.setattr(
        plan, "time", types.SimpleNamespace(perf_counter=lambda: now[0])
    )

    def at_scale(k, impl, agents, floor=0.0):
        calls.append(("scale", k, agents))
        now[0] += 4 * agents * 20 / small[k]
        return {"plan": plan.LocalPlan(k).name, "conv_impl": impl[0],
                "matmul_impl": impl[1], "agents": agents, "steps": 20,
                "compile_s": 0.0, "run_s": 0.01,
                "agent_steps_per_s": large[k]}  # fmt: skip

    def run(budget_s, max_agents=10_000, prior=None):
        calls.clear()
        now[0] = 0.0
        return plan.search(
            measure, num_agents=1000, cap=1000, variants=(v,), budget_s=budget_s,
            at_scale=at_scale, scale_steps=20, scale_max_agents=max_agents,
            prior=prior,
        )  # fmt: skip

    best, table, complete = run(1e6)
    assert complete and best == plan.LocalPlan(32, "patches", "xla")
    # finalists: block:8 (fastest), block:16 and block:32 (2x and 4x; block:4
    # at 70 is not one); largest population 64 agents -> 128, a multiple of 32;
    # the largest of them, block:32, wins at scale: block:64 (two blocks of 128
    # agents) is timed too, and loses
    scaled = [c for c in calls if c[0] == "scale"]
    assert scaled == [("scale", 8, 128), ("scale", 32, 128), ("scale", 16, 128),
                      ("scale", 64, 128)]  # fmt: skip
    rows = [r for r in table if r.get("at_scale")]
    assert [(r["plan"], r["agents"], r["steps"]) for r in rows] == [
        ("block:8", 128, 20), ("block:32", 128, 20), ("block:16", 128, 20),
        ("block:64", 128, 20)]  # fmt: skip
    assert all(not k.startswith("_") for r in table for k in r)
    # Data limit: at most 100 agents -> 128 does not fit; 96 (a multiple of 32,
    # larger than the 64 block:32 was timed on) does (and holds no two blocks
    # of 64).
    best, _, complete = run(1e6, max_agents=100)
    assert complete and best == plan.LocalPlan(32, "patches", "xla")
    assert [c for c in calls if c[0] == "scale"] == [
        ("scale", 8, 96), ("scale", 32, 96), ("scale", 16, 96)]  # fmt: skip
    # At most 60 agents: no larger population than 64 fits, the
    # small-population choice stands.
    best, _, complete = run(1e6, max_agents=60)
    assert complete and best == plan.LocalPlan(8, "patches", "xla")
    assert not [c for c in calls if c[0] == "scale"]
    # Budget: each finalist costs TIME_S (0 here) + 4 calls of 128 x 20
    # agent-steps at its first speed: block:8 102.4 s, block:32 113.8 s,
    # block:16 157.5 s; block:64 at block:32's speed at scale, 107.8 s. 250 s
    # (the exploration is free here) pay for two: the search is cut with its
    # small-population choice; a run resuming it times block:16 at scale and
    # is cut before block:64; the next one times block:64 and completes.
    large[32] = 300.0  # faster at scale than any small timing: not compared
    best, _, complete = run(250.0)
    assert not complete and best == plan.LocalPlan(8, "patches", "xla")
    large[32] = 95.0
    best, table, complete = run(250.0)
    assert not complete and best == plan.LocalPlan(8, "patches", "xla")
    assert [c for c in calls if c[0] == "scale"] == [
        ("scale", 8, 128), ("scale", 32, 128)]  # fmt: skip
    best, table, complete = run(250.0, prior=table)
    assert calls == [("scale", 16, 128)]
    assert not complete and best == plan.LocalPlan(8, "patches", "xla")
    best, table, complete = run(250.0, prior=table)
    assert calls == [("scale", 64, 128)]
    assert complete and best == plan.LocalPlan(32, "patches", "xla")
    resumed = [r["plan"] for r in table if r.get("at_scale") and r.get("resumed")]
    assert resumed == ["block:8", "block:32", "block:16"]


def _records(steps, *rows):
    """Search records ``(plan, agents, agent-steps/s)`` timed on ``steps``
    steps with the default kernels."""
    return [
        {"conv_impl": "patches", "matmul_impl": "xla", "steps": steps, "plan": p,
         "agents": a, "agent_steps_per_s": v}
        for p, a, v in rows
    ]  # fmt: skip


def test_a_finalist_on_the_whole_population_is_timed_at_the_runs_steps():
    """``all`` was timed on every agent, with the weights out of cache, and
    ranks only fourth: it is a finalist all the same (within WHOLE_WITHIN),
    timed again on its own population at the run's steps; the blocks on A
    agents when twice their population does not fit."""
    recs = _records(8, ("block:8", 40, 69.0), ("block:32", 64, 65.0),
                    ("block:4", 40, 63.0), ("all", 100, 62.0),
                    ("sequential", 37, 30.0))  # fmt: skip
    todo, kept = plan._scale_up(recs, num_agents=100, cap=100, steps=20,
                                max_agents=1000)  # fmt: skip
    # block:16 was not timed; block:4 is smaller than the fastest block
    assert [(r["plan"], m) for r, m in todo] == [
        ("block:8", 100), ("block:32", 100), ("all", 100)]  # fmt: skip
    assert kept == []
    # At the run's steps already: ``all`` stands as it is.
    recs[3]["steps"] = 20
    todo, kept = plan._scale_up(recs, num_agents=100, cap=100, steps=20,
                                max_agents=1000)  # fmt: skip
    assert [r["plan"] for r, _ in todo] == ["block:8", "block:32"]
    assert [r["plan"] for r in kept] == ["all"]
    # Below WHOLE_WITHIN of the fastest it is no finalist.
    recs[3] |= {"steps": 8, "agent_steps_per_s": 0.74 * 69.0}
    todo, kept = plan._scale_up(recs, num_agents=100, cap=100, steps=20,
                                max_agents=1000)  # fmt: skip
    assert [r["plan"] for r, _ in todo] == ["block:8", "block:32"]
    assert kept == []


def test_candidates_at_scale_already_are_not_timed_again():
    """A finalist timed on every agent (``all``) or in blocks of ``cap``, at
    the run's steps, is at scale already: it is kept, only the small ones are
    timed again."""
    recs = _records(4, ("block:8", 16, 100.0), ("block:16", 32, 95.0),
                    ("all", 64, 90.0), ("block:32", 64, 85.0))  # fmt: skip
    todo, kept = plan._scale_up(recs, num_agents=64, cap=32, steps=4,
                                max_agents=1000)  # fmt: skip
    # 2 x 32 = 64 = A
    assert [(r["plan"], m) for r, m in todo] == [("block:8", 64), ("block:16", 64)]
    assert [r["plan"] for r in kept] == ["block:32", "all"]
    assert plan._scale_up(recs[2:3], num_agents=64, cap=32, steps=4,
                          max_agents=1000) is None  # fmt: skip


def test_a_slower_kernel_variant_stops_after_two_sizes():
    """A further variant's block series counts from the best of every series:
    staying more than 15% below it, it stops after two sizes, where its own
    best alone would have let it run on."""
    a, b = ("patches", "xla"), ("patches", "wgrad_t")
    speeds = {(k, a): s for k, s in
              [(1, 50), (2, 60), (4, 80), (8, 100), (16, 90), (32, 70), (64, 60),
               (100, 40)]}  # fmt: skip
    speeds |= {(k, b): s for k, s in
               [(1, 45), (2, 50), (4, 55), (8, 60), (16, 58), (32, 57)]}  # fmt: skip
    calls = []
    best, _, _ = plan.search(
        _fake_measure(speeds, calls), num_agents=100, cap=100, variants=(a, b),
        budget_s=100.0,
    )  # fmt: skip
    assert best == plan.LocalPlan(8, *a)
    assert [k for k, v in calls if v == b] == [1, 2, 4]


def test_a_search_cut_by_its_budget_is_resumed_until_complete(monkeypatch):
    """Each search gets a budget of 2.5 candidates (1 s each on a fake clock):
    the first is cut after three, the next ones take the stored timings as
    they are (no new measurement) and time the following candidates, until the
    search completes with the choice an unlimited search makes."""
    v = ("patches", "xla")
    speeds = {(k, v): s for k, s in
              [(1, 10), (2, 30), (4, 60), (8, 70), (16, 50), (32, 20), (50, 40)]}  # fmt: skip
    measure, calls = _clocked_measure(monkeypatch, speeds, cost_s=1.0)
    full, _, complete = plan.search(
        measure, num_agents=50, cap=50, variants=(v,), budget_s=1e9
    )
    assert complete and full == plan.LocalPlan(8, *v)
    everything = list(calls)  # sequential, all, 2, 4, 8, 16, 32
    calls.clear()
    table, runs, best = None, [], None
    for _ in range(5):
        best, table, complete = plan.search(
            measure, num_agents=50, cap=50, variants=(v,), budget_s=2.5,
            prior=table,
        )  # fmt: skip
        runs.append((list(calls), complete, best.name))
        calls.clear()
        if complete:
            break
    # 2 candidates fit a 2.5 s budget (1 s spent + 1 s predicted <= 2.5), a
    # third would not; a resumed search times the candidates after the stored.
    assert runs == [
        ([(1, v), (50, v)], False, "all"),
        ([(2, v), (4, v)], False, "block:4"),
        ([(8, v), (16, v)], False, "block:8"),
        ([(32, v)], True, "block:8"),  # 16 and 32 slower by > 15%: the end
    ]  # fmt: skip
    assert [c for r in runs for c in r[0]] == everything  # each timed once
    assert best == full
    by_plan = {r["plan"]: r for r in table}
    assert by_plan["sequential"]["resumed"] and by_plan["block:4"]["resumed"]
    assert not by_plan["block:32"].get("resumed")
    assert by_plan["block:2"]["agent_steps_per_s"] == 30


def test_an_incomplete_search_is_cached_and_resumed_by_the_next_run(
    tmp_path, monkeypatch
):
    """resolve() caches a search its budget cut with ``complete: False``; the
    next run with the same key resumes it (``source='resumed'``, candidates
    timed before are not timed again) and, once it is complete, later runs
    read the cache without measuring."""
    now = [0.0]
    monkeypatch.setattr(
        plan, "time", types.SimpleNamespace(perf_counter=lambda: now[0])
    )
    speeds = {1: 100.0, 8: 120.0, 2: 150.0, 4: 250.0}
    timed = []

    def fake_measure_local(*a, block_size, conv_impl, matmul_impl, num_agents,
                           steps, **k):  # fmt: skip
        now[0] += 1.0
        timed.append(block_size)
        return {"plan": plan.LocalPlan(block_size).name, "conv_impl": conv_impl,
                "matmul_impl": matmul_impl, "agents": 8, "steps": steps,
                "compile_s": 0.5, "run_s": 0.01,
                "agent_steps_per_s": speeds[block_size or num_agents]}  # fmt: skip

    monkeypatch.setattr(plan, "measure_local", fake_measure_local)
    config = types.SimpleNamespace(
        local_plan="auto", conv_impl="patches", matmul_impl="xla", batch_size=2,
        local_epochs=1, num_rounds=10, local_buckets=1,
    )  # fmt: skip
    n_train = np.full(8, 4)  # 2 steps per agent per round: 160 agent-steps
    x = np.zeros((8, 4, 3), np.float32)
    y = np.zeros((8, 4), np.int32)

    def resolve():
        timed.clear()
        # budget = 0.1 x 160 agent-steps x 0.15 s = 2.4 s: two candidates
        return plan.resolve(
            config, num_agents=8, cap=8,
            probe={"compile_s": 0.01, "run_s": 0.15}, has_conv=False,
            make_trainer=None, init_params=None, tx=None, mu=0.0, x=x, y=y,
            n_train=n_train, key_fields={"model": "fake"},
        )  # fmt: skip

    p1, info1 = resolve()
    assert timed == [1, 0] and info1["source"] == "measured"
    assert info1["complete"] is False and info1["search_runs"] == 1 and p1.name == "all"
    p2, info2 = resolve()
    assert timed == [2, 4] and info2["source"] == "resumed"
    # 1, 2, 4 and 8 = A (all) are every candidate: the search is complete
    assert info2["complete"] is True and info2["search_runs"] == 2
    assert [r.get("resumed", False) for r in info2["table"]] == [True, True, False,
                                                                 False]  # fmt: skip
    assert p2.name == "block:4"
    p3, info3 = resolve()
    assert timed == [] and info3["source"] == "cache" and p3 == p2


def test_a_hopeless_kernel_variant_gets_no_block_series():
    """A further variant whose ``sequential`` ran below HOPELESS_BELOW of the
    best (``lax.conv`` where im2col runs 10x faster) is not timed in blocks;
    one just above it is."""
    a, b = ("patches", "xla"), ("xla", "xla")
    speeds = {(k, a): s for k, s in [(1, 100), (2, 120), (4, 110), (8, 90),
                                     (16, 80), (32, 60)]}  # fmt: skip
    for seq_b, blocks_timed in [(14.0, []), (16.0, [2, 4])]:  # best 120: 15
        speeds |= {(1, b): seq_b, (2, b): 10.0, (4, b): 9.0, (8, b): 8.0}
        calls = []
        best, _, complete = plan.search(
            _fake_measure(speeds, calls), num_agents=32, cap=32, variants=(a, b),
            budget_s=100.0,
        )  # fmt: skip
        assert best == plan.LocalPlan(2, *a) and complete
        assert [k for k, v in calls if v == b and k > 1] == blocks_timed


def test_the_log_and_timing_record_say_when_the_search_resumes(caplog):
    """An incomplete search is announced in the log (the next run resumes it)
    and recorded in timing.jsonl's plan record; records from an earlier run
    and timings at scale are marked in the log's table."""
    import logging

    from demjax import run_output

    table = _records(8, ("sequential", 8, 10.0), ("block:2", 8, 12.0))
    table[0]["resumed"] = True
    table[1] |= {"compile_s": 0.5, "at_scale": True}
    table[0]["compile_s"] = 0.4
    info = {"plan": "block:2", "conv_impl": "patches", "matmul_impl": "xla",
            "source": "resumed", "cap": 8, "table": table, "complete": False,
            "search_runs": 3, "search_s": 2.5,
            "eval": {"eval_batch": 4, "conv_impl": "patches", "source": "prior"}}  # fmt: skip
    with caplog.at_level(logging.INFO):
        run_output.log_plan(info)
    text = caplog.text
    assert "next run of this workload resumes it (search run 3)" in text
    assert "from an earlier run" in text and "at scale" in text
    rec = run_output.plan_record(info)
    assert rec["plan_source"] == "resumed"
    assert rec["plan_search_complete"] is False and rec["plan_search_runs"] == 3
    info["complete"] = True
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_output.log_plan(info)
    assert "resumes it" not in caplog.text


def test_multi_device_searches_only_shard_mapped_local_training(monkeypatch):
    """Agents sharded over several devices: the engine's local phase runs the
    plan per device under shard_map, so ``auto`` searches as on one device
    (its own cache key); a plug-in's local training (left to XLA's
    partitioner) trains each device's agents at once, untimed."""
    timed = []

    def fake_measure_local(*a, block_size, conv_impl, matmul_impl, num_agents,
                           steps, **k):  # fmt: skip
        timed.append(block_size)
        return {"plan": plan.LocalPlan(block_size).name, "conv_impl": conv_impl,
                "matmul_impl": matmul_impl, "agents": 8, "steps": steps,
                "compile_s": 0.5, "run_s": 0.01,
                "agent_steps_per_s": {1: 300.0}.get(block_size, 100.0)}  # fmt: skip

    monkeypatch.setattr(plan, "measure_local", fake_measure_local)
    config = types.SimpleNamespace(
        local_plan="auto", conv_impl="patches", matmul_impl="xla", batch_size=2,
        local_epochs=1, num_rounds=1000, local_buckets=1, num_replicas=1,
    )  # fmt: skip
    n_train = np.full(8, 4)
    x, y = np.zeros((8, 4, 3), np.float32), np.zeros((8, 4), np.int32)
    out = {}
    for mapped in (False, True):
        timed.clear()
        p, info = plan.resolve(
            config, num_agents=8, cap=8,
            probe={"compile_s": 0.01, "run_s": 0.15}, has_conv=False,
            make_trainer=None, init_params=None, tx=None, mu=0.0, x=x, y=y,
            n_train=n_train, key_fields={"model": f"fake_{mapped}"},
            multi_device=True, shard_mapped=mapped,
        )  # fmt: skip
        out[mapped] = (p.name, info["source"], list(timed))
    assert out[False] == ("all", "multi_device", [])
    name, source, times = out[True]
    assert source == "measured" and times and times[0] == 1 and name == "sequential"


def test_device_choice_without_budget_reads_the_searches():
    """``resolve_devices`` with no budget left for its own timings decides from
    the two searches' records of their winners (the fastest record of each
    chosen plan), and keeps one device when a search timed nothing."""
    c = base_config(num_rounds=1)
    mesh = types.SimpleNamespace(devices=np.zeros(2))
    n_train = np.full(4, 20)

    def rec(name, speed, matmul="xla"):
        return {"plan": name, "conv_impl": "patches", "matmul_impl": matmul,
                "agents": 4, "steps": 2, "agent_steps_per_s": speed}  # fmt: skip

    seq, all_ = plan.LocalPlan(1, "patches"), plan.LocalPlan(0, "patches")
    one = (all_, {"table": [rec("all", 100.0), rec("sequential", 90.0),
                            rec("all", 120.0)]})  # fmt: skip
    for sharded_speed, chosen in ((150.0, 2), (110.0, 1)):
        sharded = (seq, {"table": [rec("sequential", sharded_speed),
                                   rec("sequential", 500.0, "wgrad_t")]})  # fmt: skip
        got, info = plan.resolve_devices(
            c, mesh=mesh, one=one, sharded=sharded, num_agents=4,
            probe={"compile_s": 1e6, "run_s": 1e-3}, make_trainer=None,
            init_params=None, tx=None, mu=0.0, x=None, y=None, n_train=n_train,
            key_fields={"test": sharded_speed},
        )  # fmt: skip
        dev = info["devices"]
        assert dev["source"] == "searches" and dev["chosen"] == chosen
        assert [r["agent_steps_per_s"] for r in dev["table"]] == [120.0, sharded_speed]
        assert [r["devices"] for r in dev["table"]] == [1, 2]
        assert got == (seq if chosen == 2 else all_)
    # A search that timed nothing (too short a run): one device.
    got, info = plan.resolve_devices(
        c, mesh=mesh, one=(all_, {"table": []}), sharded=sharded, num_agents=4,
        probe={"compile_s": 1e6, "run_s": 1e-3}, make_trainer=None,
        init_params=None, tx=None, mu=0.0, x=None, y=None, n_train=n_train,
        key_fields={"test": "prior"},
    )  # fmt: skip
    assert info["devices"]["source"] == "prior" and info["devices"]["chosen"] == 1
    assert got == all_
