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


def test_the_tradeoff_plot_draws_panels_without_trustworthy_figures(tmp_path):
    from kdcli.report import plots

    # every latency was noise (left out as None): the panel says so, the legend comes from the size panel
    plots.tradeoff(tmp_path / "a.png", ["teacher", "student"], [0.9, 0.8], {"ms": [None, None], "MB": [1.0, 0.5]})
    plots.tradeoff(tmp_path / "b.png", ["teacher"], [0.9], {"ms": [None]})  # nothing at all to draw
    assert (tmp_path / "a.png").stat().st_size > 1000 and (tmp_path / "b.png").stat().st_size > 1000
