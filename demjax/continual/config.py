"""Config of a distributed continual-learning run (``scenario="continual"``).

``scripts/run.py`` runs it when the config file sets ``scenario = "continual"``
(``configs/continual_digits.py``, ``configs/continual_fmnist.py``). Every field,
its default and accepted values are below; ``validate`` checks them all before
any data is loaded, each error naming the field.
"""

from __future__ import annotations

import math

import ml_collections

from demjax.continual.consolidate import (
    PROJECTOR_INITS,
    STUDENT_INITS,
    STUDENT_LOGITS,
)
from demjax.continual.proxy import NOISES, PROXIES, same_dataset
from demjax.continual.scenario import CLASS_ORDERS, DATASETS
from demjax.errors import ConfigError, check_choice
from demjax.local import make_optimizer
from demjax.models import CONV_IMPLS, INITS, MODELS

METHODS = ("dac", "logit", "finetune", "average", "joint")
"""``dac``: logit + projected latent distillation on proxy data; ``logit``: the
same with ``alpha`` forced to 0; ``finetune``: one model trained on each task's data in
turn; ``average``: FedAvg-style mean of the previous and the agents' models;
``joint``: one model on all tasks' data at once (upper bound)."""

AGENT_HEADS = ("masked", "full")
AVG_WEIGHTINGS = ("tasks", "uniform")


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
    return c


def _int(config, field, low):
    v = config[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{field}={v!r} is not valid; accepted: an integer >= {low}")


def _num(config, field, low, high, low_open=False):
    v = config[field]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not (low < v if low_open else low <= v) or not v <= high:
        lo = "(" if low_open else "["
        hi = ")" if high == math.inf else "]"
        raise ConfigError(
            f"{field}={v!r} is not valid; accepted: a finite number in "
            f"{lo}{low}, {high}{hi}"
        )


def validate(config) -> None:
    """Checks every field of a continual config.

    Raises:
      ConfigError: the first bad field, naming it and the accepted values.
    """
    check_choice("scenario", config.scenario, ("continual",))
    check_choice("method", config.method, METHODS)
    check_choice("dataset", config.dataset, DATASETS)
    check_choice("class_order", config.class_order, CLASS_ORDERS)
    check_choice("model", config.model, MODELS)
    check_choice("conv_impl", config.conv_impl, CONV_IMPLS)
    check_choice("init", config.init, INITS)
    check_choice("agent_head", config.agent_head, AGENT_HEADS)
    check_choice("proxy", config.proxy, PROXIES)
    check_choice("proxy_noise", config.proxy_noise, NOISES)
    check_choice("proxy_image", config.proxy_image, ("china.jpg", "flower.jpg"))
    check_choice("student_init", config.student_init, STUDENT_INITS)
    check_choice("projector_init", config.projector_init, PROJECTOR_INITS)
    check_choice("student_logits", config.student_logits, STUDENT_LOGITS)
    check_choice("average_weighting", config.average_weighting, AVG_WEIGHTINGS)
    if config.proxy == "dataset":
        from demjax.data import SOURCES

        check_choice("proxy_dataset", config.proxy_dataset, SOURCES)
        if same_dataset(config.proxy_dataset, config.dataset):
            raise ConfigError(
                f"proxy_dataset={config.proxy_dataset!r} is the scenario's own data "
                f"set (dataset={config.dataset!r}); accepted: another data set, e.g. "
                "'digits' for fashion_mnist"
            )
    make_optimizer(config.optimizer, config.lr)
    for f in ("num_tasks", "classes_per_task", "agents_per_task", "test_per_class"):
        _int(config, f, 1)
    for f in ("local_epochs", "batch_size", "consolidation_steps", "proxy_batch"):
        _int(config, f, 1)
    for f in ("samples_per_agent", "proxy_dataset_size", "seed"):
        _int(config, f, 0)
    _num(config, "crop_min_scale", 0.0, 1.0, low_open=True)
    _num(config, "proxy_jitter", 0.0, 0.99)
    _num(config, "alpha", 0.0, float("inf"))
    _num(config, "consolidation_lr", 0.0, float("inf"), low_open=True)
    for f in ("standardize", "download", "forward_transfer", "progress"):
        if not isinstance(config[f], bool):
            raise ConfigError(
                f"{f}={config[f]!r} is not valid; accepted: True or False"
            )
    hidden = config.hidden
    if not (
        isinstance(hidden, (tuple, list))
        and hidden
        and all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
        )
    ):
        raise ConfigError(
            f"hidden={hidden!r} is not valid; accepted: a non-empty tuple of positive "
            "integers, e.g. (128,)"
        )
