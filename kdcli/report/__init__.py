"""What the user sees: the one rich console, progress bars, result tables, and the summary of
a sweep (summary.csv and a plot of accuracy against the swept value)."""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from kdcli.core import distributed
from kdcli.core.files import write_csv
from kdcli.core.metrics import mean_interval

# Log files and CI logs are read in wide windows: don't wrap at 80 columns there.
console = Console(width=None if sys.stdout.isatty() else 120)


def error(message: str) -> None:
    """The one-paragraph error a user sees (the message is printed as is, never as markup)."""
    # soft_wrap: no line breaks inserted, so a path in the message stays whole for copying
    if distributed.rank() > 0:  # several processes: the others' output is quiet, their errors are not
        print(f"error (rank {distributed.rank()}): {message}", file=sys.stderr)
        return
    console.print("[bold red]error:[/bold red]", escape(message), highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str, total: int):
    """Yields advance(); draws a transient bar only when enabled and on a terminal."""
    if not (enabled and console.is_terminal):
        yield lambda: None
        return
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda: progress.advance(task)


def pct(x: Any) -> str:
    return f"{100 * x:.2f}" if isinstance(x, (int, float)) else "-"


def _numeric(value: str) -> bool:
    try:
        float(value.split(" ± ")[0].replace(",", "").rstrip("%"))
        return True
    except ValueError:
        return value == "-"


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    """A rich table; columns whose cells are all numbers are right-aligned. Cells and title are
    text, not markup: `features=[at]` shows as written."""
    cells = [["-" if v is None else escape(str(v)) for v in r] for r in rows]
    t = Table(title=escape(title), title_justify="left")
    for i, c in enumerate(columns):
        numeric = bool(cells) and all(_numeric(r[i]) for r in cells)
        t.add_column(c, justify="right" if numeric else "left")
    for r in cells:
        t.add_row(*r)
    return t


# ---------------------------------------------------------------- sweeps

SUMMARY_FIELDS = ("student.test_acc", "scratch.test_acc", "teacher.test_acc", "kd_gain")
# Shown as they are (not as percentages): the paired test's p-value of each job's KD gain.
PLAIN_FIELDS = {"kd_gain_test.p_value": "kd_gain p"}


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _job_overrides(job_dir: Path) -> list[str]:
    import yaml

    f = job_dir / ".hydra" / "overrides.yaml"
    try:
        overrides = yaml.safe_load(f.read_text()) if f.is_file() else []
    except (OSError, ValueError, yaml.YAMLError):  # a damaged file: the job's values are unknown
        return []
    return [o for o in overrides if isinstance(o, str)] if isinstance(overrides, list) else []


def _job_metrics(job_dir: Path) -> dict:
    """A job's metrics.json; a missing or damaged one is a row that says so."""
    f = job_dir / "metrics.json"
    if not f.is_file():
        return {"status": "missing"}
    try:
        metrics = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        return {"status": "unreadable", "error": f"{f}: {e}"}
    return metrics if isinstance(metrics, dict) else {"status": "unreadable", "error": f"{f} holds no JSON object"}


def summarise_sweep(sweep_dir: Path) -> list[dict]:
    """One row per job directory: the swept values, status and headline figures. Writes
    summary.csv and, when one numeric value was swept, summary.png. Returns the rows."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    overrides = [dict(o.split("=", 1) for o in _job_overrides(job) if "=" in o) for job in jobs]
    swept = [k for k in dict.fromkeys(k for o in overrides for k in o) if len({o.get(k) for o in overrides}) > 1]
    fixed = {k: v for k, v in (overrides[0] if overrides else {}).items() if k not in swept}
    rows, objective, commands = [], None, set()
    for job, over in zip(jobs, overrides):
        metrics = _job_metrics(job)
        if isinstance(metrics.get("command"), str):
            commands.add(metrics["command"])
        row = {"job": int(job.name), **{k: over.get(k) for k in swept}, "status": metrics.get("status")}
        record = metrics.get("objective")
        if isinstance(record, dict) and isinstance(record.get("key"), str):
            objective = objective or record
            if isinstance(record.get("value"), (int, float)) and record["key"] == objective["key"]:
                row[objective["key"]] = record["value"]
        for field in SUMMARY_FIELDS:
            value = _get(metrics, field)
            if value is not None:
                row[field] = value
        for field, name in PLAIN_FIELDS.items():
            value = _get(metrics, field)
            if isinstance(value, (int, float)):
                row[name] = float(f"{value:.3g}")
        if metrics.get("error"):
            row["error"] = metrics["error"]
        rows.append(row)
    if not rows:
        return rows
    figures = [f for f in SUMMARY_FIELDS if any(f in r for r in rows)]
    plain = [f for f in PLAIN_FIELDS.values() if any(f in r for r in rows)]
    searched = [objective["key"]] if objective else []  # validation accuracy, the figure a search optimises
    fields = ["job", *swept, "status", *searched, *figures, *plain]
    fields += ["error"] if any("error" in r for r in rows) else []
    write_csv(sweep_dir / "summary.csv", fields, rows)
    shown = ["job", *swept, "status", *searched, *figures, *plain]
    split = f"; {searched[0]} on the validation split, the others on test" if searched else ""
    title = f"Sweep summary ({'accuracy %' + split if split else 'test accuracy %'}): {sweep_dir}"
    if fixed:
        title += "\nfixed: " + " ".join(f"{k}={v}" for k, v in fixed.items())
    percent = {*SUMMARY_FIELDS, *searched}
    console.print(table(title, shown, ([pct(r.get(f)) if f in percent else r.get(f) for f in shown] for r in rows)))
    if objective and "seed" not in swept:  # the best of seeds is noise, not a setting: summary_seeds.csv
        _print_best(rows, objective, swept)
    unfinished = [r for r in rows if r["status"] != "completed"]
    for r in unfinished:
        console.print(f"[red]job {r['job']} {r['status']}[/red]: {escape(r.get('error', ''))}", highlight=False)
    resumable = commands <= {"train_teacher", "distill"}  # the commands that take resume=
    if unfinished and not resumable:
        names = " / ".join(f"kd {c.replace('_', '-')}" for c in sorted(commands))
        console.print(
            f"To finish the unfinished jobs: run the same sweep command again ({names} starts over; no resume=).",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    elif unfinished:
        console.print(
            f"To finish the unfinished jobs in place: re-run the same sweep command with "
            f"hydra.sweep.dir={sweep_dir} resume=auto (completed jobs are kept).",
            highlight=False,
            markup=False,
            soft_wrap=True,  # a path to copy: never broken
        )
    if len(swept) == 1 and swept[0] != "seed":
        _plot_sweep(rows, swept[0], figures, sweep_dir / "summary.png")
    if "seed" in swept:
        _over_seeds(rows, [k for k in swept if k != "seed"], figures, sweep_dir / "summary_seeds.csv")
    return rows


def best_job(rows: list[dict], objective: dict) -> dict | None:
    """The completed job with the best objective (the first of equals, as Optuna's best trial)."""
    key, sign = objective["key"], -1 if objective.get("direction") == "minimize" else 1
    scored = [r for r in rows if r["status"] == "completed" and isinstance(r.get(key), (int, float))]
    return max(scored, key=lambda r: sign * r[key]) if scored else None  # max keeps the first of equals


def _print_best(rows: list[dict], objective: dict, swept: list[str]) -> None:
    best = best_job(rows, objective)
    if best is None:
        console.print(f"No completed job recorded its objective {objective['key']}.", highlight=False, markup=False)
        return
    setting = " ".join(f"{k}={best[k]}" for k in swept) or "(nothing swept)"
    test = [f"{f} {pct(best[f])} %" for f in ("student.test_acc", "teacher.test_acc") if f in best][:1]
    console.print(
        f"Best {objective['key']} ({objective.get('direction', 'maximize')}d on the validation split): "
        f"{pct(best[objective['key']])} % in job {best['job']}: {setting}" + (f" (test: {test[0]})" if test else ""),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _over_seeds(rows: list[dict], keys: list[str], figures: list[str], path: Path) -> None:
    """Mean ± sample standard deviation over seeds of each figure, for each setting of the
    other swept keys (completed jobs only)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "completed":
            groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for setting, members in groups.items():
        row = {**dict(zip(keys, setting)), "seeds": len(members)}
        for f in figures:
            values = [100 * m[f] for m in members if f in m]
            if not values:  # e.g. kd_gain of baseline=false jobs
                row[f] = "-"
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f] = f"{statistics.mean(values):.2f} ± {spread:.2f}"
            if f == "kd_gain" and len(values) > 1:  # is the mean gain over seeds above zero?
                _, _, lo, hi = mean_interval(values)
                row["kd_gain 95% CI"] = f"{lo:+.2f} to {hi:+.2f}"
        out.append(row)
    if not out:
        return
    columns = list(dict.fromkeys(k for r in out for k in r))
    write_csv(path, columns, out)
    console.print(
        table(
            "Over seeds: mean ± std (test accuracy %, KD gain in points; CI: Student-t interval of the mean gain)",
            columns,
            ([r.get(c, "-") for c in columns] for r in out),
        )
    )


def _plot_sweep(rows: list[dict], key: str, figures: list[str], path: Path) -> None:
    """Test accuracy against the swept value, when that value is numeric."""
    try:
        xs = [float(r[key]) for r in rows]
    except (TypeError, ValueError):
        return
    from kdcli.report.plots import lines

    series = {}
    for field in (f for f in figures if f != "kd_gain"):
        pts = sorted((x, 100 * r[field]) for x, r in zip(xs, rows) if isinstance(r.get(field), (int, float)))
        if pts:
            series[field] = pts
    if series:  # none when no job completed
        lines(path, key, "test accuracy (%)", series)


class SweepSummary(Callback):
    """Hydra callback: after a multirun, summarise every job of the sweep directory."""

    failed = False  # read by the command line to choose the exit code
    started: Path | None = None  # the sweep directory of the multirun that started
    ended = False  # whether it reached its end (a sweeper may stop it with an error)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.started = Path(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.ended = True
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = summarise_sweep(sweep_dir)
        SweepSummary.failed = any(r["status"] != "completed" for r in rows)
        console.print(f"Sweep directory: {sweep_dir}")

    @staticmethod
    def stopped() -> None:
        """After a sweep that its sweeper ended with an error (Optuna: "No trials are completed yet"
        when every job failed): the jobs it ran, and what that error means."""
        sweep_dir = SweepSummary.started
        if sweep_dir is None or SweepSummary.ended or not sweep_dir.is_dir():
            return
        rows = summarise_sweep(sweep_dir)
        done = sum(r["status"] == "completed" for r in rows)
        error(
            f"the sweeper stopped the sweep with the error above, after {len(rows)} job(s), {done} completed. "
            + ("Each job's error is in the table: fix it and run the sweep again. " if done < len(rows) else "")
            + f"Sweep directory: {sweep_dir}"
        )
