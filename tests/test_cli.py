"""The real `kd` front in a subprocess: help, usage errors, config errors. Fast: no training."""

import pytest


def test_help_lists_every_subcommand(kd):
    r = kd("--help")
    assert r.returncode == 0
    for name in ("train-teacher", "distill", "evaluate", "export", "quantize", "list", "report"):
        assert name in r.stdout


def test_unknown_subcommand_exits_2_with_the_list(kd):
    r = kd("distil")
    assert r.returncode == 2
    assert "unknown command 'distil'. Did you mean 'distill'?" in r.stderr
    assert "train-teacher" in r.stderr and "export" in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["studnet=mlp"], "Unknown key 'studnet' in 'studnet=mlp'. Did you mean 'student'?"),
        (["student=mpl"], "Unknown student 'mpl'. Did you mean 'mlp'? Options for student: convnet, lenet5, mlp,"),
        (["teacher=tv_resnet81"], "Unknown teacher 'tv_resnet81'. Did you mean 'tv_resnet18'?"),
        (["trainer.epohcs=3"], "Unknown key 'trainer.epohcs'. Did you mean 'trainer.epochs'?"),
        (["student=lenet5", "student.hidden=[8]"], "Unknown key 'student.hidden'. Keys of student: name."),
        (["-m", "T=1,2", "optimizer=sgdd"], "Unknown optimizer 'sgdd'. Did you mean 'sgd'?"),
        (["T=-1"], "T must be > 0 (got -1.0)"),
        (["alpha=2"], "alpha must be in [0, 1] (got 2.0)"),
        (["device=tpu"], "device=tpu is not a device. Choose one of: auto, cpu, cuda, cuda:N, mps."),
        (["teacher.ckpt=missing.pt"], "Checkpoint not found: missing.pt"),
        (["+trainer.epoch=5"], "Unknown key 'trainer.epoch'. Did you mean 'trainer.epochs'?"),
        (["+newkey=1"], "Unknown key 'newkey' in '+newkey=1'."),
        (["teacher=null"], "Unknown teacher 'null'. Options for teacher: convnet, lenet5, mlp,"),
        (["~T"], "'~T': kd distill needs T; set another value instead."),
        (["imports=my.py"], "imports takes a list: imports=[my.py]."),
        (["student.hidden=64"], "model 'mlp': 'hidden' takes list values; got 64."),
        (["optimizer.momentum=-1", "debug=smoke"], "optimizer.momentum must be a number in [0, 1] (got -1)"),
    ],
)
def test_bad_input_gets_one_clear_line_and_exit_1(kd, args, message):
    r = kd("distill", *args)
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 1, out
    assert message in out
    assert "Traceback" not in out


def test_options_of_another_command_are_refused(kd):
    r = kd("train-teacher", "student=mlp")
    assert r.returncode == 1
    assert "Unknown key 'student' in 'student=mlp'. Keys of kd train-teacher:" in " ".join(r.stdout.split())


def test_smoke_preset_shows_what_it_sets(kd):
    r = kd("distill", "debug=smoke", "trainer.epochs=2", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    assert "epochs: 2" in r.stdout and "max_batches: 3" in r.stdout and "limit: 256" in r.stdout
    assert "device: cpu" in r.stdout


def test_wrong_type_is_one_error_naming_the_key(kd):
    r = kd("distill", "T=abc")
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 1 and "Traceback" not in out and out.count("error:") == 1, out
    assert "error: T=abc: Value 'abc' of type 'str' could not be converted to Float" in out
    assert "HYDRA_FULL_ERROR" not in out


def test_full_traceback_on_request(kd):
    r = kd("distill", "T=-1", env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode == 1 and "T must be > 0" in r.stdout
    assert "Traceback" in r.stderr and "kdcli.core.errors.KdError: T must be > 0" in r.stderr
    r = kd("distill", "studnet=mlp", env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "Unknown key 'studnet'" in r.stderr


def test_cfg_job_prints_the_composed_config(kd):
    r = kd("distill", "teacher=convnet", "student=mlp", "T=2", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    assert "T: 2.0" in r.stdout and "alpha: 0.0" in r.stdout and "name: mlp" in r.stdout


def test_command_help_shows_groups_and_options(kd):
    r = kd("distill", "--help")
    assert r.returncode == 0
    assert "kd distill: distill a teacher into a student" in r.stdout
    for group in (
        "student: convnet, lenet5, mlp",
        "optimizer: adam, adamw, sgd",
        "scheduler: cosine, none, onecycle, step",
    ):
        assert group in r.stdout


def test_list_shows_registries(kd):
    r = kd("list", "models")
    assert r.returncode == 0
    assert "convnet" in r.stdout and "21,840" in r.stdout and "hidden=[256]" in r.stdout
    assert kd("list", "modles").returncode == 1
    r = kd("list", "--help")
    assert r.returncode == 0 and "usage: kd list" in r.stdout


def test_flags_may_stand_between_overrides():
    from kdcli.overrides import _flags_first

    args = ["T=1", "-m", "alpha=0.5", "--cfg", "job", "seed=1", "--info", "config"]
    assert _flags_first(args) == ["-m", "--cfg", "job", "--info", "config", "T=1", "alpha=0.5", "seed=1"]


def test_overrides_after_a_flag_are_not_a_usage_error(kd):
    # Hydra's argparse takes the overrides as one run of arguments: this used to exit 2
    r = kd("distill", "T=2", "--cfg", "job", "debug=smoke", "alpha=0.3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "T: 2.0" in r.stdout and "alpha: 0.3" in r.stdout and "max_batches: 3" in r.stdout
