"""Metrics on a hand-computed case: 'models' that always predict one fixed class."""

import jax.numpy as jnp
import numpy as np

from demjax import metrics
from demjax.types import GroupTree, Partition


def constant_apply(params, x, train, key):
    """A model whose params are a class id c: it predicts c for every sample."""
    return jnp.broadcast_to(jax_one_hot(params, 3), (x.shape[0], 3))


def jax_one_hot(c, k):
    return (jnp.arange(k) == c).astype(jnp.float32)


def make_partition():
    # 3 agents. Test labels: agent 0: [0, 0, 1]; agent 1: [1, 1]; agent 2: [2, 0, 0, 2].
    y_test = np.array([[0, 0, 1, 0], [1, 1, 0, 0], [2, 0, 0, 2]], np.int32)
    n_test = np.array([3, 2, 4], np.int32)
    y_all = np.array([0, 0, 1, 1, 1, 2, 0, 0, 2], np.int32)
    owner = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2], np.int32)
    x_test = np.zeros((3, 4, 1, 1, 1), np.float32)
    return Partition(
        x_train=x_test,
        y_train=y_test,
        n_train=n_test,
        x_test=x_test,
        y_test=y_test,
        n_test=n_test,
        x_all=np.zeros((9, 1, 1, 1), np.float32),
        y_all=y_all,
        owner_all=owner,
        num_classes=3,
    )


def test_client_metrics_hand_computed():
    part = make_partition()
    params = jnp.array([0, 1, 0])  # agent a predicts class params[a]
    out = metrics.client_metrics(
        constant_apply, params, part, part.x_all, part.y_all, 2
    )
    # C-SPE: agent 0 gets 2/3, agent 1 2/2, agent 2 2/4 -> (2 + 2 + 2) / 9.
    np.testing.assert_allclose(out["c_spe"], 6 / 9, rtol=1e-6)
    # C-GEN: pooled labels have 4 zeros, 3 ones, 2 twos: mean(4/9, 3/9, 4/9).
    np.testing.assert_allclose(out["c_gen"], (4 + 3 + 4) / 27, rtol=1e-6)


def test_group_metrics_hand_computed():
    part = make_partition()
    # One level: group 0 = agents {0, 1}, group 1 = agent {2}; root = node 2.
    tree = GroupTree(
        agent_parent=jnp.array([0, 0, 1], jnp.int32),
        node_parent=jnp.array([2, 2, 2], jnp.int32),
        agent_ancestor=jnp.array([[0, 0, 1], [2, 2, 2]], jnp.int32),
        level_sizes=(2, 1),
    )
    node_params = jnp.array([1, 2, 0])  # group 0 predicts 1, group 1 predicts 2, root 0
    node_weight = jnp.array([2.0, 1.0, 3.0])
    out = metrics.group_metrics(constant_apply, node_params, node_weight, tree, part, 2)
    # G-SPE: group 0 on pooled tests of agents 0, 1 (labels 0,0,1,1,1): 3/5;
    # group 1 on agent 2's (2,0,0,2): 2/4; weighted by agents: (2*.6 + 1*.5) / 3.
    np.testing.assert_allclose(out["g_spe_l1"], (2 * 0.6 + 0.5) / 3, rtol=1e-6)
    # G-GEN: group 0 on all: 3/9, group 1: 2/9 -> (2 * 3/9 + 2/9) / 3.
    np.testing.assert_allclose(out["g_gen_l1"], (2 * 3 / 9 + 2 / 9) / 3, rtol=1e-6)
    np.testing.assert_allclose(out["global_acc"], 4 / 9, rtol=1e-6)
