"""The agent axis sharded over 8 forced CPU devices equals the one-device run."""

import json
import os
import subprocess
import sys

import pytest
from helpers import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
sys.path.insert(0, {repo!r})
import jax
from configs import default
from demjax import train
assert jax.device_count() == 8, jax.devices()
import jax.numpy as jnp
import numpy as np
from demjax import engine, metrics, models, sharding
out = {{}}
# Local training under shard_map: count the sharded local phases traced.
traced = []
orig = engine._sharded
engine._sharded = lambda *a, **k: traced.append(1) or orig(*a, **k)
runs = [("demlearn_p", "auto"), ("fedavg", "auto"), ("demlearn_p", "sequential"),
        ("demlearn", "block:2")]
for algorithm, plan in runs:
    for n in (8, 1):
        c = default.get_config()
        c.num_agents, c.num_rounds, c.model, c.num_levels = 16, 2, "mlp", 2
        c.hidden, c.progress, c.local_epochs = (16,), False, 1
        c.algorithm, c.num_devices, c.local_plan = algorithm, n, plan
        r = train.run(c, f"{{sys.argv[1]}}/{{algorithm}}_{{plan}}_{{n}}")
        out[f"{{algorithm}}_{{plan}}_{{n}}"] = dict(
            records=r["records"], devices=r["num_devices"], spread=r["params_devices"]
        )
out["sharded_local_phases"] = len(traced)
# Group models split over the devices (5 models: padded to 8) = one device.
model = models.make_model("mlp", 10, (8,))
keys = jax.random.split(jax.random.PRNGKey(0), 5)
ps = jax.vmap(lambda k: models.init_params(k, model, (8, 8, 1)))(keys)
x = jax.random.normal(jax.random.PRNGKey(1), (40, 8, 8, 1))
y = jnp.arange(40) % 10
fn = models.make_apply(model)
mesh = sharding.make_mesh(8, 8)
a = metrics.sharded_correct_matrix(fn, ps, x, y, 2, mesh)
b = metrics.correct_matrix(fn, ps, x, y, 2)
out["correct_shape"] = list(a.shape)
out["correct_equal"] = bool(np.array_equal(np.asarray(a), np.asarray(b)))
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow(seconds=60)  # a subprocess with 8 devices, 8 runs
def test_sharded_run_equals_single_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(repo=REPO), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    for name in ("demlearn_p_auto", "fedavg_auto", "demlearn_p_sequential",
                 "demlearn_block:2"):  # fmt: skip
        sharded, single = out[f"{name}_8"], out[f"{name}_1"]
        assert sharded["devices"] == 8 and sharded["spread"] == 8
        assert single["devices"] == 1 and single["spread"] == 1
        for a, b in zip(sharded["records"], single["records"], strict=True):
            for k, v in a.items():
                if isinstance(v, float):
                    assert v == pytest.approx(b[k], abs=2e-5), (name, k)
    # Every sharded run traced its local phase under shard_map (one per run;
    # the one-device runs never).
    assert out["sharded_local_phases"] == 4
    assert out["correct_shape"] == [5, 40] and out["correct_equal"]


def test_mesh_errors_name_the_field():
    from demjax import sharding
    from demjax.errors import ConfigError

    assert sharding.make_mesh(1, 10) is None
    with pytest.raises(ConfigError, match="num_devices"):
        sharding.make_mesh(64, 10)


def test_cpu_devices_errors_name_the_flag():
    """``--cpu_devices``: negative refused; after JAX started (this process: one
    CPU device) the same count is accepted and another refused, naming the flag."""
    import jax

    from demjax import sharding
    from demjax.errors import ConfigError

    jax.devices()  # the backends are initialized
    have = len(jax.devices("cpu"))
    assert sharding.set_cpu_devices(have) == have
    with pytest.raises(ConfigError, match="--cpu_devices=-1 is not valid"):
        sharding.set_cpu_devices(-1)
    with pytest.raises(ConfigError, match=r"--cpu_devices=.*comes after JAX started"):
        sharding.set_cpu_devices(have + 1)


@pytest.mark.slow(seconds=25)  # two scripts/run.py processes, 2 CPU devices
def test_run_script_cpu_devices(tmp_path):
    """``scripts/run.py --cpu_devices=2 --config.num_devices=2`` shards the
    agents over two CPU devices; by default (one device per core, here the
    forced 2) a run too short to time both sides keeps one device and says
    so in ``timing.jsonl``."""
    from helpers import run_cli_batch

    base = ["--config.num_agents=4", "--config.num_rounds=1", "--config.model=mlr",
            "--config.local_epochs=1", "--quiet"]  # fmt: skip
    got = run_cli_batch(
        {"sharded": ["--cpu_devices=2", "--config.num_devices=2", *base],
         "default": ["--cpu_devices=2", *base]},
        tmp_path, parallel=2,
    )  # fmt: skip
    heads = {}
    for name, r in got.items():
        assert r.returncode == 0, r.stderr[-3000:]
        with open(r.workdir / "timing.jsonl") as f:
            heads[name] = json.loads(f.readline())
    assert heads["sharded"]["num_devices"] == 2, heads["sharded"]
    assert heads["sharded"]["device_choice"] is None
    assert heads["default"]["num_devices"] == 1, heads["default"]
    choice = heads["default"]["device_choice"]
    assert choice["chosen"] == 1 and choice["source"] == "prior", choice
    assert "local training on 1 of 2 CPU devices" in got["default"].stderr


DEVICE_CHOICE = r"""
import json, os, sys
sys.path[:0] = [{tests!r}, os.path.dirname({tests!r})]
import jax
assert jax.device_count() == 2, jax.devices()
from helpers import tiny_config
from demjax import data, plan, sharding, train
plan.SEARCH_FRACTION = 1e6  # a long run's budget: both sides are timed
plan.OUTSIDE_LOAD_MAX = 1.0  # cached whatever else runs on the machine
out = {{}}
c = tiny_config(num_agents=8, model="mlp", hidden=(16,), local_plan="sequential",
                matmul_impl="xla")
split = data.make_split(c, None)
part = sharding.shard_partition(split.partition, sharding.make_mesh(0, 8))
for i in range(2):  # measured, then from the cache
    _, ctx, _ = train.build(c, part)
    out[f"build_{{i}}"] = dict(plan=ctx.plan_info["plan"],
                              devices=ctx.plan_info["devices"])
# The run follows the choice: forced to each side in turn.
orig = plan.resolve_devices
for chosen in (1, 2):
    def forced(config, chosen=chosen, **kw):
        p, info = orig(config, **kw)
        side = kw["sharded"] if chosen == 2 else kw["one"]
        return side[0], dict(side[1], devices=dict(info["devices"], chosen=chosen))
    plan.resolve_devices = forced
    r = train.run(c, f"{{sys.argv[1]}}/chosen_{{chosen}}")
    out[f"chosen_{{chosen}}"] = dict(records=r["records"], devices=r["num_devices"],
                                    spread=r["params_devices"])
plan.resolve_devices = orig
c.num_devices = 1
r = train.run(c, f"{{sys.argv[1]}}/one")
out["one"] = dict(records=r["records"], devices=r["num_devices"])
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow(seconds=40)  # a subprocess with 2 devices, 3 runs
def test_device_choice_measures_both_sides(tmp_path):
    """``num_devices=0`` on several CPU devices: the local plan is timed on one
    device and under ``shard_map`` over both (``plan.resolve_devices``), the
    faster kept and cached; the run then trains on the chosen devices, one
    device giving exactly a one-device run's results."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(
        os.environ,
        XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"),
        DEMJAX_CACHE_DIR=str(tmp_path / "cache"),
    )
    proc = subprocess.run(
        [sys.executable, "-c", DEVICE_CHOICE.format(tests=tests), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    first, again = out["build_0"]["devices"], out["build_1"]["devices"]
    assert first["source"] == "measured" and again["source"] == "cache"
    table = first["table"]
    assert [r["devices"] for r in table] == [1, 2]
    # Both sides time 8 agents: on one device, and 4 on each of two.
    assert [r["agents"] for r in table] == [8, 4]
    assert all(r["plan"] == "sequential" and r["agent_steps_per_s"] > 0 for r in table)
    faster = 2 if table[1]["agent_steps_per_s"] > table[0]["agent_steps_per_s"] else 1
    assert first["chosen"] == faster and again["chosen"] == faster
    assert again["table"] == table
    one, c1, c2 = out["one"], out["chosen_1"], out["chosen_2"]
    assert one["devices"] == 1 and c1["devices"] == 1 and c1["spread"] == 1
    assert c2["devices"] == 2 and c2["spread"] == 2
    assert c1["records"] == one["records"]  # the same program on one device
    for a, b in zip(c2["records"], one["records"], strict=True):
        for k, v in a.items():
            if isinstance(v, float):
                assert v == pytest.approx(b[k], abs=2e-5), k


SHARD_POPULATION = r"""
import json, sys
sys.path.insert(0, {repo!r})
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from demjax import local, models, pytrees, sharding
assert jax.device_count() == 4, jax.devices()
A, D = 8, 4
mesh = sharding.make_mesh(D, A)
n_train = np.array([5, 9, 3, 12, 7, 2, 11, 6])  # uneven: shard positions differ
x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (A, 12, 6)), np.float32)
y = np.arange(A * 12).reshape(A, 12) % 3
model = models.make_model("mlp", 3, (5,))
apply = models.make_apply(model)
w = models.init_params(jax.random.PRNGKey(0), model, (6,))
params = pytrees.stack(w, A)
tx = optax.sgd(0.1)
opt = jax.vmap(tx.init)(params)
keys = jax.random.split(jax.random.PRNGKey(2), A)
anchor = pytrees.stack(jax.tree.map(lambda v: v + 0.5, w), A)
max_steps = jnp.array([100, 100, 1, 100, 2, 100, 100, 0], jnp.int32)
put = lambda t: jax.device_put(t, NamedSharding(mesh, P(sharding.AXIS)))
out = {{}}
for block in (1, 2, 0):
    make = lambda n: local.make_train_population(
        apply, tx, batch_size=4, local_epochs=2, n_train=n, num_buckets=2,
        block_size=block)
    ref = jax.jit(make(n_train))(keys, params, opt, x, y, jnp.asarray(n_train),
                                 anchor, 0.3, max_steps)
    per_shard = n_train.reshape(D, -1).max(axis=0)
    fn = jax.jit(local.shard_population(make(per_shard), mesh))
    args = [put(a) for a in (keys, params, opt, x, y, jnp.asarray(n_train), anchor)]
    got = fn(*args, 0.3, put(max_steps))
    jaxpr = str(jax.make_jaxpr(fn)(*args, 0.3, put(max_steps)))
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
    out[block] = dict(diff=diff, shard_map="shard_map" in jaxpr,
                      spread=len(got[0]["Dense_0"]["kernel"].sharding.device_set),
                      moved=float(jnp.max(jnp.abs(got[0]["Dense_0"]["kernel"]
                                                  - params["Dense_0"]["kernel"]))))
try:
    local.shard_population(make(per_shard), mesh)(*args, 0.3, start=params)
except ValueError as e:
    out["error"] = str(e)
print("RESULT" + json.dumps(out))
"""


def test_shard_population_equals_one_device(tmp_path):
    """A plug-in's population trainer under ``shard_map`` (each of 4 forced CPU
    devices trains its 2 agents, compiled for one shard's largest counts) gives
    the one-device trainer's parameters, optimizer state and losses, for the
    sequential, block and all-at-once plans, with uneven sample counts and
    stragglers; ``start`` (global agent ids) is refused."""
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"))
    proc = subprocess.run(
        [sys.executable, "-c", SHARD_POPULATION.format(repo=REPO)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    for block in ("1", "2", "0"):
        r = out[block]
        assert r["shard_map"] and r["spread"] == 4, (block, r)
        assert r["moved"] > 1e-3  # training happened
        assert r["diff"] < 1e-5, (block, r["diff"])
    assert "no start, finish or anchor function" in out["error"]
