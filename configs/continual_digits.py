"""Distributed continual learning on Split digits (arXiv 2303.15888).

5 tasks of 2 classes of scikit-learn's digits (embedded, offline), 2 self-centred
agents per task, MLP 64-128-10, DAC consolidation on crops of one image (china.jpg).
Fields: ``demjax/continual/config.py``. Run::

    python scripts/run.py --config=configs/continual_digits.py
    python scripts/run.py --config=configs/continual_digits.py --config.method=average
"""

from demjax.continual.config import get_config as _base


def get_config():
    c = _base()
    c.dataset = "digits"
    c.test_per_class = 60
    c.local_epochs = 10
    c.consolidation_steps = 500
    return c
