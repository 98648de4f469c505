"""Latency of a model on one batch: warm-up runs first (allocations, caches, lazy
initialisation of the runtime), then the median wall time of repeated runs."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_ms(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device, warmup: int, repeats: int
) -> float:
    """Median over `repeats` timed calls of run(x), after `warmup` untimed ones, in milliseconds.
    The device is synchronised around each call, so queued GPU work is counted."""
    for _ in range(warmup):
        run(x)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def costs(run, x_small: torch.Tensor, x_large: torch.Tensor, device: torch.device, warmup: int, repeats: int) -> dict:
    """Latency at batch 1 and at the larger batch, and the throughput that batch gives."""
    one = median_ms(run, x_small, device, warmup, repeats)
    many = median_ms(run, x_large, device, warmup, repeats)
    return {
        "latency_ms_bs1": one,
        "latency_ms_batch": many,
        "latency_batch": len(x_large),
        "throughput_per_s": len(x_large) / (many / 1000),
    }


@contextlib.contextmanager
def threads(n: int | None):
    """PyTorch's intra-op thread count set to n (None: left as it is) for the block, then put
    back: one job of a sweep does not change the next one's."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
