"""Where a `kd distill` training step spends its time, by torch.profiler.

The engine marks each step's parts (kdcli/training/engine.py, only while a profiler runs): kd:data (the
batch: indexing the device-resident split, augmentation, or a DataLoader's wait when streamed),
kd:teacher (its forward, or the cache lookup), kd:forward+loss (the student and the objective),
kd:backward, kd:optimizer; "other" is the rest of kd:step (zeroing gradients, the running sums,
the scheduler). One epoch of `kdcli.distill` (convnet teacher, mlp student) is profiled per
setting, after a first epoch that warms up; the table gives microseconds per step and shares.

    python scripts/profile_step.py                          # mnist5k
    python scripts/profile_step.py --dataset fashion_mnist --limit 20000
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

PARTS = ["kd:data", "kd:teacher", "kd:forward+loss", "kd:backward", "kd:optimizer"]
SETTINGS = {
    "in memory, augmented (teacher each step)": {"augment": "standard", "storage": "memory"},
    "in memory, no augmentation (teacher cache)": {"augment": "none", "storage": "memory"},
    "streamed (DataLoader), augmented": {"augment": "standard", "storage": "stream"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--limit", type=int, default=None, help="training images (default: all)")
    ap.add_argument("--student", default="mlp")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("KDCLI_RUNS", tempfile.mkdtemp(prefix="kd-profile-"))
    import kdcli

    keys = {"limit": args.limit} if args.limit else {}
    base = kdcli.load_data(args.dataset, augment="none", **keys)
    teacher = kdcli.train_teacher("convnet", base, epochs=1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {base.device}")
    rows = []
    for label, setting in SETTINGS.items():
        data = kdcli.load_data(args.dataset, augment=setting["augment"], storage=setting["storage"], **keys)
        overrides = [f"trainer.batch_size={args.batch_size}"]
        kdcli.distill(teacher, args.student, data, epochs=1, overrides=overrides)  # warm-up (and the cache)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            kdcli.distill(teacher, args.student, data, epochs=1, overrides=overrides)
        totals = {e.key: e for e in prof.key_averages() if e.key.startswith("kd:")}
        steps = totals["kd:step"].count
        us = {k: totals[k].cpu_time_total / steps if k in totals else 0.0 for k in [*PARTS, "kd:step"]}
        us["other"] = us.pop("kd:step") - sum(us[k] for k in PARTS[1:])
        whole = sum(us.values())
        rows.append((label, steps, whole, {k: (v, v / whole) for k, v in us.items()}))
    cols = [*PARTS, "other"]
    print(
        f"\n{args.dataset}, teacher convnet, student {args.student}, batch {args.batch_size}: "
        "microseconds per step (share)"
    )
    print("| setting | steps | step µs | " + " | ".join(c.removeprefix("kd:") for c in cols) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in cols) + " |")
    for label, steps, whole, parts in rows:
        cells = " | ".join(f"{parts[c][0]:,.0f} ({parts[c][1]:.0%})" for c in cols)
        print(f"| {label} | {steps} | {whole:,.0f} | {cells} |")


if __name__ == "__main__":
    main()
