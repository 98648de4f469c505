"""The teacher kd distill trains for itself: kd train-teacher's recipe (never the student's), reuse
only for the same recipe, and the warning when the teacher is no better than the scratch student."""

import json

import pytest
import yaml

pytestmark = pytest.mark.slow


def teacher_runs(kd) -> list:
    root = kd.dir / "runs" / "train_teacher"
    return sorted(root.iterdir()) if root.is_dir() else []


def test_the_teacher_keeps_its_own_recipe_and_is_reused_only_for_it(kd):
    r = kd("distill", "debug=smoke", "augment=none", "optimizer.lr=0.2", "trainer.selection=val_acc")
    assert r.returncode == 0, r.stdout + r.stderr
    (first,) = teacher_runs(kd)
    config = yaml.safe_load((first / "config.yaml").read_text())
    # The student's augmentation, learning rate and selection did not reach the teacher.
    assert config["augment"] == "standard" and config["optimizer"]["lr"] == 0.05
    assert config["trainer"]["selection"] == "last" and config["seed"] == 0
    assert json.loads((first / "metrics.json").read_text())["command"] == "train_teacher"
    # A smoke teacher is at chance: the run says so before the student trains.
    assert "the teacher is not clearly better than the student trained on labels" in r.stdout

    r = kd("distill", "debug=smoke", "seed=3")  # another student recipe and seed: the same teacher
    assert r.returncode == 0, r.stdout + r.stderr
    assert "latest train-teacher run of this recipe" in r.stdout and teacher_runs(kd) == [first]

    r = kd("distill", "debug=smoke", "teacher_train.optimizer.lr=0.01")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "another recipe (optimizer.lr: 0.05 -> 0.01)" in r.stdout
    second = [d for d in teacher_runs(kd) if d != first]
    assert len(second) == 1
    assert yaml.safe_load((second[0] / "config.yaml").read_text())["optimizer"]["lr"] == 0.01


def test_a_teacher_trained_by_hand_with_the_default_recipe_is_reused(kd):
    r = kd("train-teacher", "debug=smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    r = kd("distill", "debug=smoke", "trainer.epochs=2")  # student keys do not change the teacher
    assert r.returncode == 0, r.stdout + r.stderr
    assert "latest train-teacher run of this recipe" in r.stdout and len(teacher_runs(kd)) == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("teacher_train.teacher.hidden=3", "teacher_train.teacher: the teacher's model, data, device and folders"),
        ("teacher_train.trainr.epochs=3", "Unknown key 'trainr'"),
        ("teacher_train.optimizer=adm", "Unknown optimizer 'adm'"),
    ],
)
def test_bad_teacher_recipes_are_refused_before_any_training(kd, override, message):
    r = kd("distill", "debug=smoke", override)
    assert r.returncode == 1 and message in r.stdout + r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr and teacher_runs(kd) == []


def test_metrics_and_table_carry_the_paired_test_of_the_gain(kd):
    r = kd("distill", "debug=smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = (kd.dir / "runs" / "distill").iterdir()
    m = json.loads((run / "metrics.json").read_text())
    g = m["kd_gain_test"]
    assert g["gain"] == pytest.approx(m["kd_gain"]) and g["n"] == 256
    assert g["gain"] == pytest.approx((g["only_new"] - g["only_base"]) / g["n"])
    assert g["ci"][0] <= g["gain"] <= g["ci"][1] and 0 <= g["p_value"] <= 1
    assert f"McNemar exact p = {g['p_value']:.2g}" in r.stdout


def test_hydra_interpolations_still_resolve_in_the_job(kd):
    r = kd("distill", "-m", "debug=smoke", "seed=${hydra:job.num}", "baseline=false")
    assert r.returncode == 0, r.stdout + r.stderr
    (job,) = (d for d in next((kd.dir / "runs" / "distill-multirun").iterdir()).iterdir() if d.name == "0")
    assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
