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
from torch.utils.data import DataLoader, Dataset

from kdcli.core import distributed
from kdcli.core.errors import KdError
from kdcli.core.interrupt import Interrupted, ignore_in_worker, requested
from kdcli.data.device import mix_seed
from kdcli.data.types import DataInfo, Split, Splits

log = logging.getLogger("kdcli")


def _image(split, i: int) -> torch.Tensor:
    """uint8 (C, H, W) image i of an in-memory Split or a FileSplit."""
    return split.image(i) if hasattr(split, "image") else split.x[i]


class _Augment:
    """Random crop with `shift` pixels of black padding and a random horizontal flip of one
    uint8 image, drawn from a generator seeded by (epoch seed, sample index): the result does
    not depend on which worker process, or how many, decode the sample."""

    def __init__(self, shift: int, flip: bool, affine: bool = False):
        self.shift, self.flip, self.affine = shift, flip, affine

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.affine:  # rotation, scaling and the shift in one map (kdcli/data/device.py), black fill
            from kdcli.data.device import affine_batch

            moved = affine_batch(x[None].float(), self.shift, torch.zeros(x.shape[0]), g)[0]
            x = moved.round().clamp(0, 255).to(x.dtype)
        elif self.shift:
            s, (h, w) = self.shift, x.shape[1:]
            dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=g).tolist()
            x = torch.nn.functional.pad(x, (s, s, s, s))[:, dy : dy + h, dx : dx + w]
        if self.flip and torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        return x


class _Samples(Dataset):
    """(transformed image, label, index) of one split; `augment` (with the `epoch_seed` of the
    epoch being read) before `transform`."""

    def __init__(self, split, transform=None, augment: _Augment | None = None):
        self.split, self.transform, self.augment = split, transform, augment
        self.epoch_seed = 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        x = _image(self.split, i)
        if self.augment is not None:
            x = self.augment(x, mix_seed(self.epoch_seed, i))
        return (self.transform(x) if self.transform else x), self.split.y[i], i


def _loader_error(e: Exception) -> KdError:
    """A worker's KdError comes back wrapped in its traceback: keep the message alone."""
    text = str(e)
    marker = "KdError: "
    return KdError(text[text.rindex(marker) + len(marker) :].strip() if marker in text else text)


def _shut_down(batches) -> None:
    """Stop a loader iterator's worker processes now. Left to garbage collection, they outlive
    an error (the traceback keeps the iterator alive), and the interpreter's exit then waits on
    workers that ignore SIGTERM (ignore_in_worker): a hang after the error was printed."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()  # idempotent; a finished epoch's iterator has already done it


def _iterate(loader: DataLoader):
    batches = iter(loader)
    try:
        yield from batches
    except Exception as e:
        _shut_down(batches)
        if requested() is not None:  # stopping on a signal: the loader's failure is part of it
            raise Interrupted(requested()) from None
        text = str(e)
        if isinstance(e, KdError) or (isinstance(e, RuntimeError) and "KdError" in text):
            raise _loader_error(e) from None
        if isinstance(e, RuntimeError) and "DataLoader worker" in text and ("killed" in text or "exited" in text):
            raise KdError(
                f"a data loader process died ({text.splitlines()[0]}), often for lack of shared memory "
                "(/dev/shm) or memory. Fix: dataset.workers=0 (load in the training process), or give the "
                "machine or container more shared memory (docker: --shm-size=2g)."
            ) from None
        raise
    finally:  # also when the reader stops early (GeneratorExit) or on a KeyboardInterrupt
        _shut_down(batches)


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
    try:  # MemAvailable counts reclaimable page cache, unlike MemFree: stable from run to run
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024 // 4
    except (OSError, StopIteration, ValueError, IndexError):  # not Linux: assume a laptop's few GiB
        return 2 << 30


def float_bytes(splits: Splits) -> int:
    n = len(splits.train) + len(splits.val) + len(splits.test)
    c, h, w = splits.info.input_shape
    return n * c * h * w * 4


class StreamSplit:
    """One split read through a DataLoader, in order (augmented only when `augment` is given)."""

    def __init__(self, split, transform, device: torch.device, workers: int, augment: _Augment | None = None):
        self.samples = _Samples(split, transform, augment)
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
            worker_init_fn=ignore_in_worker,
            # its own generator: a loader would otherwise take a draw from the global one (dropout's)
            generator=kwargs.pop("generator", None) or torch.Generator().manual_seed(0),
            **kwargs,
        )

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for x, _, _ in _iterate(self.loader(batch_size)):
            yield x.to(self.device, non_blocking=True)

    def head(self, n: int) -> torch.Tensor:
        return torch.stack([self.samples[i][0] for i in range(min(n, len(self)))]).to(self.device)

    def subset(self, n: int) -> "StreamSplit":
        s = self.samples
        return StreamSplit(
            s.split.take(torch.arange(min(n, len(self)))), s.transform, self.device, self.workers, s.augment
        )


class StreamData:
    def __init__(
        self, splits: Splits, device: torch.device, shift: int = 0, flip: bool = False, workers: int = 0, affine=False
    ):
        from torchvision.transforms import v2

        self.info: DataInfo = splits.info
        self.device = device
        self.shift, self.flip, self.workers = int(shift), bool(flip), int(workers)
        to_input = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.info.mean, self.info.std)])
        augment = _Augment(self.shift, self.flip, bool(affine)) if self.shift or self.flip or affine else None
        # `train` is the training split as the engine reads it (evaluation, shapes): not augmented.
        self.train, self.val, self.test = (
            StreamSplit(s, to_input, device, self.workers) for s in (splits.train, splits.val, splits.test)
        )
        self._augmented = StreamSplit(splits.train, to_input, device, self.workers, augment)

    def split(self, name: str) -> StreamSplit:
        return getattr(self, name)

    def train_batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """One epoch of shuffled, augmented batches (x, y, indices), as DeviceData's: the order
        follows from `seed`, each sample's random transform from (seed, sample index), so the
        batches do not depend on the workers and an epoch continues exactly at batch `start`. Under
        several processes each reads its rows of every batch (kdcli/core/distributed.py)."""
        n = len(self.train)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        stop = n - n % batch_size if n >= batch_size else n
        samples = self._augmented.samples
        samples.epoch_seed = seed  # read by the workers, which start with each epoch's loader
        order = perm[start * batch_size : stop]
        if distributed.world() > 1:  # this process's rows of each batch
            lo, hi = distributed.part(min(batch_size, n))
            order = order.view(-1, min(batch_size, n))[:, lo:hi].reshape(-1)
            batch_size = hi - lo
        loader = self._augmented.loader(
            batch_size, sampler=order.tolist(), generator=torch.Generator().manual_seed(seed)
        )
        for x, y, idx in _iterate(loader):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), idx.to(self.device)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.train) // batch_size)


def default_workers() -> int:
    """Loader processes: one per core this process may use beside the training process, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


def check_workers(workers) -> int:
    if workers is None:
        return default_workers()
    if int(workers) < 0:
        raise KdError(f"dataset.workers={workers}: give a count of loader processes (0 = in the main process).")
    return int(workers)


def open_data(
    splits: Splits, device: torch.device, shift: int = 0, flip: bool = False, storage="auto", workers=None, affine=False
):
    """DeviceData (whole splits as tensors on the device) when they fit in the memory budget,
    else StreamData; `storage=memory|stream` forces the choice. affine: random rotations and
    scaling on top of the shift (augment=affine, dataset.affine)."""
    from dataclasses import replace

    from kdcli.data.device import DeviceData

    workers = check_workers(workers)
    if storage not in ("auto", "memory", "stream"):
        raise KdError(f"dataset.storage={storage}: choose auto (from the size), memory or stream.")
    if storage == "auto":
        need, budget = float_bytes(splits), memory_budget(device)
        # Several processes take rank 0's choice: memory and stream shuffle differently on a GPU
        storage = distributed.same("memory" if need <= budget else "stream")
        if storage == "stream":
            log.info(
                f"data     {need / 2**30:.1f} GiB as float32 exceeds the {budget / 2**30:.1f} GiB budget on {device}: "
                f"streaming with {workers} worker processes (dataset.storage=memory to force)"
            )
    if storage == "stream":
        return StreamData(splits, device, shift, flip, workers, affine)
    lazy = {
        k: decode_all(getattr(splits, k), workers, k)
        for k in ("train", "val", "test")
        if hasattr(getattr(splits, k), "image")
    }
    return DeviceData(replace(splits, **lazy) if lazy else splits, device, shift, flip, affine)
