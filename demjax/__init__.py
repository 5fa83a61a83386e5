"""demjax: vectorized simulation of democratized (hierarchical) distributed learning."""

from demjax.errors import ConfigError, DataNotFoundError
from demjax.types import GroupTree, Partition

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataNotFoundError", "GroupTree", "Partition", "__version__"]
