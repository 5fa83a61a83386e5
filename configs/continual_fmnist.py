"""Distributed continual learning on Split Fashion-MNIST (arXiv 2303.15888).

5 tasks of 2 classes, 4 self-centred agents per task (1,000 training samples each),
MLP 784-256-10, DAC consolidation on crops of one image (china.jpg); 200 test
images per class. Needs the IDX files (``apt-get install dataset-fashion-mnist``).
Fields: ``demjax/continual/config.py``. Run::

    python scripts/run.py --config=configs/continual_fmnist.py
"""

from demjax.continual.config import get_config as _base


def get_config():
    c = _base()
    c.dataset = "fashion_mnist"
    c.agents_per_task = 4
    c.samples_per_agent = 1000
    c.test_per_class = 200
    c.hidden = (256,)
    c.local_epochs = 3
    c.consolidation_steps = 1000
    c.proxy_dataset = "digits"
    return c
