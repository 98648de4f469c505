import pytest

from kdcli.commands.evaluate import _same_data
from kdcli.core.errors import KdError

DATA = {
    "name": "mnist5k",
    "input_shape": [1, 28, 28],
    "class_names": [str(i) for i in range(10)],
    "mean": [0.13],
    "std": [0.31],
    "dataset": {"name": "mnist5k", "val_size": 500, "split_seed": 0, "classes": None, "limit": None, "shift": 2},
}


def test_checkpoints_of_one_split_are_compared():
    other_aug = {**DATA, "dataset": {**DATA["dataset"], "shift": 0}}  # augmentation does not change the split
    assert _same_data([("a.pt", {"data": DATA}), ("b.pt", {"data": other_aug})]) is DATA


def test_checkpoints_of_different_splits_are_refused():
    limited = {**DATA, "dataset": {**DATA["dataset"], "limit": 256}}
    with pytest.raises(KdError, match=r"b.pt and a.pt were trained on different data \(limit: None vs 256\)"):
        _same_data([("a.pt", {"data": DATA}), ("b.pt", {"data": limited})])
