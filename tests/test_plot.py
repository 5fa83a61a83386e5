"""scripts/plot.py on real digits workdirs writes the curve and tree pictures."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import default  # noqa: E402
from demjax import train  # noqa: E402


def test_plot_writes_curves_and_tree(tmp_path):
    from demjax import plotting as plot

    c = default.get_config()
    c.num_agents, c.num_rounds, c.model, c.progress = 10, 3, "mlr", False
    c.num_levels, c.local_epochs, c.tree_snapshot_every = 2, 1, 2
    train.run(c, str(tmp_path / "dem"))
    c.algorithm = "fedavg"
    train.run(c, str(tmp_path / "avg"))
    assert sorted(os.listdir(tmp_path / "dem" / "trees")) == [
        "round_00000.json", "round_00002.json",
    ]  # fmt: skip
    out = tmp_path / "plots"
    plot.main([str(tmp_path / "dem"), str(tmp_path / "avg"), f"--out={out}", "--svg",
               "--tree_round=2"])  # fmt: skip
    for name in ("curves.png", "curves.svg", "tree.png", "tree.svg"):
        assert (out / name).stat().st_size > 5_000, name
