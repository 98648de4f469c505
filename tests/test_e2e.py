"""End-to-end runs of the real `kd` command on the embedded mnist5k, in subprocesses."""

import csv
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch

pytestmark = pytest.mark.slow

TINY = ["trainer.epochs=2", "dataset.limit=600", "trainer.batch_size=64"]
# The recipe of a teacher trained with TINY, for kd distill to find it (or train it so)
TINY_TEACHER = ["teacher_train.trainer.epochs=2", "teacher_train.trainer.batch_size=64"]


def only_run(root: Path, command: str) -> Path:
    runs = [d for d in (root / command).iterdir() if d.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_train_teacher_distill_evaluate_export(kd):
    runs = kd.dir / "runs"
    r = kd("train-teacher", *TINY)
    assert r.returncode == 0, r.stdout + r.stderr
    t_dir = only_run(runs, "train_teacher")
    t_metrics = read_metrics(t_dir)
    assert t_metrics["status"] == "completed"
    assert len((t_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (t_dir / "config.yaml").is_file() and (t_dir / "train_teacher.log").is_file()
    ck = torch.load(t_dir / "checkpoints" / "teacher_best.pt", weights_only=True)
    assert (
        ck["arch"]["name"] == "convnet" and ck["data"]["num_classes"] == 10 and ck["data"]["input_shape"] == [1, 28, 28]
    )
    assert (t_dir / "checkpoints" / "teacher_last.pt").is_file()

    r = kd("distill", "teacher=convnet", "student=mlp", "T=4", *TINY, *TINY_TEACHER)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "latest train-teacher run of this recipe" in r.stdout
    d_dir = only_run(runs, "distill")
    m = read_metrics(d_dir)
    assert m["status"] == "completed" and m["T"] == 4.0 and m["alpha"] == 0.0
    assert m["teacher"]["checkpoint"] == t_metrics["teacher"]["checkpoint"]
    # Same checkpoint, same fixed test split: the same accuracy in both commands.
    assert m["teacher"]["test_acc"] == pytest.approx(t_metrics["teacher"]["test_acc"])
    assert m["kd_gain"] == pytest.approx(m["student"]["test_acc"] - m["scratch"]["test_acc"])
    roles = [json.loads(line)["role"] for line in (d_dir / "metrics.jsonl").read_text().splitlines()]
    assert roles == ["scratch", "scratch", "student", "student"]
    for role in ("teacher", "student, from scratch", "student, distilled"):
        assert role in r.stdout
    assert f"{100 * m['student']['test_acc']:.2f}" in r.stdout

    # A teacher checkpoint that does not fit the request is refused, and nothing is lost.
    ckpt = t_metrics["teacher"]["checkpoint"]
    r = kd("distill", "teacher=lenet5", f"teacher.ckpt={ckpt}", *TINY)
    assert r.returncode == 1 and "holds convnet" in r.stdout and "asks for lenet5" in " ".join(r.stdout.split())
    r = kd("distill", f"teacher.ckpt={ckpt}", "dataset.classes=[0,1,2]", *TINY)
    assert r.returncode == 1 and "predicts classes that this run's data does not have: 3, 4, 5" in r.stdout
    assert torch.load(ckpt, weights_only=True)["arch"]["name"] == "convnet"
    failed = [d for d in (runs / "distill").iterdir() if d != d_dir]
    assert len(failed) == 2 and all(read_metrics(d)["status"] == "failed" for d in failed)
    for d in failed:
        shutil.rmtree(d)

    r = kd("evaluate")
    assert r.returncode == 0, r.stdout + r.stderr
    ev = json.loads((only_run(runs, "evaluate") / "evaluation.json").read_text())
    by_role = {row["role"]: row for row in ev["models"]}
    assert set(by_role) == {"teacher", "scratch", "student"}
    assert by_role["teacher"]["acc"] == pytest.approx(m["teacher"]["test_acc"])
    assert by_role["student"]["acc"] == pytest.approx(m["student"]["test_acc"])
    assert by_role["teacher"]["agreement"] == 1.0
    assert by_role["student"]["agreement"] == pytest.approx(m["student"]["teacher_agreement"])

    r = kd("export")
    assert r.returncode == 0, r.stdout + r.stderr
    e_dir = only_run(runs, "export")
    exports = read_metrics(e_dir)["exports"]
    for fmt in ("torchscript", "onnx"):
        assert exports[fmt]["ok"] and exports[fmt]["max_abs_diff"] < 1e-4 and exports[fmt]["top1_agreement"] == 1.0
        assert Path(exports[fmt]["path"]).is_file()
    model = onnx.load(exports["onnx"]["path"])
    onnx.checker.check_model(model)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param  # a named (dynamic) batch axis, not a fixed size
    meta = json.loads((e_dir / "mlp_student.json").read_text())
    assert meta["class_names"] == [str(i) for i in range(10)] and len(meta["mean"]) == 1


def test_distill_trains_a_missing_teacher_once(kd):
    r = kd("distill", "debug=smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "training one first" in " ".join(r.stdout.split())
    teacher_run = only_run(kd.dir / "runs", "train_teacher")
    assert read_metrics(teacher_run)["status"] == "completed"
    r = kd("distill", "debug=smoke", "baseline=false")
    assert r.returncode == 0 and "latest train-teacher run" in r.stdout
    assert len(list((kd.dir / "runs" / "train_teacher").iterdir())) == 1
    m = read_metrics(max((kd.dir / "runs" / "distill").iterdir()))
    assert "scratch" not in m and "kd_gain" not in m
    # The smoke preset works for every command.
    r = kd("evaluate", "debug=smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((only_run(kd.dir / "runs", "evaluate") / "evaluation.json").read_text())["images"] == 256
    r = kd("export", "debug=smoke", "formats=[onnx]")
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_metrics(only_run(kd.dir / "runs", "export"))["exports"]["onnx"]["checked_images"] == 64


def test_sweep_is_summarised_and_a_failed_job_loses_nothing(kd):
    r = kd("distill", "-m", "T=1,4", "debug=smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    sweep = next((kd.dir / "runs" / "distill-multirun").iterdir())
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(row["T"], row["status"]) for row in rows] == [("1", "completed"), ("4", "completed")]
    for row, job in zip(rows, ("0", "1")):
        assert float(row["student.test_acc"]) == pytest.approx(read_metrics(sweep / job)["student"]["test_acc"])
    assert (sweep / "summary.png").stat().st_size > 1000
    assert "Sweep summary" in r.stdout

    r = kd("distill", "-m", "seed=0,1", "debug=smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    sweep = max((kd.dir / "runs" / "distill-multirun").iterdir())
    (row,) = list(csv.DictReader(open(sweep / "summary_seeds.csv")))
    gains = [100 * read_metrics(sweep / job)["kd_gain"] for job in ("0", "1")]
    mean, std = sum(gains) / 2, abs(gains[0] - gains[1]) / 2**0.5  # sample std of two values
    assert row["seeds"] == "2" and row["kd_gain"] == f"{mean:.2f} ± {std:.2f}"

    r = kd("distill", "-m", "T=2,-1", "debug=smoke", "baseline=false")
    assert r.returncode == 1
    sweep = max((kd.dir / "runs" / "distill-multirun").iterdir())
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(row["T"], row["status"]) for row in rows] == [("2", "completed"), ("-1", "failed")]
    assert "T must be > 0" in rows[1]["error"]
    assert (sweep / "0" / "checkpoints" / "student_best.pt").is_file()


def test_a_user_model_from_a_python_file(kd):
    f = kd.dir / "my_models.py"
    f.write_text(
        "import torch.nn as nn\n"
        "from kdcli.registry import MODELS\n\n"
        "@MODELS.register('tiny_user_cnn')\n"
        "def tiny_user_cnn(input_shape, num_classes, *, width: int = 4):\n"
        '    """A user-defined CNN."""\n'
        "    return nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))\n"
    )
    r = kd("list", "models", f"imports=[{f}]")
    assert r.returncode == 0 and "tiny_user_cnn" in r.stdout and "A user-defined CNN." in r.stdout
    r = kd("distill", f"imports=[{f}]", "student=tiny_user_cnn", "student.width=6", "debug=smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    ck = torch.load(
        next((kd.dir / "runs" / "distill").iterdir()) / "checkpoints" / "student_best.pt", weights_only=True
    )
    assert ck["arch"] == {"name": "tiny_user_cnn", "kwargs": {"width": 6}}
    r = kd("distill", "student=tiny_user_cnn", "debug=smoke")  # without the import: a clear error
    assert r.returncode == 1 and "Unknown student 'tiny_user_cnn'" in r.stdout


def test_a_user_loss_from_a_python_file(kd):
    f = kd.dir / "my_losses.py"
    f.write_text(
        "import torch.nn.functional as F\n"
        "from kdcli.registry import LOSSES\n\n"
        "@LOSSES.register('logit_mse_user')\n"
        "def logit_mse_user(*, weight: float = 1.0):\n"
        "    def term(s, t, y, T):\n"
        "        return weight * F.mse_loss(s, t, reduction='none').mean(1)\n"
        "    return term\n"
    )
    r = kd("distill", f"imports=[{f}]", "loss=logit_mse_user", "loss.weight=0.5", "debug=smoke", "baseline=false")
    assert r.returncode == 0, r.stdout + r.stderr
    m = read_metrics(only_run(kd.dir / "runs", "distill"))
    assert m["loss"] == "logit_mse_user" and m["status"] == "completed"


def test_quick_start_default_run(kd):
    """README's main job: the default `kd distill` on mnist5k, with real accuracies."""
    r = kd("distill")
    assert r.returncode == 0, r.stdout + r.stderr
    m = read_metrics(only_run(kd.dir / "runs", "distill"))
    assert m["teacher"]["test_acc"] > 0.97
    assert m["scratch"]["test_acc"] > 0.9 and m["student"]["test_acc"] > 0.9
    assert "KD gain over the scratch student" in r.stdout


def test_parallel_sweep_with_the_joblib_launcher(kd):
    r = kd(
        "distill", "-m", "T=1,4", "debug=smoke", "baseline=false", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    sweep = next((kd.dir / "runs" / "distill-multirun").iterdir())
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(row["T"], row["status"]) for row in rows] == [("1", "completed"), ("4", "completed")]
    assert "Joblib.Parallel(n_jobs=2" in r.stdout + r.stderr  # the joblib launcher, not the basic one


def test_sweep_through_the_submitit_launcher(kd):
    """The cluster path (hydra/launcher=slurm in configs/hydra/launcher) runs through submitit; its
    local executor runs the same launcher code without a cluster."""
    r = kd("train-teacher", "debug=smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    r = kd("distill", "-m", "T=1,4", "debug=smoke", "baseline=false", "augment=none", "hydra/launcher=submitit_local")
    assert r.returncode == 0, r.stdout + r.stderr
    sweep = next((kd.dir / "runs" / "distill-multirun").iterdir())
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(row["T"], row["status"]) for row in rows] == [("1", "completed"), ("4", "completed")]
    assert (sweep / ".submitit").is_dir()  # submitit's own job folders: it ran the jobs
    assert len(list((kd.dir / "runs" / "cache" / "teacher_outputs").iterdir())) == 1  # the teacher once
    r = kd("distill", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    assert r.returncode == 0 and "SlurmLauncher" in r.stdout and "partition: gpu" in r.stdout
