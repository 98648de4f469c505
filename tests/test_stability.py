"""Students that collapsed or went NaN under KD at the labels' learning rate train at the defaults:
distill_lr_scale=auto (kdcli/methods/shared.py) scales the distilled models' learning rate."""

import json

import pytest
from omegaconf import OmegaConf

from kdcli.losses import Objective, Schedule
from kdcli.methods.shared import distill_lr_scale

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "T, alpha, expected",
    [(4.0, 0.1, 1 / (0.1 + 0.9 * 4)), (1.0, 0.5, 1.0), (8.0, 0.0, 1 / 8), (0.5, 0.0, 1.0)],
)
def test_auto_scale_is_one_over_the_gradient_bound(T, alpha, expected):
    cfg = {"distill_lr_scale": "auto", "loss": {"name": "kd"}}
    objective = Objective(lambda s, t, y, T: s.sum(), T=Schedule("linear", T, 1.0), alpha=alpha)
    assert distill_lr_scale(OmegaConf.create(cfg), objective) == pytest.approx(expected)
    assert distill_lr_scale(OmegaConf.create({**cfg, "distill_lr_scale": 0.5}), objective) == 0.5
    assert distill_lr_scale(OmegaConf.create({**cfg, "loss": {"name": "mse"}}), objective) == 1.0
    assert distill_lr_scale(OmegaConf.create(cfg), Objective()) == 1.0  # the scratch student


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import run_kd

    cwd = tmp_path_factory.mktemp("teacher")
    r = run_kd("train-teacher", "trainer.epochs=4", cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    return next((cwd / "runs" / "train_teacher").glob("*/checkpoints/teacher_best.pt"))


@pytest.mark.parametrize(
    "student",
    [
        ["student=convnet", "student.channels=[4,8]", "student.hidden=16", "student.dropout=0"],  # collapsed to chance
        ["student=mlp", "student.hidden=[1024,1024]"],  # went NaN in epoch 5
    ],
)
def test_small_and_wide_students_train_at_the_default_rate(kd, teacher, student):
    r = kd("distill", f"teacher.ckpt={teacher}", *student, "trainer.epochs=6", "baseline=false")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "learning rate 0.05 x 0.25 = 0.0125" in r.stdout
    (run,) = (kd.dir / "runs" / "distill").iterdir()
    m = json.loads((run / "metrics.json").read_text())
    assert m["student"]["test_acc"] > 0.9, m["student"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] < 0.0125 and all(r["train_loss"] == r["train_loss"] for r in rows)  # no NaN
