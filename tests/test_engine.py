import json
import logging

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from kdcli.data import DeviceData, load_splits
from kdcli.losses import Objective
from kdcli.training import checkpoint
from kdcli.training.engine import Trainee, evaluate, fit

DATA = {"name": "mnist5k", "val_size": 200, "split_seed": 0, "classes": None, "limit": 400}


def recipe(epochs=3, lr=0.05):
    return OmegaConf.create(
        {
            "seed": 0,
            "trainer": {
                "epochs": epochs,
                "batch_size": 50,
                "eval_batch_size": 1000,
                "max_batches": None,
                "grad_clip": 1.0,
            },
            "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9},
            "scheduler": {"name": "none"},
        }
    )


def linear():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def test_fit_keeps_the_best_on_validation_and_the_last_checkpoint(tmp_path):
    data = DeviceData(load_splits(DATA, "unused"), torch.device("cpu"))
    torch.manual_seed(0)
    meta = {"arch": {"name": "mlp", "kwargs": {"hidden": []}}, "data": {**data.info.to_dict(), "dataset": DATA}}
    result = fit(Trainee("scratch", linear(), Objective(), meta), data, recipe(), run_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    best = max(rows, key=lambda r: r["val_acc"])
    assert result.metrics["best_epoch"] == best["epoch"] and result.metrics["val_acc"] == best["val_acc"]
    # The returned model holds the best weights; the best file holds the same weights.
    saved = checkpoint.load(result.best_path)
    assert saved["epoch"] == best["epoch"]
    reloaded = checkpoint.build_from(saved)
    assert evaluate(reloaded, data.test, 1000)["acc"] == result.metrics["test_acc"]
    assert checkpoint.load(result.last_path)["epoch"] == 3
    assert evaluate(reloaded, data.val, 1000)["acc"] == best["val_acc"]


def test_a_collapsed_model_is_reported(tmp_path, caplog):
    data = DeviceData(load_splits(DATA, "unused"), torch.device("cpu"))
    # Dead ReLUs: the output no longer depends on the input, as after a too-large first step.
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    nn.init.constant_(model[1].bias, -1e3)
    meta = {"arch": {"name": "mlp", "kwargs": {"hidden": []}}, "data": {**data.info.to_dict(), "dataset": DATA}}
    with caplog.at_level(logging.WARNING, logger="kdcli"):
        fit(Trainee("student", model, Objective(), meta), data, recipe(epochs=2), run_dir=tmp_path)
    assert "validation accuracy" in caplog.text and "is at chance after 2 epoch(s)" in caplog.text


@pytest.mark.parametrize(
    "role, alpha, hint",
    [("teacher", None, False), ("scratch", None, False), ("student", 0.1, True), ("student", 1.0, False)],
)
def test_the_kd_hint_of_a_collapse_is_only_for_a_model_with_a_kd_term(tmp_path, caplog, role, alpha, hint):
    from kdcli.core.registry import LOSSES
    from kdcli.training.engine import Teacher

    data = DeviceData(load_splits(DATA, "unused"), torch.device("cpu"))
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    nn.init.constant_(model[1].bias, -1e3)  # collapsed: at chance whatever it learns
    # Labels only (a teacher, a scratch student), or a KD term of weight 1 - alpha against a teacher
    objective = Objective() if alpha is None else Objective(LOSSES.build("kd"), T=4.0, alpha=alpha)
    teachers = [] if alpha is None else [Teacher(linear().eval(), torch.arange(10))]
    meta = {"arch": {"name": "mlp", "kwargs": {"hidden": []}}, "data": {**data.info.to_dict(), "dataset": DATA}}
    with caplog.at_level(logging.WARNING, logger="kdcli"):
        fit(Trainee(role, model, objective, meta), data, recipe(epochs=2), run_dir=tmp_path, teachers=teachers)
    assert f"warning  {role}: validation accuracy" in caplog.text and "is at chance" in caplog.text
    assert ("the KD term's gradients grow with T" in caplog.text) == hint


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_take_the_fused_update_unless_told_otherwise(name):

    from kdcli.training.optim import build_optimizer

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    cfg = OmegaConf.create({"name": name, "lr": 0.1})
    assert build_optimizer(params, cfg).defaults["fused"] is True
    chosen = build_optimizer(params, OmegaConf.create({"name": name, "lr": 0.1, "foreach": True}))
    assert not chosen.defaults["fused"] and chosen.defaults["foreach"] is True
    # the fused SGD step is the plain formula: p - lr * grad (no momentum or decay set)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer(
        [p], OmegaConf.create({"name": "sgd", "lr": 0.5, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0})
    )
    p.grad = torch.tensor([0.2, 0.4])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -2.2]))
