"""Distillation losses: logit terms (registry LOSSES, `loss=` group), feature and relational
terms (registry FEATURE_LOSSES, `features=` group), and the objective that combines them with
the hard labels (objective.py)."""

from kdcli.losses import feature, logit  # noqa: F401  (registers the built-in losses)
from kdcli.losses.feature import FEATURE_LOSSES, Shapes
from kdcli.losses.logit import kd_loss
from kdcli.losses.objective import Objective, Schedule

__all__ = ["FEATURE_LOSSES", "Objective", "Schedule", "Shapes", "kd_loss"]
