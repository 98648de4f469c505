"""Every distillation method end to end through the real `kd distill` command on mnist5k
(smoke-sized: a few batches), with the files and figures each one must produce."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_kd

pytestmark = pytest.mark.slow  # real `kd` subprocesses: several minutes in all

SMOKE = ("debug=smoke", "baseline=false")


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def rows(run_dir: Path, role: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["role"] == role]


def the_run(root: Path, command: str = "distill") -> Path:
    (run,) = list((root / "runs" / command).iterdir())
    return run


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Smoke teachers trained once: on all classes (two seeds), and on digits 0-4 and 5-9."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for name, extra in {
        "all": [],
        "all_seed1": ["seed=1"],
        "low": ["dataset.classes=[0,1,2,3,4]"],
        "high": ["dataset.classes=[5,6,7,8,9]"],
    }.items():
        r = run_kd("train-teacher", "debug=smoke", *extra, f"hydra.run.dir={root / name}", cwd=root)
        assert r.returncode == 0, r.stdout + r.stderr
        out[name] = str(root / name / "checkpoints" / "teacher_best.pt")
    return out


@pytest.mark.parametrize(
    "loss", [["loss=soft_ce"], ["loss=mse"], ["loss=mse", "loss.probs=true"], ["loss=dkd"], ["loss=dist"], ["loss=ls"]]
)
def test_each_logit_loss_runs(kd, teachers, loss):
    r = kd("distill", *SMOKE, f"teacher.ckpt={teachers['all']}", *loss)
    assert r.returncode == 0, r.stdout + r.stderr
    m = metrics(the_run(kd.dir))
    assert m["status"] == "completed" and m["loss"] == loss[0].split("=")[1]
    assert 0 <= m["student"]["test_acc"] <= 1
    (row,) = rows(the_run(kd.dir), "student")
    assert row["T"] == 4.0 and row["alpha"] == 0.0


CONV2 = ["features.{0}.student_layer=conv2", "features.{0}.teacher_layer=conv2"]


@pytest.mark.parametrize(
    "name, layers",
    [
        ("fitnet", CONV2),
        ("at", CONV2),
        ("nst", CONV2),
        ("rkd", []),
        ("pkt", []),
        ("sp", []),
        ("crd", ["features.crd.negatives=64"]),
    ],
)
def test_each_feature_term_runs_on_hooked_layers(kd, teachers, name, layers):
    # lenet5's conv2 gives (16, 10, 10), the teacher's (20, 8, 8): channels adapted, maps pooled.
    args = [o.format(name) for o in layers]
    r = kd("distill", *SMOKE, f"teacher.ckpt={teachers['all']}", "student=lenet5", f"features=[{name}]", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    layer = "conv2" if layers == CONV2 else "penultimate"
    expected = {"conv2": ("(16, 10, 10)", "(20, 8, 8)"), "penultimate": ("(84,)", "(50,)")}[layer]
    assert f"features {name}: student {layer} {expected[0]} -> teacher {layer} {expected[1]}" in r.stdout
    assert metrics(the_run(kd.dir))["status"] == "completed"


def test_several_feature_terms_and_several_layer_pairs(kd, teachers):
    r = kd(
        "distill",
        *SMOKE,
        f"teacher.ckpt={teachers['all']}",
        "student=lenet5",
        "features=[at,rkd]",
        "features.at.student_layer=[conv1,conv2]",
        "features.at.teacher_layer=[conv1,conv2]",
        "features.at.weight=10",
        "features.rkd.weight=2",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "features at: student conv1 (6, 28, 28), conv2 (16, 10, 10) -> teacher conv1 (10, 24, 24)" in r.stdout
    assert "weight 10" in r.stdout and "features rkd:" in r.stdout


def test_fitnet_hint_stage_comes_first(kd, teachers):
    r = kd(
        "distill",
        *SMOKE,
        f"teacher.ckpt={teachers['all']}",
        "trainer.epochs=2",
        "features=[fitnet]",
        "features.fitnet.hint_epochs=2",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    run = the_run(kd.dir)
    assert [r["epoch"] for r in rows(run, "student_hint")] == [1, 2]
    assert [r["epoch"] for r in rows(run, "student")] == [1, 2]
    assert (run / "checkpoints" / "student_hint_last.pt").is_file()


def test_temperature_and_alpha_schedules_reach_their_end_values(kd, teachers):
    r = kd(
        "distill",
        *SMOKE,
        f"teacher.ckpt={teachers['all']}",
        "trainer.epochs=3",
        "T=8",
        "schedule.T=linear",
        "schedule.T_end=2",
        "alpha=0.1",
        "schedule.alpha=step",
        "schedule.alpha_end=0.5",
        "confidence_weights=true",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    student = rows(the_run(kd.dir), "student")
    assert [r["T"] for r in student] == [8.0, 5.0, 2.0]
    assert [r["alpha"] for r in student] == [0.1, 0.1, 0.5]  # once 1.5 of the 3 epochs are done


def test_schedule_without_an_end_value_is_refused(kd):
    r = kd("distill", *SMOKE, "schedule.T=cosine")
    assert r.returncode == 1 and "schedule.T_end" in r.stdout


def test_an_ensemble_of_teachers(kd, teachers):
    r = kd("distill", *SMOKE, f"teachers=[{teachers['all']},{teachers['all_seed1']}]", "teacher_weights=[2,1]")
    assert r.returncode == 0, r.stdout + r.stderr
    m = metrics(the_run(kd.dir))
    assert m["teacher"]["label"] == "2 teachers, merged (probs)"
    assert [t["checkpoint"] for t in m["teacher"]["teachers"]] == [teachers["all"], teachers["all_seed1"]]
    r = kd("distill", *SMOKE, f"teachers=[{teachers['all']},{teachers['all_seed1']}]", "teacher_weights=[1]")
    assert r.returncode == 1 and "give one weight per entry" in r.stdout


@pytest.mark.parametrize("merge", ["auto", "probs", "logits"])
def test_teachers_of_disjoint_classes_teach_all_classes(kd, teachers, merge):
    r = kd("distill", *SMOKE, f"teachers=[{teachers['low']},{teachers['high']}]", f"teacher_merge={merge}")
    assert r.returncode == 0, r.stdout + r.stderr
    m = metrics(the_run(kd.dir))
    assert m["teacher"]["label"] == f"2 teachers, merged ({'conditional' if merge == 'auto' else merge})"
    assert [t["classes"] for t in m["teacher"]["teachers"]] == [list("01234"), list("56789")]
    assert 0 <= m["teacher"]["test_acc"] <= 1 and 0 <= m["student"]["test_acc"] <= 1


def test_teachers_that_miss_classes_are_refused(kd, teachers):
    r = kd("distill", *SMOKE, f"teachers=[{teachers['low']}]")
    assert r.returncode == 1
    assert "no teacher knows 5, 6, 7, 8, 9" in r.stdout


def test_deep_mutual_learning(kd):
    r = kd("distill", "debug=smoke", "method=dml", "method.peers=3")
    assert r.returncode == 0, r.stdout + r.stderr
    run = the_run(kd.dir)
    m = metrics(run)
    assert {"scratch", "student", "peer2", "peer3", "ensemble"} <= set(m)
    for role in ("student", "peer2", "peer3"):
        assert (run / "checkpoints" / f"{role}_best.pt").is_file()
    # Peers start from different weights: their first-epoch losses differ.
    assert len({rows(run, role)[0]["train_loss"] for role in ("student", "peer2", "peer3")}) == 3
    assert not (kd.dir / "runs" / "train_teacher").exists()  # no teacher is trained


def test_joint_training_trains_the_teacher_too(kd):
    r = kd("distill", *SMOKE, "method=joint", "features=[rkd]")
    assert r.returncode == 0, r.stdout + r.stderr
    run = the_run(kd.dir)
    m = metrics(run)
    assert m["teacher"]["label"] == "teacher, trained jointly" and m["teacher"]["params"] > 0
    assert (run / "checkpoints" / "teacher_best.pt").is_file() and (run / "checkpoints" / "student_best.pt").is_file()


def test_born_again_generations_and_their_ensemble(kd):
    r = kd("distill", "debug=smoke", "method=born_again", "method.generations=2")
    assert r.returncode == 0, r.stdout + r.stderr
    m = metrics(the_run(kd.dir))
    assert {"scratch", "gen1", "student", "ensemble"} <= set(m)
    assert m["ensemble"]["label"] == "ensemble of generations 1-2"
    assert "generation 2, from generation 1" in r.stdout


def test_teacher_assistant_chain(kd, teachers):
    r = kd("distill", *SMOKE, f"teacher.ckpt={teachers['all']}", "method=ta", "method.assistants=[lenet5,mlp]")
    assert r.returncode == 0, r.stdout + r.stderr
    m = metrics(the_run(kd.dir))
    assert m["assistant1"]["arch"]["name"] == "lenet5" and m["assistant2"]["arch"]["name"] == "mlp"
    assert "student, from the last assistant" in r.stdout


def test_online_methods_refuse_feature_terms_and_teachers(kd, teachers):
    r = kd("distill", *SMOKE, "method=dml", "features=[rkd]")
    assert r.returncode == 1 and "method=dml does not take feature terms" in r.stdout
    r = kd("distill", *SMOKE, "method=born_again", f"teacher.ckpt={teachers['all']}")
    assert r.returncode == 1 and "trains without a pretrained teacher" in r.stdout


def test_transfer_copies_matching_tensors_and_freezing_keeps_them(kd, teachers):
    # A convnet student with a narrower fc1: conv1 and conv2 match the teacher's, fc1 does not.
    r = kd(
        "distill",
        *SMOKE,
        f"teacher.ckpt={teachers['all']}",
        "student=convnet",
        "student.hidden=30",
        "transfer.init_from_teacher=true",
        "transfer.freeze=[conv1]",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    run = the_run(kd.dir)
    transfer = metrics(run)["transfer"]
    assert {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"} <= set(transfer["copied"])
    assert {"fc1.weight", "fc2.weight"} <= set(transfer["kept"])
    teacher = torch.load(teachers["all"], weights_only=True)["state_dict"]
    student = torch.load(run / "checkpoints" / "student_last.pt", weights_only=True)["state_dict"]
    assert torch.equal(student["conv1.weight"], teacher["conv1.weight"])  # frozen all along
    assert not torch.equal(student["conv2.weight"], teacher["conv2.weight"])  # trained


def test_bad_layer_names_and_modules_are_named_with_the_choices(kd, teachers):
    r = kd("distill", *SMOKE, f"teacher.ckpt={teachers['all']}", "features=[at]", "features.at.teacher_layer=conv3")
    assert r.returncode == 1
    assert "teacher_layer=conv3: the teacher has no layer of that name. Did you mean 'conv2'?" in r.stdout
    assert "conv1 (10, 24, 24)" in r.stdout
    r = kd("distill", *SMOKE, f"teacher.ckpt={teachers['all']}", "features=[at]")  # penultimate: flat
    assert r.returncode == 1 and "at compares spatial feature maps" in r.stdout
    r = kd("distill", *SMOKE, f"teacher.ckpt={teachers['all']}", "transfer.freeze=[conv9]")
    assert r.returncode == 1 and "transfer.freeze: the student has no module 'conv9'" in r.stdout
    r = kd("distill", *SMOKE, "features=[atx]")
    assert r.returncode == 1 and "Unknown features 'atx'" in r.stdout


def test_confidence_weights_with_a_batch_level_loss_are_refused_before_training(kd, teachers):
    r = kd("distill", "debug=smoke", f"teacher.ckpt={teachers['all']}", "loss=dist", "confidence_weights=true")
    assert r.returncode == 1 and "needs a per-sample logit loss" in r.stdout
    assert not (the_run(kd.dir) / "checkpoints").exists()  # not even the scratch baseline ran


def test_frozen_modules_thaw_after_freeze_epochs(kd, teachers):
    r = kd(
        "distill",
        *SMOKE,
        f"teacher.ckpt={teachers['all']}",
        "student=convnet",
        "trainer.epochs=2",
        "transfer.init_from_teacher=true",
        "transfer.freeze=[conv1,conv2]",
        "transfer.freeze_epochs=1",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "epoch 2: unfreezing conv1, conv2" in r.stdout
    ckpts = the_run(kd.dir) / "checkpoints"
    teacher = torch.load(teachers["all"], weights_only=True)["state_dict"]
    # Same architecture: everything was copied; conv1 kept during epoch 1, trained in epoch 2.
    assert metrics(the_run(kd.dir))["transfer"]["kept"] == []
    last = torch.load(ckpts / "student_last.pt", weights_only=True)
    assert last["epoch"] == 2 and not torch.equal(last["state_dict"]["conv1.weight"], teacher["conv1.weight"])


def test_a_teacher_with_the_classes_in_another_order_is_remapped(kd):
    r = kd("train-teacher", "debug=smoke", "dataset.classes=[0,1]", "trainer.max_batches=6")
    assert r.returncode == 0, r.stdout + r.stderr
    run = the_run(kd.dir, "train_teacher")
    own = metrics(run)["teacher"]["test_acc"]
    ckpt = run / "checkpoints" / "teacher_best.pt"
    r = kd("distill", *SMOKE, "dataset.classes=[1,0]", f"teacher.ckpt={ckpt}")
    assert r.returncode == 0, r.stdout + r.stderr
    # The same test images, labelled the other way round: the remapped teacher scores the same.
    assert metrics(the_run(kd.dir))["teacher"]["test_acc"] == pytest.approx(own)
    r = kd("distill", *SMOKE, "dataset.classes=[1,0]", f"teacher.ckpt={ckpt}", "transfer.init_from_teacher=true")
    assert r.returncode == 1 and "classes in the same order" in r.stdout


def test_more_bad_settings_get_one_line_errors(kd, teachers):
    ckpt = f"teacher.ckpt={teachers['all']}"
    cases = [
        (["transfer.freeze=[1,3]"], "no parameter is left to train"),
        (["student=lenet5", "features=[at]", "features.at.p=0.5", *[o.format("at") for o in CONV2]], "p must be >= 1"),
        (["method=ta", "method.assistants=lenet5"], "method.assistants takes a list of model names"),
        (["features=[rkd]", "features.rkd.weight=-1"], "features.rkd.weight must be >= 0"),
        (["transfer.freeze_epochs=2"], "transfer.freeze_epochs applies to the modules in transfer.freeze"),
    ]
    for extra, message in cases:
        r = kd("distill", *SMOKE, ckpt, *extra)
        assert r.returncode == 1 and message in r.stdout, (extra, r.stdout + r.stderr)
        assert "Traceback" not in r.stdout + r.stderr
