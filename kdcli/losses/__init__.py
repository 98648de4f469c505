"""Distillation losses.

A loss builder takes the top-level temperature and hard-label weight, `(T, alpha, *, ...)`,
and returns a callable `loss(student_logits, teacher_logits, targets) -> (loss, parts)` where
`parts` holds the detached terms for logging.
"""

from kdcli.losses import logit  # noqa: F401  (registers the built-in losses)
from kdcli.losses.logit import kd_loss
from kdcli.registry import LOSSES


def build_loss(name: str, T: float, alpha: float, kwargs: dict | None = None):
    return LOSSES.build(name, float(T), float(alpha), **(kwargs or {}))


__all__ = ["build_loss", "kd_loss"]
