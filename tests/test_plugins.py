"""The plug-in interface: registry, config groups, engine runs, Ditto's update rule."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config as base_config
from helpers import train_is_test_partition

from demjax import train
from demjax.algorithms import REGISTRY
from demjax.algorithms.hierarchical import FAMILY
from demjax.errors import ConfigError

# The algorithms outside the hierarchical family.
PLUGINS = {n: a for n, a in REGISTRY.items() if n not in FAMILY}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tiny_config = functools.partial(base_config, checkpoint_every=0)


def test_plugins_are_registered_with_documented_hparams():
    assert "ditto" in PLUGINS
    c = base_config()
    for name, plugin in PLUGINS.items():
        assert plugin.citation
        for key, hparam in plugin.hparams.items():
            assert c[name][key] == hparam.default
            assert hparam.doc


def test_bad_plugin_hparam_names_the_field(tmp_path):
    c = tiny_config(algorithm="ditto")
    c.ditto.lam = -1.0
    with pytest.raises(ConfigError, match=r"ditto\.lam=-1\.0 is not valid; accepted"):
        train.run(c, str(tmp_path))


DITTO_CLI = ["--quiet", "--config.algorithm=ditto", "--config.num_agents=6",
             "--config.num_rounds=2", "--config.model=mlr", "--config.ditto.lam=0.5"]  # fmt: skip


@pytest.mark.cli(
    ditto=DITTO_CLI, ditto_bad=[*DITTO_CLI, "--config.ditto.personal_epochs=-2"]
)
def test_cli_runs_plugin_and_rejects_bad_hparam(cli):
    ok, bad = cli["ditto"], cli["ditto_bad"]
    assert ok.returncode == 0, ok.stderr
    assert "ditto on digits" in ok.stdout
    cfg = json.loads((ok.workdir / "config.json").read_text())
    assert cfg["ditto"]["lam"] == 0.5
    assert bad.returncode == 2
    assert "ditto.personal_epochs=-2 is not valid" in bad.stderr


def _softmax_grad(w, b, x, y, c):
    """NumPy gradient of the mean softmax cross-entropy of ``x @ w + b``."""
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return x.T @ p, p.sum(0)


def test_ditto_one_round_matches_numpy():
    """Two agents, full-batch SGD, one local step: Ditto Alg. 1 by hand."""
    rng = np.random.default_rng(0)
    a, n, f, c = 2, 4, 3, 3
    x = rng.normal(size=(a, n, f)).astype(np.float32)
    y = rng.integers(0, c, size=(a, n)).astype(np.int32)
    n_train = np.array([4, 3], np.int32)  # agent 1 has 3 real samples
    part = train_is_test_partition(x, y, n_train, c)
    lr, lam = 0.5, 0.3
    cfg = tiny_config(
        algorithm="ditto", num_agents=a, batch_size=4, lr=lr, local_buckets=1
    )
    cfg.ditto.lam = lam
    _, ctx, rounds = train.build(cfg, jax.tree.map(jnp.asarray, part))
    dev = jax.tree.map(jnp.asarray, part)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    # Personal models differ from the global one so the proximal pull matters.
    v0 = jax.tree.map(
        lambda p: p + 0.1 * jnp.arange(a).reshape(-1, 1, *([1] * (p.ndim - 2))), state.v
    )
    state = state.replace(v=v0)
    new, info = jax.jit(rounds.round)(state, dev, jax.random.PRNGKey(1), jnp.int32(0))

    w, b = (
        np.asarray(state.w["Dense_0"]["kernel"]),
        np.asarray(state.w["Dense_0"]["bias"]),
    )
    w_k, b_k, v_k, vb_k = [], [], [], []
    for i in range(a):  # reference loop over agents
        m = n_train[i]
        gw, gb = _softmax_grad(w, b, x[i, :m], y[i, :m], c)
        w_k.append(w - lr * gw)
        b_k.append(b - lr * gb)
        vw = np.asarray(v0["Dense_0"]["kernel"][i])
        vb = np.asarray(v0["Dense_0"]["bias"][i])
        gw, gb = _softmax_grad(vw, vb, x[i, :m], y[i, :m], c)
        v_k.append(vw - lr * (gw + lam * (vw - w)))
        vb_k.append(vb - lr * (gb + lam * (vb - b)))
    wts = n_train / n_train.sum()
    np.testing.assert_allclose(
        new.w["Dense_0"]["kernel"],
        sum(p * q for p, q in zip(wts, w_k, strict=True)),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        new.w["Dense_0"]["bias"],
        sum(p * q for p, q in zip(wts, b_k, strict=True)),
        atol=1e-5,
    )
    np.testing.assert_allclose(new.v["Dense_0"]["kernel"], np.stack(v_k), atol=1e-5)
    np.testing.assert_allclose(new.v["Dense_0"]["bias"], np.stack(vb_k), atol=1e-5)
    assert np.isfinite(float(info["train_loss"]))


def test_plugin_checkpoint_resume_is_identical(tmp_path):
    full = train.run(
        tiny_config(algorithm="ditto", num_rounds=3, checkpoint_every=1),
        str(tmp_path / "full"),
    )
    train.run(
        tiny_config(algorithm="ditto", num_rounds=2, checkpoint_every=1),
        str(tmp_path / "part"),
    )
    resumed = train.run(
        tiny_config(algorithm="ditto", num_rounds=3, checkpoint_every=1),
        str(tmp_path / "part"),
    )
    assert resumed["records"] == full["records"]
