"""Ranges of the train-teacher/distill keys that types alone do not bound (issue 18): absurd values
are refused by `validate` with the key, the allowed range and the value given."""

import pytest

from kdcli.config import validate
from kdcli.core.errors import KdError


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["dataset.shift=1000000000"], r"dataset.shift must be a number in \[0, 64\] \(got 1000000000\)"),
        (["dataset.shift=65"], r"dataset.shift must be a number in \[0, 64\] \(got 65\)"),
        (["dataset.shift=64"], None),
        (
            ["dataset=imagefolder", "dataset.root=x", "dataset.image_size=16", "dataset.shift=17"],
            r"dataset.shift must be a number in \[0, 16\] \(got 17\)",
        ),
        (["dataset.val_size=inf"], r"dataset.val_size must be a count >= 1 or a fraction in \(0, 1\) \(got inf\)"),
        (["dataset.val_size=nan"], r"dataset.val_size must be a number > 0 \(got nan\)"),
        (["dataset.val_size=1.5"], r"dataset.val_size must be a count >= 1 or a fraction in \(0, 1\) \(got 1.5\)"),
        (["dataset.val_size=0"], r"dataset.val_size must be a number > 0 \(got 0\)"),
        (["dataset.val_size=0.2"], None),
        (["dataset.val_size=100"], None),
        (["dataset.split_seed=18446744073709551616"], r"dataset.split_seed must be a number in \[0, .*\] \(got 1844"),
        (["dataset.split_seed=-1"], r"dataset.split_seed must be a number in \[0, .*\] \(got -1\)"),
        (["dataset.split_seed=4294967295"], None),
        (["trainer.epochs=100000000000000000000"], r"trainer.epochs must be a number in \[1, 1e\+06\] \(got 1000"),
        (["trainer.epochs=1000000"], None),
        (["trainer.batch_size=100000000"], r"trainer.batch_size must be a number in \[1, 1e\+07\] \(got 100000000\)"),
        (["method=dml", "method.peers=1000000"], r"method.peers must be a number in \[2, 64\] \(got 1000000\)"),
        (["method=dml", "method.peers=1"], r"method.peers must be a number >= 2 \(got 1\)"),
        (["method=dml", "method.peers=4"], None),
        (
            ["method=born_again", "method.generations=101"],
            r"method.generations must be a number in \[1, 100\] \(got 101\)",
        ),
        (["method=born_again", "method.generations=5"], None),
        (
            ["schedule.T_end=2"],
            r"schedule.T_end=2.0 has no effect with schedule.T=constant; set schedule.T=linear\|cosine\|step",
        ),
        (
            ["schedule.alpha_end=0.5"],
            r"schedule.alpha_end=0.5 has no effect with schedule.alpha=constant; set schedule.alpha=linear\|cosine\|",
        ),
        (["schedule.T=linear", "schedule.T_end=2"], None),
        (["optimizer.nesterov=sometimes"], r"optimizer.nesterov must be true or false \(got 'sometimes'\)"),
        (["optimizer.nesterov=false"], None),
        (["optimizer.weight_decay=abc"], r"optimizer.weight_decay must be a number \(got 'abc'\)"),
        (
            ["optimizer=adam", "+optimizer.betas=[0.9]"],
            r"optimizer.betas must be a list of 2 numbers, e.g. \[0.9, 0.999\] \(got \[0.9\]\)",
        ),
        (["scheduler.min_lr=abc"], r"scheduler.min_lr must be a number in \[0, 1000\] \(got 'abc'\)"),
        (["dataset.classes=10"], r"dataset.classes takes a list of class names or indices, .* \(got 10\)"),
        (["dataset.classes=abc"], r"dataset.classes takes a list of class names or indices, .* \(got abc\)"),
        (["dataset.classes=[0,1]"], None),
    ],
)
def test_absurd_values_are_refused_with_the_range(hydra_cfg, overrides, message):
    cfg = hydra_cfg("distill", overrides)
    if message is None:
        validate(cfg, "distill")
        return
    with pytest.raises(KdError, match=message):
        validate(cfg, "distill")


@pytest.mark.parametrize("command", ["train_teacher", "distill"])
def test_ranges_apply_to_train_teacher_too(hydra_cfg, command):
    with pytest.raises(KdError, match=r"trainer.epochs must be a number in \[1, 1e\+06\]"):
        validate(hydra_cfg(command, ["trainer.epochs=2000000"]), command)
