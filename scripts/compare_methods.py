"""Every distillation method of kdcli on one teacher/student pair, over several seeds.

Trains the teacher(s) once with `kd train-teacher`, then runs `kd distill -m seed=...` per
method (the real command, as a user would) and prints a table of the student's test accuracy,
mean and sample standard deviation over seeds, next to the student trained from scratch with
the same recipe. Writes compare.csv and compare.md into --out.

    python scripts/compare_methods.py                       # mnist5k, 3 seeds
    python scripts/compare_methods.py --dataset fashion_mnist --epochs 10 --seeds 2
    python scripts/compare_methods.py --only kd,dkd,kd_at   # a subset, by the names --list prints
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kdcli.report import console, table

TEACHER = ["teacher=convnet", "teacher.channels=[32,64]", "teacher.hidden=256"]
STUDENT = ["student=convnet", "student.channels=[4,8]", "student.hidden=32", "student.dropout=0"]
# The student's recipe for every method; SGD at lr 0.05 diverges for this small CNN under KD.
RECIPE = ["optimizer=adam", "optimizer.lr=0.002"]


def conv(term: str) -> list[str]:
    return [f"features.{term}.teacher_layer=conv2", f"features.{term}.student_layer=conv2"]


# name -> (the method's overrides, what it needs: "teacher", "ensemble", "domains" or nothing)
METHODS = {
    "kd": (["loss=kd"], "teacher"),
    "soft_ce": (["loss=soft_ce"], "teacher"),
    "mse": (["loss=mse", "alpha=0.5"], "teacher"),
    "dkd": (["loss=dkd", "schedule.warmup=2"], "teacher"),
    "dist": (["loss=dist", "T=1", "alpha=0.5"], "teacher"),
    "ls": (["loss=ls", "T=2"], "teacher"),
    "kd, T 8->1 linear": (["schedule.T=linear", "T=8", "schedule.T_end=1"], "teacher"),
    "kd, confidence weights": (["confidence_weights=true"], "teacher"),
    "kd + fitnet (hint stage 2 ep)": (
        ["features=[fitnet]", *conv("fitnet"), "features.fitnet.hint_epochs=2"],
        "teacher",
    ),
    "kd + at": (["features=[at]", *conv("at")], "teacher"),
    "kd + nst": (["features=[nst]", *conv("nst")], "teacher"),
    "kd + rkd": (["features=[rkd]"], "teacher"),
    "kd + pkt": (["features=[pkt]"], "teacher"),
    "kd + sp": (["features=[sp]"], "teacher"),
    "kd + crd": (["features=[crd]"], "teacher"),
    "kd, 2-teacher ensemble": ([], "ensemble"),
    "kd, teachers of 0-4 and 5-9 merged": ([], "domains"),
    "kd, teachers of 0-4 and 5-9, logits merged": (["teacher_merge=logits"], "domains"),
    "ta (assistant convnet 10-20-50)": (["method=ta", "method.assistants=[convnet]"], "teacher"),
    "dml (2 peers, T=1, alpha=0.5)": (["method=dml", "T=1", "alpha=0.5"], None),
    "joint (teacher trained alongside)": (["method=joint"], None),
    "born_again (2 generations)": (["method=born_again", "method.generations=2"], None),
}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def kd(*args: str, env: dict) -> None:
    cmd = [sys.executable, "-m", "kdcli", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def train_teacher(name: str, out: Path, common: list[str], extra: list[str], env: dict) -> str:
    run = out / "teachers" / name
    if not (run / "checkpoints" / "teacher_best.pt").is_file():
        kd("train-teacher", *common, *TEACHER, *extra, f"hydra.run.dir={run}", env=env)
    return str(run / "checkpoints" / "teacher_best.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15, help="student epochs")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--only", default="", help="comma-separated method slugs, see --list (default: all)")
    ap.add_argument("--list", action="store_true", help="print the method slugs and exit")
    args = ap.parse_args()
    if args.list:
        print("\n".join(f"{slug(m):<40} {m}" for m in METHODS))
        return
    out = Path(args.out).resolve()
    env = {**os.environ, "KDCLI_RUNS": str(out / "runs"), "COLUMNS": "160"}
    common = [f"dataset={args.dataset}", "trainer.progress=false"]
    t_common = [*common, f"trainer.epochs={args.teacher_epochs}"]
    seeds = ",".join(str(s) for s in range(args.seeds))
    wanted = [w for w in args.only.split(",") if w]
    unknown = [w for w in wanted if w not in {slug(m) for m in METHODS}]
    if unknown:
        sys.exit(f"--only: unknown {', '.join(unknown)}; see --list")
    chosen = [m for m in METHODS if not wanted or slug(m) in wanted]

    t0 = time.perf_counter()
    teacher = train_teacher("main", out, t_common, [], env)
    needs = {METHODS[m][1] for m in chosen}
    second = train_teacher("seed1", out, t_common, ["seed=1"], env) if "ensemble" in needs else None
    halves = (
        [
            train_teacher(f"classes{i}", out, t_common, [f"dataset.classes=[{c}]"], env)
            for i, c in ((0, "0,1,2,3,4"), (1, "5,6,7,8,9"))
        ]
        if "domains" in needs
        else None
    )
    console.print(f"teachers ready in {time.perf_counter() - t0:.0f} s")

    rows, scratch = [], None
    for name in chosen:
        overrides, need = METHODS[name]
        sweep = out / "sweeps" / slug(name)
        teacher_args = {
            "teacher": [f"teacher.ckpt={teacher}"],
            "ensemble": [f"teachers=[{teacher},{second}]"],
            "domains": [f"teachers=[{','.join(halves or [])}]"],
            None: [*TEACHER],
        }[need]
        baseline = "baseline=true" if scratch is None else "baseline=false"
        done = [sweep / str(i) / "metrics.json" for i in range(args.seeds)]
        # Sweeps finished by an earlier invocation are reused.
        if not all(f.is_file() and json.loads(f.read_text())["status"] == "completed" for f in done):
            kd(
                "distill", "-m", f"seed={seeds}", *common, *STUDENT, *RECIPE, f"trainer.epochs={args.epochs}",
                *teacher_args, baseline, *overrides, f"hydra.sweep.dir={sweep}", env=env,
            )  # fmt: skip
        jobs = [json.loads(f.read_text()) for f in done]
        seconds = statistics.mean(j["student"]["train_s"] for j in jobs)
        if scratch is None:
            scratch = [100 * j["scratch"]["test_acc"] for j in jobs]
            rows.append(
                ("scratch (labels only)", "alpha=1", scratch, statistics.mean(j["scratch"]["train_s"] for j in jobs))
            )
        acc = [100 * j["student"]["test_acc"] for j in jobs]
        rows.append((name, " ".join(overrides) or "-", acc, seconds))
        console.print(f"{name}: {statistics.mean(acc):.2f} (student trained in {seconds:.0f} s)")

    base = statistics.mean(scratch)

    def fmt(values):
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"

    header = ["method", "test acc % (mean ± std)", "vs scratch", "train s", "overrides"]
    body = [[n, fmt(a), f"{statistics.mean(a) - base:+.2f}", f"{s:.0f}", o] for n, o, a, s in rows]
    title = (
        f"{args.dataset}: teacher {' '.join(TEACHER[1:])} -> student {' '.join(STUDENT[1:])}, "
        f"{args.epochs} student epochs ({args.teacher_epochs} teacher), {' '.join(RECIPE)}, {args.seeds} seeds"
    )
    console.print(table(title, header, body))
    with open(out / "compare.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    md = [f"{title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in body]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    console.print(f"written: {out / 'compare.csv'}, {out / 'compare.md'}; {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
