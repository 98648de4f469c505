"""Validation of composed configs (Hydra compose API, as a notebook would use it)."""

import pytest
import torch

from kdcli.config import resolve_device, validate
from kdcli.errors import KdError


def test_defaults_compose_and_validate(hydra_cfg):
    cfg = hydra_cfg("distill")
    assert (cfg.T, cfg.alpha, cfg.teacher.name, cfg.student.name, cfg.dataset.name) == (
        4.0,
        0.1,
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
        ("trainer.epochs=0", r"trainer.epochs must be >= 1 \(got 0\)"),
        ("trainer.batch_size=0", r"trainer.batch_size must be >= 1"),
        ("optimizer.lr=0", r"optimizer.lr must be > 0"),
        ("device=gpu", r"device=gpu is not a device. Choose one of: auto, cpu, cuda, cuda:N, mps"),
        ("student.name=resnet9000", r"student.name=resnet9000: unknown model. Available: convnet, lenet5, mlp"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_allowed_values(hydra_cfg, override, message):
    with pytest.raises(KdError, match=message):
        validate(hydra_cfg("distill", [override]), "distill")


def test_wrong_type_is_refused_by_the_schema(hydra_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="T=abc"):
        hydra_cfg("distill", ["T=abc"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_on_a_machine_without_one():
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(KdError, match=f"device={spec}: no CUDA device is available"):
            resolve_device(spec)


def test_auto_and_cpu_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
