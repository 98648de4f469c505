"""Device-resident data: whole splits as normalised tensors on the training device, batched by
index with randperm, augmented with batched tensor ops (no DataLoader, no workers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from kdcli.core import distributed
from kdcli.data.types import DataInfo, Splits


@dataclass
class DeviceSplit:
    x: torch.Tensor  # float32 (N, C, H, W), normalised
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(self), batch_size):
            yield self.x[i : i + batch_size]

    def head(self, n: int) -> torch.Tensor:
        return self.x[:n]

    def subset(self, n: int) -> "DeviceSplit":
        return DeviceSplit(self.x[:n], self.y[:n])


def mix_seed(seed: int, i: int) -> int:
    """A seed for item i of a stream seeded by `seed` (a Weyl step: distinct for distinct i)."""
    return (seed + i * 0x9E3779B97F4A7C15) % 2**63


def normalise(x_uint8: torch.Tensor, info: DataInfo, device) -> torch.Tensor:
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    return (x_uint8.to(device).float().div_(255) - mean) / std


def augment_batch(
    x: torch.Tensor, shift: int, flip: bool, fill: torch.Tensor, generator, rows: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """Random translation by up to `shift` pixels (uncovered pixels take `fill`, the
    per-channel value of a black pixel) and, if `flip`, random horizontal flips. With
    rows=(lo, hi, n), x is rows lo:hi of a batch of n and gets the transforms those rows get
    in the whole batch (a process's part of it)."""
    b, c, h, w = x.shape
    lo, hi, n = rows or (0, b, b)
    if shift > 0:
        padded = fill.view(1, c, 1, 1).expand(b, c, h + 2 * shift, w + 2 * shift).clone()
        padded[:, :, shift : shift + h, shift : shift + w] = x
        dy, dx = torch.randint(0, 2 * shift + 1, (2, n, 1), device=x.device, generator=generator)[:, lo:hi]
        rows = (torch.arange(h, device=x.device) + dy)[:, None, :, None].expand(b, c, h, w + 2 * shift)
        x = padded.gather(2, rows)
        cols = (torch.arange(w, device=x.device) + dx)[:, None, None, :].expand(b, c, h, w)
        x = x.gather(3, cols)
    if flip:
        mask = torch.rand(n, device=x.device, generator=generator)[lo:hi] < 0.5
        x = torch.where(mask.view(b, 1, 1, 1), x.flip(3), x)
    return x


# augment=affine: a random rotation and scale on top of the shift, as digit augmentation usually
# draws them (Simard et al. 2003 use small rotations and scalings of this size for MNIST)
ROTATE_DEG, SCALE = 15.0, 0.1


def affine_batch(
    x: torch.Tensor, shift: int, fill: torch.Tensor, generator, rows: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """Random rotation by up to ROTATE_DEG degrees, scaling by up to 1 +- SCALE and translation by
    up to `shift` pixels of each image (bilinear; uncovered pixels take `fill`, a black pixel).
    rows=(lo, hi, n) as in augment_batch: rows lo:hi of a batch of n get the draws they get there."""
    b, c, h, w = x.shape
    lo, hi, n = rows or (0, b, b)
    u = torch.rand(n, 4, device=x.device, generator=generator)[lo:hi] * 2 - 1  # in [-1, 1)
    angle, scale = u[:, 0] * ROTATE_DEG * torch.pi / 180, 1 + u[:, 1] * SCALE
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = angle.cos() / scale, -angle.sin() / scale
    theta[:, 1, 0], theta[:, 1, 1] = angle.sin() / scale, angle.cos() / scale
    theta[:, 0, 2], theta[:, 1, 2] = u[:, 2] * 2 * shift / w, u[:, 3] * 2 * shift / h  # grid units: 2 / size per px
    grid = torch.nn.functional.affine_grid(theta, [b, c, h, w], align_corners=False)
    black = fill.view(1, c, 1, 1)
    return torch.nn.functional.grid_sample(x - black, grid, align_corners=False) + black


class DeviceData:
    def __init__(self, splits: Splits, device: torch.device, shift: int = 0, flip: bool = False, affine=False):
        self.info = splits.info
        self.device = device
        self.shift, self.flip, self.affine = int(shift), bool(flip), bool(affine)
        self.train, self.val, self.test = (
            DeviceSplit(normalise(s.x, splits.info, device), s.y.to(device))
            for s in (splits.train, splits.val, splits.test)
        )
        self.fill = normalise(torch.zeros(1, len(self.info.mean), 1, 1, dtype=torch.uint8), self.info, device).view(-1)

    def split(self, name: str) -> DeviceSplit:
        return getattr(self, name)

    def train_batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """One epoch of shuffled, augmented training batches (x, y, indices into the train split);
        a last partial batch is dropped so every step sees the same batch size (unless the split
        is smaller than one batch). The order follows from `seed` and batch k's augmentation from
        (seed, k) alone, so an interrupted epoch continues exactly at batch `start`. Under several
        processes each takes its rows of every batch (kdcli/core/distributed.py)."""
        n = len(self.train)
        g = torch.Generator(device=self.device).manual_seed(seed)
        perm = torch.randperm(n, device=self.device, generator=g)
        stop = n - n % batch_size if n >= batch_size else n
        for k, i in enumerate(range(0, stop, batch_size)):
            if k < start:
                continue
            n_batch = min(batch_size, n - i)
            lo, hi = distributed.part(n_batch)
            idx = perm[i + lo : i + hi]
            x = self.train.x[idx]
            if self.shift or self.flip or self.affine:
                g.manual_seed(mix_seed(seed, k + 1))
                if self.affine:  # the shift is the affine map's translation
                    x = affine_batch(x, self.shift, self.fill, g, (lo, hi, n_batch))
                x = augment_batch(x, 0 if self.affine else self.shift, self.flip, self.fill, g, (lo, hi, n_batch))
            yield x, self.train.y[idx], idx

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.train) // batch_size)
