"""A careless or hostile command line, a bad place to write, a stop at the wrong moment, a
corrupt file: each ends in one `error:` paragraph naming the key or file (exit 1), never a
traceback, a hang or a write somewhere nobody asked for."""

import contextlib
import errno
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_kd, start_kd
from omegaconf import OmegaConf
from test_faults import assert_one_error, flat

from kdcli.app import _stop_hint, finisher, run_record
from kdcli.config import validate
from kdcli.core.errors import KdError
from kdcli.core.registry import MODELS
from kdcli.training import checkpoint, resume

SMOKE = ["debug=smoke", "teacher=mlp"]


# ----------------------------------------------------------------------------------------------
# Where a run writes: checked before Hydra makes the run directory


@pytest.mark.slow
@pytest.mark.parametrize("override", ["runs_dir=", "hydra.run.dir=", "data_root="])
def test_an_empty_path_is_refused_and_nothing_is_written(kd, override):
    r = kd("distill", override, *SMOKE)
    key = override.rstrip("=")
    assert_one_error(r, f"{key} is empty")
    assert not Path("/distill").exists()
    assert sorted(p.name for p in kd.dir.iterdir()) == []  # no run directory, no .hydra, no metrics.json


@pytest.mark.slow
@pytest.mark.parametrize("case", ["file", "/dev/null", "symlink loop", "long name", "broken symlink"])
def test_a_runs_dir_that_cannot_hold_a_run_is_one_error(kd, case):
    target = {
        "file": kd.dir / "a_file",
        "/dev/null": Path("/dev/null"),
        "symlink loop": kd.dir / "loop",
        "long name": kd.dir / ("r" * 300),
        "broken symlink": kd.dir / "dangling",
    }[case]
    if case == "file":
        target.write_text("not a folder")
    if case == "symlink loop":
        os.symlink(kd.dir / "loop2", target)
        os.symlink(target, kd.dir / "loop2")
    if case == "broken symlink":
        os.symlink(kd.dir / "nowhere", target)
    r = kd("distill", f"runs_dir={target}", *SMOKE)
    assert_one_error(r, "runs_dir: cannot make the run directory")


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted on `folder` (root only: the tests that need one skip elsewhere)."""
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if os.geteuid() != 0 or r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder that even root cannot write in: a read-only tmpfs (chmod is enough for others)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o555)
        yield folder
        folder.chmod(0o755)
        return
    with tmpfs(tmp_path / "ro", "ro,size=1m") as folder:
        yield folder


@pytest.mark.slow
def test_a_read_only_runs_dir_is_one_error(kd, read_only_dir):
    assert_one_error(kd("distill", f"runs_dir={read_only_dir}", *SMOKE), "Read-only file system", names=read_only_dir)


@pytest.mark.slow
def test_a_disk_too_full_to_start_a_run_is_one_error(kd):
    with tmpfs(kd.dir / "disk", "size=8k") as disk:
        assert_one_error(kd("distill", f"runs_dir={disk}", *SMOKE), "a run needs at least 1 MiB to start")


@pytest.mark.slow
def test_a_disk_that_fills_during_a_run_is_the_readmes_error(kd):
    with tmpfs(kd.dir / "disk", "size=3m") as disk:
        r = kd("distill", f"runs_dir={disk}", *SMOKE)
        text = assert_one_error(r, "No space left to write", "continue the run with resume=auto")
        records = [f.read_text() for f in disk.rglob("metrics.json")]
    assert re.search(r"No space left to write \S+\.pt \(", text), text
    assert records and not any("inline_container" in m or "RuntimeError" in m for m in records), records


def test_torchs_zip_writer_error_on_a_full_disk_is_the_no_space_error(tmp_path, monkeypatch):
    def save(obj, f):  # what torch.save raises when the file's write fails for want of space
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(KdError, match="No space left to write"):
        checkpoint.write(tmp_path / "x.pt", {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_sweep_dir_that_is_a_device_is_one_error(kd):
    assert_one_error(kd("distill", "-m", "T=1,2", "hydra.sweep.dir=/dev/null", *SMOKE), "hydra.sweep.dir: cannot make")


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, override, key",
    [
        ("distill", "runs_dir=${oc.env:NOPE_DIR}", "runs_dir"),
        ("distill", "T=${T}", "T"),
        ("distill", "seed=${seed}", "seed"),
        ("distill", "T=${oc.env:PATH}", "T"),
        ("evaluate", "checkpoints=[${oc.env:NOPE}]", "checkpoints[0]"),
    ],
)
def test_an_interpolation_that_does_not_resolve_is_one_error(kd, command, override, key):
    assert_one_error(kd(command, override, "debug=smoke"), f"{key}: its value does not resolve")
    assert not (kd.dir / "runs").exists()


# ----------------------------------------------------------------------------------------------
# Ranges that types alone do not express


@pytest.mark.parametrize(
    "command, overrides, key",
    [
        ("distill", ["seed=-1"], "seed"),
        ("distill", ["seed=4294967296"], "seed"),
        ("evaluate", ["seed=-1"], "seed"),
        ("train_teacher", ["optimizer=sgd", "optimizer.momentum=2"], "optimizer.momentum"),
        ("train_teacher", ["optimizer=sgd", "optimizer.momentum=nan"], "optimizer.momentum"),
        ("train_teacher", ["scheduler=cosine", "scheduler.min_lr=-1"], "scheduler.min_lr"),
        ("train_teacher", ["scheduler=cosine", "scheduler.warmup_epochs=-1"], "scheduler.warmup_epochs"),
        ("export", ["opset=99"], "opset"),
        ("export", ["opset=1000000000"], "opset"),
        ("evaluate", ["latency.threads=1000000"], "latency.threads"),
        ("evaluate", ["latency.repeats=1000000000"], "latency.repeats"),
        ("quantize", ["latency.warmup=1000000000"], "latency.warmup"),
        ("distill", ["dataset.storage=stream", "dataset.workers=1000000"], "dataset.workers"),
    ],
)
def test_meaningless_values_are_refused_with_their_range(hydra_cfg, command, overrides, key):
    with pytest.raises(KdError, match=rf"^{key} must be a number in \["):
        validate(hydra_cfg(command, overrides), command)


@pytest.mark.parametrize("command", ["train_teacher", "distill", "evaluate", "export", "quantize"])
def test_the_defaults_pass_the_range_checks(hydra_cfg, command):
    validate(hydra_cfg(command), command)


@pytest.mark.parametrize(
    "name, kwargs, phrase",
    [
        ("mlp", {"hidden": [-5]}, "hidden=[-5]"),
        ("mlp", {"hidden": [0]}, "hidden=[0]"),
        ("mlp", {"dropout": -0.5}, "dropout=-0.5"),
        ("convnet", {"channels": [0, 0]}, "channels=[0, 0]"),
        ("convnet", {"dropout": 1.5}, "dropout=1.5"),
    ],
)
def test_model_sizes_out_of_range_are_refused_before_anything_is_built(name, kwargs, phrase):
    with pytest.raises(KdError, match=re.escape(f"{name} {phrase}")):
        MODELS.build(name, (1, 28, 28), 10, **kwargs)


# ----------------------------------------------------------------------------------------------
# A stop: reported as a stop, with a hint that works


# A user module whose ONNX exporter behaves as torch.export does when Ctrl-C lands inside it:
# the signal's KeyboardInterrupt is caught and re-raised as its own error, in colour.
WRAPPED_INTERRUPT = """
import os, signal
from kdcli.deploy import formats

def onnx(*args):
    try:
        os.kill(os.getpid(), signal.SIGINT)
        signal.pause()
    except BaseException as e:
        raise RuntimeError("Failed to export the model. \\x1b[96mThis is step 1/3\\x1b[0m of exporting.") from e

formats.EXPORTERS["onnx"] = onnx
"""


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    r = run_kd("train-teacher", *SMOKE, cwd=folder)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = folder.glob("runs/train_teacher/*/checkpoints/teacher_best.pt")
    return path


@pytest.mark.slow
def test_ctrl_c_inside_an_exporter_is_an_interrupt_with_a_hint_that_works(kd, checkpoint_file):
    (kd.dir / "wraps.py").write_text(WRAPPED_INTERRUPT)
    r = kd("export", f"checkpoint={checkpoint_file}", "formats=[onnx]", f"imports=[{kd.dir / 'wraps.py'}]")
    out = r.stdout + r.stderr
    assert r.returncode == 130, out
    assert "Traceback" not in out and "error:" not in out, out
    assert "Interrupted (SIGINT). To finish: run the same kd export command again" in flat(out), out
    assert "resume=" not in out.replace("no resume=", ""), out
    (metrics_file,) = kd.dir.glob("runs/export/*/metrics.json")
    assert "\x1b" not in metrics_file.read_text() and "\\u001b" not in metrics_file.read_text()
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "interrupted" and "resume=" not in metrics["resume"].replace("no resume=", "")


def test_only_commands_with_resume_offer_it():
    assert _stop_hint("distill", Path("/r/d"), False) == "To continue: kd distill resume=/r/d"
    for command in ("export", "evaluate", "quantize"):
        hint = _stop_hint(command, Path("/r/d"), False)
        assert "resume=/" not in hint and "again" in hint, hint
    assert "resume=auto" not in _stop_hint("export", Path("/r/m/0"), True)


def test_colour_codes_never_reach_metrics_json(tmp_path):
    finish = finisher(tmp_path, {})
    finish("failed", error="\x1b[96mstep 1/3\x1b[0m failed")
    assert json.loads((tmp_path / "metrics.json").read_text())["error"] == "step 1/3 failed"


# ----------------------------------------------------------------------------------------------
# resume=auto and a recorded pid that another process holds now


def record(**changes) -> dict:
    return {**run_record("train_teacher", []), **changes}


def test_a_run_is_alive_only_while_its_own_process_runs():
    assert resume.liveness(record()) == "running"  # this process, as it recorded itself
    assert resume.liveness(record(pid=1)) == "ended"  # pid 1 runs, but started at another time
    assert resume.liveness(record(pid=1, pid_started=resume.process_start(1))) == "running"
    assert resume.liveness(record(status="interrupted")) == "ended"
    assert resume.liveness(record(host="elsewhere")) == "ended"


def test_a_live_pid_without_a_start_time_is_said_to_be_undecidable(tmp_path):
    metrics = record(pid=1, pid_started=None)  # a record of an older kdcli
    assert resume.liveness(metrics) == "unknown" and resume.alive(metrics)
    why = flat(resume.still_running(metrics, tmp_path))
    assert "cannot tell whether it is that run" in why and f"resume={tmp_path}" in why


def unfinished_run(runs: Path, metrics: dict, config: dict) -> Path:
    run = runs / "train_teacher" / "2026-01-01_00-00-00-000000"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "teacher_resume.pt").write_bytes(b"state")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_resume_auto_continues_a_killed_run_whose_pid_was_reused(tmp_path):
    config = {"seed": 0, "teacher": {"name": "mlp"}}
    run = unfinished_run(tmp_path, record(pid=1), config)  # killed; its pid now belongs to init
    assert resume.find_unfinished(str(tmp_path), "train_teacher", config, tmp_path / "new") == run.resolve()


def test_resume_auto_leaves_a_live_run_alone_and_says_why(tmp_path, caplog):
    config = {"seed": 0}
    run = unfinished_run(tmp_path, record(), config)
    with caplog.at_level(logging.INFO, logger="kdcli"):
        assert resume.find_unfinished(str(tmp_path), "train_teacher", config, tmp_path / "new") is None
    assert f"{run.resolve()} is not continued: it is still running (process {os.getpid()}" in caplog.text


# ----------------------------------------------------------------------------------------------
# A metrics.json that is not what kdcli wrote


@pytest.mark.parametrize("content", ["[1, 2]", "null", '"running"', "42", "{broken", ""])
def test_a_metrics_json_that_is_no_object_reads_as_empty(tmp_path, content):
    (tmp_path / "metrics.json").write_text(content)
    assert resume.read_metrics(tmp_path) == {}


def test_a_fifo_named_metrics_json_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "metrics.json")  # opening it to read would wait for a writer forever
    assert resume.read_metrics(tmp_path) == {}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "list"])
def test_distill_is_not_stopped_by_a_foreign_metrics_json_under_runs_dir(kd, kind):
    for command in ("train_teacher", "distill"):
        folder = kd.dir / "runs" / command / "2026-01-01_00-00-00-000000"
        folder.mkdir(parents=True)
        if kind == "fifo":
            os.mkfifo(folder / "metrics.json")
        else:
            (folder / "metrics.json").write_text("[1, 2]")
    r = kd("distill", *SMOKE, "resume=auto", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------
# kd report on damaged run folders; small fronts


BAD_JSON = ["{broken", "[1, 2]", "null", '"text"']


@pytest.mark.slow
@pytest.mark.parametrize("content", BAD_JSON)
def test_kd_report_of_a_run_with_a_damaged_metrics_json_is_one_error(kd, content):
    run = kd.dir / "run"
    run.mkdir()
    (run / "metrics.json").write_text(content)
    assert_one_error(kd("report", str(run)), "metrics.json", names=run)


@pytest.mark.slow
@pytest.mark.parametrize("metrics, overrides", [(c, "[T=1]") for c in BAD_JSON] + [("{}", "{a: [b"), ("{}", "7")])
def test_kd_report_of_a_sweep_with_damaged_job_files_ends_without_a_traceback(kd, metrics, overrides):
    for job, T in (("0", 1), ("1", 2)):
        (kd.dir / "sweep" / job / ".hydra").mkdir(parents=True)
        (kd.dir / "sweep" / job / ".hydra" / "overrides.yaml").write_text(f"[T={T}]")
        (kd.dir / "sweep" / job / "metrics.json").write_text('{"status": "completed"}')
    (kd.dir / "sweep" / "0" / "metrics.json").write_text(metrics)
    (kd.dir / "sweep" / "0" / ".hydra" / "overrides.yaml").write_text(overrides)
    r = kd("report", str(kd.dir / "sweep"))
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert (kd.dir / "sweep" / "summary.csv").is_file()


@pytest.mark.slow
def test_a_superscript_digit_is_no_number_of_classes(kd):
    assert_one_error(kd("list", "models", "classes=²"), "classes=²: give the number of classes")


@pytest.mark.slow
def test_shell_completion_without_a_command_says_where_it_belongs(kd):
    r = kd("--shell-completion")
    assert r.returncode == 2 and "kd <command> --shell-completion" in r.stdout, r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------
# A corrupt image file read by a loader worker


@pytest.mark.slow
def test_evaluate_of_a_run_whose_test_png_was_corrupted_is_one_error_not_a_hang(kd):
    from dataset_files import image_folder

    photos = kd.dir / "data" / "photos"
    image_folder(photos / "train", ["cat", "dog"], 20, size=(16, 16))
    image_folder(photos / "test", ["cat", "dog"], 6, size=(16, 16), seed=1)
    r = kd("distill", "debug=smoke", "dataset=imagefolder", "dataset.root=data/photos", "baseline=false", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    run = next((kd.dir / "runs" / "distill").iterdir())
    bad = photos / "test" / "cat" / "2.png"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated inside the image data
    # The error used to be printed, then the exit waited forever on a loader worker that ignores SIGTERM.
    r = kd("evaluate", f"run={run}", timeout=120)
    assert_one_error(r, "cannot decode image", "image file is truncated", names=bad)


# ----------------------------------------------------------------------------------------------
# Two runs at once in one runs_dir


@pytest.mark.slow
def test_two_distills_started_at_once_without_a_teacher_do_not_corrupt_each_other(tmp_path):
    procs = [start_kd(tmp_path, "distill", "debug=smoke") for _ in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    runs = sorted((tmp_path / "runs").glob("*/*/metrics.json"))
    assert len([m for m in runs if m.parent.parent.name == "distill"]) == 2, runs
    for m in runs:
        metrics = json.loads(m.read_text())  # complete JSON: no write interleaved with another
        assert metrics["status"] == "completed", (m, metrics)
        if m.parent.parent.name == "distill":
            ckpt = checkpoint.load(metrics["teacher"]["checkpoint"])  # CRCs and all: not half-written
            assert ckpt["arch"]["name"] == "convnet"
    for out in outs:  # each says where its teacher came from
        said = flat(out)
        assert "(trained now)" in said or "(latest train-teacher run of this recipe)" in said, out


# ----------------------------------------------------------------------------------------------
# Paths in the config that the system will not look up, and folders it may not read


@pytest.fixture
def symlink_loop(tmp_path) -> Path:
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    return tmp_path / "loop_a"


@pytest.mark.parametrize(
    "command, key, value, message",
    [
        ("distill", "teacher.ckpt", "x" * 5000, "teacher.ckpt=xxxx"),
        ("distill", "teachers", "[{}]", "teachers[0]="),
        ("evaluate", "checkpoints", "[{}]", "checkpoints[0]="),
        ("evaluate", "reference", "{}/x.pt", "reference="),
        ("export", "checkpoint", "{}", "checkpoint="),
        ("export", "out_dir", "y" * 300, "out_dir=yyyy"),
        ("quantize", "run", "{}", "run="),
    ],
)
def test_a_path_the_system_will_not_look_up_is_refused_by_key(hydra_cfg, symlink_loop, command, key, value, message):
    cfg = hydra_cfg(command, [f"{key}={value.format(symlink_loop)}"])
    with pytest.raises(KdError) as e:
        validate(cfg, command)
    text = str(e.value)
    assert text.startswith(message) and ("Too many levels of symbolic links" in text or "File name too long" in text)
    assert len(text) < 200, text  # a 5000-character value is cut in the message


def test_a_folder_that_cannot_be_read_is_an_imagefolder_error(tmp_path, monkeypatch):
    from kdcli.data import folder

    (tmp_path / "cat").mkdir()

    def scandir(path):  # what /proc/1 gives: its cwd link may not be followed
        raise PermissionError(13, "Permission denied", str(tmp_path / "cwd"))

    monkeypatch.setattr(folder.os, "scandir", scandir)
    with pytest.raises(KdError, match=r"imagefolder: cannot read .*cwd: Permission denied. Fix: dataset.root=PATH"):
        folder._scan(tmp_path)


@pytest.mark.slow
def test_the_hostile_paths_of_the_issue_are_one_error_each(kd, symlink_loop):
    assert_one_error(kd("evaluate", f"checkpoints=[{symlink_loop}]"), "Too many levels of symbolic links")
    r = kd("distill", f"teacher.ckpt={'x' * 5000}", *SMOKE)
    assert_one_error(r, "teacher.ckpt=", "File name too long", "(5000 characters)")
    assert not (kd.dir / "runs" / "train_teacher").exists()  # refused before a teacher was trained
    r = kd("distill", "dataset=imagefolder", "dataset.root=/proc/1", *SMOKE)
    assert_one_error(r, "imagefolder", "/proc/1")


# ----------------------------------------------------------------------------------------------
# Command lines that Hydra or OmegaConf would answer with a traceback, with its message and no
# `error:`, or by silently taking another value: refused by the front before anything is written


@pytest.fixture
def front(tmp_path, monkeypatch, capsys):
    """kd's front in this process: (exit code, output on one line). Refusals end before Hydra runs."""
    from kdcli.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def call(*args: str) -> tuple[int, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, flat(out.out + out.err)

    return call


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["distill", "-m", "T=interval(0,1)"], "'T=interval(0,1)': Hydra's basic sweeper runs listed values"),
        (["distill", "-m", "T=1,2", "hydra.sweeper.max_batch_size=0"], "hydra.sweeper.max_batch_size=0: give the"),
        (["distill", "-m", "T=1", "hydra.sweeper.max_batch_size=abc"], "hydra.sweeper.max_batch_size=abc: Value"),
        (["export", "-m", "+hydra.sweeper.max_batch_size=???"], "??? is OmegaConf's mark of a missing value"),
        (["distill", "T=???"], "'T=???': ??? is OmegaConf's mark of a missing value; give T a value."),
        (["distill", "T=1,2"], "'T=1,2' is a sweep: add -m to run one job per value"),
        (["distill", "T=abc"], "T=abc: Value 'abc' of type 'str' could not be converted to Float"),
        (["distill", "-m", "T=1,abc"], "T=abc: Value 'abc' of type 'str' could not be converted to Float"),
        (["distill", "trainer.epochs=1.5"], "trainer.epochs=1.5: Value '1.5' of type 'float' could not be"),
        (["distill", "--cfg", "job", "seed=[1]"], "seed=[1]: Value '[1]' of type 'list' could not be converted"),
        (["export", "formats.sub=x"], "Unknown key 'formats.sub': formats is a list (4 entries), not a group"),
        (["export", "formats.7=onnx"], "Unknown key 'formats.7': formats is a list"),
        (["distill", "T.x=1"], "Unknown key 'T.x': T is a value, not a group of keys"),
        (["distill", "features.at.weight=1"], "features has no key 'at' (keys: (none)). Choose the option first"),
        (["distill", "baseline=2"], "baseline=2: baseline takes true or false"),
        (["distill", "baseline=yes"], "baseline=yes: baseline takes true or false"),
        (["distill", "-m", "baseline=true,2"], "baseline=2: baseline takes true or false"),
        (["evaluate", "figures=0"], "figures=0: figures takes true or false"),
        (["distill", "optimizer.nesterov=sometimes"], "optimizer.nesterov=sometimes: optimizer.nesterov takes true"),
        (
            ["distill", "teachers=[a.pt,b.pt]", "teacher=resnet8"],
            "'teacher=resnet8' and teachers=[...] both given: with teachers=[...] each teacher's architecture",
        ),
        (["distill", "teacher.hidden=[5]", "teachers=[a.pt]"], "Drop 'teacher.hidden=[5]', or give one teacher as"),
        (["distill", "-m", "T=1,2", "--cfg", "job"], "--cfg and -m do not go together: give one of -m, --cfg"),
        (["distill", "-m", "student=glob(zz*)"], "'student=glob(zz*)' matches no student option. Options for"),
    ],
)
def test_a_command_line_hydra_would_crash_on_is_one_error(front, tmp_path, args, phrase):
    code, out = front(*args, "debug=smoke")
    assert code == 1 and "Traceback" not in out and "HYDRA_FULL_ERROR" not in out, out
    assert out.count("error:") == 1 and phrase in out, out
    assert not (tmp_path / "runs").exists()  # refused before Hydra made a run directory


@pytest.mark.parametrize(
    "args",
    [
        ["distill", "baseline=false", "trainer.deterministic=True"],
        ["distill", "-m", "baseline=true,false"],
        ["distill", "teachers=[]", "teacher=mlp"],  # no teachers: the teacher group is the one used
        ["export", "formats.0=onnx"],  # an index of the list
        ["distill", "features=at", "features.at.weight=2"],
        ["distill", "-m", "student=glob(ml*)", "teacher=glob(lenet*)"],  # globs list a group's options
    ],
)
def test_what_those_checks_let_through(args):
    from kdcli.app import _check_start
    from kdcli.cli import COMMANDS
    from kdcli.overrides import _prepare

    command = COMMANDS[args[0]][0]
    _prepare(command, args[1:])
    _check_start(command, args[1:], print_only=True)  # composes each job's config, runs nothing


# ----------------------------------------------------------------------------------------------
# Checkpoints that are not what kdcli wrote, given to each command that reads one


ODD_CHECKPOINTS = {
    "a dict without kdcli's fields": ({"weights": [1, 2]}, "not a kdcli checkpoint"),
    "a list": ([1, 2], "not a kdcli checkpoint"),
    "a tensor": (torch.zeros(3), "not a kdcli checkpoint"),
    "None": (None, "not a kdcli checkpoint"),
    "kdcli's header, arch a string": ({"format": checkpoint.FORMAT, "arch": "mlp"}, "no arch {name, kwargs}"),
}
GIVEN_AS = {
    "distill": "teacher.ckpt={}",
    "evaluate": "checkpoints=[{}]",
    "export": "checkpoint={}",
    "quantize": "checkpoint={}",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, odd",
    [(c, "kdcli's header, arch a string") for c in GIVEN_AS]
    + [
        ("distill", "a list"),
        ("evaluate", "a tensor"),
        ("export", "None"),
        ("quantize", "a dict without kdcli's fields"),
    ],
)
def test_a_checkpoint_that_kdcli_did_not_write_is_one_error_in_every_command(kd, command, odd):
    content, phrase = ODD_CHECKPOINTS[odd]
    path = kd.dir / "odd.pt"
    torch.save(content, path)
    before = path.read_bytes()
    r = kd(command, GIVEN_AS[command].format(path), *(SMOKE if command == "distill" else ["debug=smoke"]))
    assert_one_error(r, phrase, names=path)
    assert path.read_bytes() == before  # read, never rewritten or removed


@pytest.mark.parametrize("case", ["a 5000-character name", "a symbolic link loop", "/proc/1"])
def test_kd_report_of_a_path_the_system_refuses_is_one_error(front, symlink_loop, case):
    path, phrase = {
        "a 5000-character name": ("x" * 5000, "File name too long"),
        "a symbolic link loop": (str(symlink_loop), "Too many levels of symbolic links"),
        "/proc/1": ("/proc/1", ""),  # its cwd link may not be followed (what it says depends on who runs it)
    }[case]
    code, out = front("report", path)
    assert code == 1 and "Traceback" not in out and out.count("error:") == 1 and phrase in out, out
    assert len(out) < 400, out  # the long name is cut


def test_kd_report_of_a_folder_that_cannot_be_read_is_one_error(front, tmp_path, monkeypatch):
    folder = tmp_path / "sweep"
    folder.mkdir()

    def iterdir(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", iterdir)
    code, out = front("report", str(folder))
    assert code == 1 and "Traceback" not in out and out.count("error:") == 1, out
    assert f"kd report {folder}: {folder}: Permission denied." in out, out


@pytest.mark.parametrize("case", ["a 5000-character name", "a symbolic link loop"])
def test_resume_of_a_path_the_system_refuses_is_one_error(front, symlink_loop, case):
    value, phrase = {
        "a 5000-character name": ("x" * 5000, "File name too long"),
        "a symbolic link loop": (str(symlink_loop), "Too many levels of symbolic links"),
    }[case]
    code, out = front("distill", f"resume={value}", "debug=smoke")
    assert code == 1 and "Traceback" not in out and out.count("error:") == 1, out
    assert out.startswith("error: resume=") and phrase in out and len(out) < 300, out
