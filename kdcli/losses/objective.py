"""The training objective of one model: hard labels, a logit distillation term and feature
terms, with schedules for T and alpha and optional per-sample weights.

    L = alpha(e) * CE(s, y) + (1 - alpha(e)) * r(e) * mean_i w_i * term_i(s, t, y, T(e))
        + r(e) * sum_k weight_k * feature_term_k

e is the epoch; T(e) and alpha(e) follow their schedules; r(e) = min(1, e / warmup) ramps the
distillation terms up (DKD's warm-up); w_i are the confidence weights (1 unless enabled).
Several teachers are merged into one soft target before the term (see `merge_teachers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcli.core.errors import KdError


@dataclass
class Schedule:
    """A value that moves from `start` (first epoch) to `end` (last epoch) linearly or along a
    half cosine, or switches to `end` in one step once the fraction `step_at` of the epochs is
    done (epochs 4 and 5 of 5 for step_at=0.5)."""

    kind: str
    start: float
    end: Optional[float] = None
    step_at: float = 0.5

    def at(self, epoch: int, epochs: int) -> float:
        """The value for `epoch` (1-based) of `epochs`: start at the first, end at the last."""
        if self.kind == "constant" or self.end is None:
            return self.start
        if self.kind == "step":  # once the fraction step_at of the epochs is done
            return self.end if epoch - 1 >= self.step_at * epochs else self.start
        progress = (epoch - 1) / (epochs - 1) if epochs > 1 else 1.0
        f = progress if self.kind == "linear" else (1 - math.cos(math.pi * progress)) / 2
        return self.start + f * (self.end - self.start)


def merge_teachers(
    logits: list[torch.Tensor],
    class_maps: list[torch.Tensor],
    num_classes: int,
    T: float,
    weights: list[float],
    mode: str = "probs",
) -> torch.Tensor:
    """One set of teacher logits over the student's classes from several teachers.

    Teacher k predicts the student's classes class_maps[k] (all of them for an ensemble, a
    subset for teachers of disjoint label domains). mode=probs (for ensembles): the merged distribution is
    p(c) = sum over the teachers k covering c of w_k softmax(z_k / T)(c), divided by sum_k w_k,
    returned as logits T * log p (so that softmax(./T) gives back p). mode=logits: the logit
    of class c is the w-weighted mean of the covering teachers' logits for c (for disjoint
    domains: their concatenation). mode=conditional is compared per teacher by the objective
    (`Objective.logit_term`); as one prediction it is the logits merge."""
    b = logits[0].shape[0]
    if mode == "conditional":  # as a prediction (the objective itself compares per teacher): logits
        mode = "logits"
    if mode == "probs":
        p = logits[0].new_zeros(b, num_classes)
        for z, cmap, w in zip(logits, class_maps, weights):
            p[:, cmap] += w * F.softmax(z / T, dim=1)
        return T * torch.log((p / sum(weights)).clamp_min(1e-30))
    total = logits[0].new_zeros(b, num_classes)
    norm = logits[0].new_zeros(num_classes)
    for z, cmap, w in zip(logits, class_maps, weights):
        total[:, cmap] += w * z
        norm[cmap] += w
    return total / norm


def confidence_weights(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample weights B * softmax over the batch of (teacher's top-class probability at T=1)
    / temperature: they average 1, and confident teacher predictions count more."""
    conf = F.softmax(teacher_logits, dim=1).max(1).values
    return len(conf) * F.softmax(conf / temperature, dim=0)


class FeatureTerm(nn.Module):
    def __init__(
        self, name: str, module: nn.Module, student_layers, teacher_layers, hint_epochs: int = 0, teacher_shapes=()
    ):
        super().__init__()
        self.name, self.module = name, module
        self.student_layers, self.teacher_layers = list(student_layers), list(teacher_layers)
        self.hint_epochs = hint_epochs
        self.teacher_shapes = [tuple(s) for s in teacher_shapes]  # per teacher layer, without the batch


class Objective(nn.Module):
    """Callable as objective(student_logits, teacher_logits, targets, student_feats,
    teacher_feats, idx, mixed) -> (loss, parts), after set_epoch(epoch, epochs). teacher_logits is a
    list (one per teacher) or None for plain training on the labels; mixed (kdcli/data/mix.py), for
    a mixup/cutmix batch, splits the hard-label term between each pair's two labels."""

    def __init__(
        self,
        term: Optional[Callable] = None,
        *,
        T: Schedule | float = 4.0,
        alpha: Schedule | float = 1.0,
        warmup: int = 0,
        label_smoothing: float = 0.0,
        confidence: Optional[float] = None,
        features: list[FeatureTerm] = (),
        class_maps: Optional[list[torch.Tensor]] = None,
        teacher_weights: Optional[list[float]] = None,
        merge: str = "probs",
        num_classes: int = 0,
    ):
        super().__init__()
        self.term = term
        self.T_schedule = T if isinstance(T, Schedule) else Schedule("constant", float(T))
        self.alpha_schedule = alpha if isinstance(alpha, Schedule) else Schedule("constant", float(alpha))
        self.warmup, self.label_smoothing, self.confidence = warmup, label_smoothing, confidence
        self.features = nn.ModuleList(features)
        self.class_maps, self.teacher_weights, self.merge, self.num_classes = (
            class_maps,
            teacher_weights,
            merge,
            num_classes,
        )
        self.set_epoch(1, 1)

    @property
    def needs_teacher(self) -> bool:
        return self.term is not None or len(self.features) > 0

    @property
    def student_layers(self) -> list[str]:
        return [name for f in self.features for name in f.student_layers]

    @property
    def teacher_layers(self) -> list[str]:
        return [name for f in self.features for name in f.teacher_layers]

    @property
    def hint_epochs(self) -> int:
        return max((f.hint_epochs for f in self.features), default=0)

    def set_epoch(self, epoch: int, epochs: int, hint: bool = False) -> dict:
        """Fix T, alpha and the warm-up factor for this epoch; `hint` keeps only the terms of
        a FitNets first stage. Returns them for the metrics."""
        self.T = self.T_schedule.at(epoch, epochs)
        self.alpha = self.alpha_schedule.at(epoch, epochs)
        self.ramp = min(1.0, epoch / self.warmup) if self.warmup > 0 else 1.0
        self.hint = hint
        if self.T <= 0 or not 0 <= self.alpha <= 1:
            raise KdError(
                f"The schedules give T={self.T:g}, alpha={self.alpha:g} in epoch {epoch}: need T > 0, alpha in [0, 1]."
            )
        return {"T": self.T, "alpha": self.alpha} if self.needs_teacher else {}

    def teacher_logits(self, logits: list[torch.Tensor], T: float) -> torch.Tensor:
        if self.class_maps is None:
            return logits[0]
        return merge_teachers(logits, self.class_maps, self.num_classes, T, self.teacher_weights, self.merge)

    def logit_term(self, s_logits, t_logits: list[torch.Tensor], targets) -> torch.Tensor:
        """The logit term against the (merged) teachers. With merge=conditional, teacher k is
        compared with the student's distribution restricted to k's classes (a softmax over
        them, i.e. renormalised) and the terms are averaged with the teacher weights, as in
        Vongkulbhisal et al. (CVPR 2019): each teacher only says how likely its own classes
        are relative to each other, and the hard labels set the mass between domains."""
        if self.class_maps is None or self.merge != "conditional":
            return self.term(s_logits, self.teacher_logits(t_logits, self.T), targets, self.T)
        total = 0.0
        for z, cmap, w in zip(t_logits, self.class_maps, self.teacher_weights):
            local = (targets[:, None] == cmap[None, :]).int().argmax(1)  # label's position in cmap (0 if absent)
            total = total + w * self.term(s_logits[:, cmap], z, local, self.T)
        return total / sum(self.teacher_weights)

    def forward(self, s_logits, t_logits, targets, s_feats=(), t_feats=(), idx=None, mixed=None):
        parts = {}
        loss = s_logits.new_zeros(())
        if not self.hint:
            ce = F.cross_entropy(s_logits, targets, label_smoothing=self.label_smoothing)
            if mixed is not None:  # lam * CE(y) + (1 - lam) * CE(y[perm])
                partner = F.cross_entropy(s_logits, mixed.partner, label_smoothing=self.label_smoothing)
                ce = mixed.lam * ce + (1 - mixed.lam) * partner
            parts["ce"] = ce.detach()
            alpha = self.alpha if self.needs_teacher and t_logits is not None else 1.0
            loss = loss + alpha * ce
            if self.term is not None and t_logits is not None and alpha < 1:
                value = self.logit_term(s_logits, t_logits, targets)
                if value.dim() == 1:
                    if self.confidence is not None:
                        w = confidence_weights(self.teacher_logits(t_logits, 1.0), self.confidence)
                        value = value * w
                    value = value.mean()
                elif self.confidence is not None:
                    raise KdError(
                        "confidence_weights=true needs a per-sample logit loss (kd, ls, soft_ce, mse, dkd); "
                        "this one is defined on the whole batch (dist)."
                    )
                parts["kd"] = value.detach()
                loss = loss + (1 - alpha) * self.ramp * value
        if t_feats:
            at = 0
            for f in self.features:
                n = len(f.student_layers)
                if self.hint and f.hint_epochs == 0:
                    at += n
                    continue
                value = f.module(s_feats[at : at + n], t_feats[at : at + n], idx)
                at += n
                parts[f.name] = value.detach()
                loss = loss + (1.0 if self.hint else self.ramp) * value
        return loss, parts
