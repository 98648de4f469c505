"""Does distillation pay? Teacher, scratch and distilled student over seeds, per method.

For each method, runs the real `kd distill -m seed=0,...,N-1 <method> <overrides>` in one runs
directory, so the teacher is trained once (its recipe does not depend on the student's seed or
method) and reused by every job; every job also trains the scratch student with the same seed,
initial weights, augmentation and budget. Prints, per method: teacher, scratch and distilled
test accuracy (mean ± std over seeds), the KD gain with its Student-t 95 % interval over seeds,
the gap closure (distilled - scratch) / (teacher - scratch), the median and largest per-seed
exact McNemar p-value of the gain (paired on the same test images), and the student's training
time. Writes quality.md and quality.csv into --out.

    python scripts/bench_quality.py                                  # the defaults, 5 seeds
    python scripts/bench_quality.py --methods kd,dkd,dist,ls,kd_rkd  # several methods
    python scripts/bench_quality.py --dataset fashion_mnist --seeds 3 -- teacher=resnet20 student=resnet8
    python scripts/bench_quality.py --list                           # the method names
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kdcli.core.metrics import mean_interval
from kdcli.report import console, table

# name -> the method's kd distill overrides (the papers' settings where they give them)
METHODS = {
    "kd": [],  # the defaults: cutmix for both students (the teacher labels the mixed images), 60 epochs
    "kd_no_mix": ["mix=none"],  # the same without mixing: the best scratch student measured
    "kd_30": ["trainer.epochs=30"],
    "kd_no_mix30": ["mix=none", "trainer.epochs=30"],  # the defaults before cutmix
    "kd_mixup": ["mix=mixup"],  # both students on mixup batches; the teacher on the same mixed images
    # Beyer et al. 2022 (function matching): the teacher's softmax at T 1 on the mixed images only, no labels, long
    "funmatch": ["mix=mixup", "alpha=0", "T=1", "trainer.epochs=120"],
    "kd_T1": ["T=1"],
    "kd_T2": ["T=2"],
    "kd_T8": ["T=8"],
    "kd_alpha0": ["alpha=0"],  # the teacher alone: under cutmix the labels' area-weighted target is the poor one
    "kd_alpha0.5": ["alpha=0.5"],
    "kd_patient": ["trainer.epochs=120"],  # Beyer et al. 2022: consistent teaching, long schedules
    "kd_unscaled_lr": ["distill_lr_scale=1"],  # the student at the labels' learning rate (before distill_lr_scale)
    "kd_no_aug": ["augment=none"],  # neither student augmented nor mixed; the teacher keeps its own recipe
    "kd_shift_only": ["dataset.affine=false", "mix=none"],  # shifts only, for students and teacher
    "kd_teacher120": ["teacher_train.trainer.epochs=120"],  # a teacher trained twice as long
    "kd_teacher_wide": ["teacher.channels=[16,32]", "teacher.hidden=128"],  # a wider convnet teacher
    "kd_teacher_cutmix": ["teacher_train.mix=cutmix"],  # a teacher that has seen mixed images
    "kd_student64": ["student.hidden=[64]"],  # a smaller MLP student: a wider gap to the teacher
    "kd_student32": ["student.hidden=[32]"],
    "kd_student64_t120": ["student.hidden=[64]", "teacher_train.trainer.epochs=120"],
    "soft_ce": ["loss=soft_ce"],
    "dkd": ["loss=dkd", "schedule.warmup=5", "alpha=0.1"],  # Zhao et al. 2022: alpha 1, beta 8, warm-up of the term
    "dist": ["loss=dist", "T=1", "alpha=0.5"],  # Huang et al. 2022: T 1, beta = gamma = 1
    "ls": ["loss=ls", "T=2", "alpha=0.1"],  # Sun et al. 2024: kd on z-scored logits
    "kd_rkd": ["features=[rkd]"],  # Park et al. 2019, on the penultimate features
    "kd_pkt": ["features=[pkt]"],  # Passalis & Tefas 2018
    "kd_sp": ["features=[sp]"],  # Tung & Mori 2019
}


def run_method(name: str, seeds: int, common: list[str], runs: Path) -> dict:
    """One sweep over seeds; the figures of each job."""
    cmd = [sys.executable, "-m", "kdcli", "distill", "-m", f"seed={','.join(map(str, range(seeds)))}"]
    cmd += [*METHODS[name], *common, f"hydra.sweep.dir={runs / 'sweeps' / name}"]
    console.print(f"$ kd {' '.join(cmd[3:])}", highlight=False, markup=False, soft_wrap=True)
    started = time.perf_counter()
    result = subprocess.run(cmd, env={**os.environ, "KDCLI_RUNS": str(runs)}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    jobs = sorted((d for d in (runs / "sweeps" / name).iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    metrics = [json.loads((d / "metrics.json").read_text()) for d in jobs]
    failed = [m.get("error", "?") for m in metrics if m.get("status") != "completed"]
    if result.returncode != 0 or failed:
        sys.exit(f"{name}: failed: {failed or result.stdout[-3000:] + result.stderr[-3000:]}")
    return {"metrics": metrics, "wall": wall}


def summarise(name: str, found: dict) -> dict:
    ms = found["metrics"]
    teacher = [100 * m["teacher"]["test_acc"] for m in ms]
    scratch = [100 * m["scratch"]["test_acc"] for m in ms]
    student = [100 * m["student"]["test_acc"] for m in ms]
    gains = [s - b for s, b in zip(student, scratch)]
    closure = [g / (t - b) if t != b else float("nan") for g, t, b in zip(gains, teacher, scratch)]
    p = [m["kd_gain_test"]["p_value"] for m in ms]
    mean, sd, lo, hi = mean_interval(gains)
    fmt = lambda v: f"{statistics.fmean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}"  # noqa: E731
    return {
        "method": name,
        "overrides": " ".join(METHODS[name]) or "(defaults)",
        "teacher %": fmt(teacher),
        "scratch %": fmt(scratch),
        "distilled %": fmt(student),
        "gain": f"{mean:+.2f} ± {sd:.2f}",
        "gain 95% CI": f"{lo:+.2f} to {hi:+.2f}" if len(gains) > 1 else "-",
        "gap closure": f"{statistics.fmean(closure):.2f} ± {statistics.stdev(closure) if len(closure) > 1 else 0:.2f}",
        "McNemar p (median, max)": f"{statistics.median(p):.2g}, {max(p):.2g}",
        "student s": f"{statistics.fmean(m['student']['train_s'] for m in ms):.1f}",
        "sweep s": f"{found['wall']:.0f}",
        "seeds": str(len(ms)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="kd", help="comma-separated names (--list)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--dataset", default=None, help="dataset=NAME for every run (default: kd distill's)")
    ap.add_argument("--out", type=Path, default=Path("bench_quality"))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("overrides", nargs="*", help="kd distill overrides for every method (after --)")
    args = ap.parse_args()
    if args.list:
        for name, overrides in METHODS.items():
            print(f"{name:<12} {' '.join(overrides) or '(defaults)'}")
        return
    names = args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; --list shows {', '.join(METHODS)}")
    common = ([f"dataset={args.dataset}"] if args.dataset else []) + args.overrides
    args.out.mkdir(parents=True, exist_ok=True)
    runs = (args.out / "runs").resolve()
    first = None
    rows = []
    for name in names:
        found = run_method(name, args.seeds, common, runs)
        if first is None:
            first = found["metrics"][0]["elapsed_s"]
        rows.append(summarise(name, found))
        console.print(table("So far", list(rows[0]), (r.values() for r in rows)))
    title = f"Distillation against the scratch student, {args.seeds} seeds ({' '.join(common) or 'defaults'})"
    console.print(table(title, list(rows[0]), (r.values() for r in rows)))
    console.print(
        f"First run (teacher trained, then scratch and distilled student): {first:.1f} s on {os.cpu_count()} cores"
    )
    with open(args.out / "quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r.values()) + " |" for r in rows]
    (args.out / "quality.md").write_text(f"{title}\n\n" + "\n".join(lines) + "\n")
    console.print(f"Tables: {args.out / 'quality.md'}, {args.out / 'quality.csv'}")


if __name__ == "__main__":
    main()
