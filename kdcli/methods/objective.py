"""The objective a trainee of kd distill learns with, built from the config: the logit loss (loss=),
the feature terms (features=) with the shapes of the layers they tap, the T and alpha schedules."""

from __future__ import annotations

import logging

import torch
from omegaconf import OmegaConf

from kdcli.config import group_kwargs
from kdcli.core import distributed
from kdcli.core.errors import KdError
from kdcli.core.registry import FEATURE_LOSSES, LOSSES
from kdcli.data import DeviceData
from kdcli.losses import Objective, Schedule, Shapes
from kdcli.losses.objective import FeatureTerm
from kdcli.losses.taps import Taps
from kdcli.training.engine import Teacher

log = logging.getLogger("kdcli")


def _layers(node, key: str) -> list[str]:
    value = node[key]
    return [str(v) for v in value] if OmegaConf.is_list(value) or isinstance(value, list) else [str(value)]


@torch.no_grad()
def _tap_shapes(model, names: list[str], role: str, data: DeviceData) -> list[tuple]:
    taps = Taps(model, names, role, data.info.input_shape)
    was_training = model.training
    model.eval()
    try:
        model(data.train.head(2))
        values = taps.take()
        for name, v in zip(names, values):
            if v is None:
                raise KdError(
                    f"{role}_layer={name}: that layer does not run in the {role}'s forward pass; pick another."
                )
        return [tuple(v.shape[1:]) for v in values]
    finally:
        taps.remove()
        model.train(was_training)


def build_objective(cfg, data: DeviceData, student, teacher=None, teachers: list[Teacher] = ()) -> Objective:
    """The student's objective from the loss, schedule, weighting and features config. Feature
    shapes are found with one forward of two training images through student and teacher."""
    sch = cfg.schedule
    features = []
    for name, node in (cfg.features or {}).items():
        s_layers, t_layers = _layers(node, "student_layer"), _layers(node, "teacher_layer")
        if len(s_layers) != len(t_layers):
            raise KdError(
                f"features.{name}: {len(s_layers)} student layer(s) {s_layers} but {len(t_layers)} teacher layer(s) "
                f"{t_layers}; they are matched in pairs."
            )
        shapes = Shapes(
            _tap_shapes(student, s_layers, "student", data),
            _tap_shapes(teacher.model if isinstance(teacher, Teacher) else teacher, t_layers, "teacher", data),
            len(data.train),
            int(cfg.seed),
        )
        params = {k: v for k, v in group_kwargs(node).items() if k not in ("student_layer", "teacher_layer")}
        if params.get("weight", 0) < 0:
            raise KdError(f"features.{name}.weight must be >= 0 (got {params['weight']}).")
        module = FEATURE_LOSSES.build(name, shapes, **params)
        if distributed.world() > 1 and any(True for _ in module.buffers()):
            raise KdError(
                f"features.{name} keeps state over the training samples (a memory bank), which several processes "
                "would each update with their own part of the batches: run it in one process (without torchrun)."
            )
        hint_epochs = int(params.get("hint_epochs", 0))
        features.append(FeatureTerm(name, module, s_layers, t_layers, hint_epochs, shapes.teacher))
        log.info(
            f"features {name}: student {', '.join(f'{n} {s}' for n, s in zip(s_layers, shapes.student))} -> "
            f"teacher {', '.join(f'{n} {s}' for n, s in zip(t_layers, shapes.teacher))}, "
            f"weight {params.get('weight', 1):g}"
        )
    identity = torch.arange(data.info.num_classes, device=data.device)
    several = len(teachers) > 1 or any(not torch.equal(t.class_map, identity) for t in teachers)
    partial = any(len(t.class_map) < data.info.num_classes for t in teachers)
    merge = cfg.teacher_merge if cfg.teacher_merge != "auto" else ("conditional" if partial else "probs")
    weights = list(cfg.teacher_weights) or [1.0] * max(1, len(teachers))
    if several and merge == "conditional" and cfg.loss.name == "dkd":
        raise KdError("loss=dkd needs the target class in every teacher's classes; use teacher_merge=probs or logits.")
    if several and merge == "probs" and cfg.loss.name == "mse" and not cfg.loss.get("probs", False):
        raise KdError(
            "loss=mse compares logits, and teacher_merge=probs merges probabilities: use teacher_merge=logits "
            "or loss.probs=true."
        )
    if len(teachers) > 1 or partial:
        log.info(f"teachers merged: teacher_merge={merge}, weights {weights}")
    term = LOSSES.build(cfg.loss.name, **group_kwargs(cfg.loss))
    if cfg.confidence_weights:  # a batch-level term cannot be weighted per sample: say so before training
        z = torch.randn(2, data.info.num_classes, device=data.device)
        if term(z, z.flip(0), torch.zeros(2, dtype=torch.long, device=data.device), float(cfg.T)).dim() != 1:
            raise KdError(
                "confidence_weights=true needs a per-sample logit loss (kd, ls, soft_ce, mse, dkd); "
                f"loss={cfg.loss.name} is defined on the whole batch."
            )
    return Objective(
        term,
        T=Schedule(sch.T, float(cfg.T), sch.T_end, sch.step_at),
        alpha=Schedule(sch.alpha, float(cfg.alpha), sch.alpha_end, sch.step_at),
        warmup=int(sch.warmup),
        label_smoothing=float(cfg.trainer.label_smoothing),
        confidence=float(cfg.confidence_temperature) if cfg.confidence_weights else None,
        features=features,
        class_maps=[t.class_map for t in teachers] if several else None,
        teacher_weights=weights,
        merge=merge,
        num_classes=data.info.num_classes,
    ).to(data.device)


def labels_only(cfg, device) -> Objective:
    return Objective(label_smoothing=float(cfg.trainer.label_smoothing)).to(device)
