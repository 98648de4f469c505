"""mix=mixup / mix=cutmix: each training batch blended with a shuffled copy of itself.

Mixup (Zhang et al., ICLR 2018) takes lam * x + (1 - lam) * x[perm]; CutMix (Yun et al., ICCV 2019)
pastes a box of x[perm] covering 1 - lam of the image. lam ~ Beta(mix_alpha, mix_alpha), one per
batch. The teachers run on the mixed batch too, so the student matches them on the very images it
sees: "function matching" (Beyer et al., CVPR 2022, "Knowledge distillation: a good teacher is
patient and consistent"). The hard-label term becomes lam * CE(y) + (1 - lam) * CE(y[perm]).

Each pair is named after its larger part (lam >= 0.5 after a swap), so the labels, the sample
indices and the train accuracy of a batch refer to the image that dominates each mixed one. The
draws follow from a seed per step: a resumed run mixes as the uninterrupted one would."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Mixed:
    """The second image of each mixed pair: its labels, and the first image's share lam."""

    partner: torch.Tensor
    lam: float


def mixing(cfg) -> tuple[str, float]:
    """The mixing a run's training batches get, (kind, alpha): cfg.mix, unless augment=none, which
    turns every random augmentation off, mixing included."""
    if str(cfg.get("augment", "standard")).lower() in ("none", "false"):
        return "none", 1.0
    return str(cfg.get("mix", "none")), float(cfg.get("mix_alpha", 1.0))


def cut_box(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box (top, bottom, left, right) of about (1 - lam) * h * w pixels around a uniform centre,
    clipped to the image (CutMix's sampling)."""
    r = float(np.sqrt(1.0 - lam))
    ch, cw = int(round(h * r)), int(round(w * r))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    return max(cy - ch // 2, 0), min(cy + (ch - ch // 2), h), max(cx - cw // 2, 0), min(cx + (cw - cw // 2), w)


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, kind: str, alpha: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Mixed | None]:
    """The batch mixed as `kind` says (mixup, cutmix; none: unchanged, Mixed None), with the labels
    and indices of each pair's larger part and the Mixed that completes the label term."""
    if kind == "none" or len(y) < 2:
        return x, y, idx, None
    rng = np.random.default_rng(seed)
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(y)))
    at = {d: perm.to(d) for d in {x.device, y.device, idx.device}}
    if kind == "mixup":
        x = lam * x + (1 - lam) * x[at[x.device]]
    else:
        top, bottom, left, right = cut_box(x.shape[-2], x.shape[-1], lam, rng)
        x = x.clone()
        x[..., top:bottom, left:right] = x[..., top:bottom, left:right][at[x.device]]  # only the box is copied
        lam = 1.0 - (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])
    if lam < 0.5:  # the second image is the larger part: name the pair after it
        y, idx, partner, lam = y[at[y.device]], idx[at[idx.device]], y, 1.0 - lam
    else:
        partner = y[at[y.device]]
    return x, y, idx, Mixed(partner, lam)
