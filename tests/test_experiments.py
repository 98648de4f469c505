"""experiment= presets (configs/experiment/) and the user's own config folders (-cd DIR,
--config-dir, hydra.searchpath): composed as Hydra composes them, read through `--cfg job`,
and a typo still answered with one error line. Fast but for the two real runs at the end."""

import json

import pytest
import yaml


def composed(kd, *args) -> dict:
    r = kd("distill", *args, "--cfg", "job")
    assert r.returncode == 0, r.stdout + r.stderr
    return yaml.safe_load(r.stdout)


def one_error(r) -> str:
    """The one `error:` line of a refused command line (exit 1, no traceback)."""
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Traceback" not in out
    (line,) = [line for line in out.splitlines() if line.startswith("error:")]
    return line


@pytest.fixture
def user_dir(tmp_path):
    """A user's config folder: a student option and an experiment of their own."""
    d = tmp_path / "myconfigs"
    (d / "student").mkdir(parents=True)
    (d / "student" / "mlp_small.yaml").write_text("name: mlp\nhidden: [64]\ndropout: 0.0\n")
    (d / "experiment").mkdir()
    (d / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /student: mlp_small\nT: 2.0\ntrainer:\n  epochs: 7\n"
    )
    return d


@pytest.mark.parametrize(
    "name, expected",
    [
        ("quick", {"trainer.epochs": 5, "teacher_train.trainer.epochs": 10, "loss.name": "kd", "T": 4.0}),
        ("dkd", {"loss.name": "dkd", "loss.nckd": 8.0, "schedule.warmup": 5, "T": 4.0, "alpha": 0.1}),
        ("dist", {"loss.name": "dist", "T": 1.0, "alpha": 0.5}),
        ("ls", {"loss.name": "ls", "T": 2.0, "alpha": 0.1}),
        ("dml", {"method.name": "dml", "method.peers": 2, "T": 1.0, "alpha": 0.5}),
        ("patient", {"trainer.epochs": 120, "loss.name": "kd", "T": 4.0, "alpha": 0.0}),
        ("funmatch", {"mix": "mixup", "alpha": 0.0, "T": 1.0, "trainer.epochs": 120}),
    ],
)
def test_each_preset_sets_its_recipe(kd, name, expected):
    cfg = composed(kd, f"experiment={name}")
    for key, value in expected.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_overrides_apply_on_top_of_a_preset(kd):
    # Hydra's docs write +experiment=NAME (a group the defaults do not list): the same preset
    assert composed(kd, "+experiment=dkd") == composed(kd, "experiment=dkd")
    cfg = composed(kd, "experiment=dkd", "loss.nckd=4", "T=2", "schedule.warmup=0")
    assert cfg["loss"] == {"name": "dkd", "tckd": 1.0, "nckd": 4.0, "standardize": False}
    assert cfg["T"] == 2.0 and cfg["schedule"]["warmup"] == 0
    # debug=smoke after a preset: smoke-sized whatever the preset's epochs
    cfg = composed(kd, "experiment=patient", "debug=smoke")
    assert cfg["trainer"]["epochs"] == 1 and cfg["dataset"]["limit"] == 256


def test_a_preset_typo_is_one_error(kd):
    line = one_error(kd("distill", "experiment=dkk"))
    assert (
        "Unknown experiment 'dkk'. Did you mean 'dkd'? Options for experiment: dist, dkd, dml, funmatch, ls, patient"
        in line
    )
    line = one_error(kd("distill", "+experiment=dkk"))
    assert "Unknown experiment 'dkk'" in line


def test_kd_list_shows_the_presets_and_what_they_set(kd):
    r = kd("list", "experiments")
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    for name, sets in (("dkd", "loss=dkd alpha=0.1 schedule.warmup=5"), ("dist", "loss=dist T=1.0 alpha=0.5")):
        assert f"{name} │ {sets}" in out
    assert "quick │ trainer.epochs=5 teacher_train.trainer.epochs=10" in out
    r = kd("list", "d*")  # a pattern covers them too
    assert r.returncode == 0 and "dkd" in r.stdout and "quick" not in r.stdout


@pytest.mark.parametrize(
    "flags",
    [
        ["-cd", "{dir}"],
        ["--config-dir", "{dir}"],
        ["--config-dir={dir}"],
        ["hydra.searchpath=[file://{dir}]"],
    ],
)
def test_a_user_config_folder_adds_options(kd, user_dir, flags):
    flags = [f.format(dir=user_dir) for f in flags]
    cfg = composed(kd, *flags, "student=mlp_small", "T=3")
    assert cfg["student"] == {"name": "mlp", "hidden": [64], "dropout": 0.0} and cfg["T"] == 3.0


def test_typos_are_still_refused_beside_a_user_folder(kd, user_dir):
    cfg = composed(kd, "-cd", str(user_dir), "student=mlp_small", "student.hidden=[32]")  # the group's own keys
    assert cfg["student"]["hidden"] == [32]
    line = one_error(kd("distill", "-cd", str(user_dir), "student=mlp_smal"))
    assert "Unknown student 'mlp_smal'. Did you mean 'mlp_small'? Options for student: convnet, lenet5, mlp," in line
    assert "mlp_small" in line.split("Options for student:")[1]
    line = one_error(kd("distill", "-cd", str(user_dir), "student=mlp_small", "student.hiden=[3]"))
    assert "Unknown key 'student.hiden'. Did you mean 'student.hidden'? Keys of student: name, hidden, dropout." in line


def test_presets_from_a_user_folder_and_the_packaged_ones_beside_it(kd, user_dir):
    for form in ("experiment=mine", "+experiment=mine"):
        cfg = composed(kd, "-cd", str(user_dir), form)
        assert cfg["student"]["hidden"] == [64] and cfg["T"] == 2.0 and cfg["trainer"]["epochs"] == 7
    cfg = composed(kd, "-cd", str(user_dir), "+experiment=quick")
    assert cfg["trainer"]["epochs"] == 5 and cfg["student"]["hidden"] == [256]
    line = one_error(kd("distill", "-cd", str(user_dir), "experiment=mien"))
    assert "Unknown experiment 'mien'. Did you mean 'mine'?" in line and "quick" in line


def test_user_options_are_refused_without_their_folder(kd, user_dir, tmp_path):
    line = one_error(kd("distill", "student=mlp_small"))
    assert "Unknown student 'mlp_small'." in line
    line = one_error(kd("distill", "-cd", str(tmp_path / "nope"), "student=mlp_small"))
    assert f"--config-dir {tmp_path / 'nope'}: no such directory." in line
    line = one_error(kd("distill", "hydra.searchpath=file://x"))
    assert "hydra.searchpath takes a list of config folders" in line
    # +group=option adds only a group that exists somewhere on the search path
    line = one_error(kd("distill", "-cd", str(user_dir), "+experimnt=mine"))
    assert "Unknown key 'experimnt' in '+experimnt=mine'. Did you mean 'experiment'?" in line


@pytest.mark.slow
def test_a_run_with_a_preset_of_a_user_folder(kd, user_dir):
    teacher_opt = user_dir / "optimizer"
    teacher_opt.mkdir()
    (teacher_opt / "sgd_slow.yaml").write_text("name: sgd\nlr: 0.02\nmomentum: 0.9\nnesterov: true\n")
    r = kd("distill", "-cd", str(user_dir), "+experiment=mine", "teacher_train.optimizer=sgd_slow", "debug=smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = (kd.dir / "runs" / "distill").iterdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["student"]["hidden"] == [64] and config["T"] == 2.0
    assert json.loads((run / "metrics.json").read_text())["student"]["arch"]["kwargs"]["hidden"] == [64]
    # the teacher it trained first composed its recipe with the same folder
    (teacher,) = (kd.dir / "runs" / "train_teacher").iterdir()
    assert yaml.safe_load((teacher / "config.yaml").read_text())["optimizer"]["lr"] == 0.02


@pytest.mark.slow
def test_the_quick_preset_is_a_real_run_of_a_few_epochs(kd):
    r = kd("distill", "experiment=quick")
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = (kd.dir / "runs" / "distill").iterdir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["epoch"] for r in rows if r["role"] == "student"}) == [1, 2, 3, 4, 5]
    (teacher,) = (kd.dir / "runs" / "train_teacher").iterdir()
    assert len((teacher / "metrics.jsonl").read_text().splitlines()) == 10
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dataset"]["limit"] is None  # all of mnist5k: figures that mean something
    assert metrics["teacher"]["test_acc"] > 0.5  # not a smoke run's chance-level teacher
