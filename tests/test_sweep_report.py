"""A real sweep with a failing job, and `kd report` on sweep and run directories."""

import csv
import json
import shutil
from pathlib import Path

import pytest
from test_report import job  # hand-written sweep job directories

from kdcli.cli import main as kd_main

HINT = "To finish the unfinished jobs in place: re-run the same sweep command with hydra.sweep.dir="


def words(text: str) -> str:
    """Text with rich's line wrapping undone."""
    return " ".join(text.split())


def only_sweep(kd) -> Path:
    (sweep,) = (kd.dir / "runs" / "distill-multirun").iterdir()
    return sweep


def read_summary(sweep) -> list[dict]:
    return list(csv.DictReader(open(sweep / "summary.csv")))


def run_dir(tmp_path, metrics) -> Path:
    d = tmp_path / "runs" / "distill" / "2024-01-01_00-00-00"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def report(capsys, *args) -> tuple[int, str]:
    code = kd_main(["report", *map(str, args)])
    return code, capsys.readouterr().out


@pytest.mark.slow
def test_sweep_with_an_invalid_job_then_kd_report(kd):
    r = kd("distill", "-m", "debug=smoke", "T=2,-1", "baseline=false")
    out = words(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr
    sweep = only_sweep(kd)
    rows = read_summary(sweep)
    assert [(row["job"], row["T"], row["status"]) for row in rows] == [("0", "2", "completed"), ("1", "-1", "failed")]
    assert rows[0]["error"] == "" and rows[1]["error"].startswith("T must be > 0 (got -1.0)")
    assert 0 < float(rows[0]["student.test_acc"]) <= 1
    assert "│ 0 │ 2 │ completed │" in out and "│ 1 │ -1 │ failed │" in out
    assert "job 1 failed: T must be > 0 (got -1.0)" in out and "job 0 failed" not in out
    assert f"{HINT}{sweep} resume=auto (completed jobs are kept)." in out

    (sweep / "summary.csv").unlink()
    r = kd("report", str(sweep))
    assert r.returncode == 1, r.stdout + r.stderr
    again = words(r.stdout)
    assert "│ 0 │ 2 │ completed │" in again and "│ 1 │ -1 │ failed │" in again
    assert "job 1 failed: T must be > 0 (got -1.0)" in again and HINT in again
    assert read_summary(sweep) == rows  # written again, the same

    # The failed job re-run by hand: the sweep now reports complete.
    fixed = kd.dir / "fixed"
    shutil.copytree(sweep, fixed)
    metrics = json.loads((fixed / "1" / "metrics.json").read_text())
    metrics.update(status="completed", student={"test_acc": 0.5})
    del metrics["error"]
    (fixed / "1" / "metrics.json").write_text(json.dumps(metrics))
    r = kd("report", str(fixed))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failed" not in r.stdout and HINT not in words(r.stdout)
    assert [row["status"] for row in read_summary(fixed)] == ["completed", "completed"]
    assert read_summary(fixed)[1]["student.test_acc"] == "0.5"


@pytest.mark.slow
def test_a_job_whose_model_raises_is_failed_with_the_exception(kd):
    f = kd.dir / "boom_models.py"
    f.write_text(
        "import torch.nn as nn\n"
        "from kdcli.registry import MODELS\n\n"
        "class Boom(nn.Module):\n"
        "    def __init__(self, input_shape, num_classes):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(1, num_classes)\n\n"
        "    def forward(self, x):\n"
        "        raise RuntimeError('boom')\n\n"
        "@MODELS.register('boom_net')\n"
        "def boom_net(input_shape, num_classes):\n"
        '    """A model whose forward always raises."""\n'
        "    return Boom(input_shape, num_classes)\n"
    )
    r = kd("distill", "-m", "debug=smoke", f"imports=[{f}]", "student=mlp,boom_net", "baseline=false")
    assert r.returncode == 1, r.stdout + r.stderr
    rows = read_summary(only_sweep(kd))
    assert [(row["student"], row["status"]) for row in rows] == [("mlp", "completed"), ("boom_net", "failed")]
    assert rows[1]["error"] == "RuntimeError: boom" and rows[0]["error"] == ""
    assert "job 1 failed: RuntimeError: boom" in words(r.stdout)


def test_report_of_a_hand_built_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    done = {"status": "completed", "student": {"test_acc": 0.9}}
    job(sweep, 0, ["T=1"], done)
    job(sweep, 1, ["T=4"], {**done, "student": {"test_acc": 0.92}})
    code, out = report(capsys, sweep)
    assert code == 0 and HINT not in words(out)
    assert [r["student.test_acc"] for r in read_summary(sweep)] == ["0.9", "0.92"]

    job(sweep, 2, ["T=8"], {"status": "running", "command": "distill"})  # still training
    job(sweep, 3, ["T=16"], None)  # started, no metrics.json yet
    code, out = report(capsys, sweep)
    out = words(out)
    assert code == 1
    assert "│ 2 │ 8 │ running │" in out and "│ 3 │ 16 │ missing │" in out and "│ 0 │ 1 │ completed │" in out
    assert f"{HINT}{sweep} resume=auto" in out
    assert [r["status"] for r in read_summary(sweep)] == ["completed", "completed", "running", "missing"]


@pytest.mark.parametrize("command", ["evaluate", "export", "quantize"])
def test_a_sweep_of_a_command_without_resume_is_not_told_to_resume(tmp_path, capsys, command):
    sweep = tmp_path / "sweep"
    job(sweep, 0, ["limit=1"], {"status": "completed", "command": command})
    job(sweep, 1, ["limit=2"], {"status": "failed", "command": command, "error": "boom"})
    code, out = report(capsys, sweep)
    out = words(out)
    assert code == 1 and HINT not in out and "resume=" not in out.replace("no resume=", ""), out
    name = command.replace("_", "-")
    assert (
        f"To finish the unfinished jobs: run the same sweep command again (kd {name} starts over; no resume=)." in out
    )


def test_report_of_one_run_directory(tmp_path, capsys):
    figures = {"teacher": {"test_acc": 0.981}, "scratch": {"test_acc": 0.9012}, "student": {"test_acc": 0.9234}}
    done = run_dir(
        tmp_path, {"command": "distill", "status": "completed", "elapsed_s": 12.34, **figures, "kd_gain": 0.0222}
    )
    code, out = report(capsys, done)
    out = words(out)
    assert code == 0
    assert "│ distill │ completed │ 12.3 │ 92.34 │ 90.12 │ 98.10 │ 2.22 │" in out
    assert "student.test_acc" in out and "kd_gain" in out and str(done) in out and "error" not in out

    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "metrics.json").write_text(
        json.dumps({"command": "train_teacher", "status": "failed", "elapsed_s": 1.0, "error": "RuntimeError: boom"})
    )
    code, out = report(capsys, failed)
    assert code == 1
    assert "│ train_teacher │ failed │ 1.0 │" in words(out) and "failed: RuntimeError: boom" in words(out)

    code, out = report(capsys, done, failed)  # several directories: 1 if any did not complete
    assert code == 1 and "92.34" in out and "RuntimeError: boom" in out


def test_report_refuses_what_is_not_a_sweep_or_run(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, out = report(capsys, missing)
    assert code == 1 and out.startswith("error:") and out.count("error:") == 1
    assert f"{missing} does not exist." in words(out) and "runs/distill-multirun/<date_time>" in words(out)

    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = report(capsys, empty)
    assert code == 1 and out.startswith("error:") and out.count("error:") == 1
    assert f"{empty} is neither a sweep nor a run directory." in words(out)
    assert not (empty / "summary.csv").exists()


def test_report_usage(capsys):
    code, out = report(capsys)
    assert code == 2 and out.startswith("usage: kd report DIR")
    code, out = report(capsys, "--help")
    assert code == 0 and out.startswith("usage: kd report DIR")
    code, out = report(capsys, "--all")
    assert code == 2 and "unknown option '--all'" in out
