"""Config of a distributed continual-learning run (``scenario="continual"``).

``scripts/run.py`` runs it when the config file sets ``scenario = "continual"``
(``configs/continual_digits.py``, ``configs/continual_fmnist.py``). Every field,
its default and accepted values are below; ``demjax.config.validate`` (the one
validation entry point, ``demjax.config_checks.check_continual``) checks them all
before any data is loaded, each error naming the field.
"""

from __future__ import annotations

import ml_collections

METHODS = ("dac", "logit", "finetune", "average", "joint")
"""``dac``: logit + projected latent distillation on proxy data; ``logit``: the
same with ``alpha`` forced to 0; ``finetune``: one model trained on each task's data in
turn; ``average``: FedAvg-style mean of the previous and the agents' models;
``joint``: one model on all tasks' data at once (upper bound)."""

AGENT_HEADS = ("masked", "full")
AVG_WEIGHTINGS = ("tasks", "uniform")

# Accepted values of the other fields, used by the modules that implement them
# (defined here, a module without dependencies, so the config checks import them
# without importing the scenario's code).
DATASETS = ("digits", "fashion_mnist", "fashion_mnist_tfds", "mnist", "cifar10")
"""Accepted values of ``config.dataset`` in continual runs."""
CLASS_ORDERS = ("natural", "random")
PROXIES = ("crops", "noise", "dataset")
NOISES = ("uniform", "gaussian")
PROXY_IMAGES = ("china.jpg", "flower.jpg")
"""scikit-learn's bundled sample images (``proxy_image``)."""
STUDENT_INITS = ("previous", "agents", "average")
PROJECTOR_INITS = ("identity", "lecun")
STUDENT_LOGITS = ("raw", "centred")


def same_dataset(a: str, b: str) -> bool:
    """Whether two ``dataset`` names are the same data (both Fashion-MNIST loaders
    count as one)."""
    fm = ("fashion_mnist", "fashion_mnist_tfds")
    return a == b or (a in fm and b in fm)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.scenario = "continual"  # dispatch key for scripts/run.py
    c.seed = 0
    c.method = "dac"  # dac | logit | finetune | average | joint

    # Scenario (demjax.continual.scenario): Split <dataset>.
    c.dataset = (
        "digits"  # digits | fashion_mnist | fashion_mnist_tfds | mnist | cifar10
    )
    c.data_dir = ""
    c.standardize = True
    c.download = False  # tfds sources (cifar10): fetch if missing
    c.num_tasks = 5
    c.classes_per_task = 2
    c.class_order = "natural"  # natural | random (seeded)
    c.agents_per_task = 2  # self-centred agents per task, trained in one vmap
    c.test_per_class = 60  # held-out test samples per class
    c.samples_per_agent = 0  # cap on each agent's training samples; 0 = no cap

    # Agents' local training (demjax.local).
    c.model = "mlp"  # mlr | mlp | cnn | cnn4 | cnn_cifar
    c.hidden = (128,)
    c.init = "flax"  # flax (LeCun normal, zero bias) | torch (PyTorch's default)
    c.conv_impl = "patches"
    c.optimizer = "adam"
    c.lr = 0.001
    c.local_epochs = 5
    c.batch_size = 32
    # masked: an agent's cross-entropy only over its task's classes; full: all.
    c.agent_head = "masked"
    # Also train each task's agents from scratch to measure forward transfer.
    c.forward_transfer = True

    # Consolidation (demjax.continual.consolidate, demjax.continual.proxy).
    c.proxy = "crops"  # crops | noise | dataset
    c.proxy_image = "china.jpg"  # china.jpg | flower.jpg (bundled with sklearn)
    c.proxy_noise = "uniform"  # uniform | gaussian
    c.proxy_dataset = "fashion_mnist"  # for proxy=dataset: another data set
    c.proxy_dataset_size = 2000  # images kept from proxy_dataset; 0 = all
    c.crop_min_scale = 0.1
    c.proxy_jitter = 0.4
    c.consolidation_steps = 500
    c.proxy_batch = 128
    c.consolidation_lr = 0.001
    c.alpha = 1.0  # weight of the projected latent distillation (0 = logit only)
    c.student_init = "average"  # previous | agents | average
    c.projector_init = "identity"  # identity | lecun
    # Student logits in the double distillation loss: raw (as published, DMC's
    # L_dd) | centred (mean-centred per class subset like the targets; ablation).
    c.student_logits = "raw"
    c.average_weighting = "tasks"  # average: prev weighted by tasks seen | uniform

    c.progress = True
    # Also write TensorBoard events (<workdir>/tensorboard; --tensorboard).
    c.tensorboard = False
    return c
