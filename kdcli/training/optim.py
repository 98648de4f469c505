"""Optimizers and learning-rate schedules from their config groups (configs/optimizer,
configs/scheduler). Schedules step once per training step."""

from __future__ import annotations

import inspect

import torch
from torch.optim import lr_scheduler

from kdcli.config import group_kwargs
from kdcli.config.choices import OPTIMIZERS
from kdcli.core.errors import KdError

OPTIMIZER_CLASSES = {name: getattr(torch.optim, cls) for name, cls in OPTIMIZERS.items()}  # the schema's names


def _fusable(params) -> bool:
    """torch's fused optimizers take floating-point parameters on the CPU or a CUDA device."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(params, cfg, fused: bool = True, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """The optimizer cfg names over params, at lr_scale times its learning rate; with `fused` (and
    unless cfg sets foreach or fused), its fused update where torch has one for these parameters."""
    cls = OPTIMIZER_CLASSES[cfg.name]
    kwargs = group_kwargs(cfg)
    if lr_scale != 1.0:
        kwargs["lr"] = kwargs["lr"] * lr_scale
    allowed = set(inspect.signature(cls).parameters) - {"params"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise KdError(
            f"optimizer {cfg.name} has no parameter {', '.join(sorted(unknown))}. "
            f"Its parameters: {', '.join(sorted(allowed))}."
        )
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    params = list(params)
    if fused and not {"fused", "foreach"} & set(kwargs) and "fused" in allowed and _fusable(params):
        # One kernel for the whole update instead of a loop over tensors: on a small model the
        # loop's overhead was a fifth of a training step (scripts/profile_step.py).
        kwargs["fused"] = True
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as e:  # torch checks the ranges: say which group it was
        raise KdError(f"optimizer {cfg.name} with {kwargs}: {e}") from None


def build_scheduler(optimizer, cfg, steps_per_epoch: int, epochs: int):
    """None for `none`; warm-up (linear from 0.1 x lr) then the schedule for cosine and step."""
    total = steps_per_epoch * epochs
    kw = group_kwargs(cfg)
    if cfg.name == "none":
        return None
    if cfg.name == "onecycle":
        lr = optimizer.param_groups[0]["lr"]
        return lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=kw.get("pct_start", 0.25))
    warmup = int(round(kw.get("warmup_epochs", 0) * steps_per_epoch))
    if warmup >= total:
        raise KdError(f"scheduler.warmup_epochs={kw.get('warmup_epochs')} covers the whole run ({epochs} epochs).")
    if cfg.name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=kw.get("min_lr", 0.0))
    else:  # step
        main = lr_scheduler.StepLR(
            optimizer, step_size=max(1, int(kw["step_epochs"] * steps_per_epoch)), gamma=kw["gamma"]
        )
    if warmup == 0:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
