import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

REPO = Path(__file__).resolve().parents[1]


def kd_env(cwd: Path, **extra: str) -> dict:
    """The environment of a `kd` subprocess: runs and data under cwd, wide output, no tracebacks."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(KDCLI_RUNS=str(cwd / "runs"), KDCLI_DATA=str(cwd / "data"), COLUMNS="200", **extra)
    return env


def run_kd(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `kd` command (as `python -m kdcli`) in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "kdcli", *args],
        cwd=cwd,
        env=kd_env(cwd, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_kd(cwd: Path, *args: str, new_session: bool = False) -> subprocess.Popen:
    """Start the real `kd` command in the background, its output (stdout and stderr) on p.stdout."""
    return subprocess.Popen(
        [sys.executable, "-m", "kdcli", *args],
        cwd=cwd,
        env=kd_env(cwd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )


@pytest.fixture
def kd(tmp_path):
    def call(*args: str, **kw) -> subprocess.CompletedProcess:
        return run_kd(*args, cwd=tmp_path, **kw)

    call.dir = tmp_path
    return call


@pytest.fixture
def hydra_cfg():
    """Compose a command's config with Hydra's compose API (the way notebooks would)."""
    from hydra import compose, initialize_config_module

    from kdcli.config import register_configs

    register_configs()

    def make(command: str, overrides: list[str] = ()):
        with initialize_config_module(config_module="kdcli.configs", version_base="1.3", job_name=command):
            return compose(config_name=command, overrides=list(overrides))

    yield make
    GlobalHydra.instance().clear()
