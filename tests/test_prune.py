"""Magnitude pruning during distillation (kdcli/training/prune.py): the schedule against hand-computed
values, the masks of hand-made layers, the training loop with a pruner (in-process, resume
included), and the real `kd distill prune.kind=...` command."""

import json
import logging
import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import run_kd
from omegaconf import OmegaConf

from kdcli.config import validate
from kdcli.core import interrupt
from kdcli.core.errors import KdError
from kdcli.data import DeviceData, load_splits
from kdcli.losses import Objective
from kdcli.models import build_model
from kdcli.training import checkpoint
from kdcli.training import resume as resume_mod
from kdcli.training.engine import Trainee, fit
from kdcli.training.prune import Pruner, plain_state_dict, plan, prunable, sparsity, target_sparsity

SCHEDULE = {"initial": 0.5, "final": 0.75, "start_step": 0, "end_step": 100, "every": 50, "power": 3.0}


def pruner(model, kind="unstructured", **kw):
    return Pruner(model, kind=kind, **{**SCHEDULE, **kw})


# ---------------------------------------------------------------- the schedule


@pytest.mark.parametrize(
    "step, start, power, expected",
    [
        (0, 0, 3.0, 0.5),  # s_i at t0
        (50, 0, 3.0, 0.75 + (0.5 - 0.75) * 0.5**3),  # 0.71875
        (75, 0, 3.0, 0.75 - 0.25 * 0.25**3),  # 0.74609375
        (100, 0, 3.0, 0.75),  # s_f at t1
        (150, 0, 3.0, 0.75),  # and after it
        (5, 10, 3.0, 0.0),  # dense before t0
        (55, 10, 1.0, 0.75 - 0.25 * 0.5),  # linear: halfway between 10 and 100
    ],
)
def test_target_sparsity_follows_zhu_and_gupta(step, start, power, expected):
    assert target_sparsity(step, 0.5, 0.75, start, 100, power) == pytest.approx(expected, abs=1e-12)


def test_masks_change_every_n_steps_from_start_and_exactly_at_end():
    p = pruner(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), start_step=10, end_step=35, every=10)
    assert [s for s in range(50) if p.is_update(s)] == [10, 20, 30, 35]
    assert not p.reached(34) and p.reached(35)


def test_plan_resolves_a_null_end_and_refuses_one_past_the_run():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    node = OmegaConf.create({"kind": "channel", **SCHEDULE, "end_step": None})
    assert plan(node, 200, model)["end_step"] == 150  # 75 % of the run
    node.end_step = 300
    with pytest.raises(KdError, match=r"prune.end_step=300.*200 training steps.*prune.end_step <= 200"):
        plan(node, 200, model)
    node.end_step, node.start_step = None, 150
    with pytest.raises(KdError, match=r"prune.start_step=150 is not before.*gives 150"):
        plan(node, 200, model)
    with pytest.raises(KdError, match="no Linear or Conv layer besides its classifier"):
        plan(OmegaConf.create({**node, "start_step": 0}), 200, nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


# ---------------------------------------------------------------- masks of hand-made layers


def two_layers(weight: list) -> nn.Sequential:
    """A hidden layer with the given weight, then the classifier (never pruned)."""
    rows, cols = len(weight), len(weight[0])
    model = nn.Sequential(nn.Linear(cols, rows, bias=False), nn.ReLU(), nn.Linear(rows, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(weight))
    return model


def test_unstructured_zeroes_exactly_the_smallest_magnitudes():
    w = [[1.0, -2.0, 3.0, -4.0], [0.5, 6.0, -7.0, 8.0], [9.0, -0.1, 11.0, 12.0]]
    model = two_layers(w)
    p = pruner(model, initial=0.5, final=0.5)
    assert p.update(0)
    # Half of the 12 weights: |w| 0.1, 0.5, 1, 2, 3, 4 are the six smallest.
    expected = torch.tensor([[0, 0, 0, 0], [0, 6.0, -7.0, 8.0], [9.0, 0, 11.0, 12.0]])
    p.make_permanent()
    assert torch.equal(model[0].weight, expected)
    assert sparsity(model) == 0.5


def test_channel_zeroes_the_rows_of_lowest_l2_norm():
    # Row norms: 5, 1, 10, 3 (sqrt(4 + 4 + 1)): half the rows go, the ones of norm 1 and 3.
    w = [[3.0, 4.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 6.0, 8.0], [2.0, 2.0, 1.0, 0.0]]
    model = two_layers(w)
    p = pruner(model, kind="channel", initial=0.5, final=0.5)
    p.update(0)
    p.make_permanent()
    expected = torch.tensor(w)
    expected[[1, 3]] = 0
    assert torch.equal(model[0].weight, expected)


def test_channel_pruning_of_a_conv_takes_whole_output_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 2, 5, 5))  # materialise the classifier
    with torch.no_grad():  # output channel k has norm k + 1: channels 0..5 are the lowest six
        for k in range(8):
            model[0].weight[k] = (k + 1) / model[0].weight[k].norm() * model[0].weight[k]
    p = pruner(model, kind="channel", initial=0.75, final=0.75)
    p.update(0)
    p.make_permanent()
    zero = [bool((model[0].weight[k] == 0).all()) for k in range(8)]
    assert zero == [True] * 6 + [False] * 2


def test_the_classifier_is_never_pruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 9, 8), nn.ReLU(), nn.Linear(8, 3))
    before = model[4].weight.detach().clone()
    assert [name for name, _ in prunable(model)] == ["0", "2"]
    p = pruner(model, start_step=0, end_step=2, every=1)
    for step in range(3):
        p.update(step)
    assert not hasattr(model[4], "weight_mask") and torch.equal(model[4].weight, before)
    assert "4.weight_mask" not in model.state_dict() and "2.weight_mask" in model.state_dict()


def test_pruned_weights_stay_zero_as_the_sparsity_rises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 2))
    p = pruner(model, start_step=0, end_step=10, every=2)
    layer, zeros, shares = model[0], torch.zeros(30, 20, dtype=torch.bool), []
    for step in range(11):
        with torch.no_grad():  # training moves every stored weight, the masked ones too (momentum)
            layer.weight_orig.add_(0.05 * torch.randn_like(layer.weight_orig))
        if p.update(step):
            now = (layer.weight_orig * layer.weight_mask) == 0
            assert bool(now[zeros].all()), f"a weight pruned before step {step} came back"
            zeros = now
            shares.append(sparsity(model))
    # Steps 0, 2, ..., 10 of 600 weights: round(600 * s_t) each time.
    expected = [round(600 * target_sparsity(s, 0.5, 0.75, 0, 10, 3.0)) / 600 for s in range(0, 11, 2)]
    assert shares == expected and shares[-1] == 0.75


def test_sparsity_reads_the_effective_weight_and_plain_models():
    model = two_layers([[1.0, 0.0], [3.0, 4.0]])
    assert sparsity(model) == 0.25  # one exact zero of four (the classifier does not count)
    p = pruner(model, initial=0.5, final=0.5)
    p.update(0)
    assert sparsity(model) == 0.5  # weight_orig * weight_mask, before any forward pass
    p.make_permanent()
    assert sparsity(model) == 0.5 and not hasattr(model[0], "weight_orig")


def test_plain_state_dict_folds_orig_times_mask_and_loads_into_the_plain_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    p = pruner(model, initial=0.6, final=0.6)
    p.update(0)
    state = model.state_dict()
    plain = plain_state_dict(state)
    assert sorted(plain) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert torch.equal(plain["0.weight"], state["0.weight_orig"] * state["0.weight_mask"])
    assert plain["2.weight"] is state["2.weight"]
    fresh = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    fresh.load_state_dict(plain)
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), model(x))


def test_the_optimizer_keeps_training_the_same_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    p = pruner(model, start_step=0, end_step=4, every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trained = {id(q) for g in optimizer.param_groups for q in g["params"]}
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    for step in range(5):
        p.update(step)
        assert {id(q) for q in model.parameters()} == trained
        before = model[0].weight_orig.detach().clone()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        kept = model[0].weight_mask.bool()
        assert not torch.equal(model[0].weight_orig[kept], before[kept])  # the optimizer moves the kept weights
    p.make_permanent()
    assert {id(q) for q in model.parameters()} == trained


def test_a_state_dict_restores_the_masks_into_a_fresh_pruner():
    """What resume relies on: the masks travel in the model's state dict."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))  # noqa: E731
    a = make()
    pa = pruner(a, start_step=0, end_step=6, every=2)
    for step in range(5):
        pa.update(step)
    b = make()
    pb = pruner(b, start_step=0, end_step=6, every=2)
    b.load_state_dict(a.state_dict())
    for name in ("0", "2"):
        assert torch.equal(b.get_submodule(name).weight_mask, a.get_submodule(name).weight_mask)
    x = torch.randn(5, 8)
    assert torch.equal(b(x), a(x))
    assert pa.update(6) and pb.update(6)  # and the schedule goes on alike
    assert torch.equal(b(x), a(x)) and sparsity(b) == sparsity(a) == 0.75


# ---------------------------------------------------------------- the training loop, in-process

DATA = {"name": "mnist5k", "val_size": 200, "split_seed": 0, "classes": None, "limit": 400}
ARCH = {"name": "mlp", "kwargs": {"hidden": [32]}}
# 3 epochs of 4 steps; masks at steps 2, 4, 6, 8, 10 (every 2 from 2, the last at 10).
PLAN = {"kind": "unstructured", "initial": 0.5, "final": 0.75, "start_step": 2, "end_step": 10, "every": 2, "power": 3}


def recipe():
    trainer = {"epochs": 3, "batch_size": 50, "eval_batch_size": 1000, "max_batches": 4, "grad_clip": 1.0}
    return OmegaConf.create(
        {
            "seed": 0,
            "trainer": trainer,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "scheduler": {"name": "none"},
        }
    )


class StopAt(Objective):
    """Fails as epoch `stop` begins: the training state of the epoch before stays on disk."""

    def __init__(self, stop: int):
        self.stop_at = stop  # before Objective.__init__, which calls set_epoch
        super().__init__()

    def set_epoch(self, epoch: int, epochs: int, hint: bool = False) -> dict:
        if epoch == self.stop_at:
            raise RuntimeError("stopped")
        return super().set_epoch(epoch, epochs, hint)


class SignalAt(Objective):
    """Sends this process SIGINT during training step `step` of the run (from 1), as Ctrl-C would:
    the loop finishes that step, its mask update included, saves a mid-epoch state and stops."""

    def __init__(self, step: int):
        self.signal_at, self.calls = step, 0  # before Objective.__init__, as in StopAt
        super().__init__()

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.signal_at:
            signal.raise_signal(signal.SIGINT)  # caught by interrupt's handler: the step goes on
        return super().forward(*args, **kwargs)


def pruned_fit(data, run_dir: Path, objective=None, resume=False):
    torch.manual_seed(0)
    model = build_model("mlp", data.info.input_shape, data.info.num_classes, ARCH["kwargs"])
    meta = {"arch": ARCH, "data": {**data.info.to_dict(), "dataset": DATA}}
    trainee = Trainee("student", model, objective or Objective(), meta, pruner=Pruner(model, **PLAN))
    torch.manual_seed(1)
    return fit(trainee, data, recipe(), run_dir=run_dir, resume=resume)


@pytest.fixture(scope="module")
def data():
    return DeviceData(load_splits(DATA, "unused"), torch.device("cpu"))


def test_fit_prunes_along_the_schedule_and_only_a_final_epoch_is_best(tmp_path, data):
    result = pruned_fit(data, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # 25,088 weights in the hidden layer; after steps 4, 8, 12: s_t = 0.75 - 0.25 (1 - (t - 2) / 8)^3
    assert [r["sparsity"] for r in rows] == [0.75 - 0.25 * 0.75**3, 0.75 - 0.25 * 0.25**3, 0.75]
    assert result.metrics["best_epoch"] == 3 and result.metrics["sparsity"] == 0.75
    assert not any(k.endswith(("_orig", "_mask")) for k in result.model.state_dict())  # plain module back
    for path in (result.best_path, result.last_path):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert sorted(state) == ["1.bias", "1.weight", "3.bias", "3.weight"]
        assert int((state["1.weight"] == 0).sum()) == 18816  # 0.75 * 25088
    torch.testing.assert_close(result.model.state_dict(), checkpoint.load(result.best_path)["state_dict"])


def test_a_resumed_fit_ends_with_the_masks_of_an_uninterrupted_one(tmp_path, data, caplog):
    whole = pruned_fit(data, tmp_path / "whole")
    with pytest.raises(RuntimeError, match="stopped"):
        pruned_fit(data, tmp_path / "cut", StopAt(3))  # the state after epoch 2 (step 8, mid-schedule) stays
    with caplog.at_level(logging.INFO, logger="kdcli"):
        resumed = pruned_fit(data, tmp_path / "cut", resume=True)
    assert "resuming after epoch 2 + 0 step(s)" in caplog.text
    a, b = checkpoint.load(whole.best_path)["state_dict"], checkpoint.load(resumed.best_path)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A loop that had finished hands back its checkpoint's weights, plain, into a pruned model.
    again = pruned_fit(data, tmp_path / "cut", resume=True)
    assert all(torch.equal(again.model.state_dict()[k], a[k]) for k in a) and again.metrics["sparsity"] == 0.75


def test_a_fit_stopped_mid_epoch_right_after_a_mask_update_resumes_exactly(tmp_path, data, caplog):
    whole = pruned_fit(data, tmp_path / "whole")
    # Step 6 is step 2 of epoch 2's 4, and a mask update: the state saved on the signal holds its masks.
    with interrupt.handled(), pytest.raises(interrupt.Interrupted):
        pruned_fit(data, tmp_path / "cut", SignalAt(6))
    state = resume_mod.load(resume_mod.state_path(tmp_path / "cut" / "checkpoints", ["student"]))
    assert (state["status"], state["epochs_done"], state["step"]) == ("running", 1, 2)
    mask = state["trainees"]["student"]["model"]["1.weight_mask"]
    assert int((mask == 0).sum()) == 18032  # s_6 = 0.75 - 0.25 (1 - 4/8)^3 = 0.71875 of the 25,088 weights
    with caplog.at_level(logging.INFO, logger="kdcli"):
        resumed = pruned_fit(data, tmp_path / "cut", resume=True)
    assert "resuming after epoch 1 + 2 step(s)" in caplog.text
    for which in ("best", "last"):  # the weights, their zeros (the final masks) included, bit for bit
        a, b = (checkpoint.load(tmp_path / run / "checkpoints" / f"student_{which}.pt") for run in ("whole", "cut"))
        assert a["epoch"] == b["epoch"] and sorted(a["state_dict"]) == sorted(b["state_dict"])
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), which
    assert all(torch.equal(v, whole.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    # Epoch 2's row sums the steps before and after the stop: the same losses, accuracies, sparsities.
    rows = {
        run: [
            {k: v for k, v in json.loads(line).items() if k != "epoch_s"}
            for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]
        for run in ("whole", "cut")
    }
    assert rows["cut"] == rows["whole"] and [r["epoch"] for r in rows["cut"]] == [1, 2, 3]
    figures = {
        run: {k: v for k, v in res.metrics.items() if k not in ("train_s", "checkpoint")}
        for run, res in (("whole", whole), ("cut", resumed))
    }
    assert figures["cut"] == figures["whole"] and figures["cut"]["sparsity"] == 0.75


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "override, message",
    [
        ("prune.kind=random", "prune.kind=random: choose one of none, unstructured, channel"),
        ("prune.final=1.2", "prune.final=1.2 must satisfy 0 <= initial <= final < 1"),
        ("prune.initial=0.8", "prune.initial=0.8 and prune.final=0.75 must satisfy"),
        ("prune.initial=-0.1", "prune.initial=-0.1"),
        ("prune.start_step=-1", "prune.start_step=-1 must be >= 0"),
        ("prune.end_step=0", "prune.end_step=0 must be after prune.start_step=0"),
        ("prune.every=0", "prune.every=0 must be >= 1"),
        ("prune.power=0", "prune.power=0.0 must be > 0"),
    ],
)
def test_bad_prune_values_name_the_key_and_the_fix(hydra_cfg, override, message):
    with pytest.raises(KdError) as e:
        validate(hydra_cfg("distill", [override]), "distill")
    assert message in str(e.value)


def test_defaults_do_not_prune(hydra_cfg):
    cfg = hydra_cfg("distill")
    validate(cfg, "distill")
    assert cfg.prune.kind == "none" and cfg.prune.end_step is None and cfg.prune.every == 50


# ---------------------------------------------------------------- the real command

SMOKE = ("debug=smoke", "baseline=false", "trainer.epochs=2", "trainer.max_batches=6", "dataset.limit=512")
SCHEDULED = ("prune.end_step=8", "prune.every=2")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    r = run_kd("train-teacher", "debug=smoke", f"hydra.run.dir={root / 't'}", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(root / "t" / "checkpoints" / "teacher_best.pt")


def the_run(root: Path) -> Path:
    (run,) = list((root / "runs" / "distill").iterdir())
    return run


def student(run: Path, which: str = "best") -> dict:
    return torch.load(run / "checkpoints" / f"student_{which}.pt", weights_only=True)


@pytest.mark.slow
def test_distill_unstructured_writes_plain_checkpoints_at_the_final_sparsity(kd, teacher):
    r = kd("distill", *SMOKE, *SCHEDULED, f"teacher.ckpt={teacher}", "prune.kind=unstructured")
    assert r.returncode == 0, r.stdout + r.stderr
    run = the_run(kd.dir)
    ckpt = student(run)
    assert not any(k.endswith(("_orig", "_mask")) for k in ckpt["state_dict"])
    assert ckpt["epoch"] == 2  # epoch 1 ends at step 6, before the final sparsity (step 8): never best
    model = checkpoint.build_from(ckpt)
    assert sparsity(model) == pytest.approx(0.75, abs=1e-4)
    assert ckpt["pruning"] == {**PLAN, "start_step": 0, "end_step": 8, "power": 3.0}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student"]["sparsity"] == pytest.approx(0.75, abs=1e-4)
    assert metrics["student"]["pruning"]["end_step"] == 8
    # Epoch 1 ends after the mask of step 6: 0.75 - 0.25 (1 - 6/8)^3 of the 200,704 hidden weights.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["sparsity"] for row in rows] == [0.74609375, 0.75]
    assert "sparsity 74.6%" in r.stderr + r.stdout  # the epoch line
    assert "75.00% of its prunable weights are zero (prune.kind=unstructured" in r.stdout  # under the table
    assert sparsity(checkpoint.build_from(student(run, "last"))) == pytest.approx(0.75, abs=1e-4)


@pytest.mark.slow
def test_distill_channel_zeroes_whole_rows(kd, teacher):
    r = kd("distill", *SMOKE, *SCHEDULED, f"teacher.ckpt={teacher}", "prune.kind=channel")
    assert r.returncode == 0, r.stdout + r.stderr
    weight = student(the_run(kd.dir))["state_dict"]["1.weight"]  # mlp's hidden layer: 256 rows of 784
    zero_rows = (weight == 0).all(1)
    assert int(zero_rows.sum()) == 192  # 0.75 * 256
    assert int((weight == 0).sum()) == 192 * 784  # no zero outside those rows


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (("prune.kind=unstructured", "prune.final=1.2"), "prune.final=1.2 must satisfy 0 <= initial <= final < 1"),
        (("prune.kind=random",), "prune.kind=random: choose one of none, unstructured, channel"),
        (("prune.kind=channel", "prune.end_step=100"), "prune.end_step=100, past the run's end: it has 12 training"),
        (("prune.kind=unstructured", "method=dml"), "prune.kind=unstructured prunes the distilled student of"),
    ],
)
def test_bad_prune_settings_exit_1_before_training(kd, args, message):
    r = kd("distill", *SMOKE, *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert message in r.stderr + r.stdout
    assert not (kd.dir / "runs" / "train_teacher").exists()  # no teacher was trained first


def test_a_student_whose_attention_reads_weights_directly_is_refused():
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj: a mask would not apply."""

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Linear(784, 32)
            self.att = torch.nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = torch.nn.Linear(32, 10)

        def forward(self, x):
            h = self.emb(x.flatten(1))[:, None]
            return self.fc(self.att(h, h, h)[0][:, 0])

    node = OmegaConf.create(
        {
            "kind": "unstructured",
            "initial": 0.5,
            "final": 0.75,
            "start_step": 0,
            "end_step": None,
            "every": 5,
            "power": 3.0,
        }
    )
    with pytest.raises(KdError, match=r"layers att.out_proj are used without calling their forward"):
        plan(node, 100, Attn(), (1, 28, 28))
    assert plan(node, 100, build_model("convnet", (1, 28, 28), 10), (1, 28, 28))["end_step"] == 75
