"""The GPU speed settings of `trainer` (kdcli/training/accel.py). On a CPU they are ignored with a note;
with "cpu" added to the device types they apply on, their code paths run here: autocast of the
student's step and of the teacher's forward (each in its own precision), fp16's gradient scaler,
channels-last inputs and weights, and torch.compile."""

import copy

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

import kdcli
from kdcli.models import build_model
from kdcli.training import accel
from kdcli.training.accel import Speed


def _trainer(**keys):
    return OmegaConf.create({**accel.DEFAULTS, **keys})


def test_on_a_cpu_the_settings_are_noted_and_ignored(caplog):
    with caplog.at_level("INFO", logger="kdcli"):
        speed = Speed.of(_trainer(precision="bf16", compile=True), torch.device("cpu"))
    assert (speed.dtype, speed.scaler, speed.channels_last, speed.compile, speed.teacher_dtype) == (
        None,
        None,
        False,
        False,
        None,
    )
    assert "trainer.precision=bf16, trainer.compile=True: CUDA settings, ignored on cpu" in caplog.text
    with caplog.at_level("INFO", logger="kdcli"):
        caplog.clear()
        Speed.of(_trainer(), torch.device("cpu"))
    assert caplog.text == ""  # nothing asked, nothing said


def test_where_they_apply_fp16_brings_a_gradient_scaler_and_bf16_none(monkeypatch):
    monkeypatch.setattr(accel, "APPLY_ON", {"cuda", "cpu"})
    fp16 = Speed.of(_trainer(precision="fp16"), torch.device("cpu"))
    bf16 = Speed.of(_trainer(precision="bf16", teacher_precision="fp16"), torch.device("cpu"))
    assert fp16.dtype is torch.float16 and isinstance(fp16.scaler, torch.amp.GradScaler)
    assert bf16.dtype is torch.bfloat16 and bf16.scaler is None and bf16.teacher_dtype is torch.float16
    assert fp16.state_dict()["scale"] == 2.0**16 and bf16.state_dict() is None


class _Spy:
    """Records, per forward of a module, (in a training step, output dtype, channels-last input).
    A training step's batch has 64 images (trainer.batch_size); evaluation batches are larger."""

    def __init__(self, module: nn.Module):
        self.seen = []
        module.register_forward_hook(self.hook)

    def hook(self, module, args, out):
        x = args[0]
        channels_last = x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)
        self.seen.append((len(x) == 64, out.dtype, channels_last))

    def dtypes(self, in_step: bool) -> set:
        return {dtype for step, dtype, _ in self.seen if step == in_step}


def _distill(tmp_path, student, teacher, features=None, **trainer):
    data = kdcli.load_data("mnist5k", device="cpu", limit=600, augment="none")
    overrides = [f"trainer.{k}={v}" for k, v in trainer.items()]
    return kdcli.distill(
        teacher, student, data, epochs=2, run_dir=tmp_path / "run", overrides=overrides, features=features
    )


@pytest.mark.parametrize("precision, teacher_precision", [("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp16")])
def test_mixed_precision_runs_the_step_and_the_teacher_each_in_its_own(
    tmp_path, monkeypatch, precision, teacher_precision
):
    monkeypatch.setattr(accel, "APPLY_ON", {"cuda", "cpu"})
    torch.manual_seed(0)
    student, teacher = build_model("mlp", (1, 28, 28), 10), build_model("mlp", (1, 28, 28), 10)
    s_spy, t_spy = _Spy(student), _Spy(teacher)
    steps, objective_inputs = [], []
    original = Speed.step
    monkeypatch.setattr(Speed, "step", lambda self, opt: (steps.append(self.scaler is not None), original(self, opt)))
    from kdcli.losses import Objective

    forward = Objective.forward

    def spied(self, s_logits, *args, **kw):
        objective_inputs.append((s_logits.dtype, torch.is_autocast_enabled("cpu")))
        return forward(self, s_logits, *args, **kw)

    monkeypatch.setattr(Objective, "forward", spied)
    result = _distill(tmp_path, student, teacher, precision=precision, teacher_precision=teacher_precision)
    assert s_spy.dtypes(in_step=True) == {accel.DTYPES[precision]}  # the student's step under autocast
    assert s_spy.dtypes(in_step=False) == {torch.float32}  # validation and test: float32
    assert t_spy.dtypes(in_step=True) == {accel.DTYPES[teacher_precision] or torch.float32}  # its own precision
    assert t_spy.dtypes(in_step=False) == {torch.float32}  # its reported accuracy: float32
    assert steps and all(s == (precision == "fp16") for s in steps)  # the scaler steps fp16 only
    assert set(objective_inputs) == {(torch.float32, False)}  # the loss itself in float32, autocast off
    assert all(p.dtype is torch.float32 for p in student.parameters())  # master weights stay float32
    monkeypatch.undo()
    torch.manual_seed(0)
    student, teacher = build_model("mlp", (1, 28, 28), 10), build_model("mlp", (1, 28, 28), 10)
    reference = _distill(tmp_path / "fp32", student, teacher)  # the same run in float32
    assert result.metrics["val_acc"] == pytest.approx(reference.metrics["val_acc"], abs=0.03)


def test_channels_last_reaches_a_conv_students_inputs_and_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(accel, "APPLY_ON", {"cuda", "cpu"})
    torch.manual_seed(0)
    student, teacher = build_model("convnet", (1, 28, 28), 10), build_model("mlp", (1, 28, 28), 10)
    conv = next(m for m in student.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    spy = _Spy(conv)
    _distill(tmp_path, student, teacher, channels_last=True)
    assert any(step and cl for step, _, cl in spy.seen)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
@pytest.mark.parametrize("features", [None, ["rkd"]], ids=["logits", "with-feature-hooks"])
def test_compile_compiles_the_students_forward(tmp_path, monkeypatch, features):
    """Also with a feature term, whose forward hook (the `penultimate` tap) runs inside the compiled
    forward: the same training as the eager run, and a fixed number of graphs (no recompiling per step)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(accel, "APPLY_ON", {"cuda", "cpu"})
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    student, teacher = build_model("mlp", (1, 28, 28), 10), build_model("mlp", (1, 28, 28), 10)
    plain = _distill(tmp_path / "plain", copy.deepcopy(student), teacher, features)  # the same initial weights
    compiled = _distill(tmp_path / "compiled", student, teacher, features, compile=True)
    assert 1 <= counters["stats"]["unique_graphs"] <= 8  # 2 epochs x 9 steps: compiled once, not per step
    assert compiled.metrics["val_acc"] == pytest.approx(plain.metrics["val_acc"], abs=0.01)


def test_trainer_gpu_runs_on_a_cpu_with_a_note(kd):
    r = kd("distill", "trainer=gpu", "debug=smoke", "device=cpu", "baseline=false")
    assert r.returncode == 0, r.stdout + r.stderr
    text = " ".join(r.stdout.split())
    assert (
        "trainer.precision=bf16, trainer.channels_last=True, trainer.compile=True, trainer.teacher_precision=bf16: "
        "CUDA settings, ignored on cpu" in text
    )
