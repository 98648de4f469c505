"""The Python API (kdcli/api.py): the README example, user modules, configs and their errors, and
figures recomputed independently from the returned models and checkpoints."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import kdcli
from kdcli.core.errors import KdError
from kdcli.training import checkpoint

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md has no ```python block after <!-- api-example -->"
    return m.group(1)


@pytest.fixture(scope="module")
def data():
    return kdcli.load_data("mnist5k", device="cpu", limit=1000)


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    return kdcli.train_teacher("convnet", data, epochs=3, run_dir=tmp_path_factory.mktemp("api") / "teacher")


@pytest.fixture(scope="module")
def distilled(data, teacher, tmp_path_factory):
    student = kdcli.build_model("mlp", data, hidden=[64])
    return kdcli.distill(teacher, student, data, epochs=2, run_dir=tmp_path_factory.mktemp("api") / "student")


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs for all of x in one forward pass, in eval mode (not kdcli's engine)."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


@pytest.mark.slow
def test_readme_example_runs_and_prints_real_accuracies(kd):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(KDCLI_RUNS=str(kd.dir / "runs"), KDCLI_DATA=str(kd.dir / "data"))
    out = subprocess.run(
        [sys.executable, "-c", readme_example()], cwd=kd.dir, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    m = re.search(r"teacher ([\d.]+)%, student ([\d.]+)%, agreement ([\d.]+)%\n(.+)\n", out.stdout)
    assert m, out.stdout
    teacher_acc, student_acc, agree = (float(m.group(i)) for i in (1, 2, 3))
    assert 90 <= teacher_acc <= 100 and 80 <= student_acc <= 100 and 80 <= agree <= 100
    (run,) = (kd.dir / "runs" / "api" / "distill").iterdir()
    assert m.group(4) == str(run / "checkpoints" / "student_best.pt")
    assert (run / "checkpoints" / "student_best.pt").is_file()
    (teacher_run,) = (kd.dir / "runs" / "api" / "train_teacher").iterdir()
    assert (teacher_run / "checkpoints" / "teacher_best.pt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["teacher"]["checkpoint"] == str(teacher_run / "checkpoints" / "teacher_best.pt")
    assert f"{100 * metrics['student']['test_acc']:.2f}" == f"{student_acc:.2f}"
    # An API run directory is a kd run directory: kd evaluate reads it and measures the same figures.
    ev = kd("evaluate", f"run={run}", "device=cpu")
    assert ev.returncode == 0, ev.stderr
    (evaluation,) = (kd.dir / "runs" / "evaluate").iterdir()
    models = {m["role"]: m for m in json.loads((evaluation / "metrics.json").read_text())["models"]}
    assert models["student"]["acc"] == metrics["student"]["test_acc"]
    assert models["teacher"]["acc"] == metrics["teacher"]["test_acc"]
    assert models["student"]["agreement"] == metrics["student"]["teacher_agreement"]


@pytest.mark.slow
def test_own_module_student_from_a_teacher_checkpoint(data, teacher, tmp_path, monkeypatch):
    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(self.body(x))

    def no_default_student(*args, **kwargs):
        raise AssertionError("the config's default student was built, though a module was given")

    monkeypatch.setattr("kdcli.methods.shared.new_model", no_default_student)
    torch.manual_seed(0)
    net = TinyNet()
    path = str(teacher.checkpoint)  # a plain path, as a user would type it
    res = kdcli.distill(path, net, data, epochs=2, features=["rkd"], run_dir=tmp_path / "run")
    assert res.model is net
    assert res.run_dir == tmp_path / "run" and res.checkpoint == tmp_path / "run" / "checkpoints" / "student_best.pt"
    assert res.metrics["arch"] == {"name": "<custom:TinyNet>", "kwargs": {}}
    assert res.metrics["params"] == 784 * 32 + 32 + 32 * 10 + 10
    saved = checkpoint.load(res.checkpoint)
    assert saved["arch"]["name"] == "<custom:TinyNet>" and saved["data"]["dataset"]["limit"] == 1000
    with pytest.raises(KdError, match=r"Unknown model '<custom:TinyNet>'"):
        checkpoint.build_from(saved)
    # The teacher was rebuilt from its checkpoint: the same test accuracy as when it was trained.
    assert res.results["teacher"]["checkpoint"] == path
    assert res.results["teacher"]["test_acc"] == teacher.metrics["test_acc"]
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["role"], r["epoch"]) for r in rows] == [("student", 1), ("student", 2)]
    assert res.metrics["best_epoch"] in (1, 2) and "scratch" not in res.results  # baseline off by default
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["api"] is True
    assert metrics["student"]["test_acc"] == res.metrics["test_acc"]
    cfg = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert cfg["teacher"]["ckpt"] == path and list(cfg["features"]) == ["rkd"] and cfg["trainer"]["epochs"] == 2


@pytest.mark.slow
def test_registry_names_loss_dict_and_overrides(data, runs):
    res = kdcli.distill(
        "lenet5",
        {"name": "mlp", "hidden": [32]},
        data,
        loss={"name": "dkd", "nckd": 4},
        T=2,
        alpha=0.1,
        epochs=1,
        baseline=True,
        overrides=["trainer.batch_size=32", "optimizer=adam"],
        seed=3,
    )
    (run,) = (runs / "api" / "distill").iterdir()
    assert res.run_dir == run
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["loss"] == {"name": "dkd", "tckd": 1.0, "nckd": 4, "standardize": False}
    assert (cfg["T"], cfg["seed"], cfg["trainer"]["batch_size"], cfg["optimizer"]["name"]) == (2.0, 3, 32, "adam")
    assert cfg["teacher"]["name"] == "lenet5" and cfg["student"]["hidden"] == [32]
    # The named teacher was trained first as a train-teacher run of its own, as `kd distill` does.
    (teacher_run,) = (runs / "train_teacher").iterdir()
    teacher_ckpt = teacher_run / "checkpoints" / "teacher_best.pt"
    assert res.results["teacher"]["checkpoint"] == str(teacher_ckpt)
    assert json.loads((teacher_run / "metrics.json").read_text())["status"] == "completed"
    assert {p.name for p in (run / "checkpoints").glob("*_best.pt")} == {"scratch_best.pt", "student_best.pt"}
    rows = [json.loads(line)["role"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == ["scratch", "student"]
    assert res.metrics["label"] == "student, distilled (dkd, T=2, alpha=0.1)"
    assert res.metrics["kd_gain"] == res.metrics["test_acc"] - res.results["scratch"]["test_acc"]
    assert checkpoint.load(res.checkpoint)["epoch"] == 1
    first = next(checkpoint.build_from(checkpoint.load(res.checkpoint)).parameters())
    assert first.shape == (32, 784)  # student.hidden=[32], rebuilt from the checkpoint alone
    # The same teacher again (same data, same settings): that run is reused, not trained again.
    settings = {"overrides": ["trainer.batch_size=32", "optimizer=adam"], "seed": 3}
    again = kdcli.distill("lenet5", "mlp", data, epochs=1, **settings)
    assert len(list((runs / "train_teacher").iterdir())) == 1
    assert again.results["teacher"]["checkpoint"] == str(teacher_ckpt)
    assert again.results["teacher"]["test_acc"] == res.results["teacher"]["test_acc"]


@pytest.mark.slow
def test_metrics_agree_with_an_independent_recomputation(data, teacher, distilled):
    """Accuracy, NLL and agreement recomputed from the returned modules with plain torch, not with the
    engine's predict/scores that produced the figures."""
    x, y = data.test.x, data.test.y
    assert len(y) == 1000 and teacher.metrics["test_acc"] > 0.8
    logits = logits_of(distilled.model, x)
    correct = int((logits.argmax(1) == y).sum())
    assert distilled.metrics["test_acc"] == pytest.approx(correct / len(y), abs=1e-6)  # pins the count: 1e-3 each
    assert distilled.metrics["test_nll"] == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-5)
    # The checkpoint is a normal one: a registry model (build_model) is rebuilt with the same outputs.
    rebuilt = checkpoint.build_from(checkpoint.load(distilled.checkpoint))
    assert torch.equal(logits_of(rebuilt, x), logits)
    assert distilled.metrics["arch"] == {"name": "mlp", "kwargs": {"hidden": [64], "dropout": 0.0}}
    t_logits = logits_of(teacher.model, x)
    assert teacher.metrics["test_acc"] == pytest.approx(int((t_logits.argmax(1) == y).sum()) / len(y), abs=1e-6)
    agree = int((logits.argmax(1) == t_logits.argmax(1)).sum())
    assert distilled.metrics["teacher_agreement"] == pytest.approx(agree / len(y), abs=1e-6)
    # val_acc and best_epoch are those of the best epoch in metrics.jsonl.
    rows = [json.loads(line) for line in (distilled.run_dir / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["val_acc"])
    assert (best["epoch"], best["val_acc"]) == (distilled.metrics["best_epoch"], distilled.metrics["val_acc"])


@pytest.mark.slow
def test_teacher_as_a_module_or_an_ensemble(data, teacher, tmp_path):
    # The trained module itself: used as is, on the student's inputs and classes, frozen as kd distill's teacher.
    teacher.model.train().requires_grad_(True)  # as a user may leave it (an earlier distill froze it)
    res = kdcli.distill(teacher.model, "lenet5", data, epochs=1, run_dir=tmp_path / "module")
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    assert res.results["teacher"]["arch"] == teacher.metrics["arch"] and res.results["teacher"]["checkpoint"] is None
    assert res.results["teacher"]["test_acc"] == teacher.metrics["test_acc"]
    # Two teachers (a Result and a checkpoint path), weighted: the config records them as teachers=[...].
    res = kdcli.distill(
        [teacher, str(teacher.checkpoint)], "lenet5", data, epochs=1, teacher_weights=[1, 3], run_dir=tmp_path / "two"
    )
    cfg = yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())
    assert cfg["teachers"] == [str(teacher.checkpoint)] * 2 and cfg["teacher_weights"] == [1.0, 3.0]
    assert res.results["teacher"]["label"] == "2 teachers, merged (probs)"
    assert len(res.results["teacher"]["teachers"]) == 2
    # Keys of the distill config pass through: here the student starts as a copy of the teacher.
    transfer = {"init_from_teacher": True}
    res = kdcli.distill(teacher, "convnet", data, epochs=1, transfer=transfer, run_dir=tmp_path / "t")
    assert res.results["transfer"]["kept"] == [] and len(res.results["transfer"]["copied"]) > 0
    with pytest.raises(KdError, match=r"teacher_weights has 3 values for 2 teacher\(s\)"):
        kdcli.distill([teacher, teacher], "lenet5", data, teacher_weights=[1, 2, 3], run_dir=tmp_path / "three")


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda d: kdcli.distill("convnet", "mlp", d, T=-1), "T must be > 0 (got -1.0); it divides the logits."),
        (lambda d: kdcli.distill("convnet", "resnet9000", d), "Unknown student 'resnet9000'."),
        (lambda d: kdcli.distill("convnet", "mlp", d, loss="kdd"), "Unknown loss 'kdd'. Did you mean 'kd'?"),
        (
            lambda d: kdcli.train_teacher("convnet", d, overrides=["trainer.epoch=3"]),
            "Unknown key 'trainer.epoch'. Did you mean 'trainer.epochs'?",
        ),
        (lambda d: kdcli.train_teacher("convnet", d, sed=1), "Unknown key 'sed' in 'sed=1'. Did you mean 'seed'?"),
        (lambda d: kdcli.train_teacher("convnet", d, epochs=0), "trainer.epochs must be a number >= 1 (got 0)."),
        (lambda d: kdcli.build_model("resnet9000", d), "Unknown model 'resnet9000'. Did you mean 'resnet20'?"),
        (
            lambda d: kdcli.distill("convnet", "mlp", d, overrides=["T=2"]),
            "'T=2': T is already set by an argument; set it once.",
        ),
        (
            lambda d: kdcli.train_teacher("convnet", d, overrides=["dataset.limit=10"]),
            "'dataset.limit=10': dataset belongs to the data; give it to kdcli.load_data(...) instead.",
        ),
        (
            lambda d: kdcli.distill(nn.Linear(784, 10), "mlp", d, overrides=["teacher=lenet5"]),
            "'teacher=lenet5': the teacher is given as a checkpoint, Result or module, which fixes its model.",
        ),
        (lambda d: kdcli.train_teacher("convnet", d.train), "data: pass what kdcli.load_data(...) returned"),
    ],
    ids=["T", "student", "loss", "key", "keyword", "epochs", "model", "twice", "dataset", "fixed-teacher", "data"],
)
def test_bad_input_raises_kderror_before_any_work(data, runs, call, message):
    with pytest.raises(KdError) as e:
        call(data)
    assert message in str(e.value)
    assert not runs.exists()  # no run directory, no teacher trained


def test_a_failed_run_says_so_in_its_metrics(data, runs):
    with pytest.raises(KdError, match=r"Checkpoint not found: \S*missing/teacher.pt"):
        kdcli.distill("missing/teacher.pt", "mlp", data)
    (run,) = (runs / "api" / "distill").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"].startswith("Checkpoint not found: ")


def test_unknown_names_list_the_choices(data):
    with pytest.raises(KdError, match=r"Options for student: .*convnet.*lenet5.*mlp"):
        kdcli.distill("convnet", "resnet9000", data)
    with pytest.raises(KdError, match=r"Available: .*convnet.*lenet5.*mlp"):
        kdcli.build_model("resnet9000", data)


@pytest.mark.slow
@pytest.mark.parametrize("args,kwargs", [(["T=-1"], {"T": -1}), (["student=resnet9000"], {"student": "resnet9000"})])
def test_errors_are_the_command_lines_own(kd, data, args, kwargs):
    """The same message as `kd distill ...` prints (whitespace aside: the console wraps lines)."""
    cli = kd("distill", *args, "device=cpu")
    assert cli.returncode == 1
    kwargs = {"student": "mlp", **kwargs}
    with pytest.raises(KdError) as e:
        kdcli.distill("convnet", kwargs.pop("student"), data, **kwargs)
    assert " ".join(str(e.value).split()) in " ".join(cli.stderr.split() + cli.stdout.split())


@pytest.mark.slow
def test_same_teacher_as_kd_train_teacher(kd, data):
    """The API trains with the command's pieces: `kd train-teacher` with the same settings gives
    the same test accuracy and weights."""
    res = kdcli.train_teacher("convnet", data, epochs=1, run_dir=kd.dir / "api")
    cli = kd("train-teacher", "trainer.epochs=1", "dataset.limit=1000", "device=cpu")
    assert cli.returncode == 0, cli.stderr
    (run,) = (kd.dir / "runs" / "train_teacher").iterdir()
    theirs = json.loads((run / "metrics.json").read_text())["teacher"]
    assert (theirs["test_acc"], theirs["val_acc"], theirs["arch"]) == (
        res.metrics["test_acc"],
        res.metrics["val_acc"],
        res.metrics["arch"],
    )
    a, b = checkpoint.load(res.checkpoint)["state_dict"], checkpoint.load(theirs["checkpoint"])["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_notebooks_own_hydra_is_left_as_it_was(data):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    initialize_config_module(config_module="kdcli.configs", version_base="1.3")  # as a notebook cell would
    try:
        mine = compose(config_name="evaluate", overrides=["split=val"])
        with pytest.raises(KdError, match="T must be > 0"):
            kdcli.distill("convnet", "mlp", data, T=0)
        assert GlobalHydra.instance().is_initialized()
        assert compose(config_name="evaluate", overrides=["split=val"]) == mine
    finally:
        GlobalHydra.instance().clear()


def test_import_kdcli_stays_light():
    code = "import sys, kdcli; print('torch' in sys.modules, 'hydra' in sys.modules, 'distill' in dir(kdcli))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "True"]
