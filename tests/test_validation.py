"""The held-out validation split (``config.val_fraction``, demjax.data.validation)."""

import numpy as np
import pytest

from configs import default
from demjax import data
from demjax.config import validate
from demjax.data import validation
from demjax.data.partition import stack_partition
from demjax.errors import ConfigError


def _id_partition():
    """Rows whose one feature is their pool index: every row is identifiable."""
    pool = np.arange(100, dtype=np.float32)[:, None]
    y = (np.arange(100) % 3).astype(np.int32)
    splits = [
        (np.arange(0, 20), np.arange(60, 65)),
        (np.arange(20, 27), np.arange(65, 70)),
        (np.arange(27, 30), np.arange(70, 80)),
    ]
    return pool, y, splits


def test_held_out_rows_are_a_seeded_share_of_each_agents_training_rows():
    pool, y, splits = _id_partition()
    part = stack_partition(pool, y, splits, 3)
    got = validation.hold_out(part, 0.3, seed=4)
    # Hand count: round(0.3 * n), at least 1: n = 20, 7, 3 -> 6, 2, 1.
    np.testing.assert_array_equal(got.n_test, [6, 2, 1])
    np.testing.assert_array_equal(got.n_train, [14, 5, 2])
    tests = set()
    for a, (tr, te) in enumerate(splits):
        kept = got.x_train[a, : got.n_train[a], 0].astype(int)
        held = got.x_test[a, : got.n_test[a], 0].astype(int)
        assert set(kept).isdisjoint(held)
        assert sorted([*kept, *held]) == sorted(tr)  # a partition of the train rows
        assert list(kept) == sorted(kept)  # kept rows keep their order
        assert set(held).isdisjoint(te)  # no test row anywhere
        np.testing.assert_array_equal(got.y_test[a, : got.n_test[a]], y[held])
        tests.update(te)
    pooled = got.x_all[:, 0].astype(int)
    assert tests.isdisjoint(pooled) and pooled.shape[0] == got.n_test.sum()
    np.testing.assert_array_equal(got.owner_all, np.repeat([0, 1, 2], [6, 2, 1]))
    # Seeded: the same seed holds out the same rows, another seed others.
    again = validation.hold_out(part, 0.3, seed=4)
    np.testing.assert_array_equal(again.x_test, got.x_test)
    other = validation.hold_out(part, 0.3, seed=5)
    assert not np.array_equal(other.x_test[0], got.x_test[0])
    assert validation.hold_out(part, 0.0, seed=4) is part


def test_index_and_partition_forms_pick_the_same_rows():
    pool, y, splits = _id_partition()
    by_index = stack_partition(
        pool, y, validation.hold_out_indices(splits, 0.5, seed=1), 3
    )
    by_rows = validation.hold_out(stack_partition(pool, y, splits, 3), 0.5, seed=1)
    for field in ("x_train", "n_train", "x_test", "n_test", "x_all", "owner_all"):
        np.testing.assert_array_equal(getattr(by_index, field), getattr(by_rows, field))


def test_run_split_never_holds_a_test_row():
    c = default.get_config()
    c.num_agents = 8
    base = data.make_split(c)
    c.val_fraction = 0.25
    split = data.make_split(c)
    for (tr0, te0), (tr, va) in zip(base.indices, split.indices, strict=True):
        assert set(va) <= set(tr0) and set(tr) | set(va) == set(tr0)
        assert set(va).isdisjoint(te0) and set(tr).isdisjoint(va)
    assert split.info["validation"]["val_fraction"] == 0.25
    assert split.partition.n_test.sum() == sum(len(va) for _, va in split.indices)


@pytest.mark.parametrize("value", [1.0, -0.1, float("inf")])
def test_bad_val_fraction_is_named(value):
    c = default.get_config()
    c.val_fraction = value
    with pytest.raises(ConfigError, match=r"^val_fraction=.*accepted"):
        validate(c)


def test_too_few_rows_for_a_validation_row_is_named():
    pool, y, splits = _id_partition()
    part = stack_partition(pool, y, splits, 3)
    with pytest.raises(ConfigError, match=r"leaves agent 2 \(3 training rows\)"):
        validation.hold_out(part, 0.9, seed=0)
