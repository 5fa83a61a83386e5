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


@pytest.mark.slow(seconds=25)  # a subprocess: scripts/run.py, 2 CPU devices
def test_run_script_cpu_devices_shards_the_agents(tmp_path):
    """``scripts/run.py --cpu_devices=2`` exposes two CPU devices and shards
    the agents over them (``num_devices`` auto), in the run's log line."""
    env = dict(os.environ, XLA_FLAGS=xla_flags())
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "run.py"), "--cpu_devices=2",
         "--config.num_agents=4", "--config.num_rounds=1", "--config.model=mlr",
         "--config.local_epochs=1", "--quiet", f"--workdir={tmp_path}"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "timing.jsonl") as f:
        head = json.loads(f.readline())
    assert head["num_devices"] == 2, head
