"""Default: DemLearn on scikit-learn's digits (embedded, offline), 50 agents.

The fields and their defaults live in ``demjax/default_config.py`` (so an installed
demjax has them too, e.g. in the Colab notebook); this file is the CLI's default
``--config``. Override any field with ``--config.FIELD=VALUE``.
"""

from demjax.default_config import get_config  # noqa: F401
