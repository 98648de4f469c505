"""Distillation terms on intermediate features and on relations between samples.

Features come from forward hooks on named modules (kdcli/losses/taps.py). A registered builder
takes the shapes of the hooked student and teacher features (one per layer pair) and its own
keyword parameters, and returns an nn.Module `term(student_feats, teacher_feats, idx)` giving
one scalar, summed over the layer pairs. Learned parts (adapters, CRD's embeddings) are
parameters of that module and train with the student; CRD's memory banks are buffers. The
default weights are those of the papers' or their authors' code, for the formulas as written
here (each docstring says which convention).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcli.core.registry import FEATURE_LOSSES

log = logging.getLogger("kdcli")


@dataclass
class Shapes:
    student: list[tuple]  # per layer pair, without the batch dimension
    teacher: list[tuple]
    num_samples: int  # size of the training split (CRD's memory bank)
    seed: int = 0  # the run's seed (CRD's noise draws)


# ---------------------------------------------------------------- functional forms


def _same_spatial(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps to the other's height and width."""
    if fs.shape[-2:] == ft.shape[-2:]:
        return fs, ft
    size = tuple(min(a, b) for a, b in zip(fs.shape[-2:], ft.shape[-2:]))
    return F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size)


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis (2017): the channel mean of |A|^p, flattened, L2-normalised."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(fs: torch.Tensor, ft: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer: mean over batch and positions of the squared difference of the
    normalised attention maps (the authors' code; the paper writes beta/2 times the norm)."""
    fs, ft = _same_spatial(fs, ft)
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp_min(1e-12)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_distance(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Park et al. (2019), distance-wise: Huber loss between the pairwise distances of student
    and teacher embeddings, each divided by its mean over the pairs i != j; mean over pairs."""
    fs, ft = fs.flatten(1), ft.flatten(1)
    off = ~torch.eye(len(fs), dtype=torch.bool, device=fs.device)
    ds, dt = _pairwise_distances(fs), _pairwise_distances(ft)
    ds, dt = ds / ds[off].mean(), dt / dt[off].mean()
    return F.smooth_l1_loss(ds[off], dt[off])


def rkd_angle(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Park et al. (2019), angle-wise: Huber loss between cos of the angle at j of every
    triplet (i, j, k), <(e_i - e_j)/|.|, (e_k - e_j)/|.|>; mean over all B^3 triplets."""

    def cosines(e):
        diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # [j, i] = e_i - e_j
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()

    return F.smooth_l1_loss(cosines(fs.flatten(1)), cosines(ft.flatten(1)))


def pkt_loss(fs: torch.Tensor, ft: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Passalis & Tefas (2018): the cosine kernel (cos + 1) / 2 of L2-normalised features,
    row-normalised to conditional probabilities P(j | i); KL(teacher || student) summed over
    j and averaged over the B^2 pairs (the convention of RepDistiller's weight)."""

    def conditional(f):
        f = F.normalize(f.flatten(1), dim=1, eps=eps)
        k = (f @ f.t() + 1) / 2
        return k / k.sum(1, keepdim=True)

    ps, pt = conditional(fs), conditional(ft)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def sp_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Tung & Mori (2019): Gram matrices G = F F^T of the flattened features, rows
    L2-normalised; squared Frobenius distance divided by B^2."""

    def gram(f):
        f = f.flatten(1)
        return F.normalize(f @ f.t(), dim=1)

    b = len(fs)
    return (gram(fs) - gram(ft)).pow(2).sum() / (b * b)


def nst_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Huang & Wang (2017), neuron selectivity transfer: squared MMD with the polynomial kernel
    k(x, y) = (x . y)^2 between the channels (each an L2-normalised map over positions) of
    student and teacher, averaged over the batch."""
    fs, ft = _same_spatial(fs, ft)
    s = F.normalize(fs.flatten(2), dim=2)
    t = F.normalize(ft.flatten(2), dim=2)

    def k(a, b):
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean((1, 2))

    return (k(t, t) + k(s, s) - 2 * k(s, t)).mean()


# ---------------------------------------------------------------- modules


def _check_maps(name: str, shapes: Shapes) -> None:
    for s, t in zip(shapes.student, shapes.teacher):
        if len(s) != 3 or len(t) != 3:
            raise ValueError(
                f"{name} compares spatial feature maps (C, H, W); the chosen layers give student {tuple(s)} and "
                f"teacher {tuple(t)}. Pick convolutional layers with student_layer=... teacher_layer=..."
            )


class Adapter(nn.Module):
    """Maps a student feature to the teacher's shape: identity when they agree, a 1x1 conv for
    maps with the same spatial size, else a linear map of the flattened features."""

    def __init__(self, s: tuple, t: tuple):
        super().__init__()
        self.t = tuple(t)
        if tuple(s) == tuple(t):
            self.map = nn.Identity()
        elif len(s) == 3 and len(t) == 3 and s[1:] == t[1:]:
            self.map = nn.Conv2d(s[0], t[0], 1, bias=False)
        else:
            self.map = nn.Linear(math.prod(s), math.prod(t))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if isinstance(self.map, nn.Linear):
            return self.map(f.flatten(1)).view(len(f), *self.t)
        return self.map(f)


class PairwiseTerm(nn.Module):
    """weight * sum over layer pairs of fn(student feature, teacher feature)."""

    def __init__(self, fn, weight: float, adapters: list[nn.Module] | None = None):
        super().__init__()
        self.fn, self.weight = fn, float(weight)
        self.adapters = nn.ModuleList(adapters or [])

    def forward(self, fs: list[torch.Tensor], ft: list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        if self.adapters:
            fs = [a(f) for a, f in zip(self.adapters, fs)]
        return self.weight * sum(self.fn(s, t) for s, t in zip(fs, ft))


@FEATURE_LOSSES.register("fitnet")
def fitnet(shapes: Shapes, *, weight: float = 100.0, hint_epochs: int = 0):
    """FitNets hints (Romero et al. 2015): MSE of adapted student vs teacher features; hint_epochs: stage 1."""
    if hint_epochs < 0:
        raise ValueError("hint_epochs must be >= 0")
    adapters = [Adapter(s, t) for s, t in zip(shapes.student, shapes.teacher)]
    return PairwiseTerm(F.mse_loss, weight, adapters)


@FEATURE_LOSSES.register("at")
def at(shapes: Shapes, *, weight: float = 1000.0, p: float = 2.0):
    """Attention transfer (Zagoruyko & Komodakis 2017): normalised channel-pooled |A|^p maps."""
    _check_maps("at", shapes)
    if p < 1:
        raise ValueError(f"p must be >= 1 (got {p}): |A|^p has no finite gradient at 0 below that; the paper uses 2")
    return PairwiseTerm(lambda s, t: at_loss(s, t, p), weight)


@FEATURE_LOSSES.register("rkd")
def rkd(shapes: Shapes, *, weight: float = 1.0, distance: float = 25.0, angle: float = 50.0):
    """Relational KD (Park et al. 2019): distance-wise and angle-wise Huber terms on embeddings."""
    return PairwiseTerm(lambda s, t: distance * rkd_distance(s, t) + angle * rkd_angle(s, t), weight)


@FEATURE_LOSSES.register("pkt")
def pkt(shapes: Shapes, *, weight: float = 30000.0):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): KL of cosine-kernel affinities."""
    return PairwiseTerm(pkt_loss, weight)


@FEATURE_LOSSES.register("sp")
def sp(shapes: Shapes, *, weight: float = 3000.0):
    """Similarity-preserving KD (Tung & Mori 2019): row-normalised batch Gram matrices."""
    return PairwiseTerm(sp_loss, weight)


@FEATURE_LOSSES.register("nst")
def nst(shapes: Shapes, *, weight: float = 50.0):
    """Neuron selectivity transfer (Huang & Wang 2017): polynomial-kernel MMD between channel maps."""
    _check_maps("nst", shapes)
    return PairwiseTerm(nst_loss, weight)


class CRD(nn.Module):
    """Contrastive representation distillation (Tian et al., ICLR 2020), NCE form.

    Student and teacher features are embedded (linear + L2 norm) in `dim` dimensions. Two
    memory banks hold an embedding per training sample (student's, teacher's), updated with
    momentum. For each sample, the positive is its own entry in the other network's bank and
    `negatives` entries drawn uniformly (one draw per batch, shared) are the noise; scores exp(<v, m> / tau) / Z, with Z
    fixed from the first batch, go through the NCE loss with noise probability 1/N. The loss
    is the sum of the student-anchored and teacher-anchored terms."""

    def __init__(self, shapes: Shapes, weight, dim, negatives, tau, momentum, seed):
        super().__init__()
        n = shapes.num_samples
        if negatives >= n:
            log.info(f"crd      {negatives} negatives asked for, {n} training samples: using {n - 1}")
            negatives = n - 1
        self.weight, self.k, self.tau, self.momentum, self.n = float(weight), int(negatives), tau, momentum, n
        self.embed_s = nn.Linear(math.prod(shapes.student[0]), dim)
        self.embed_t = nn.Linear(math.prod(shapes.teacher[0]), dim)
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", (torch.rand(n, dim, generator=g) * 2 - 1) * bound)
        self.register_buffer("memory_t", (torch.rand(n, dim, generator=g) * 2 - 1) * bound)
        self.register_buffer("z", torch.full((2,), -1.0))
        self.generator: torch.Generator | None = None
        self.seed = seed
        self._saved_generator: torch.Tensor | None = None  # from a training state, applied at the next draw

    def get_extra_state(self) -> dict:  # the noise generator's position, for exact resumption
        return {"generator": self.generator.get_state() if self.generator is not None else None}

    def set_extra_state(self, state: dict) -> None:
        self.generator, self._saved_generator = None, state.get("generator")

    def sample(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, K + 1) bank indices: each sample itself, then K uniform draws shared by the batch
        (one draw per step keeps memory at K x dim instead of B x K x dim)."""
        if self.generator is None or self.generator.device != idx.device:
            self.generator = torch.Generator(device=idx.device).manual_seed(self.seed)
            if self._saved_generator is not None:
                self.generator.set_state(self._saved_generator)
                self._saved_generator = None
        noise = torch.randint(0, self.n, (self.k,), device=idx.device, generator=self.generator)
        return torch.cat([idx[:, None], noise.expand(len(idx), self.k)], 1)

    @staticmethod
    def scores(v: torch.Tensor, bank: torch.Tensor, contrast: torch.Tensor, tau: float) -> torch.Tensor:
        """exp(<bank[contrast[b, k]], v_b> / tau), shape (B, K + 1)."""
        pos = (bank[contrast[:, 0]] * v).sum(1, keepdim=True)
        noise = contrast[:, 1:]
        if bool((noise == noise[:1]).all()):  # one noise set for the batch: a single matmul
            neg = v @ bank[noise[0]].t()
        else:
            neg = torch.einsum("bkd,bd->bk", bank[noise], v)
        return torch.exp(torch.cat([pos, neg], 1) / tau)

    def nce(self, scores: torch.Tensor) -> torch.Tensor:
        """-(log D(positive) + sum log(1 - D(noise))) averaged over the batch, with
        D(x) = x / (x + K / N)."""
        noise = self.k / self.n
        eps = 1e-7
        log_d1 = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
        log_d0 = torch.log(noise / (scores[:, 1:] + noise + eps))
        return -(log_d1.sum() + log_d0.sum()) / len(scores)

    def forward(self, fs: list[torch.Tensor], ft: list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        vs = F.normalize(self.embed_s(fs[0].flatten(1)), dim=1)
        vt = F.normalize(self.embed_t(ft[0].flatten(1)), dim=1)
        contrast = self.sample(idx)
        # The student's embedding against the teacher's bank, and the other way round.
        out_s = self.scores(vs, self.memory_t, contrast, self.tau)
        out_t = self.scores(vt, self.memory_s, contrast, self.tau)
        if self.z[0] < 0:  # the normalising constants, estimated once (as the paper's code does)
            self.z.copy_(torch.stack([out_s.mean().detach() * self.n, out_t.mean().detach() * self.n]))
        loss = self.nce(out_s / self.z[0]) + self.nce(out_t / self.z[1])
        with torch.no_grad():
            for bank, v in ((self.memory_s, vs), (self.memory_t, vt)):
                bank[idx] = F.normalize(bank[idx] * self.momentum + v.detach() * (1 - self.momentum), dim=1)
        return self.weight * loss


@FEATURE_LOSSES.register("crd")
def crd(
    shapes: Shapes,
    *,
    weight: float = 0.8,
    dim: int = 128,
    negatives: int = 4096,
    tau: float = 0.07,
    momentum: float = 0.5,
):
    """Contrastive representation distillation (Tian et al. 2020): NCE against memory banks."""
    if len(shapes.student) != 1:
        raise ValueError("crd takes one layer pair (usually the penultimate features, the default)")
    if negatives < 1 or dim < 1 or tau <= 0 or not 0 <= momentum < 1:
        raise ValueError("crd needs negatives >= 1, dim >= 1, tau > 0 and 0 <= momentum < 1")
    return CRD(shapes, weight, dim, negatives, tau, momentum, shapes.seed)
