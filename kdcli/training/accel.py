"""The GPU speed settings of `trainer`: mixed precision, channels-last memory layout,
torch.compile and a half-precision teacher.

    trainer.precision=bf16|fp16   autocast of the training step (fp16 with a gradient scaler)
    trainer.channels_last=true    conv nets and their 4-D inputs in NHWC layout (tensor cores)
    trainer.compile=true          torch.compile of each trained model's forward
    trainer.teacher_precision=bf16|fp16   the frozen teacher's forward in half precision (autocast;
                                   its weights stay float32, so its reported accuracy does not change)

They apply on CUDA devices. On a CPU (or MPS) they are accepted and ignored, with a note in the
log: CPU autocast and compilation rarely pay off for the small models one trains on a laptop, and a
config written for a GPU box must still run in a CPU smoke test.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from kdcli.config import TrainerConfig
from kdcli.config.choices import PRECISIONS
from kdcli.core.errors import KdError

log = logging.getLogger("kdcli")

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
assert tuple(DTYPES) == PRECISIONS, "trainer.precision: the schema's names and DTYPES differ"
KEYS = ("precision", "channels_last", "compile", "teacher_precision")
DEFAULTS = {k: getattr(TrainerConfig(), k) for k in KEYS}  # the schema's
APPLY_ON = {"cuda"}  # device types where the settings take effect (tests add "cpu" to run these paths)


@dataclass
class Speed:
    device_type: str = "cpu"
    dtype: Optional[torch.dtype] = None  # autocast dtype of the training step; None: float32
    scaler: Optional[torch.amp.GradScaler] = None  # fp16 only
    channels_last: bool = False
    compile: bool = False
    teacher_dtype: Optional[torch.dtype] = None

    @classmethod
    def of(cls, tcfg, device: torch.device) -> "Speed":
        asked = {k: tcfg.get(k, v) for k, v in DEFAULTS.items()}
        changed = [f"trainer.{k}={v}" for k, v in asked.items() if v != DEFAULTS[k]]
        if device.type not in APPLY_ON:
            if changed:
                log.info(f"speed    {', '.join(changed)}: CUDA settings, ignored on {device.type} (float32 here)")
            return cls(device.type)
        dtype, teacher_dtype = DTYPES[asked["precision"]], DTYPES[asked["teacher_precision"]]
        if (
            device.type == "cuda"
            and torch.bfloat16 in (dtype, teacher_dtype)
            and not torch.cuda.is_bf16_supported(False)
        ):
            raise KdError(
                f"{torch.cuda.get_device_name(device)} has no bfloat16 support: use trainer.precision=fp16 "
                "(and trainer.teacher_precision=fp16), or fp32."
            )
        speed = cls(
            device.type,
            dtype=dtype,
            scaler=torch.amp.GradScaler(device.type) if dtype is torch.float16 else None,
            channels_last=bool(asked["channels_last"]),
            compile=bool(asked["compile"]),
            teacher_dtype=teacher_dtype,
        )
        if changed:
            log.info(f"speed    {', '.join(changed)}")
        return speed

    def _autocast(self, dtype: Optional[torch.dtype]):
        return torch.autocast(self.device_type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def autocast(self):
        """The models' forward in a training step: in precision."""
        return self._autocast(self.dtype)

    def full_precision(self):
        """Inside autocast: float32 again (the objectives: logits and features come in as float32)."""
        return torch.autocast(self.device_type, enabled=False) if self.dtype is not None else contextlib.nullcontext()

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def prepare(self, model: nn.Module) -> nn.Module:
        """A trained model in the chosen layout (its parameters stay float32: autocast casts them)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def forward_of(self, model: nn.Module):
        """The callable that runs the model's forward in a training step: compiled or not."""
        return torch.compile(model) if self.compile else model

    def teacher_autocast(self):
        """The teacher's forward: in teacher_precision, whatever the student's step runs in."""
        return self._autocast(self.teacher_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Before gradient clipping: the gradients in their true scale."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
        else:
            optimizer.step()

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> Optional[dict]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
