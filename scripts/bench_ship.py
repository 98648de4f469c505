"""What a user ships, measured: the quick-start distillation, the same student pruned while it
distils (unstructured and channel), int8 quantization of the distilled and the pruned student,
and one `kd evaluate` of all of them (the table quoted in README, "After distilling").

Runs the real commands in a fresh runs directory and prints their tables. Usage:

    python scripts/bench_ship.py                          # convnet -> mlp on mnist5k, the defaults
    python scripts/bench_ship.py student.hidden=[128]     # overrides for every kd distill
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def kd(env: dict, *args: str, show: bool = False) -> None:
    print("$ kd", " ".join(args), flush=True)
    r = subprocess.run([sys.executable, "-m", "kdcli", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stdout[-4000:] + r.stderr[-4000:])
    if show:
        print(r.stdout, flush=True)


def newest(root: Path) -> Path:
    return max((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)


def main(overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        env = {**os.environ, "KDCLI_RUNS": str(runs), "COLUMNS": "160"}
        kd(env, "distill", *overrides)
        dense = newest(runs / "distill")
        pruned = {}
        for kind in ("unstructured", "channel"):
            kd(env, "distill", "baseline=false", f"prune.kind={kind}", *overrides)
            pruned[kind] = newest(runs / "distill") / "checkpoints" / "student_best.pt"
        kd(env, "quantize", f"run={dense}", show=True)
        q_dense = newest(runs / "quantize")
        kd(env, "quantize", f"checkpoint={pruned['unstructured']}", "modes=[dynamic]")
        q_pruned = newest(runs / "quantize")
        teacher = json.loads((dense / "metrics.json").read_text())["teacher"]["checkpoint"]
        files = [
            teacher,
            dense / "checkpoints" / "scratch_best.pt",
            dense / "checkpoints" / "student_best.pt",
            pruned["unstructured"],
            pruned["channel"],
            *sorted(q_dense.glob("*.int8-*.onnx")),
            *q_pruned.glob("*.int8-dynamic.onnx"),
        ]
        labels = ["teacher", "scratch", "distilled", "pruned unstr.", "pruned channel"]
        labels += ["int8 dynamic", "int8 static", "pruned unstr. + int8 dyn."]
        kd(env, "evaluate", f"checkpoints=[{','.join(map(str, files))}]", f"labels=[{','.join(labels)}]", show=True)


if __name__ == "__main__":
    main(sys.argv[1:])
