"""Streaming data, for datasets too large to keep on the device: a DataLoader with worker
processes decodes and transforms each sample (random crop with padding and flips for
training, as the in-memory path does on whole batches), pinned memory when training on a GPU.

`StreamData` offers what `DeviceData` offers (`train_batches`, `steps_per_epoch`, splits
with `batches`, `head`, `subset` and `y`), so the engine does not know which one it has."""

from __future__ import annotations

import logging
import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from kdcli.data.splits import DataInfo, Split, Splits
from kdcli.errors import KdError

log = logging.getLogger("kdcli")


def _image(split, i: int) -> torch.Tensor:
    """uint8 (C, H, W) image i of an in-memory Split or a FileSplit."""
    return split.image(i) if hasattr(split, "image") else split.x[i]


class _Samples(Dataset):
    """(transformed image, label, index) of one split."""

    def __init__(self, split, transform=None):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        x = _image(self.split, i)
        return (self.transform(x) if self.transform else x), self.split.y[i], i


def _loader_error(e: Exception) -> KdError:
    """A worker's KdError comes back wrapped in its traceback: keep the message alone."""
    text = str(e)
    marker = "KdError: "
    return KdError(text[text.rindex(marker) + len(marker) :].strip() if marker in text else text)


def _iterate(loader: DataLoader):
    try:
        yield from loader
    except KdError as e:
        raise _loader_error(e) from None
    except RuntimeError as e:
        if "KdError" in str(e):
            raise _loader_error(e) from None
        raise


def decode_all(split, workers: int, what: str) -> Split:
    """Decode a FileSplit into an in-memory Split of uint8 images (with worker processes)."""
    loader = DataLoader(_Samples(split), batch_size=256, num_workers=workers)
    log.info(f"data     decoding {len(split)} {what} images into memory ({workers} worker processes)")
    xs = [x for x, _, _ in _iterate(loader)]
    return Split(torch.cat(xs), split.y.clone())


def memory_budget(device: torch.device) -> int:
    """Bytes of float32 images that are kept on `device` rather than streamed: a quarter of
    the device's free memory (of the machine's available memory for the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):  # not Linux: assume a laptop's few GiB
        return 2 << 30


def float_bytes(splits: Splits) -> int:
    n = len(splits.train) + len(splits.val) + len(splits.test)
    c, h, w = splits.info.input_shape
    return n * c * h * w * 4


class StreamSplit:
    """One split read through a DataLoader, in order, without augmentation."""

    def __init__(self, split, transform, device: torch.device, workers: int):
        self.samples = _Samples(split, transform)
        self.y = split.y.to(device)
        self.device, self.workers = device, workers

    def __len__(self) -> int:
        return len(self.y)

    def loader(self, batch_size: int, **kwargs) -> DataLoader:
        return DataLoader(
            self.samples,
            batch_size=batch_size,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            **kwargs,
        )

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for x, _, _ in _iterate(self.loader(batch_size)):
            yield x.to(self.device, non_blocking=True)

    def head(self, n: int) -> torch.Tensor:
        return torch.stack([self.samples[i][0] for i in range(min(n, len(self)))]).to(self.device)

    def subset(self, n: int) -> "StreamSplit":
        out = StreamSplit.__new__(StreamSplit)
        out.samples = _Samples(self.samples.split.take(torch.arange(min(n, len(self)))), self.samples.transform)
        out.y, out.device, out.workers = self.y[:n], self.device, self.workers
        return out


class StreamData:
    def __init__(self, splits: Splits, device: torch.device, shift: int = 0, flip: bool = False, workers: int = 0):
        from torchvision.transforms import v2

        self.info: DataInfo = splits.info
        self.device = device
        self.shift, self.flip, self.workers = int(shift), bool(flip), int(workers)
        h, w = self.info.input_shape[1:]
        to_input = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.info.mean, self.info.std)]
        augment = ([v2.RandomCrop((h, w), padding=self.shift, fill=0)] if self.shift else []) + (
            [v2.RandomHorizontalFlip()] if self.flip else []
        )
        evaluation = v2.Compose(to_input)
        self.train = StreamSplit(splits.train, v2.Compose(augment + to_input), device, self.workers)
        self.val, self.test = (StreamSplit(s, evaluation, device, self.workers) for s in (splits.val, splits.test))
        self._train_plain = StreamSplit(splits.train, evaluation, device, self.workers)

    def split(self, name: str) -> StreamSplit:
        return self._train_plain if name == "train" else getattr(self, name)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        """One epoch of shuffled, augmented batches (x, y, indices), as DeviceData's: the order and
        the workers' random transforms follow from `generator`."""
        n = len(self.train)
        seed = int(torch.randint(0, 2**62, (1,), device=generator.device, generator=generator))
        order = torch.Generator().manual_seed(seed)
        loader = self.train.loader(
            batch_size,
            sampler=RandomSampler(self.train.samples, generator=order),
            drop_last=n >= batch_size,
            generator=order,
        )
        for x, y, idx in _iterate(loader):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), idx.to(self.device)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.train) // batch_size)


def check_workers(workers) -> int:
    if workers is None:
        from kdcli.data.folder import default_workers

        return default_workers()
    if int(workers) < 0:
        raise KdError(f"dataset.workers={workers}: give a count of loader processes (0 = in the main process).")
    return int(workers)


def open_data(splits: Splits, device: torch.device, shift: int = 0, flip: bool = False, storage="auto", workers=None):
    """DeviceData (whole splits as tensors on the device) when they fit in the memory budget,
    else StreamData; `storage=memory|stream` forces the choice."""
    from dataclasses import replace

    from kdcli.data.device import DeviceData

    workers = check_workers(workers)
    if storage not in ("auto", "memory", "stream"):
        raise KdError(f"dataset.storage={storage}: choose auto (from the size), memory or stream.")
    if storage == "auto":
        need, budget = float_bytes(splits), memory_budget(device)
        storage = "memory" if need <= budget else "stream"
        if storage == "stream":
            log.info(
                f"data     {need / 2**30:.1f} GiB as float32 exceeds the {budget / 2**30:.1f} GiB budget on {device}: "
                f"streaming with {workers} worker processes (dataset.storage=memory to force)"
            )
    if storage == "stream":
        return StreamData(splits, device, shift, flip, workers)
    lazy = {
        k: decode_all(getattr(splits, k), workers, k)
        for k in ("train", "val", "test")
        if hasattr(getattr(splits, k), "image")
    }
    return DeviceData(replace(splits, **lazy) if lazy else splits, device, shift, flip)
