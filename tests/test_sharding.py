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
out = {{}}
for algorithm in ("demlearn_p", "fedavg"):
    for n in (8, 1):
        c = default.get_config()
        c.num_agents, c.num_rounds, c.model, c.num_levels = 16, 2, "mlp", 2
        c.hidden, c.progress, c.local_epochs = (16,), False, 1
        c.algorithm, c.num_devices = algorithm, n
        r = train.run(c, f"{{sys.argv[1]}}/{{algorithm}}_{{n}}")
        out[f"{{algorithm}}_{{n}}"] = dict(
            records=r["records"], devices=r["num_devices"], spread=r["params_devices"]
        )
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow(seconds=45)  # a subprocess with 8 devices, 4 runs
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
    for algorithm in ("demlearn_p", "fedavg"):
        sharded, single = out[f"{algorithm}_8"], out[f"{algorithm}_1"]
        assert sharded["devices"] == 8 and sharded["spread"] == 8
        assert single["devices"] == 1 and single["spread"] == 1
        for a, b in zip(sharded["records"], single["records"], strict=True):
            for k, v in a.items():
                if isinstance(v, float):
                    assert v == pytest.approx(b[k], abs=2e-5), (algorithm, k)


def test_mesh_errors_name_the_field():
    from demjax import sharding
    from demjax.errors import ConfigError

    assert sharding.make_mesh(1, 10) is None
    with pytest.raises(ConfigError, match="num_devices"):
        sharding.make_mesh(64, 10)
