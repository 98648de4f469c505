"""Teacher/student pairs of the model zoo on one dataset: accuracy, weights, FLOPs and time.

For each pair TEACHER:STUDENT, trains the teacher once with `kd train-teacher` and distills the
student with `kd distill` (which also trains it from scratch from the same initial weights), the
real commands as a user runs them, then prints one table and writes it as CSV and Markdown.

    python scripts/bench_zoo.py --dataset fashion_mnist --pairs resnet20:resnet8 \\
        --teacher-epochs 5 --epochs 3 --out bench/zoo
    python scripts/bench_zoo.py --dataset mnist5k --pairs resnet20:resnet8,wrn_16_2:resnet8 -- trainer.max_batches=5

Finished runs under --out are reused, so an interrupted benchmark continues where it stopped.
Arguments after `--` are overrides passed to every command (e.g. data_root=..., optimizer=adam).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

KD = [sys.executable, "-m", "kdcli"]
COLUMNS = [
    "teacher",
    "student",
    "teacher weights",
    "student weights",
    "teacher MFLOPs",
    "student MFLOPs",
    "teacher acc %",
    "scratch acc %",
    "KD acc %",
    "KD gain",
    "teacher s",
    "scratch s",
    "KD s",
]


def completed(run_dir: Path) -> dict | None:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("status") == "completed" else None


def kd(command: str, run_dir: Path, overrides: list[str], runs: Path) -> dict:
    """Run one kd command into run_dir, unless it completed there before; its metrics."""
    done = completed(run_dir)
    if done:
        return done
    args = [*KD, command, *overrides, f"hydra.run.dir={run_dir}", f"runs_dir={runs}", "trainer.progress=false"]
    print("$", " ".join(args[2:]), flush=True)
    start = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{command} failed ({time.perf_counter() - start:.0f} s):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return completed(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--pairs", default="resnet20:resnet8", help="TEACHER:STUDENT,... (kd list models)")
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="student epochs (scratch and distilled)")
    parser.add_argument("--out", type=Path, default=Path("bench/zoo"))
    parser.add_argument("overrides", nargs="*", help="after --: overrides for every command")
    args = parser.parse_args()

    runs = (args.out / "runs").resolve()
    common = [f"dataset={args.dataset}", *args.overrides]
    rows = []
    for pair in args.pairs.split(","):
        teacher, student = pair.split(":")
        t = kd(
            "train-teacher",
            runs / f"teacher-{teacher}",
            [f"teacher={teacher}", f"trainer.epochs={args.teacher_epochs}", *common],
            runs,
        )["teacher"]
        d = kd(
            "distill",
            runs / f"distill-{teacher}-{student}",
            [f"teacher.ckpt={t['checkpoint']}", f"student={student}", f"trainer.epochs={args.epochs}", *common],
            runs,
        )
        s, k = d["scratch"], d["student"]
        rows.append(
            [
                teacher,
                student,
                f"{t['params']:,}",
                f"{k['params']:,}",
                f"{t['flops'] / 1e6:.1f}",
                f"{k['flops'] / 1e6:.1f}",
                f"{100 * t['test_acc']:.2f}",
                f"{100 * s['test_acc']:.2f}",
                f"{100 * k['test_acc']:.2f}",
                f"{100 * (k['test_acc'] - s['test_acc']):+.2f}",
                f"{t['train_s']:.0f}",
                f"{s['train_s']:.0f}",
                f"{k['train_s']:.0f}",
            ]
        )

    table = Table(title=f"{args.dataset}: teacher {args.teacher_epochs} epochs, students {args.epochs} epochs")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("teacher", "student") else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    (console if console.is_terminal else Console(width=200)).print(table)  # a log file gets the whole table
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "zoo.csv", "w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *rows])
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]
    (args.out / "zoo.md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out / 'zoo.csv'} and {args.out / 'zoo.md'}")


if __name__ == "__main__":
    main()
