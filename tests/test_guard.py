"""The divergence guard and the communication accounting of every registered
algorithm.

Guard: one round of 4 agents whose agent 1 holds NaN training inputs; the round
must count it (``num_diverged == 1`` of ``num_active == 4``) and leave every
other model finite: the whole new state, every personal model but agent 1's, the
global model. Accounting: ``bytes_up`` / ``bytes_down`` of one round against
sizes computed by hand from the model (MLR on the 8x8 digits: a 64 x 10 kernel
and 10 biases, float32).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_round
from helpers import tiny_config as base_config

from demjax import data, local, train
from demjax.algorithms import ALGORITHMS, layer_split

A = 4
POISONED = 1
tiny_config = functools.partial(
    base_config,
    num_agents=A,
    num_rounds=1,
    local_plan="all",
    matmul_impl="xla",
    eval_batch=4,
    checkpoint_every=0,
)
MODEL_BYTES = 4 * (64 * 10 + 10)  # MLR on digits: kernel [64, 10], bias [10]


def one_round(cfg, poison: bool):
    part = data.make_partition(cfg)
    if poison:
        x = np.array(part.x_train)
        x[POISONED] = np.nan
        part = part.replace(x_train=x)
    _, ctx, rounds = train.build(cfg, jax.tree.map(jnp.asarray, part))
    dev = jax.tree.map(jnp.asarray, part)
    state = rounds.init(jax.random.PRNGKey(0), dev)
    new, info = run_round(rounds, state, dev, jax.random.PRNGKey(1), 0)
    return ctx, rounds, dev, new, info


def nonfinite(tree, skip_agent: int | None = None) -> list[str]:
    """Paths of float leaves with a non-finite entry (rows of ``skip_agent``
    ignored in leaves with a leading agent axis)."""
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        v = np.asarray(leaf)
        if not np.issubdtype(v.dtype, np.floating):
            continue
        if skip_agent is not None and v.ndim and v.shape[0] == A:
            v = np.delete(v, skip_agent, axis=0)
        if not np.all(np.isfinite(v)):
            bad.append(jax.tree_util.keystr(path))
    return bad


@functools.cache
def poisoned_round(name: str):
    """One round of ``name`` (default hyper-parameters) with agent 1's inputs
    NaN, shared by the tests below."""
    # The layer-split algorithms need a body below the head (not MLR).
    model = "mlp" if name in layer_split.ALGORITHMS else "mlr"
    config = tiny_config(algorithm=name, model=model)
    if name == "fedgen":  # 5 generator steps check the guard as well as 50
        config.fedgen.gen_steps = 5
    return one_round(config, poison=True)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_agent_with_nan_data_is_excluded_and_counted(name):
    ctx, rounds, dev, new, info = poisoned_round(name)
    assert int(info["num_active"]) == A
    assert int(info["num_diverged"]) == 1
    assert nonfinite(new) == []  # the diverged agent kept a finite state too
    key = jax.random.PRNGKey(2)
    if rounds.personal is not None:
        assert nonfinite(rounds.personal(new, dev, key), skip_agent=POISONED) == []
    if rounds.global_model is not None:
        assert nonfinite(rounds.global_model(new)) == []
    for k in ("bytes_up", "bytes_down"):
        assert np.asarray(info[k]).dtype == np.float32
    assert (float(info["bytes_up"]) > 0) == (name != "local")


# Hand-computed traffic. A diverged agent downloads but uploads nothing.


def test_fedavg_bytes():
    *_, info = poisoned_round("fedavg")
    assert float(info["bytes_up"]) == (A - 1) * MODEL_BYTES == 7800
    assert float(info["bytes_down"]) == A * MODEL_BYTES


def test_local_training_sends_nothing():
    *_, info = poisoned_round("local")
    assert float(info["bytes_up"]) == float(info["bytes_down"]) == 0.0


def test_ifca_downloads_every_cluster_model():
    *_, info = poisoned_round("ifca")
    k = 4  # the default
    assert float(info["bytes_down"]) == A * k * MODEL_BYTES
    assert float(info["bytes_up"]) == (A - 1) * (MODEL_BYTES + 4)  # model + int32 id


def test_fedproto_sends_prototypes_and_counts():
    *_, info = poisoned_round("fedproto")
    message = 4 * (10 * 64 + 10)  # prototypes [C=10, F=64] + counts [C], float32
    assert float(info["bytes_up"]) == (A - 1) * message
    assert float(info["bytes_down"]) == A * message


def test_sgp_counts_every_push_to_a_neighbour():
    cfg = tiny_config(algorithm="sgp", network="complete", network_mode="static")
    cfg.sgp.mix_every = 2
    part = data.make_partition(cfg)
    steps = int(cfg.local_epochs) * local.steps_per_epoch(
        part.y_train.shape[1], int(cfg.batch_size)
    )
    *_, info = one_round(cfg, poison=True)
    assert int(info["num_diverged"]) == 1
    # Complete static graph: every mixing step (every 2nd local step), each
    # agent, the diverged one too (it mixes its finite x), pushes (x_i, omega_i)
    # to the A - 1 others.
    pushes = (steps // 2) * A * (A - 1)
    assert pushes > 0
    assert float(info["bytes_up"]) == pushes * (MODEL_BYTES + 4)
    assert float(info["bytes_down"]) == float(info["bytes_up"])


def test_pdbo_counts_sgp_and_hypergradient_pushes():
    cfg = tiny_config(algorithm="pdbo", network="complete", network_mode="static")
    part = data.make_partition(cfg)
    steps = int(cfg.local_epochs) * local.steps_per_epoch(
        part.y_train.shape[1], int(cfg.batch_size)
    )
    *_, info = one_round(cfg, poison=True)
    assert int(info["num_diverged"]) == 1
    learners = int(cfg.pdbo.num_learners) * MODEL_BYTES  # x_i: the k learners
    links = A * (A - 1)  # pushes of one mixing step on the complete graph
    sgp = steps * links * (learners + 4)  # (x_i, omega_i)
    hgp = int(cfg.pdbo.hgp_steps) * links * (2 * learners + 4)  # (q_i, s_i, w_i)
    last = links * (learners + 4)  # the last mixing of (s_i, w_i)
    assert cfg.pdbo.outer_every == 1  # round 0 takes the outer step
    assert float(info["bytes_up"]) == sgp + hgp + last
    assert float(info["bytes_down"]) == float(info["bytes_up"])
