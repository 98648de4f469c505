"""Weight transfer from teacher to student, and the check of module names to freeze."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from kdcli.core.errors import KdError
from kdcli.core.registry import did_you_mean

log = logging.getLogger("kdcli")


@torch.no_grad()
def copy_matching(student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
    """Copy every teacher tensor (parameters and buffers) into the student tensor of the same
    name and shape. Returns (copied names, student names left as initialised)."""
    source = teacher.state_dict()
    copied, kept = [], []
    for name, tensor in student.state_dict().items():
        other = source.get(name)
        if other is not None and other.shape == tensor.shape and other.dtype == tensor.dtype:
            tensor.copy_(other.to(tensor.device))
            copied.append(name)
        else:
            kept.append(name)
    return copied, kept


def check_module_names(model: nn.Module, names: list[str], key: str) -> None:
    modules = dict(model.named_modules())
    for name in names:
        if not name or name not in modules:
            choices = [n for n in modules if n]
            raise KdError(
                f"{key}: the student has no module '{name}'.{did_you_mean(name, choices)} "
                f"Its modules: {', '.join(choices)}."
            )


def summarise(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
