"""Distillation terms on the output logits.

Each registered builder takes its own keyword parameters and returns a term
`term(student, teacher, targets, T) -> Tensor`: one value per sample, shape (B,), or one value
for the batch, shape (), for losses defined on the whole batch (DIST). The objective
(kdcli/losses/objective.py) averages per-sample terms (optionally weighted) and combines them
with the hard-label cross-entropy: alpha * CE + (1 - alpha) * term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcli.core.registry import LOSSES


def standardize(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each row of logits (Sun et al., CVPR 2024, "Logit Standardization in KD"):
    (z - mean(z)) / std(z), with the unbiased std as in the paper's code."""
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + eps)


def kd_term(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per sample (Hinton et al. 2015); the T^2 keeps the
    soft-target gradients on the scale of the hard-label ones as T changes (their section 2)."""
    log_q = F.log_softmax(student / T, dim=1)
    log_p = F.log_softmax(teacher / T, dim=1)
    return T * T * (log_p.exp() * (log_p - log_q)).sum(1)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, T: float, alpha: float):
    """alpha * CE(s, y) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)), the KL averaged
    over the batch ("batchmean"). Returns (loss, {"ce": ..., "kl": ...})."""
    ce = F.cross_entropy(student, targets)
    kl = kd_term(student, teacher, T).mean() / (T * T)
    loss = alpha * ce + (1.0 - alpha) * T * T * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}


def soft_ce_term(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * cross-entropy of softmax(s/T) against the teacher's softmax(t/T), per sample. It
    differs from kd by the teacher's entropy, a constant for the student: same gradients."""
    return -T * T * (F.softmax(teacher / T, dim=1) * F.log_softmax(student / T, dim=1)).sum(1)


def mse_term(student: torch.Tensor, teacher: torch.Tensor, T: float, probs: bool = False) -> torch.Tensor:
    """Mean squared difference over the classes, per sample: of the logits (Ba & Caruana 2014;
    Kim et al. 2021), or with probs=True of the softened probabilities softmax(./T)."""
    if probs:
        student, teacher = F.softmax(student / T, dim=1), F.softmax(teacher / T, dim=1)
    return (student - teacher).pow(2).mean(1)


def dkd_term(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, T: float, tckd: float, nckd: float
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022), per sample: tckd * TCKD + nckd * NCKD, both x T^2.

    TCKD is the KL between the binary distributions (p_target, 1 - p_target) of teacher and
    student; NCKD the KL between their distributions over the non-target classes only
    (softmax renormalised without the target). The paper's alpha and beta are tckd and nckd."""
    mask = F.one_hot(targets, student.shape[1]).bool()
    p_s, p_t = F.softmax(student / T, dim=1), F.softmax(teacher / T, dim=1)
    b_s = torch.stack([p_s[mask], (p_s * ~mask).sum(1)], 1).clamp_min(1e-12)
    b_t = torch.stack([p_t[mask], (p_t * ~mask).sum(1)], 1).clamp_min(1e-12)
    tckd_value = (b_t * (b_t.log() - b_s.log())).sum(1)
    # Non-target distributions: the target logit pushed to -inf before the softmax.
    log_n_s = F.log_softmax((student / T).masked_fill(mask, float("-inf")), dim=1)
    log_n_t = F.log_softmax((teacher / T).masked_fill(mask, float("-inf")), dim=1)
    nckd_value = (log_n_t.exp() * torch.where(mask, 0.0, log_n_t - log_n_s)).sum(1)
    return T * T * (tckd * tckd_value + nckd * nckd_value)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_term(student: torch.Tensor, teacher: torch.Tensor, T: float, inter: float, intra: float) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022), for the batch: T^2 * (inter * (1 - mean over samples of
    the Pearson correlation between the student's and teacher's class distributions) + intra *
    (1 - mean over classes of the Pearson correlation across the batch))."""
    p_s, p_t = F.softmax(student / T, dim=1), F.softmax(teacher / T, dim=1)
    inter_value = 1 - _pearson_rows(p_s, p_t).mean()
    intra_value = 1 - _pearson_rows(p_s.t(), p_t.t()).mean()
    return T * T * (inter * inter_value + intra * intra_value)


def _maybe_standardized(term, standardize_logits: bool):
    if not standardize_logits:
        return term

    def standardized(student, teacher, targets, T):
        return term(standardize(student), standardize(teacher), targets, T)

    return standardized


@LOSSES.register("kd")
def kd(*, standardize: bool = False):
    """Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T)); standardize=true z-scores logits first."""
    return _maybe_standardized(lambda s, t, y, T: kd_term(s, t, T), standardize)


@LOSSES.register("ls")
def ls():
    """Logit standardisation (Sun et al., CVPR 2024): kd on z-scored logits (same as loss=kd loss.standardize=true)."""
    return _maybe_standardized(lambda s, t, y, T: kd_term(s, t, T), True)


@LOSSES.register("soft_ce")
def soft_ce(*, standardize: bool = False):
    """Cross-entropy against the teacher's softened probabilities, x T^2."""
    return _maybe_standardized(lambda s, t, y, T: soft_ce_term(s, t, T), standardize)


@LOSSES.register("mse")
def mse(*, probs: bool = False):
    """Mean squared error between logits (probs=true: between softmax(./T) probabilities)."""
    return lambda s, t, y, T: mse_term(s, t, T, probs)


@LOSSES.register("dkd")
def dkd(*, tckd: float = 1.0, nckd: float = 8.0, standardize: bool = False):
    """Decoupled KD (Zhao et al. 2022): tckd * target-class KL + nckd * non-target KL, x T^2."""
    if tckd < 0 or nckd < 0:
        raise ValueError("dkd weights tckd and nckd must be >= 0")
    return _maybe_standardized(lambda s, t, y, T: dkd_term(s, t, y, T, tckd, nckd), standardize)


@LOSSES.register("dist")
def dist(*, inter: float = 1.0, intra: float = 1.0):
    """DIST (Huang et al. 2022): inter- and intra-class Pearson correlation of softmax(./T); batch-level."""
    if inter < 0 or intra < 0:
        raise ValueError("dist weights inter and intra must be >= 0")
    return lambda s, t, y, T: dist_term(s, t, T, inter, intra)
