"""The KD gain's uncertainty (paired exact McNemar test, Wald interval, Student-t over seeds) and
the checkpoint selection rule, against hand computations."""

import math

import pytest
import torch

from kdcli.core.metrics import mean_interval, paired_gain
from kdcli.training.engine import _better


def logits_for(pred: list[int], classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), classes).float()


def test_paired_gain_counts_discordant_pairs_and_matches_the_exact_binomial():
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    base = [0, 1, 2, 0, 0, 0, 0, 0, 0, 1]  # right on images 0-3 and 6
    new = [0, 1, 2, 1, 1, 2, 0, 1, 2, 0]  # right on all but image 3
    g = paired_gain(logits_for(base), logits_for(new), y)
    b, c, n = 1, 5, 10  # only base right: image 3; only new right: images 4, 5, 7, 8, 9
    assert (g["only_base"], g["only_new"], g["n"]) == (b, c, n)
    assert g["gain"] == pytest.approx((c - b) / n) == pytest.approx(0.9 - 0.5)
    # two-sided exact McNemar: 2 * P(X <= min(b, c)), X ~ Binomial(b + c, 1/2)
    p = 2 * sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)
    assert g["p_value"] == pytest.approx(min(1.0, p))
    half = 1.959963984540054 * math.sqrt(b + c - (c - b) ** 2 / n) / n
    assert g["ci"] == pytest.approx([0.4 - half, 0.4 + half])


def test_paired_gain_of_identical_predictions_is_zero_with_p_one():
    y = torch.tensor([0, 1, 2, 1])
    g = paired_gain(logits_for([0, 1, 1, 1]), logits_for([0, 1, 1, 1]), y)
    assert g["gain"] == 0 and g["p_value"] == 1.0 and g["ci"] == [0.0, 0.0]


def test_a_large_one_sided_split_is_significant():
    y = torch.zeros(1000, dtype=torch.long)
    base = [1] * 30 + [0] * 970
    new = [0] * 1000
    g = paired_gain(logits_for(base), logits_for(new), y)
    assert g["gain"] == pytest.approx(0.03) and g["p_value"] == pytest.approx(2 / 2**30)
    assert g["ci"][0] > 0


def test_mean_interval_is_the_student_t_interval():
    mean, sd, lo, hi = mean_interval([1.0, 2.0, 3.0])
    t_975_2 = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom
    assert (mean, sd) == (2.0, 1.0)
    assert (lo, hi) == pytest.approx((2 - t_975_2 / math.sqrt(3), 2 + t_975_2 / math.sqrt(3)))
    assert math.isnan(mean_interval([5.0])[2])


def rows(*pairs):
    return [{"val_acc": a, "val_nll": n} for a, n in pairs]


@pytest.mark.parametrize(
    "selection, history, row, expected",
    [
        ("val_acc", [(0.98, 0.10)], (0.98, 0.20), True),  # a tie goes to the later epoch
        ("val_acc", [(0.98, 0.10)], (0.97, 0.05), False),
        ("val_nll", [(0.98, 0.10)], (0.99, 0.11), False),
        ("val_nll", [(0.98, 0.10)], (0.90, 0.09), True),
        ("last", [(0.99, 0.01)], (0.10, 3.00), True),
    ],
)
def test_selection_rule(selection, history, row, expected):
    st = {"best_state": {}, "best_epoch": len(history), "rows": rows(*history)}
    new = rows(row)[0]
    st["rows"].append(new)
    assert _better(selection, new, st) is expected


def test_the_first_epoch_is_always_selected():
    st = {"best_state": None, "best_epoch": 0, "rows": rows((0.1, 2.0))}
    assert _better("val_acc", st["rows"][0], st)


def test_runs_recorded_before_a_key_existed_compare_with_the_value_they_ran_with():
    from kdcli.training.resume import config_diff

    old = {"trainer": {"epochs": 30}, "dataset": {"name": "mnist5k"}}  # before selection, lr scale, affine
    now = {"trainer": {"epochs": 30, "selection": "last"}, "distill_lr_scale": "auto", "dataset": {**old["dataset"]}}
    now["dataset"]["affine"] = True
    assert config_diff(now, old) == [
        "trainer.selection: val_acc -> last",
        "distill_lr_scale: 1.0 -> auto",
        "dataset.affine: False -> True",
    ]
    same = {"trainer": {"epochs": 30, "selection": "val_acc"}, "distill_lr_scale": 1.0, "dataset": {**old["dataset"]}}
    same["dataset"]["affine"] = False
    assert config_diff(same, old) == []  # so `resume=DIR trainer.selection=val_acc ...` continues such a run


@pytest.mark.parametrize(
    "only_teacher, only_scratch, level, text",
    [
        (0, 0, "WARNING", "the teacher is not clearly better"),  # no gap at all
        (8, 4, "WARNING", "the teacher is not clearly better"),  # +0.8 points of 500: below the margin
        (14, 6, "INFO", "not significant on 500 images"),  # +1.6 points, p = 0.12: a note (mnist5k's defaults)
        (20, 0, None, None),  # +4 points, p < 0.05: nothing to say
    ],
)
def test_the_teacher_check_warns_below_a_point_and_notes_an_unresolved_gap(
    caplog, only_teacher, only_scratch, level, text
):
    from types import SimpleNamespace

    from kdcli.methods import shared

    y = torch.zeros(500, dtype=torch.long)

    def logits(wrong: slice) -> torch.Tensor:
        out = torch.zeros(500, 2)
        out[:, 0] = 1.0
        out[wrong] = torch.tensor([0.0, 1.0])
        return out

    scratch = logits(slice(0, only_teacher))  # only the teacher right on these
    teacher = logits(slice(only_teacher, only_teacher + only_scratch))  # only the scratch student right on these
    run = SimpleNamespace(
        models={"scratch": "model"},
        cfg=SimpleNamespace(trainer=SimpleNamespace(eval_batch_size=100)),
        data=SimpleNamespace(val=SimpleNamespace(y=y)),
        results={},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shared, "predict", lambda model, split, bs: scratch)
        mp.setattr(shared, "teacher_logits", lambda teachers, objective, split, bs: teacher)
        with caplog.at_level("INFO", logger="kdcli"):
            shared.Run.check_teacher(run, [], None)
    said = [r for r in caplog.records if r.name == "kdcli"]
    found = run.results["teacher_vs_scratch_val"]
    assert found["gain"] == pytest.approx((only_teacher - only_scratch) / 500)
    if level is None:
        assert not said
    else:
        assert [r.levelname for r in said] == [level] and text in said[0].getMessage()
