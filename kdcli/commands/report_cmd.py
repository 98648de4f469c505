"""kd report DIR [DIR...]: summarise an existing sweep directory again (summary.csv, table,
failed jobs), or show one run directory's status and figures. Exits 1 if a job or run did
not complete, or a directory is neither."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.markup import escape

from kdcli.core.files import shown
from kdcli.report import SUMMARY_FIELDS, _get, console, error, pct, summarise_sweep, table

USAGE = (
    "usage: kd report DIR [DIR...]\n"
    "  DIR  a sweep directory (runs/distill-multirun/<date_time>): summarises its jobs again, writes summary.csv\n"
    "       or a run directory (runs/distill/<date_time>): shows its status and test accuracies\n"
    "  Exits 1 if a job or run is not completed (failed, interrupted, running or missing)."
)
WHAT = (
    "Give a sweep directory, with numbered job directories (runs/distill-multirun/<date_time>), "
    "or a run directory, with a metrics.json (runs/distill/<date_time>)"
)


def _is_sweep(path: Path) -> bool:
    return any(
        d.is_dir()
        and d.name.isdigit()
        and ((d / ".hydra" / "overrides.yaml").is_file() or (d / "metrics.json").is_file())
        for d in path.iterdir()
    )


def report_run(run_dir: Path) -> bool:
    """Print one run's command, status, elapsed time and test accuracies; True if it completed."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        error(f"{run_dir / 'metrics.json'} cannot be read: {e}")
        return False
    if not isinstance(metrics, dict):
        error(f"{run_dir / 'metrics.json'} is not a run's record: it holds no JSON object.")
        return False
    status = metrics.get("status", "missing")
    figures = [f for f in SUMMARY_FIELDS if _get(metrics, f) is not None]
    elapsed = metrics.get("elapsed_s")
    row = [metrics.get("command"), status, f"{elapsed:.1f}" if isinstance(elapsed, (int, float)) else None]
    row += [pct(_get(metrics, f)) for f in figures]
    console.print(table(f"Run (test accuracy %): {run_dir}", ["command", "status", "elapsed (s)", *figures], [row]))
    if status != "completed":
        console.print(f"[red]{status}[/red]: {escape(str(metrics.get('error', '')))}", highlight=False)
    return status == "completed"


def report(path: Path) -> bool:
    """Report one directory; True if everything in it completed."""
    try:
        return _report(path)
    except OSError as e:  # a folder in it that may not be read (/proc/1: its cwd), a summary that cannot be written
        error(f"kd report {shown(path)}: {shown(e.filename or path)}: {e.strerror or e}.")
        return False


def _report(path: Path) -> bool:
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        error(f"{shown(path)} does not exist. {WHAT}.")
        return False
    except OSError as e:  # a name too long, a symbolic link loop, a folder that may not be searched
        error(f"{shown(path)}: {e.strerror}. {WHAT}.")
        return False
    if path.is_dir() and (path / "metrics.json").is_file():
        return report_run(path)
    if not path.is_dir() or not _is_sweep(path):
        error(f"{path} is neither a sweep nor a run directory. {WHAT}.")
        return False
    rows = summarise_sweep(path)
    console.print(f"Sweep directory: {path}", highlight=False, soft_wrap=True)
    return all(r["status"] == "completed" for r in rows)


def main(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    if not args:
        print(USAGE)
        return 2
    unknown = [a for a in args if a.startswith("-")]
    if unknown:
        error(f"kd report: unknown option '{unknown[0]}'.\n{USAGE}")
        return 2
    results = []
    for i, a in enumerate(args):
        if i:
            console.print()
        results.append(report(Path(a)))
    return 0 if all(results) else 1
