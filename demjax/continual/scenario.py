"""Class-incremental scenarios: a stream of tasks, each dealt out to several agents.

Carta, Cossu, Lomonaco, Bacciu, van de Weijer, "Projected Latent Distillation for
Data-Agnostic Consolidation in Distributed Continual Learning" (arXiv 2303.15888),
Sec. 3 (self-centred distributed continual learning): a stream of tasks
``T_1, ..., T_n``; task ``i`` brings classes disjoint from the previous tasks'
(class-incremental, "Split" benchmarks of Sec. 5). In demjax each task's training
data is split i.i.d. among ``agents_per_task`` self-centred agents.

Choices the paper leaves open (exposed as config fields):

- ``class_order``: ``natural`` (task ``i`` holds classes ``2i, 2i+1``) or
  ``random`` (a seeded permutation of the classes, then consecutive pairs).
- Test data: ``test_per_class`` samples of each class are held out first (from the
  source's pooled train+test split, seeded); the rest is the training pool.
- ``samples_per_agent``: each agent keeps at most this many training samples
  (0 = the whole share), bounding CPU time.

Agent data are reachable only through ``Scenario.agent_data(t)``; consolidation
never receives a ``Scenario`` (see ``demjax.continual.consolidate``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from demjax.continual.config import CLASS_ORDERS
from demjax.data import load_source
from demjax.errors import ConfigError, check_arg


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One task's training data dealt to its agents (numpy, host).

    Attributes:
      x: float32 ``[A, N_max, H, W, C]`` (rows past ``n[a]`` are zero padding).
      y: int32 ``[A, N_max]`` global class labels.
      n: int32 ``[A]`` real samples per agent.
    """

    x: np.ndarray
    y: np.ndarray
    n: np.ndarray


class Scenario:
    """A class-incremental stream of tasks (host numpy arrays).

    Attributes:
      tasks: tuple of tuples of global class ids, one per task.
      num_classes: C, classes in the source data set.
      input_shape: ``(H, W, C)``.
      agents_per_task: A.
    """

    def __init__(self, tasks, num_classes, input_shape, agent_tasks, test_sets):
        self.tasks = tuple(tuple(int(c) for c in t) for t in tasks)
        self.num_classes = int(num_classes)
        self.input_shape = tuple(input_shape)
        self._agent_tasks = list(agent_tasks)
        self._test = list(test_sets)
        self.agents_per_task = int(self._agent_tasks[0].n.shape[0])

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def agent_data(self, t: int) -> TaskData:
        """The private training data of task ``t``'s agents (``TaskData``)."""
        return self._agent_tasks[t]

    def test_data(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Held-out test set of task ``t``: float32 ``[M, H, W, C]``, int32 ``[M]``."""
        return self._test[t]

    def pooled_task(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """All of task ``t``'s agents' training samples in one array (baselines)."""
        d = self.agent_data(t)
        xs = [d.x[a, : d.n[a]] for a in range(len(d.n))]
        ys = [d.y[a, : d.n[a]] for a in range(len(d.n))]
        return np.concatenate(xs), np.concatenate(ys)


def split_classes(
    num_classes: int, num_tasks: int, classes_per_task: int, order: str, seed: int
) -> list[tuple[int, ...]]:
    """Class ids of each task: consecutive groups of a natural or seeded order.

    Raises:
      ConfigError: ``num_tasks * classes_per_task`` exceeds the classes (fields
        ``num_tasks``, ``classes_per_task``).
      ValueError: an unknown ``order``, or counts < 1.
    """
    check_arg("order", order, CLASS_ORDERS)
    if num_tasks < 1 or classes_per_task < 1:
        raise ValueError(
            f"num_tasks={num_tasks}, classes_per_task={classes_per_task} are not "
            "valid; accepted: integers >= 1"
        )
    if num_tasks * classes_per_task > num_classes:
        raise ConfigError(
            f"num_tasks={num_tasks} x classes_per_task={classes_per_task} exceeds "
            f"the {num_classes} classes of the data set; accepted: a product <= "
            f"{num_classes}"
        )
    classes = np.arange(num_classes)
    if order == "random":
        classes = np.random.default_rng(seed).permutation(num_classes)
    return [
        tuple(
            int(c) for c in classes[i * classes_per_task : (i + 1) * classes_per_task]
        )
        for i in range(num_tasks)
    ]


def build_scenario(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    num_tasks: int = 5,
    classes_per_task: int = 2,
    agents_per_task: int = 2,
    test_per_class: int = 100,
    samples_per_agent: int = 0,
    class_order: str = "natural",
    seed: int = 0,
) -> Scenario:
    """Splits a pool ``(x, y)`` into a class-incremental scenario.

    Each class's samples are shuffled (``np.random.default_rng(seed)``), its first
    ``test_per_class`` held out for testing; task ``t``'s remaining samples are
    shuffled and dealt round-robin to ``agents_per_task`` agents (i.i.d. shares),
    each capped at ``samples_per_agent`` (0 = no cap). All tasks share one padded
    capacity ``N_max`` (the largest share).

    Args:
      x: float32 ``[N, H, W, C]``; y: int ``[N]`` in ``[0, num_classes)``.

    Raises:
      ConfigError: too few samples for the test set or the agents (naming
        ``test_per_class`` or ``agents_per_task``).
    """
    if agents_per_task < 1:
        raise ConfigError(
            f"agents_per_task={agents_per_task} is not valid; accepted: an integer >= 1"
        )
    if test_per_class < 1:
        raise ConfigError(
            f"test_per_class={test_per_class} is not valid; accepted: an integer >= 1"
        )
    rng = np.random.default_rng(seed)
    tasks = split_classes(num_classes, num_tasks, classes_per_task, class_order, seed)
    agent_tasks, task_shares, test_sets = [], [], []
    for classes in tasks:
        tr, te = [], []
        for c in classes:
            idx = np.flatnonzero(y == c)
            idx = idx[rng.permutation(idx.size)]
            if idx.size < test_per_class + agents_per_task:
                raise ConfigError(
                    f"class {c} has {idx.size} samples: too few for "
                    f"test_per_class={test_per_class} and agents_per_task="
                    f"{agents_per_task}; accepted: test_per_class + agents_per_task "
                    f"<= {idx.size}"
                )
            te.append(idx[:test_per_class])
            tr.append(idx[test_per_class:])
        te = np.concatenate(te)
        tr = np.concatenate(tr)
        tr = tr[rng.permutation(tr.size)]
        shares = [tr[a::agents_per_task] for a in range(agents_per_task)]
        if samples_per_agent:
            shares = [s[:samples_per_agent] for s in shares]
        task_shares.append(shares)
        test_sets.append((np.asarray(x[te], np.float32), np.asarray(y[te], np.int32)))
    # One padded capacity N_max for every task, so the agents' jitted training
    # compiles once per run (padding rows are masked out of training).
    n_max = max(s.size for shares in task_shares for s in shares)
    for shares in task_shares:
        n = np.array([s.size for s in shares], np.int32)
        xa = np.zeros((agents_per_task, n_max, *x.shape[1:]), np.float32)
        ya = np.zeros((agents_per_task, n_max), np.int32)
        for a, s in enumerate(shares):
            xa[a, : s.size] = x[s]
            ya[a, : s.size] = y[s]
        agent_tasks.append(TaskData(xa, ya, n))
    return Scenario(tasks, num_classes, x.shape[1:], agent_tasks, test_sets)


def make_scenario(config) -> Scenario:
    """Loads ``config.dataset`` and builds its Split scenario (``build_scenario``).

    Fields read: ``dataset`` (one of ``DATASETS``; ``cifar10`` and
    ``fashion_mnist_tfds`` / ``mnist`` need tensorflow-datasets), ``data_dir``,
    ``standardize``, ``num_tasks``, ``classes_per_task``, ``agents_per_task``,
    ``test_per_class``, ``samples_per_agent``, ``class_order``, ``seed``.

    The fields are trusted: ``demjax.config.validate`` checked them.

    Raises:
      ConfigError: more tasks x classes than the data set has, too few samples.
      DataNotFoundError: the data set is not available (e.g. Split CIFAR-10
        without tensorflow-datasets), with how to get it.
    """
    x, y, num_classes = load_source(
        config.dataset,
        data_dir=config.data_dir or None,
        standardize=bool(config.standardize),
        download=bool(config.download),
    )
    return build_scenario(
        x,
        y,
        num_classes,
        num_tasks=int(config.num_tasks),
        classes_per_task=int(config.classes_per_task),
        agents_per_task=int(config.agents_per_task),
        test_per_class=int(config.test_per_class),
        samples_per_agent=int(config.samples_per_agent),
        class_order=config.class_order,
        seed=int(config.seed),
    )
