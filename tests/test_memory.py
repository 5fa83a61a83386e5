"""Block-size choice from memory estimates, and a forced block size end to end."""

import os
import sys

import pytest

from demjax import memory, train
from demjax.errors import ConfigError

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # noqa: E402


def test_choose_block_size_hand_computed():
    kw = dict(num_agents=100, state_bytes_per_agent=10, step_bytes_per_agent=50)
    # budget 0.5 * 4000 = 2000; resident 1000; room 1000 -> 20 agents at a time.
    assert memory.choose_block_size(available=4000, **kw) == 20
    # Everything fits: no blocking.
    assert memory.choose_block_size(available=10**9, **kw) == 0
    with pytest.raises(ConfigError, match="num_agents=100 does not fit"):
        memory.choose_block_size(available=2000, **kw)
    # Group models (fixed_bytes) are resident too: room 2000 - 1000 - 500 = 500.
    assert memory.choose_block_size(available=4000, fixed_bytes=500, **kw) == 10
    with pytest.raises(ConfigError, match="does not fit"):
        memory.choose_block_size(available=4000, fixed_bytes=960, **kw)


def test_available_bytes_is_positive():
    assert memory.available_bytes() > 0


def test_forced_block_matches_unblocked_run(tmp_path):
    def cfg(plan):
        c = default.get_config()
        c.num_agents, c.num_rounds, c.model, c.num_levels = 10, 2, "mlr", 2
        c.progress, c.local_epochs, c.local_plan = False, 1, plan
        return c

    a = train.run(cfg("all"), str(tmp_path / "a"))
    b = train.run(cfg("block:3"), str(tmp_path / "b"))
    assert a["agent_block"] == 0 and b["agent_block"] == 3
    for ra, rb in zip(a["records"], b["records"], strict=True):
        for k, v in ra.items():
            if isinstance(v, float):
                assert v == pytest.approx(rb[k], abs=1e-5), k
