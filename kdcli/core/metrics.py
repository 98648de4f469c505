"""What `kd evaluate` measures from a model's logits on a split: accuracy (top-1, top-k), NLL,
calibration, agreement with a reference model, per-class accuracy and the confusion matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ECE_BINS = 15  # Guo et al. 2017, "On Calibration of Modern Neural Networks", use 15 equal-width bins


def scores(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """Top-1 accuracy and mean negative log-likelihood."""
    return {
        "acc": (logits.argmax(1) == y).float().mean().item(),
        "nll": F.cross_entropy(logits, y).item(),
    }


def top_k(logits: torch.Tensor, y: torch.Tensor, k: int) -> float | None:
    """Share of rows whose label is among the k highest logits; None with fewer than k classes."""
    if logits.shape[1] < k:
        return None
    return (logits.topk(k, dim=1).indices == y[:, None]).any(1).float().mean().item()


def reliability(logits: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """Per confidence bin (equal width on (0, 1]): the count, mean confidence and accuracy of
    the rows whose top-1 probability falls in it, and the expected calibration error
    ECE = sum_b n_b / n * |acc_b - conf_b| (Guo et al. 2017, eq. 3)."""
    conf, pred = F.softmax(logits.float(), 1).max(1)
    right = (pred == y).float()
    # bin b holds conf in (b/B, (b+1)/B]; conf > 0 always, so ceil(conf * B) - 1 is in 0..B-1
    which = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(which, minlength=bins).float()
    conf_sum = torch.bincount(which, weights=conf, minlength=bins)
    right_sum = torch.bincount(which, weights=right, minlength=bins)
    seen = count.clamp(min=1)
    ece = ((right_sum - conf_sum).abs().sum() / len(y)).item()
    return {
        "ece": ece,
        "count": count.long().tolist(),
        "confidence": (conf_sum / seen).tolist(),
        "accuracy": (right_sum / seen).tolist(),
    }


def confusion(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted]."""
    pred = logits.argmax(1)
    return torch.bincount(y * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> list[float | None]:
    """Recall of each class from a confusion matrix; None for a class absent from the split."""
    totals = matrix.sum(1)
    return [(matrix[c, c] / totals[c]).item() if totals[c] else None for c in range(len(matrix))]


def kl_to(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(logits)): how far the model is from the
    reference's predictive distribution (T = 1)."""
    return F.kl_div(
        F.log_softmax(logits.float(), 1), F.log_softmax(reference.float(), 1), reduction="batchmean", log_target=True
    ).item()


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of rows on which the two sets of logits pick the same class."""
    return (logits.argmax(1) == reference.argmax(1)).float().mean().item()


def classification(logits: torch.Tensor, y: torch.Tensor, reference: torch.Tensor | None = None) -> dict:
    """Every figure of one model on one split (the confusion matrix as lists of counts)."""
    logits = logits.float()
    num_classes = logits.shape[1]
    matrix = confusion(logits, y, num_classes)
    calib = reliability(logits, y)
    s = scores(logits, y)
    out = {
        "acc": s["acc"],
        "top5": top_k(logits, y, 5),
        "nll": s["nll"],
        "ece": calib.pop("ece"),
        "per_class_acc": per_class_accuracy(matrix),
        "confusion": matrix.tolist(),
        "reliability": calib,
    }
    if reference is not None:
        out["agreement"] = agreement(logits, reference)
        out["kl_to_reference"] = kl_to(logits, reference)
    return out


def paired_gain(base_logits: torch.Tensor, new_logits: torch.Tensor, y: torch.Tensor, level: float = 0.95) -> dict:
    """How far `new` beats `base` on the same images, and whether that can be chance.

    b = images only `base` gets right, c = images only `new` gets right. The gain in accuracy
    is (c - b) / n. The exact McNemar test (McNemar 1947) asks whether the disagreements split
    unevenly: under "no difference" c ~ Binomial(b + c, 1/2); p is its two-sided exact p-value
    (scipy.stats.binomtest), 1 when the models never disagree. The interval is the Wald interval
    of a difference of paired proportions, (c - b) / n +- z * sqrt(b + c - (c - b)^2 / n) / n
    (Agresti, Categorical Data Analysis, 3rd ed., section 11.1)."""
    from scipy.stats import binomtest, norm

    base_right = base_logits.argmax(1) == y
    new_right = new_logits.argmax(1) == y
    n = len(y)
    b = int((base_right & ~new_right).sum())
    c = int((new_right & ~base_right).sum())
    gain = (c - b) / n
    z = float(norm.ppf(0.5 + level / 2))
    half = z * max(b + c - (c - b) ** 2 / n, 0.0) ** 0.5 / n
    p = binomtest(c, b + c, 0.5).pvalue if b + c else 1.0
    return {
        "gain": gain,
        "ci": [gain - half, gain + half],
        "level": level,
        "p_value": float(p),
        "only_base": b,
        "only_new": c,
        "n": n,
    }


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation and the Student-t interval of the mean of `values`
    (over seeds); the interval is (nan, nan) for fewer than two values."""
    import statistics

    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0, float("nan"), float("nan")
    sd = statistics.stdev(values)
    half = float(t.ppf(0.5 + level / 2, len(values) - 1)) * sd / len(values) ** 0.5
    return mean, sd, mean - half, mean + half
