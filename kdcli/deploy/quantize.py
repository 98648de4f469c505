"""int8 quantization of an ONNX file with ONNX Runtime: dynamic (weights) or static (weights and
activations, calibrated on training images), the model card carried over."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from kdcli.core.files import atomic_write
from kdcli.deploy import formats


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol: one input dict per call, None at the end."""

    def __init__(self, x: torch.Tensor, batch_size: int):
        self.batches = iter([{"input": x[i : i + batch_size].numpy()} for i in range(0, len(x), batch_size)])

    def get_next(self):
        return next(self.batches, None)


@contextlib.contextmanager
def quiet():
    """ONNX Runtime's quantizer logs its progress on the root logger, which prints kdcli's lines."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_onnx(mode: str, prepared: Path, target: Path, cfg, calib: torch.Tensor | None, card: dict) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    def write(tmp: str) -> None:
        if mode == "dynamic":
            quantize_dynamic(
                prepared,
                tmp,
                op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=cfg.per_channel,
                weight_type=QuantType.QInt8,
            )
        else:
            quantize_static(
                prepared,
                tmp,
                _Calibration(calib, 64),
                quant_format=QuantFormat.QDQ if cfg.static_format == "qdq" else QuantFormat.QOperator,
                per_channel=cfg.per_channel,
                activation_type=QuantType.QUInt8,  # u8 activations, s8 weights: the fast path on x86 and ARM
                weight_type=QuantType.QInt8,
            )
        formats.set_onnx_card(tmp, card)  # before the rename: the file appears whole, card included

    atomic_write(target, write)
