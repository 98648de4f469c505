"""A non-editable install finds its configs and the embedded data: build a wheel, install it
into a fresh virtual environment, run `kd --help` and a tiny `kd distill` from elsewhere."""

import os
import subprocess
import sys
import sysconfig
import venv

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_wheel_installs_and_runs(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO)],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("kdcli-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    subprocess.run([bin_dir / "pip", "install", "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    # The dependencies (torch, hydra, ...) come from this interpreter's site-packages rather
    # than a second multi-GB download; kdcli itself must come from the wheel.
    site = next((env_dir / "lib").glob("python*/site-packages"))
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "KDCLI_RUNS": str(work / "runs"), "PYTHONPATH": ""}
    where = subprocess.run(
        [bin_dir / "python", "-c", "import kdcli; print(kdcli.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert str(env_dir) in where.stdout, where.stdout + where.stderr

    r = subprocess.run([bin_dir / "kd", "--help"], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "distill" in r.stdout
    r = subprocess.run(
        [bin_dir / "kd", "distill", "debug=smoke"], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "student, distilled" in r.stdout
    assert list((work / "runs" / "distill").glob("*/checkpoints/student_best.pt"))
