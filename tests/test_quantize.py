"""kd quantize in-process: int8 files with their card, and a quantizer failure turned into one
message that leaves no half-written file behind."""

from pathlib import Path

import pytest
import torch

from kdcli.commands import quantize
from kdcli.core.errors import KdError
from kdcli.core.run import Context
from kdcli.data import DeviceData, load_splits
from kdcli.deploy import formats
from kdcli.models import build_model
from kdcli.training import checkpoint
from kdcli.training.build import ckpt_meta

DATA = {"name": "mnist5k", "val_size": 200, "split_seed": 0, "classes": None, "limit": 400}


@pytest.fixture
def student(tmp_path) -> Path:
    data = DeviceData(load_splits(DATA, "unused"), torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model("mlp", data.info.input_shape, 10, {"hidden": [32]})
    path = tmp_path / "student_best.pt"
    checkpoint.save(path, model, role="student", **ckpt_meta({"name": "mlp", "kwargs": {"hidden": [32]}}, data, DATA))
    return path


def _cfg(hydra_cfg, path: Path, *more: str):
    return hydra_cfg("quantize", [f"checkpoint={path}", "latency.repeats=1", "latency.warmup=0", *more])


def test_int8_files_carry_their_card_and_score_like_their_float_model(hydra_cfg, student, tmp_path):
    cfg = _cfg(hydra_cfg, student, "calibration=64")
    out = quantize.run(cfg, Context(tmp_path, torch.device("cpu"), multirun=False))
    rows = out["models"]
    assert list(rows) == ["float, pytorch", "float, onnx", "int8 dynamic, onnx", "int8 static, onnx"]
    assert rows["float, onnx"]["agreement_with_float"] == 1.0 and rows["float, onnx"]["acc_change"] == 0.0
    for mode in ("dynamic", "static"):
        card = formats.open_model(tmp_path / f"mlp_student.int8-{mode}.onnx").card
        assert card["quantization"]["mode"] == mode and card["source_checkpoint"] == str(student.resolve())
        assert rows[f"int8 {mode}, onnx"]["agreement_with_float"] > 0.9
    assert (
        formats.open_model(tmp_path / "mlp_student.int8-static.onnx").card["quantization"]["calibration_images"] == 64
    )
    assert not list(tmp_path.glob(".*"))  # no prepared model, no temp file left


def test_a_quantizer_failure_is_one_message_and_leaves_no_file(hydra_cfg, student, tmp_path, monkeypatch):
    import onnxruntime.quantization as ortq

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported op: Foo\nmore detail")

    monkeypatch.setattr(ortq, "quantize_dynamic", broken)
    cfg = _cfg(hydra_cfg, student, "modes=[dynamic]")
    with pytest.raises(
        KdError, match=r"dynamic quantization of .*student_best.pt failed: RuntimeError: Unsupported op: Foo\. "
    ) as e:
        quantize.run(cfg, Context(tmp_path, torch.device("cpu"), multirun=False))
    assert "modes=[dynamic]" not in str(e.value)  # not the mode that just failed
    assert "onnxruntime" in str(e.value)
    assert not (tmp_path / "mlp_student.int8-dynamic.onnx").exists()
    assert not list(tmp_path.glob(".*"))


def test_an_exported_file_is_not_a_starting_point(hydra_cfg, student, tmp_path):
    model = checkpoint.build_from(checkpoint.load(student))
    onnx_path = tmp_path / "m.onnx"
    formats.export_onnx(
        model, torch.zeros(2, 1, 28, 28), onnx_path, formats.card_of(checkpoint.load(student), student), 18
    )
    with pytest.raises(KdError, match=r"m.onnx is an exported onnx file; kd quantize starts from a kdcli checkpoint"):
        quantize.run(_cfg(hydra_cfg, onnx_path), Context(tmp_path, torch.device("cpu"), multirun=False))
