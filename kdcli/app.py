"""Turns a command's `run(cfg, ctx) -> dict` into a Hydra app.

The wrapper does what every command needs: import the user's modules, validate the config,
resolve the device, seed, write the resolved config, and always leave a metrics.json with a
`status` (completed, failed or interrupted) in the run directory, so a sweep can be summarised
whatever happened.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kdcli.config import resolve_device, validate
from kdcli.errors import KdError
from kdcli.files import write_json, write_text
from kdcli.registry import import_user_modules
from kdcli.report import console, error

log = logging.getLogger("kdcli")


@dataclass
class Context:
    run_dir: Path
    device: torch.device
    multirun: bool

    @property
    def show_progress(self) -> bool:
        return not self.multirun


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


def full_error() -> bool:
    """HYDRA_FULL_ERROR=1 asks for tracebacks, ours included."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


class Outcome:
    """Set by the task; read by the command line after Hydra returns (single runs)."""

    failed = False


def run_task(command: str, run: Callable[[DictConfig, Context], dict], cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    metrics: dict = {
        "command": command,
        "status": "running",
        "overrides": list(hc.overrides.task),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    t0 = time.perf_counter()

    def finish(status: str, **extra) -> dict:
        metrics.update(extra, status=status, elapsed_s=round(time.perf_counter() - t0, 3))
        write_json(run_dir / "metrics.json", metrics)
        return metrics

    write_json(run_dir / "metrics.json", metrics)  # a run killed outright still says "running"
    try:
        import_user_modules(cfg.imports)
        validate(cfg, command)
        device = resolve_device(cfg.device)
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        seed_everything(int(cfg.seed), bool(OmegaConf.select(cfg, "trainer.deterministic", default=False)))
        result = run(cfg, Context(run_dir, device, multirun))
        finish("completed", **result)
        console.print(f"Run directory: {run_dir}")
        return metrics
    except KdError as e:
        error(str(e))
        finish("failed", error=str(e))
        Outcome.failed = True
        if multirun:
            return metrics
        if full_error():
            raise
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        finish("interrupted")
        raise
    except Exception as e:
        finish("failed", error=f"{type(e).__name__}: {e}")
        Outcome.failed = True
        if multirun:
            log.exception("job failed")
            return metrics
        raise


def hydra_app(command: str, run: Callable[[DictConfig, Context], dict]) -> Callable[[], None]:
    """The Hydra main function for `command`, whose primary config is configs/<command>.yaml."""

    @hydra.main(version_base="1.3", config_path="pkg://kdcli.configs", config_name=command)
    def main(cfg: DictConfig) -> None:
        run_task(command, run, cfg)

    return main
