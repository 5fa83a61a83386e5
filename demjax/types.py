"""Core pytree types shared by every demjax module.

Letters used in shapes throughout demjax: A agents, N tree nodes (groups of every
level plus the root), G groups of one level, L group levels (below the root),
B batch, D flat parameters, C classes, M pooled test samples.
"""

from __future__ import annotations

import flax.struct
import numpy as np

Array = np.ndarray  # numpy or jax array


@flax.struct.dataclass
class Partition:
    """Agents' private data as stacked, padded arrays.

    Built once on the host (numpy), then placed on devices. Padding rows are zero
    and are never used: ``n_train[a]`` / ``n_test[a]`` say how many rows of agent
    ``a`` are real, and they are always the first rows.

    Attributes:
      x_train: float32 ``[A, N_train_max, *F]`` training inputs (F = H, W, C).
      y_train: int32 ``[A, N_train_max]`` training labels.
      n_train: int32 ``[A]`` real training samples per agent.
      x_test: float32 ``[A, N_test_max, *F]`` test inputs.
      y_test: int32 ``[A, N_test_max]`` test labels.
      n_test: int32 ``[A]`` real test samples per agent.
      x_all: float32 ``[M, *F]`` pooled test set: the union of all agents' test
        sets, in agent order (used for C-GEN, G-GEN and Global).
      y_all: int32 ``[M]`` pooled test labels.
      owner_all: int32 ``[M]`` index of the agent each pooled test sample
        belongs to.
      num_classes: static number of classes C.
    """

    x_train: Array
    y_train: Array
    n_train: Array
    x_test: Array
    y_test: Array
    n_test: Array
    x_all: Array
    y_all: Array
    owner_all: Array
    num_classes: int = flax.struct.field(pytree_node=False, default=10)

    @property
    def num_agents(self) -> int:
        return int(self.n_train.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[2:])


@flax.struct.dataclass
class GroupTree:
    """A K-level group tree as fixed-capacity int32 arrays.

    Nodes are numbered globally, level by level: level-1 groups occupy node ids
    ``[0, G_1)``, level-2 groups ``[G_1, G_1 + G_2)``, ..., and the root is the
    last node ``N - 1``. Capacities ``level_sizes = (G_1, ..., G_L, 1)`` are
    static: a new tree with the same capacities reuses every compiled function.
    Unused (padding) nodes have no agents under them and weight zero.

    An agent is usually a direct member of a level-1 group, but in the binary
    top-down mode of the reference an agent that is split off alone at a higher
    level is attached directly to that higher-level node (see
    ``demjax.cluster.tree_from_linkage``), so ``agent_parent`` may point to a
    node of any level.

    Attributes:
      agent_parent: int32 ``[A]`` node id of each agent's direct parent group.
      node_parent: int32 ``[N]`` node id of each node's parent; the root points
        to itself; padding nodes point to the root.
      agent_ancestor: int32 ``[L + 1, A]`` node id of the agent's ancestor group
        at level ``l + 1`` (row ``L`` is the root), ``-1`` where the agent is
        attached above that level.
      level_sizes: static tuple ``(G_1, ..., G_L, 1)``.
    """

    agent_parent: Array
    node_parent: Array
    agent_ancestor: Array
    level_sizes: tuple[int, ...] = flax.struct.field(pytree_node=False, default=(1,))

    @property
    def num_levels(self) -> int:
        """Group levels L below the root."""
        return len(self.level_sizes) - 1

    @property
    def num_nodes(self) -> int:
        return int(sum(self.level_sizes))

    @property
    def level_offsets(self) -> tuple[int, ...]:
        """Node id of the first node of each level (levels 1..L, then root)."""
        return tuple(int(x) for x in np.cumsum((0,) + self.level_sizes[:-1]))

    @property
    def root(self) -> int:
        return self.num_nodes - 1
