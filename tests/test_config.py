"""Validation of composed configs (Hydra compose API, as a notebook would use it)."""

import pytest
import torch

from kdcli.config import resolve_device, validate
from kdcli.core.errors import KdError


def test_defaults_compose_and_validate(hydra_cfg):
    cfg = hydra_cfg("distill")
    assert (cfg.T, cfg.alpha, cfg.teacher.name, cfg.student.name, cfg.dataset.name) == (
        4.0,
        0.0,
        "convnet",
        "mlp",
        "mnist5k",
    )
    validate(cfg, "distill")
    for command in ("train_teacher", "evaluate", "export"):
        validate(hydra_cfg(command), command)


@pytest.mark.parametrize(
    "override,message",
    [
        ("T=0", r"T must be > 0 \(got 0.0\)"),
        ("T=-1", r"T must be > 0 \(got -1.0\)"),
        ("alpha=1.5", r"alpha must be in \[0, 1\] \(got 1.5\)"),
        ("alpha=-0.1", r"alpha must be in \[0, 1\]"),
        ("trainer.epochs=0", r"trainer.epochs must be a number >= 1 \(got 0\)"),
        ("trainer.batch_size=0", r"trainer.batch_size must be a number >= 1"),
        ("trainer.max_batches=0", r"trainer.max_batches must be a number >= 1 or null"),
        ("optimizer.lr=0", r"optimizer.lr must be a number > 0 \(got 0\)"),
        ("optimizer.lr=abc", r"optimizer.lr must be a number > 0 \(got 'abc'\)"),
        ("dataset.limit=-5", r"dataset.limit must be a number >= 1 or null \(got -5\)"),
        ("trainer.precision=fp8", r"trainer.precision=fp8: choose fp32, bf16 or fp16"),
        ("trainer.teacher_precision=half", r"trainer.teacher_precision=half: choose fp32, bf16 or fp16"),
        ("trainer=gpu", None),
        (
            "trainer.selection=best",
            r"trainer.selection=best: choose last \(the end of the schedule\), val_acc or val_nll",
        ),
        ("trainer.selection=val_nll", None),
        ("distill_lr_scale=0", r"distill_lr_scale=0: choose auto"),
        ("distill_lr_scale=fast", r"distill_lr_scale=fast: choose auto"),
        ("distill_lr_scale=1", None),
        ("augment=affine", None),
        ("augment=rotate", r"augment=rotate: choose standard .*, affine .* or none"),
        ("teacher.ckpt=x.pt", None),
        ("student.name=resnet9000", r"student.name=resnet9000: unknown model. Available: convnet, lenet5, mlp"),
        ("objective=scratch.val_acc", None),
        ("objective=student.test_acc", r"objective=student.test_acc: the test split is never searched on"),
        ("objective=kd_gain", r"objective=kd_gain: Give a model's validation accuracy"),
        ("objective=teacher.val_acc", r"objective=teacher.val_acc: kd distill does not train its teacher"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_allowed_values(hydra_cfg, override, message):
    if message is None:  # valid for distill
        validate(hydra_cfg("distill", [override]), "distill")
        return
    with pytest.raises(KdError, match=message):
        validate(hydra_cfg("distill", [override]), "distill")


@pytest.mark.parametrize(
    "command,override,message",
    [
        ("train_teacher", "teacher.ckpt=x.pt", "teacher.ckpt is for kd distill"),
        ("train_teacher", "objective=student.val_acc", "kd train-teacher trains one model, the teacher"),
        ("evaluate", "eval_batch_size=0", r"eval_batch_size must be a number >= 1 \(got 0\)"),
        ("evaluate", "limit=0", r"limit must be a number >= 1 or null"),
        ("export", "batch_size=0", r"batch_size must be a number >= 1"),
        ("export", "atol=-1", r"atol must be a number >= 0"),
        ("export", "formats=[tflite]", r"formats=\['tflite'\]: choose from torchscript, onnx"),
    ],
)
def test_other_commands_check_their_values(hydra_cfg, command, override, message):
    with pytest.raises(KdError, match=message):
        validate(hydra_cfg(command, [override]), command)


def test_wrong_type_is_refused_by_the_schema(hydra_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="T=abc"):
        hydra_cfg("distill", ["T=abc"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_on_a_machine_without_one():
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(KdError, match=f"device={spec}: no CUDA device is available"):
            resolve_device(spec)


def test_unknown_device_lists_the_choices():
    with pytest.raises(KdError, match="device=gpu is not a device. Choose one of: auto, cpu, cuda, cuda:N, mps"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="a CPU-only machine")
def test_auto_is_the_cpu_on_a_cpu_only_machine():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
