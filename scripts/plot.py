"""Plot run workdirs: metric curves, and the dendrogram / group tree of a round.

    python scripts/plot.py runs/a runs/b [--out=DIR] [--tree_round=R] [--svg]

See ``demjax/plotting.py``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demjax.plotting import main  # noqa: E402

if __name__ == "__main__":
    main()
