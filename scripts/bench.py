"""Distillation speed: `kd distill` against the same distillation written as a plain PyTorch loop.

The plain loop is the one tutorials write: a Dataset of uint8 images with per-sample
torchvision transforms (ToTensor, Normalize), a DataLoader, the teacher's forward on every
step. Both use the same teacher checkpoint, the same training split (kdcli's, validation carved
out), the same student, initial weights, recipe (SGD + Nesterov, cosine per step, batch 64, no
augmentation) and loss (alpha * CE + (1 - alpha) * T^2 * KL, batchmean). Printed per setting:
median epoch time and samples/s of each, the ratio, the FLOPs of one training step
(torch.utils.flop_counter: student forward and backward, plus the teacher's forward where it runs:
kd distill with augment=none looks the teacher's outputs up, kdcli/teachers/cache.py) and the FLOP/s
reached as a share of this machine's float32 matmul peak (measured here), and test accuracy over
seeds. kd's epoch time includes its validation pass.

    python scripts/bench.py                                   # mnist5k, 3 seeds, 10 epochs
    python scripts/bench.py --dataset fashion_mnist --epochs 3 --seeds 0
    python scripts/bench.py --student lenet5 --lr 0.01        # a small conv student
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from kdcli.core.files import read_jsonl
from kdcli.data import load_splits
from kdcli.models import build_model
from kdcli.training import checkpoint
from kdcli.training.resume import read_metrics

T, ALPHA, BATCH = 4.0, 0.1, 64


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """float32 FLOP/s of a large square matmul on this machine (the best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Images(Dataset):
    """uint8 (N, C, H, W) images as a torchvision-style dataset: one PIL-like array per item,
    transformed per sample."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean, std):
        self.x, self.y = x.permute(0, 2, 3, 1).numpy(), y  # HWC uint8, what ToTensor expects
        self.tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.tf(self.x[i]), self.y[i]


def kd_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    kl = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
    return ALPHA * F.cross_entropy(s, y) + (1 - ALPHA) * T * T * kl


def plain_loop(
    teacher: torch.nn.Module, student_name: str, dataset: dict, data_root: str, epochs: int, seed: int, lr: float
) -> dict:
    splits = load_splits(dataset, data_root)
    info = splits.info
    torch.manual_seed(seed)
    student = build_model(student_name, info.input_shape, info.num_classes)
    train = Images(splits.train.x, splits.train.y, info.mean, info.std)
    test = Images(splits.test.x, splits.test.y, info.mean, info.std)
    loader = DataLoader(train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    times = []
    for _ in range(epochs):
        student.train()
        t0 = time.perf_counter()
        for x, y in loader:
            with torch.no_grad():
                t = teacher(x)
            loss = kd_loss(student(x), t, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        times.append(time.perf_counter() - t0)
    student.eval()
    with torch.no_grad():
        right = sum(int((student(x).argmax(1) == y).sum()) for x, y in DataLoader(test, batch_size=1000))
    return {"epoch_s": statistics.median(times), "train": len(train), "test_acc": right / len(test)}


def step_flops(teacher: torch.nn.Module, student_name: str, input_shape, num_classes: int, teacher_runs: bool) -> int:
    """FLOPs of one training step: the student's forward and backward, and the teacher's forward
    when it runs (kd distill looks cached teacher outputs up instead)."""
    student = build_model(student_name, input_shape, num_classes)
    x, y = torch.randn(BATCH, *input_shape), torch.randint(0, num_classes, (BATCH,))
    with torch.no_grad():
        t = teacher(x)
    with FlopCounterMode(display=False) as counter:
        if teacher_runs:
            with torch.no_grad():
                teacher(x)
        kd_loss(student(x), t, y).backward()
    return int(counter.get_total_flops())


def kd(env: dict, *args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "kdcli", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stdout[-3000:] + r.stderr[-3000:])


def newest(root: Path) -> Path:
    return max((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)


def kd_distill(env: dict, runs: Path, teacher: Path, args, seed: int) -> dict:
    kd(
        env,
        "distill",
        f"dataset={args.dataset}",
        f"teacher.ckpt={teacher}",
        f"student={args.student}",
        f"trainer.epochs={args.epochs}",
        f"seed={seed}",
        f"optimizer.lr={args.lr}",
        "augment=none",
        "baseline=false",
        "device=cpu",
    )
    run = newest(runs / "distill")
    times = [r["epoch_s"] for r in read_jsonl(run / "metrics.jsonl") if r["role"] == "student"]
    metrics = read_metrics(run)
    return {
        "epoch_s": statistics.median(times),
        "test_acc": metrics["student"]["test_acc"],
        "cached": metrics["teacher_cache"]["used"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--teacher", default="convnet")
    p.add_argument("--student", default="mlp")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate of both (a conv student wants 0.01)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    data_root = os.environ.get("KDCLI_DATA", str(Path("~/.cache/kdcli/data").expanduser()))
    peak = matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        env = {**os.environ, "KDCLI_RUNS": str(runs)}
        kd(
            env,
            "train-teacher",
            f"dataset={args.dataset}",
            f"teacher={args.teacher}",
            f"trainer.epochs={args.teacher_epochs}",
            "device=cpu",
        )
        teacher = newest(runs / "train_teacher") / "checkpoints" / "teacher_best.pt"
        ck = checkpoint.load(teacher)
        info, dataset = ck["data"], ck["data"]["dataset"]
        model = checkpoint.build_from(ck, teacher).eval()
        shape, classes = info["input_shape"], info["num_classes"]
        flops = {runs_teacher: step_flops(model, args.student, shape, classes, runs_teacher) for runs_teacher in (0, 1)}
        ours, plain = [], []
        for seed in seeds:
            ours.append(kd_distill(env, runs, teacher, args, seed))
            plain.append(plain_loop(model, args.student, dataset, data_root, args.epochs, seed, args.lr))
    n = plain[0]["train"]
    steps = -(-n // BATCH)
    print(
        f"{args.dataset}: {args.teacher} -> {args.student}, {n} training images, {args.epochs} epochs, "
        f"batch {BATCH}, {torch.get_num_threads()} threads; matmul peak {peak / 1e9:.1f} GFLOP/s; "
        f"MFLOP per step: {flops[1] / 1e6:.1f} with the teacher's forward, {flops[0] / 1e6:.1f} without"
    )
    print(
        f"{'':<12} {'teacher':>8} {'epoch s':>8} {'samples/s':>10} {'GFLOP/s':>8} {'% peak':>7} "
        f"{'test acc % (seeds ' + args.seeds + ')':>30}"
    )
    for name, res in (("kd distill", ours), ("plain loop", plain)):
        epoch = statistics.median(r["epoch_s"] for r in res)
        accs = [100 * r["test_acc"] for r in res]
        spread = f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else f"{accs[0]:.2f}"
        cached = all(r.get("cached") for r in res)
        rate = steps * flops[not cached] / epoch  # the work done: the teacher's forward only when it runs
        print(
            f"{name:<12} {'cached' if cached else 'runs':>8} {epoch:>8.2f} {n / epoch:>10,.0f} {rate / 1e9:>8.2f} "
            f"{100 * rate / peak:>6.1f}% {spread:>30}"
        )
    ratio = statistics.median(r["epoch_s"] for r in plain) / statistics.median(r["epoch_s"] for r in ours)
    print(f"kd distill is {ratio:.2f}x the plain loop's speed per epoch")


if __name__ == "__main__":
    main()
