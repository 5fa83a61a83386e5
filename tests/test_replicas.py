"""Replicas in one program (``config.num_replicas``): a run with R replicas
equals R one-replica runs with seeds ``seed + r`` (docs/running.md)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import tiny_config, xla_flags

from demjax import data, memory, train
from demjax.errors import ConfigError
from demjax.run_output import read_jsonl, replica_summary

R = 3
SEED = 4
# Host steps in both rounds: DemLearn regroups every round (tau 1), CFL may
# split from round 0 (criteria that always hold).
ALGOS = {
    "fedavg": {},
    "demlearn": {"tau": 1},
    "ditto": {},
    "cfl": {"cfl.warmup": 0, "cfl.eps1": 1e6, "cfl.eps2": 1e-6},
}


def config(algo: str, **kw):
    """A tiny digits config of ``algo`` (keywords set fields)."""
    fields = dict(checkpoint_every=0, local_buckets=1, **ALGOS[algo])
    fields.update(kw)
    return tiny_config(num_agents=6, algorithm=algo, **fields)


@functools.cache
def replicated(algo: str, tmp: str) -> tuple[dict, str]:
    workdir = os.path.join(tmp, f"{algo}_r{R}")
    return train.run(config(algo, seed=SEED, num_replicas=R), workdir), workdir


@functools.cache
def reference(algo: str, r: int, tmp: str) -> list[dict]:
    """A one-replica run with seed SEED + r on the split of SEED."""
    split = data.make_split(config(algo, seed=SEED))
    c = config(algo, seed=SEED + r, partition="arrays")
    out = train.run(c, os.path.join(tmp, f"{algo}_ref{r}"), partition=split)
    return out["records"]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("replicas"))


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert [(r["round"], r["point"]) for r in got] == [
        (r["round"], r["point"]) for r in want
    ]
    for g, w in zip(got, want, strict=True):
        assert set(g) - {"replica"} == set(w) - {"replica"}
        for k in w:
            if not isinstance(w[k], float):
                assert g[k] == w[k], (k, g, w)
            else:
                np.testing.assert_allclose(g[k], w[k], atol=2e-4, err_msg=k)


@pytest.mark.parametrize(
    "algo",
    # fedavg always; the others (host steps, two models) as slow tests.
    [a if a == "fedavg" else pytest.param(a, marks=pytest.mark.slow(seconds=10))
     for a in ALGOS],
)  # fmt: skip
def test_replicas_equal_one_replica_runs(algo, tmp):
    out, workdir = replicated(algo, tmp)
    recs = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert recs == out["records"]
    assert sorted({r["replica"] for r in recs}) == list(range(R))
    assert os.path.exists(os.path.join(workdir, "replicas.json"))
    for r in range(R):
        assert_same([x for x in recs if x["replica"] == r], reference(algo, r, tmp))
    # One compiled program per phase for the three replicas.
    # (evaluate_root: DemLearn evaluates no root-only round.)
    comp = out["compilations"]
    assert {v for k, v in comp.items() if k != "evaluate_root"} == {1}, comp
    assert comp.get("evaluate_root", 1) <= 1
    # The replicas differ (their seeds do): not three copies of one run.
    finals = [x["c_spe"] for x in recs if x["round"] == 1 and x["point"] == "sync"]
    assert len(set(finals)) > 1 or algo == "cfl"


@pytest.mark.parametrize(
    "algo,plan,mode",
    [("fedavg", "sequential", "one_at_a_time"),
     pytest.param("fedavg", "sequential", "vmap", marks=pytest.mark.slow(seconds=8)),
     pytest.param("demlearn", "block:2", "one_at_a_time",
                  marks=pytest.mark.slow(seconds=10))],
)  # fmt: skip
def test_replica_plans_equal_one_replica_runs(algo, plan, mode, tmp, tmp_path):
    """Replicas one after another (a loop updating the stacked state in place)
    or vmapped: each replica as its own one-replica run (the module's reference
    runs, whose plan trains all agents at once: plans agree to float
    tolerance), one compilation per phase, the mode in timing.jsonl."""
    c = config(algo, seed=SEED, num_replicas=R, local_plan=plan, replica_plan=mode)
    out = train.run(c, str(tmp_path / "r"))
    for r in range(R):
        got = [x for x in out["records"] if x["replica"] == r]
        assert_same(got, reference(algo, r, tmp))
    comp = out["compilations"]
    assert {v for k, v in comp.items() if k != "evaluate_root"} == {1}, comp
    plan_rec = read_jsonl(os.path.join(tmp_path, "r", "timing.jsonl"))[0]
    assert plan_rec["local_plan"] == plan
    assert (plan_rec["replica_plan"], plan_rec["replica_plan_source"]) == (mode, "config")


def test_over_replicas_loop_equals_vmap_and_falls_back():
    """``plan.over_replicas`` on a toy phase (state changed in place, a shared
    and a stacked ``part``): the loop equals vmap and a per-replica Python loop;
    a phase whose output state changes shape falls back to vmap."""
    import jax
    import jax.numpy as jnp

    from demjax import plan

    def phase(state, part, key, t):
        w, n = state
        noise = jax.random.normal(key, w.shape)
        w = w * part["scale"] + noise + t
        return (w, n + 1), {"norm": jnp.linalg.norm(w), "w0": w[0]}

    rng = np.random.default_rng(0)
    state = (jnp.asarray(rng.normal(size=(R, 5, 2)), jnp.float32),
             jnp.arange(R, dtype=jnp.int32))  # fmt: skip
    keys = jax.random.split(jax.random.PRNGKey(1), R)
    for axis, part in ((None, {"scale": jnp.float32(2.0)}),
                       (0, {"scale": jnp.asarray([1.0, 2.0, 3.0], jnp.float32)})):
        loop = jax.jit(plan.over_replicas(phase, axis, True))(state, part, keys, 3)
        vm = jax.jit(plan.over_replicas(phase, axis, False))(state, part, keys, 3)
        for r in range(R):
            mine = part if axis is None else {"scale": part["scale"][r]}
            ref = phase((state[0][r], state[1][r]), mine, keys[r], 3)
            for a, b in zip(jax.tree.leaves(loop), jax.tree.leaves(vm), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-6)
            for a, b in zip(jax.tree.leaves(loop), jax.tree.leaves(ref), strict=True):
                np.testing.assert_allclose(a[r], b, rtol=1e-6)

    def grows(state, part, key, t):
        return state[:, :1], {}

    x = jnp.ones((R, 4, 2))
    out, _ = jax.jit(plan.over_replicas(grows, None, True))(x, None, keys, 0)
    assert out.shape == (R, 4, 1)


def test_replica_plan_choice(monkeypatch, tmp_path):
    """``auto``: all-at-once plans keep vmap without timing; block plans time
    both modes when the budget pays, keep the faster and cache it; no budget:
    vmap; explicit modes and one replica need no timing."""
    from demjax import plan

    monkeypatch.setenv("DEMJAX_CACHE_DIR", str(tmp_path))
    calls = []

    def fake(speeds):
        def measure():
            calls.append(1)
            return [{"replica_plan": m, "agent_steps_per_s": v, "agents": 8,
                     "replicas": R, "steps": 4, "compile_s": 0.1}
                    for m, v in zip(("vmap", "one_at_a_time"), speeds, strict=True)]
        return measure  # fmt: skip

    seq, whole = plan.LocalPlan(1, "patches", "xla"), plan.LocalPlan(0, "patches", "xla")
    kw = dict(key_fields={"model": "t"}, budget_s=10.0)
    c = config("fedavg", num_replicas=R)
    got = plan.resolve_replicas(c, whole, measure=fake((1, 2)), **kw)
    assert (got["mode"], got["source"], calls) == ("vmap", "rule", [])
    got = plan.resolve_replicas(c, seq, measure=fake((100.0, 140.0)), **kw)
    assert (got["mode"], got["source"], len(calls)) == ("one_at_a_time", "measured", 1)
    assert [r["replica_plan"] for r in got["table"]] == ["vmap", "one_at_a_time"]
    got = plan.resolve_replicas(c, seq, measure=fake((200.0, 140.0)), **kw)
    assert (got["mode"], got["source"], len(calls)) == ("one_at_a_time", "cache", 1)
    blk = plan.LocalPlan(4, "patches", "xla")
    got = plan.resolve_replicas(c, blk, measure=fake((200.0, 140.0)), **kw)
    assert (got["mode"], got["source"], len(calls)) == ("vmap", "measured", 2)
    got = plan.resolve_replicas(c, plan.LocalPlan(8, "patches", "xla"),
                                measure=fake((1, 2)), key_fields={}, budget_s=0.0)
    assert (got["mode"], got["source"], len(calls)) == ("vmap", "prior", 2)
    c = config("fedavg", num_replicas=R, replica_plan="one_at_a_time")
    got = plan.resolve_replicas(c, whole, measure=fake((1, 2)), **kw)
    assert (got["mode"], got["source"], len(calls)) == ("one_at_a_time", "config", 2)
    assert plan.resolve_replicas(config("fedavg"), seq, measure=fake((1, 2)), **kw) is None


def test_measure_replicas_times_both_modes():
    """The real timing: both modes compile and run the plan's trainer on R
    replicas of the same population; speeds are positive."""
    from demjax import engine, local, models

    c = config("fedavg", num_replicas=2)
    part = data.make_split(c).partition
    tx = local.make_optimizer("sgd", 0.1)
    model = models.make_model("mlr", part.num_classes, (100,))
    one = models.init_params(__import__("jax").random.PRNGKey(0), model,
                             tuple(part.input_shape))  # fmt: skip

    def make_trainer(block, conv, matmul, n, local_epochs=1):
        return local.make_train_population(
            models.make_apply(model), tx, batch_size=10, local_epochs=local_epochs,
            n_train=n, num_buckets=1, block_size=block)  # fmt: skip

    from demjax import plan

    x = engine._host_rows(part.x_train, 4)
    y = engine._host_rows(part.y_train, 4)
    recs = plan.measure_replicas(
        make_trainer, lambda impl: one, tx, x, y,
        plan=plan.LocalPlan(1, "patches", "xla"), replicas=2, num_agents=6,
        batch_size=10, steps=2, mu=0.0)  # fmt: skip
    assert [r["replica_plan"] for r in recs] == ["vmap", "one_at_a_time"]
    assert all(r["agents"] == 6 and r["replicas"] == 2 and r["steps"] == 2
               and r["agent_steps_per_s"] > 0 for r in recs)  # fmt: skip


def test_replica_files_and_summary(tmp):
    out, workdir = replicated("demlearn", tmp)
    for r in range(R):
        assert os.path.exists(os.path.join(workdir, f"replica_{r}", "tree_final.json"))
    assert not os.path.exists(os.path.join(workdir, "tree_final.json"))
    with open(os.path.join(workdir, "replicas.json")) as f:
        summary = json.load(f)
    assert summary["seeds"] == [SEED + r for r in range(R)]
    assert summary == json.loads(json.dumps(out["replicas"]))
    recs = out["records"]
    for point in ("local", "sync"):
        for k in ("c_spe", "c_gen", "global_acc"):
            s = summary["points"][point][k]
            grid = np.array(
                [
                    [x[k] for x in recs if x["replica"] == r and x["point"] == point]
                    for r in range(R)
                ]
            )
            np.testing.assert_allclose(s["final"]["values"], grid[:, -1])
            np.testing.assert_allclose(s["final"]["mean"], grid[:, -1].mean(), 1e-5)
            np.testing.assert_allclose(
                s["final"]["std"], np.std(grid[:, -1], ddof=1), atol=1e-5
            )
            np.testing.assert_allclose(s["best"]["values"], grid.max(axis=1))
            assert s["best"]["rounds"] == [int(i) for i in grid.argmax(axis=1)]
            assert s["best_of_mean"]["round"] == int(grid.mean(axis=0).argmax())
        assert any(k.startswith("g_spe_l") for k in summary["points"][point])
    # run()'s "final": the mean over replicas of the last round.
    last = [x for x in recs if x["round"] == 1 and x["point"] == "sync"]
    np.testing.assert_allclose(
        out["final"]["sync"]["c_gen"], np.mean([x["c_gen"] for x in last]), 1e-5
    )
    # The returned state: replica axis first, agents second.
    assert out["state"].params["Dense_0"]["kernel"].shape[:2] == (R, 6)


def test_replica_summary_hand_computed():
    recs = []
    values = {0: [0.1, 0.5, 0.3], 1: [0.4, 0.2, 0.2]}
    for r, vals in values.items():
        for t, v in enumerate(vals):
            recs.append({"round": t, "point": "sync", "replica": r, "c_spe": v,
                         "global_acc": None})  # fmt: skip
    s = replica_summary(recs, 2)["points"]["sync"]
    assert "global_acc" not in s
    c = s["c_spe"]
    assert c["final"] == {"round": 2, "mean": 0.25, "std": 0.070711,
                          "values": [0.3, 0.2]}  # fmt: skip
    assert c["best"]["values"] == [0.5, 0.4] and c["best"]["rounds"] == [1, 0]
    assert c["best"]["mean"] == 0.45
    assert c["best_of_mean"] == {"round": 1, "mean": 0.35, "std": 0.212132}
    with pytest.raises(ValueError, match="replica 1 at round 2"):
        replica_summary(recs[:-1], 2)


@pytest.mark.slow(seconds=15)
@pytest.mark.parametrize(
    "algo,partition", [("demlearn", "iid"), ("fedavg", "pathological")]
)
def test_replicate_split_equals_seeded_runs(algo, partition, tmp_path):
    """Each replica its own split: equal to plain runs with seeds seed + r, both
    when the splits give one program (iid: equal sizes, vmapped over stacked
    partitions) and when they do not (pathological: sizes differ; each replica
    runs its own program)."""
    kw = dict(partition=partition, samples_per_agent=40)
    c = config(algo, seed=SEED, num_replicas=2, replicate_split=True, **kw)
    out = train.run(c, str(tmp_path / "r2"))
    for r in range(2):
        ref = train.run(config(algo, seed=SEED + r, **kw), str(tmp_path / f"{r}"))
        got = [x for x in out["records"] if x["replica"] == r]
        assert_same(got, ref["records"])
    assert os.path.exists(tmp_path / "r2" / "replica_1" / "data.json")
    programs = 1 if partition == "iid" else 2
    assert out["compilations"]["local_phase"] == programs


def test_num_replicas_errors(tmp_path):
    for field, bad in [("num_replicas", b) for b in (0, -1, 1.5, True, "2")] + [
        ("replicate_split", 1), ("replica_plan", "serial")
    ]:
        c = config("fedavg")
        with c.ignore_type():
            c[field] = bad
        with pytest.raises(ConfigError, match=f"^{field}=.*accepted: "):
            train.run(c, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a" / "metrics.jsonl")
    # A given partition cannot be split anew per replica.
    c = config("fedavg", num_replicas=2, replicate_split=True, partition="arrays")
    with pytest.raises(ConfigError, match="^replicate_split=True .*accepted: "):
        train.run(c, str(tmp_path / "b"), partition=data.make_split(config("fedavg")))


def test_memory_cap_scales_with_replicas(monkeypatch):
    """The execution plan's memory estimate counts every replica."""
    from demjax import local, models

    seen = []

    def spy(**kw):
        seen.append(kw)
        return 0

    monkeypatch.setattr(memory, "choose_block_size", spy)
    c = config("fedavg")
    part = data.make_split(c).partition
    model = models.make_model("mlr", part.num_classes, (100,))
    tx = local.make_optimizer("sgd", 0.1)
    for reps, rsplit in ((1, False), (3, False), (3, True)):
        c = config("fedavg", num_replicas=reps, replicate_split=rsplit)
        memory.memory_cap(c, part, model, tx, donate=True, num_group_models=2)
    one, three, three_split = seen
    data_bytes = sum(
        int(np.prod(getattr(part, k).shape[1:])) * getattr(part, k).dtype.itemsize
        for k in ("x_train", "y_train", "x_test", "y_test")
    )
    model_bytes = one["state_bytes_per_agent"] - data_bytes
    assert three["state_bytes_per_agent"] == 3 * model_bytes + data_bytes
    assert three_split["state_bytes_per_agent"] == 3 * (model_bytes + data_bytes)
    assert three["step_bytes_per_agent"] == 3 * one["step_bytes_per_agent"]
    assert three["fixed_bytes"] == 3 * one["fixed_bytes"]


@pytest.mark.slow(seconds=10)
def test_resume_replicas_from_checkpoint(tmp):
    """A replicated run stopped after round 0 and resumed from its checkpoint
    writes the records of the run that was never stopped."""
    _, whole = replicated("demlearn", tmp)
    work = os.path.join(tmp, "resumed")
    c = config("demlearn", seed=SEED, num_replicas=R, checkpoint_every=1)
    c.num_rounds = 1
    train.run(c, work)
    c.num_rounds = 2
    out = train.run(c, work)
    assert [x["round"] for x in out["records"]].count(1) == 2 * R
    with (
        open(os.path.join(work, "metrics.jsonl")) as f,
        open(os.path.join(whole, "metrics.jsonl")) as g,
    ):
        assert f.read() == g.read()


SHARDED = r"""
import json, os, sys
sys.path[:0] = [{tests!r}, os.path.dirname({tests!r})]
import jax
from helpers import tiny_config
from demjax import train
assert jax.device_count() == 8, jax.devices()
out = {{}}
for n in (8, 1):
    c = tiny_config(num_agents=8, algorithm="demlearn", tau=1, num_devices=n,
                    num_replicas=2, replicate_split=True, partition="iid",
                    samples_per_agent=40, checkpoint_every=0, local_buckets=1)
    r = train.run(c, f"{{sys.argv[1]}}/{{n}}")
    spec = getattr(r["state"].params["Dense_0"]["kernel"].sharding, "spec", None)
    out[n] = dict(records=r["records"], spread=r["params_devices"],
                  spec=None if spec is None else list(spec), comp=r["compilations"])
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow(seconds=45)  # a subprocess with 8 devices, 2 runs
def test_sharded_replicas_equal_single_device(tmp_path):
    """The replica axis whole, agents (axis 1) split over 8 forced CPU devices;
    stacked per-replica partitions; the same records as on one device."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"))
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED.format(tests=tests), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    sharded, single = out["8"], out["1"]
    assert sharded["spread"] == 8 and single["spread"] == 1
    assert sharded["spec"] == [None, "agents"]
    assert sharded["comp"]["local_phase"] == 1
    assert_same(sharded["records"], single["records"])


def test_benchmark_replica_columns(tmp_path):
    """benchmarks/compare_personalized.py --replicas: mean +/- std columns of the
    final and best rounds, and mean curves."""
    from benchmarks import compare_personalized as cp
    from benchmarks.common import difference, mean_curve, mean_std

    recs = [
        {"round": t, "point": "sync", "replica": r, "c_spe": v, "c_gen": v / 2,
         "global_acc": None}
        for r, vals in enumerate([[0.5, 0.7], [0.9, 0.8]])
        for t, v in enumerate(vals)
    ]  # fmt: skip
    summary = {"seeds": [0, 1], **replica_summary(recs, 2)}
    assert mean_std(summary, "c_spe", "final") == "0.750 +/- 0.071"
    assert mean_std(summary, "c_spe", "best") == "0.800 +/- 0.141"
    assert mean_std(summary, "global_acc", "final") == "-"
    assert mean_curve(recs, "c_gen") == ([0, 1], [0.35, 0.375])
    results = {"runs": {"pathological/ditto": {
        "final": {"c_spe": 0.75, "bytes_up": 1e6, "bytes_down": 3e6},
        "wall_s": 4.0, "num_rounds": 2,
        "per_round": recs, "replicas": summary,
    }}}  # fmt: skip
    cp.report(results, str(tmp_path))
    md = (tmp_path / "compare_personalized.md").read_text()
    row = next(x for x in md.splitlines() if x.startswith("| ditto"))
    assert row == (
        "| ditto | 2 | 0.750 +/- 0.071 | 0.800 +/- 0.141 | 0.375 +/- 0.035 | "
        "0.400 +/- 0.071 | - | - | 1/0 | - | 1.0 / 3.0 | 2.00 | 2 |"
    )
    # ditto's seeds end at 0.7 and 0.8 (std 0.0707). Against a FedAvg ending at
    # 0.70 and 0.72 (std 0.0141): 0.75 - 0.71 = 0.04, two standard errors
    # 2 * sqrt(0.0707^2 / 2 + 0.0141^2 / 2) = 0.102: within the noise.
    fed = [dict(x, c_spe=v) for x, v in zip(recs, [0.5, 0.7, 0.5, 0.72], strict=True)]
    fed_summary = {"seeds": [0, 1], **replica_summary(fed, 2)}
    assert difference(summary, fed_summary, "c_spe") == "+0.040 (within noise)"
    # Against 0.50 and 0.52: 0.24 > 0.102.
    low = [dict(x, c_spe=v) for x, v in zip(recs, [0.5, 0.5, 0.5, 0.52], strict=True)]
    low_summary = {"seeds": [0, 1], **replica_summary(low, 2)}
    assert difference(summary, low_summary, "c_spe") == "+0.240 (beyond noise)"
    assert difference(low_summary, summary, "c_spe") == "-0.240 (beyond noise)"
    assert difference(summary, None, "c_spe") == "-"
    results["runs"]["pathological/fedavg"] = {
        "final": {"c_spe": 0.71}, "wall_s": 2.0, "num_rounds": 2,
        "per_round": fed, "replicas": fed_summary,
    }  # fmt: skip
    cp.report(results, str(tmp_path))
    md = (tmp_path / "compare_personalized.md").read_text()
    row = next(x for x in md.splitlines() if x.startswith("| ditto"))
    assert "| 1/0 | +0.040 (within noise) |" in row
    # A tuned table names each run's chosen point and its validation score.
    tuning = {
        "setup": {"seeds": [0, 1]},
        "grids": {"ditto": {"lr": [0.05, 0.1], "ditto.lam": [0.1]}},
        "points": {"pathological/ditto": [
            {"params": {"lr": 0.05, "ditto.lam": 0.1}, "val_c_spe": 0.61},
            {"params": {"lr": 0.1, "ditto.lam": 0.1}, "val_c_spe": 0.64},
        ]},
        "chosen": {"pathological/ditto": {
            "params": {"lr": 0.1, "ditto.lam": 0.1}, "val_c_spe": 0.64}},
    }  # fmt: skip
    record = cp.tuning_record(tuning, "pathological/ditto")
    assert record["chosen"] == {"lr": 0.1, "ditto.lam": 0.1}
    assert [p["val_c_spe"] for p in record["points"]] == [0.61, 0.64]
    assert record["grid"] == {"lr": [0.05, 0.1], "ditto.lam": [0.1]}
    results["runs"]["pathological/ditto"].update(
        hyperparameters=record["chosen"], tuning=record
    )
    cp.report(results, str(tmp_path))
    md = (tmp_path / "compare_personalized.md").read_text()
    row = next(x for x in md.splitlines() if x.startswith("| ditto"))
    assert row.endswith("| lr=0.1, ditto.lam=0.1 (0.640, best of 2) |")
    row = next(x for x in md.splitlines() if x.startswith("| fedavg"))
    assert row.endswith("| paper defaults |")
    # --tuned without a choice for an algorithm refuses before any run.
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(tuning))
    with pytest.raises(SystemExit, match="no choice for pathological/fedavg"):
        cp.main([
            "--quick", f"--tuned={path}", "--only=fedavg", "--splits=pathological",
            f"--workdir={tmp_path}/w",
        ])  # fmt: skip


def test_tensorboard_series_per_replica(tmp_path):
    from test_checkpoint import tb_scalars

    from demjax.run_output import RunWriter

    writer = RunWriter(str(tmp_path))
    writer.tensorboard()
    for r, v in ((0, 0.25), (1, 0.5)):
        writer.metrics({"round": 3, "point": "sync", "replica": r, "c_spe": v})
    writer.close()
    got = tb_scalars(tmp_path)
    assert set(got) == {"replica_0/sync/c_spe", "replica_1/sync/c_spe"}
    assert got["replica_1/sync/c_spe"] == [(3, 0.5)]
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["round,point,replica,c_spe", "3,sync,0,0.25", "3,sync,1,0.5"]
