"""Latency of a model on one batch: warm-up runs first (allocations, caches, lazy
initialisation of the runtime), then the median and interquartile range of repeated runs, with
torch.utils.benchmark's rule for when that spread makes the figures noise."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# torch.utils.benchmark warns when the interquartile range is over 10 % of the median ("could
# indicate system fluctuation") and over 25 % ("significant environmental influence").
NOISY = 0.10


@dataclass(frozen=True)
class Timing:
    """The statistics of repeated timed calls, as torch.utils.benchmark's Measurement computes them
    (importing that package loads torch's C++ extension builder, which warns on CPU-only machines)."""

    median_ms: float
    iqr_ms: float
    runs: int

    @property
    def spread(self) -> float:
        """The interquartile range as a fraction of the median."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY


def time_ms(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device, warmup: int, repeats: int
) -> Timing:
    """Median and interquartile range over `repeats` timed calls of run(x), after `warmup` untimed
    ones, in milliseconds. The device is synchronised around each call, so queued GPU work is counted."""
    for _ in range(warmup):
        run(x)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    if not times:
        raise ValueError("time_ms needs repeats >= 1")
    p25, median, p75 = (
        torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    )
    return Timing(1000 * median, 1000 * (p75 - p25), len(times))


def costs(run, x_small: torch.Tensor, x_large: torch.Tensor, device: torch.device, warmup: int, repeats: int) -> dict:
    """Latency at batch 1 and at the larger batch (median and interquartile range), the throughput
    that batch gives, and whether the spread says the figures are noise (a busy machine)."""
    one = time_ms(run, x_small, device, warmup, repeats)
    many = time_ms(run, x_large, device, warmup, repeats)
    return {
        "latency_ms_bs1": one.median_ms,
        "latency_iqr_ms_bs1": one.iqr_ms,
        "latency_ms_batch": many.median_ms,
        "latency_iqr_ms_batch": many.iqr_ms,
        "latency_batch": len(x_large),
        "latency_runs": one.runs,
        "latency_noisy": one.noisy or many.noisy,
        "throughput_per_s": len(x_large) / (many.median_ms / 1000),
    }


def spread(row: dict) -> float | None:
    """The larger relative interquartile range of a costs() row's two timings (None: not timed)."""
    parts = [
        row[f"latency_iqr_ms_{k}"] / row[f"latency_ms_{k}"] for k in ("bs1", "batch") if row.get(f"latency_ms_{k}")
    ]
    return max(parts) if parts else None


def noisy_warning(rows: dict[str, dict]) -> str | None:
    """One line naming the models whose timings are noise, with the spread and the fix; None if none is."""
    bad = {name: spread(r) for name, r in rows.items() if r.get("latency_noisy")}
    if not bad:
        return None
    return (
        f"the latency of {', '.join(bad)} is noise: the interquartile range of its timed runs is up to "
        f"{100 * max(bad.values()):.0f} % of the median (over {100 * NOISY:.0f} %: the machine is busy). kdcli gives "
        "no speed-up from such figures and leaves them out of tradeoff.png; time again on an idle machine, with "
        "latency.threads=1 or more latency.repeats."
    )


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
