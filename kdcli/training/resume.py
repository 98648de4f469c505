"""Training states: everything a training loop needs to continue exactly where it stopped.

`fit` writes checkpoints/<roles>_resume.pt at the end of every epoch, every
trainer.save_every_min minutes, and when a signal stops it: per model the weights, optimizer,
scheduler, objective (adapters, memory banks), best-on-validation weights and epoch rows; the
position in the data (epoch, steps done, the epoch's seed, the seed generator) and the random
states of Python, NumPy and torch (CPU and device), plus the epoch's running sums. When the loop
finishes, the file shrinks to its results, which a resumed run reuses instead of training again.
All of it is tensors and containers, loaded with weights_only=True.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from kdcli.core import distributed
from kdcli.core.errors import KdError
from kdcli.core.files import check_path, read_jsonl, write_json, write_jsonl
from kdcli.training import checkpoint

log = logging.getLogger("kdcli")


def state_path(ckpt_dir: Path, roles: list[str]) -> Path:
    return Path(ckpt_dir) / f"{'+'.join(roles)}_resume.pt"


def rng_state(device: torch.device) -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": py[0], "key": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["key"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def save(path: Path, **fields) -> None:
    checkpoint.write(path, {"format": checkpoint.RESUME_FORMAT, "version": checkpoint.VERSION, **fields})


def load(path: Path) -> dict:
    return checkpoint.load(path, kind=checkpoint.RESUME_FORMAT)


def trim_metrics(path: Path, roles: list[str], epochs_done: int) -> None:
    """Drop the metrics.jsonl rows of `roles` past the epochs a training state holds (a run
    killed between writing a row and its state redoes that epoch, and writes the row again)."""
    rows = read_jsonl(path)
    kept = [r for r in rows if r.get("role") not in roles or r.get("epoch", 0) <= epochs_done]
    if len(kept) != len(rows):
        write_jsonl(path, kept)


# ---------------------------------------------------------------- runs: resume=PATH | auto

# Keys that may differ between a run and its continuation: they change neither what is trained
# nor how (data_root and runs_dir only say where files are).
MAY_DIFFER = (
    "resume",
    "trainer.progress",
    "trainer.save_every_min",
    "dataset.workers",
    "device",
    "data_root",
    "runs_dir",
    "objective",  # what a job returns to a sweeper, not how it trains
)
UNFINISHED = ("running", "interrupted", "failed")


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: d}


# Keys added after runs were recorded, with the value that those runs behaved by: a config.yaml
# without them is compared as if it held these (resume=auto of an older run asks for them).
LEGACY = {
    "trainer.selection": "val_acc",
    "distill_lr_scale": 1.0,
    "dataset.affine": False,
    "mix": "none",
    "mix_alpha": 1.0,
}


def config_diff(current: dict, previous: dict) -> list[str]:
    """'key: previous -> current' for each key (outside MAY_DIFFER) whose value differs."""
    a, b = _flat(current), _flat(previous)
    b.update({k: v for k, v in LEGACY.items() if k in a and k not in b})
    keys = [k for k in dict.fromkeys([*b, *a]) if not any(k == m or k.startswith(m + ".") for m in MAY_DIFFER)]
    return [f"{k}: {b.get(k, '(unset)')} -> {a.get(k, '(unset)')}" for k in keys if a.get(k) != b.get(k)]


def clear_states(run_dir: Path) -> None:
    if not distributed.is_main():  # several processes: rank 0 keeps the files
        return
    for f in Path(run_dir, "checkpoints").glob("*_resume.pt"):
        f.unlink()


def has_state(run_dir: Path) -> bool:
    return any(Path(run_dir, "checkpoints").glob("*_resume.pt"))


def run_dir_of(value: str) -> Path:
    """The run directory that resume=PATH names: the directory, or the one holding the file."""
    check_path("resume", value)  # a name too long, a symbolic link loop: one error, not an OSError
    path = Path(value).expanduser()
    if path.is_file():
        path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if not path.is_dir():
        raise KdError(
            f"resume={value}: no such run directory. Give a run directory (runs/<command>/<date>, printed when "
            "the run stopped) or resume=auto for the latest unfinished run of this configuration."
        )
    if not (path / "config.yaml").is_file():
        raise KdError(
            f"resume={value}: {path} is not a kdcli run directory (no config.yaml). Give the directory printed "
            "when the run stopped, e.g. runs/distill/2026-01-31_12-00-00-000000."
        )
    return path.resolve()


def process_start(pid: int) -> str | None:
    """When process `pid` started, or None if this machine cannot tell: from /proc/<pid>/stat
    (field 22, clock ticks after boot), else psutil where it is installed. With the pid it names
    one process: a pid alone is reused by later processes."""
    try:
        # the command name (field 2) may hold spaces and parentheses: count from the last ")"
        return "proc:" + Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        pass
    try:
        import psutil

        return f"psutil:{psutil.Process(int(pid)).create_time():.3f}"
    except Exception:  # not installed, or no such process
        return None


def liveness(metrics: dict) -> str:
    """Of a run's metrics.json: "running" (its process still runs on this machine), "ended", or
    "unknown" (a process holds its pid, but there is no start time to tell whether it is the run's:
    a record of an older kdcli, or no /proc nor psutil here)."""
    if metrics.get("status") != "running" or metrics.get("host") != socket.gethostname():
        return "ended"
    try:
        pid = int(metrics.get("pid", 0))
        if pid <= 0:
            return "ended"
        os.kill(pid, 0)
    except PermissionError:  # the pid exists, owned by another user
        pass
    except (OSError, ValueError, TypeError):
        return "ended"
    recorded, now = metrics.get("pid_started"), process_start(pid)
    if not recorded or not now or recorded.split(":")[0] != now.split(":")[0]:
        return "unknown"
    return "running" if recorded == now else "ended"


def alive(metrics: dict) -> bool:
    """A run marked running whose process may still run on this machine (see `liveness`: an
    undecidable one counts as running, so that nothing takes over a live run)."""
    return liveness(metrics) != "ended"


def read_metrics(run_dir: Path) -> dict:
    """A run's metrics.json: {} if it is missing, unreadable, not a JSON object, or not a regular
    file (a FIFO of that name would block the read forever)."""
    f = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def find_unfinished(runs_dir: str, command: str, config: dict, exclude: Path) -> Path | None:
    """The latest run of `command` under runs_dir with the same configuration that did not
    finish and holds a training state (or a recorded teacher run), or None."""
    root = Path(runs_dir).expanduser()
    found = []
    for f in [*root.glob(f"{command}/*/metrics.json"), *root.glob(f"{command}-multirun/*/*/metrics.json")]:
        run = f.parent.resolve()
        metrics = read_metrics(run)
        if run == exclude or metrics.get("status") not in UNFINISHED:
            continue
        if alive(metrics):
            log.info(f"resume   {run} is not continued: {still_running(metrics, run)}")
            continue
        if metrics.get("status") == "running" and metrics.get("host") != socket.gethostname():
            continue  # maybe still running on another machine (a shared disk): only resume=DIR takes it
        if not (has_state(run) or metrics.get("teacher_run")) or not (run / "config.yaml").is_file():
            continue
        previous = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
        if not config_diff(config, previous):
            found.append((f.stat().st_mtime, run))
    return max(found)[1] if found else None


def still_running(metrics: dict, run: Path) -> str:
    """Why a run marked running is left alone, and what to do."""
    pid = metrics.get("pid")
    if liveness(metrics) == "running":
        return (
            f"it is still running (process {pid} on this machine). Stop it first (Ctrl-C, or kill -TERM {pid}: "
            f"it saves its state), then resume={run}."
        )
    return (
        f"process {pid} exists on this machine, and kdcli cannot tell whether it is that run (no process start time "
        f'recorded to compare). If that run has ended, set "status": "interrupted" in {run / "metrics.json"}, '
        f"then resume={run}."
    )


def adopt(source: Path, run_dir: Path) -> None:
    """Give run_dir the training states, checkpoints and epoch rows of `source` (hard links
    where the file system allows, else copies); the source is marked as resumed there. Rank 0's
    work under several processes."""
    if not distributed.is_main():
        return
    for f in sorted(Path(source, "checkpoints").glob("*.pt")):
        target = run_dir / "checkpoints" / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
    if (source / "metrics.jsonl").is_file():
        write_jsonl(run_dir / "metrics.jsonl", read_jsonl(source / "metrics.jsonl"))
    metrics = read_metrics(source)
    write_json(source / "metrics.json", {**metrics, "status": "resumed", "resumed_in": str(run_dir)})
