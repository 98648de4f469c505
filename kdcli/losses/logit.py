"""Losses on the output logits."""

import torch
import torch.nn.functional as F

from kdcli.registry import LOSSES


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, T: float, alpha: float):
    """Hinton et al. (2015): alpha * CE(s, y) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)).

    The KL is taken on log-probabilities and averaged over the batch ("batchmean"); the T^2
    factor keeps the soft-target gradients on the same scale as the hard-label ones when T
    changes (Hinton et al., section 2). Returns (loss, {"ce": ..., "kl": ...}).
    """
    ce = F.cross_entropy(student, targets)
    kl = F.kl_div(
        F.log_softmax(student / T, dim=1),
        F.log_softmax(teacher / T, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    loss = alpha * ce + (1.0 - alpha) * T * T * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}


@LOSSES.register("kd")
def kd(T: float, alpha: float):
    """Hinton KD: alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher || student) at temperature T."""

    def loss(student, teacher, targets):
        return kd_loss(student, teacher, targets, T, alpha)

    return loss


@LOSSES.register("ce")
def ce(T: float, alpha: float, *, label_smoothing: float = 0.0):
    """Plain cross-entropy on the labels (training from scratch); ignores the teacher, T and alpha."""

    def loss(student, teacher, targets):
        value = F.cross_entropy(student, targets, label_smoothing=label_smoothing)
        return value, {"ce": value.detach()}

    return loss
