"""Accuracy and time of the quick start over seeds.

Runs `kd distill -m seed=0,1,2 [overrides]` in a fresh runs directory (so the teacher is trained
once, by the first job, and reused by the others), then prints the per-seed and mean ± std
tables that the sweep writes, and the wall time of the first job (teacher included) and of the
rest. Usage:

    python scripts/bench_quickstart.py                       # the defaults (convnet -> mlp, mnist5k)
    python scripts/bench_quickstart.py student.hidden=[64]   # any kd distill overrides
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(overrides: list[str], seeds: str = "0,1,2") -> None:
    with tempfile.TemporaryDirectory() as runs:
        env = {**os.environ, "KDCLI_RUNS": runs}
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "kdcli", "distill", "-m", f"seed={seeds}", *overrides]
        print("$", " ".join(cmd[2:]).replace("kdcli", "kd", 1), flush=True)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        total = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(result.stdout[-4000:] + result.stderr[-4000:])
        sweep = next((Path(runs) / "distill-multirun").iterdir())
        jobs = sorted((d for d in sweep.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
        elapsed = [json.loads((d / "metrics.json").read_text())["elapsed_s"] for d in jobs]
        print(f"{'seed':>4} {'teacher %':>10} {'scratch %':>10} {'distilled %':>12} {'gain':>7} {'time s':>7}")
        for d, t in zip(jobs, elapsed):
            m = json.loads((d / "metrics.json").read_text())
            print(
                f"{d.name:>4} {100 * m['teacher']['test_acc']:>10.2f} {100 * m['scratch']['test_acc']:>10.2f} "
                f"{100 * m['student']['test_acc']:>12.2f} {100 * m['kd_gain']:>+7.2f} {t:>7.1f}"
            )
        (row,) = csv.DictReader(open(sweep / "summary_seeds.csv"))
        print(
            f"mean ± std over {row['seeds']} seeds: teacher {row['teacher.test_acc']}, "
            f"scratch {row['scratch.test_acc']}, distilled {row['student.test_acc']}, KD gain {row['kd_gain']} points"
        )
        others = sum(elapsed[1:]) / max(1, len(elapsed) - 1)
        print(
            f"first job (teacher trained) {elapsed[0]:.1f} s, others {others:.1f} s each; "
            f"whole sweep {total:.1f} s on {os.cpu_count()} CPU cores"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
