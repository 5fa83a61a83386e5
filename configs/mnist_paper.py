"""The DemLearn paper's MNIST reference setup (needs ``pip install 'demjax[tfds]'``
and internet for tensorflow-datasets to fetch MNIST once): alpha 0.6, mu 0.002."""

from configs import fmnist_paper


def get_config():
    c = fmnist_paper.get_config()
    c.dataset = "mnist"
    c.alpha = 0.6
    return c
