"""Fuzzed command lines for every kd subcommand (issue 18): real keys, groups and values mixed
with typos, wrong types, out-of-range numbers, odd strings (empty, 5000 characters, unicode,
interpolations, Hydra grammar), sweeps and paths that are directories, devices, symbolic link
loops or damaged files. Whatever the line, `kd` ends with exit code 0 or 1, never a traceback
or a hang, and a failure says `error:`.

Reproducible: derandomized, no example database. KDCLI_FUZZ_EXAMPLES=N runs N examples per
command instead of the default (the findings so far are regression tests in test_reliability.py)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import kd_env, run_kd
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from kdcli.training import checkpoint

EXAMPLES = int(os.environ.get("KDCLI_FUZZ_EXAMPLES", "5"))
HANG_S = 300  # hang detection only: a smoke run takes seconds
LONG, NAME_300 = "<5000 characters>", "<300 characters>"  # written out when the command runs (short reports)
COMMANDS = ["train-teacher", "distill", "evaluate", "export", "quantize", "list", "report"]


@dataclass
class World:
    """The files the fuzzed command lines point at, made once per module."""

    root: Path
    data: Path
    teacher: Path  # a real checkpoint (kd train-teacher debug=smoke teacher=mlp)
    teacher_run: Path
    odd: list[Path]  # files that are not what kdcli wrote
    loop: Path  # a symbolic link loop
    dangling: Path  # a symbolic link to nothing
    reports: list[Path]  # run and sweep folders with damaged files, for kd report


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("fuzz"))


def make_world(root: Path) -> World:
    from dataset_files import cifar10, image_folder

    r = run_kd("train-teacher", "debug=smoke", "teacher=mlp", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    (teacher,) = root.glob("runs/train_teacher/*/checkpoints/teacher_best.pt")
    data = root / "data"
    image_folder(data / "photos" / "train", ["cat", "dog"], 8, size=(16, 16))
    image_folder(data / "photos" / "test", ["cat", "dog"], 4, size=(16, 16), seed=1)
    cifar10(data)  # present, so that dataset=cifar10 never downloads

    odd = root / "odd"
    odd.mkdir()
    good = torch.load(teacher, weights_only=True)
    for name, content in {
        "list.pt": [1, 2],
        "tensor.pt": torch.zeros(3),
        "none.pt": None,
        "no_fields.pt": {"weights": 1},
        "header_only.pt": {"format": checkpoint.FORMAT},
        "no_data.pt": {k: v for k, v in good.items() if k != "data"},
        "huge_hidden.pt": {**good, "arch": {"name": "mlp", "kwargs": {"hidden": [10**12]}}},
    }.items():
        torch.save(content, odd / name)
    (odd / "truncated.pt").write_bytes(teacher.read_bytes()[:1000])
    (odd / "empty.onnx").write_bytes(b"")
    (odd / "text.safetensors").write_text("not a safetensors file")
    os.mkfifo(odd / "fifo.pt")

    loop, dangling = root / "loop_a", root / "dangling"
    os.symlink(root / "loop_b", loop)
    os.symlink(loop, root / "loop_b")
    os.symlink(root / "nowhere", dangling)

    reports = []
    records = {"broken": "{broken", "list": "[1, 2]", "null": "null", "ok": '{"status": "completed"}'}
    for name, content in records.items():
        (root / "report" / name).mkdir(parents=True)
        (root / "report" / name / "metrics.json").write_text(content)
        reports.append(root / "report" / name)
    sweep = root / "report" / "sweep"
    for job, overrides in (("0", "[T=1]"), ("1", "{a: [b"), ("2", "7")):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text(overrides)
        (sweep / job / "metrics.json").write_text('{"status": "completed", "student": {"test_acc": 0.5}}')
    (root / "report" / "fifo").mkdir()
    os.mkfifo(root / "report" / "fifo" / "metrics.json")
    (root / "report" / "empty").mkdir()
    reports += [sweep, root / "report" / "fifo", root / "report" / "empty"]
    return World(root, data, teacher, teacher.parents[1], sorted(odd.iterdir()), loop, dangling, reports)


# ----------------------------------------------------------------------------------------------
# The vocabulary: real keys and values, and what a careless or hostile user types instead


def odd_strings(w: World) -> list[str]:
    return [
        "",
        LONG,
        "é中²🙂",
        "/proc/1",
        "/dev/null",
        str(w.loop),
        str(w.dangling),
        "${oc.env:NOPE_NOT_SET}",
        "${T}",
        "${oc.env:PATH}",
        "null",
        "???",
        "[]",
        "[1,[2]]",
        "{a: 1}",
        "'quoted'",
        "a b",
        "nan",
        "inf",
        "-inf",
        "1e999",
        "-1",
        "0",
        "18446744073709551616",
        "true",
        "\\",
        "%",
        "a=b",
        "interval(0,1)",
        "choice(1,2)",
        "range(0,3)",
        "[",
        "\t",
    ]


NUMBERS = ["0", "-1", "1", "2", "0.5", "1.5", "1e6", "1000001", "100000000000000000000", "abc", "nan", "inf"]
BOOLS = ["true", "false", "True", "2", "1", "yes", "sometimes", "null"]


def keys(command: str, w: World) -> dict[str, list[str]]:
    """Per command, its keys and group names with values that exist and values that do not."""
    teacher, run = str(w.teacher), str(w.teacher_run)
    odd = [str(p) for p in w.odd]
    files = [teacher, *odd]
    common = {
        "seed": ["0", "1", "-1", "4294967296", "abc"],
        "device": ["cpu", "auto", "cuda", "cuda:7", "mps", "gpu"],
        "data_root": [str(w.data), "/proc/1", "/dev/null", "relative"],
        "runs_dir": ["runs", "sub/runs", "/proc/1", "/dev/null", NAME_300],
        "imports": ["[]", "[nope_module]", "[/dev/null]", f"[{w.loop}]", "[os]", "nope_module"],
        "hydra.run.dir": ["here", "/dev/null", "/proc/1/x", ""],
        "hydra.job.chdir": ["true", "false", "2"],
        "hydra.sweeper.max_batch_size": ["0", "1", "-1", "abc", "null"],
        "hydra/launcher": ["joblib", "basic", "nope"],
        "hydra.verbose": ["true", "kdcli"],
    }
    training = {
        "teacher": ["mlp", "lenet5", "convnet", "resnet8", "mlpp", "tv_nope", "glob(ml*)", "glob(zz*)"],
        "teacher.hidden": ["[8]", "[-5]", "[0]", "5", "[10000000000]", "abc"],
        "teacher.channels": ["[4,8]", "[0,0]", "[1]"],
        "teacher.dropout": ["0.1", "-0.5", "1.5", "abc"],
        "dataset": ["mnist5k", "imagefolder", "cifar10", "cifar11"],
        "dataset.root": ["photos", "/proc/1", "/dev/null", str(w.loop), "missing"],
        "dataset.val_size": ["0.2", "100", "0", "1.5", "inf", "nan", "-1", "1000000"],
        "dataset.split_seed": ["1", "-1", "18446744073709551616"],
        "dataset.classes": ["[0,1]", "[cat,dog]", "10", "[0]", "[0,0]", "[99,100]", "abc", "[é]"],
        "dataset.limit": ["1", "2", "10", "0", "-1"],
        "dataset.shift": ["0", "4", "65", "1000000000", "-1"],
        "dataset.flip": BOOLS,
        "dataset.storage": ["auto", "memory", "stream", "disk"],
        "dataset.workers": ["0", "1", "-1", "1000000", "abc"],
        "optimizer": ["sgd", "adam", "adamw", "rmsprop"],
        "optimizer.lr": ["0.01", "0", "-1", "1e999", "abc", "nan"],
        "optimizer.momentum": ["0.5", "2", "-1", "nan"],
        "optimizer.nesterov": BOOLS,
        "optimizer.weight_decay": ["0", "-1", "1e9", "abc"],
        "scheduler": ["cosine", "step", "onecycle", "none", "linear"],
        "scheduler.min_lr": ["0", "-1", "abc", "1e999"],
        "scheduler.warmup_epochs": ["0", "1", "-1", "100"],
        "trainer": ["default", "gpu", "tpu"],
        "trainer.epochs": ["1", "2", "0", "-1", "1000001", "100000000000000000000", "1.5", "abc"],
        "trainer.batch_size": ["1", "7", "0", "-1", "100000000"],
        "trainer.eval_batch_size": ["1", "0", "-1"],
        "trainer.max_batches": ["1", "2", "0", "-1"],
        "trainer.grad_clip": ["1", "0", "-1", "nan"],
        "trainer.label_smoothing": ["0.1", "1", "-0.1"],
        "trainer.save_every_min": ["0", "0.0001", "-1", "null"],
        "trainer.nonfinite": ["stop", "skip", "ignore"],
        "trainer.selection": ["last", "val_acc", "val_nll", "best"],
        "trainer.precision": ["fp32", "bf16", "fp16", "fp8"],
        "trainer.deterministic": BOOLS,
        "trainer.compile": ["false", "maybe"],
        "augment": ["standard", "affine", "none", "true", "random"],
        "resume": ["auto", run, "/proc/1", str(w.loop), "", "missing_run", "a,b", LONG],
    }
    distill = {
        "student": ["mlp", "lenet5", "convnet", "resnet8", "nope", "glob(lenet*)", "glob(zz*)"],
        "student.hidden": ["[8]", "[-5]", "[0]", "[]", "5"],
        "student.dropout": ["0", "-0.5", "1", "abc"],
        "loss": ["kd", "dkd", "mse", "ls", "soft_ce", "dist", "nope"],
        "method": ["standard", "ta", "born_again", "dml", "joint", "nope"],
        "method.peers": ["2", "1", "0", "65", "1000000", "abc"],
        "method.generations": ["1", "2", "0", "101", "abc"],
        "method.assistants": ["[lenet5]", "[]", "[nope]", "lenet5"],
        "features": ["at", "fitnet", "rkd", "[at,rkd]", "null", "nope"],
        "T": ["1", "4", "0", "-1", "nan", "inf", "1e-30", "abc", "${T}"],
        "alpha": ["0", "0.5", "1", "-0.1", "1.1", "nan"],
        "baseline": BOOLS,
        "distill_lr_scale": ["auto", "1", "0", "101", "-1", "abc"],
        "teacher.ckpt": files + [LONG, str(w.loop), "/proc/1", "missing.pt"],
        "teachers": [f"[{teacher},{teacher}]", f"[{teacher}]", "[]", f"[{odd[0]}]", f"[{w.loop}]", teacher],
        "teacher_weights": ["[1]", "[1,2]", "[0]", "[-1]", "[]"],
        "teacher_merge": ["auto", "probs", "logits", "conditional", "max"],
        "teacher_train.trainer.epochs": ["1", "0", "abc"],
        "teacher_train.nope": ["1"],
        "schedule.T": ["constant", "linear", "cosine", "step", "jump"],
        "schedule.T_end": ["1", "0", "-1", "null"],
        "schedule.alpha_end": ["0.5", "2"],
        "confidence_weights": BOOLS,
        "confidence_temperature": ["1", "0", "-1"],
        "transfer.init_from_teacher": BOOLS,
        "transfer.freeze": ["[]", "[nope]", "[0]"],
        "transfer.freeze_epochs": ["1", "-1", "null"],
        "teacher_cache": ["auto", "off", "on"],
        "prune.kind": ["none", "unstructured", "channel", "random"],
        "prune.final": ["0.5", "1", "-1"],
        "prune.every": ["1", "0"],
    }
    latency = {
        "latency.batch_size": ["1", "0", "-1", "100000000"],
        "latency.warmup": ["0", "1", "-1", "1000000000"],
        "latency.repeats": ["0", "1", "-1", "1000000000"],
        "latency.threads": ["1", "0", "-1", "1000000", "null"],
    }
    source = {
        "checkpoint": files + [LONG, str(w.loop), "/proc/1", "/dev/null", run],
        "run": [run, *map(str, w.reports), "/proc/1", "/dev/null", str(w.loop), ""],
        "out_dir": ["out", "/proc/1", "/dev/null", NAME_300, str(w.loop), ""],
        "opset": ["18", "17", "99", "-1", "1000000000", "abc"],
    }
    if command == "train-teacher":
        return {**common, **training}
    if command == "distill":
        return {**common, **training, **distill}
    if command == "evaluate":
        return {
            **common,
            **latency,
            "checkpoints": [f"[{teacher}]", f"[{teacher},{teacher}]", "[]", *(f"[{f}]" for f in files)],
            "checkpoints.0": [teacher, "x"],
            "run": source["run"],
            "reference": files + [str(w.loop), "/dev/null"],
            "split": ["test", "val", "train", "nope"],
            "limit": ["1", "10", "0", "-1", "100000000000000000000"],
            "eval_batch_size": ["1", "0", "-1"],
            "labels": ["[a]", "[a,b,c]", "[]", "[é中]", f"[{LONG}]", "[../../etc]"],
            "figures": BOOLS,
            "trust_programs": BOOLS,
        }
    if command == "export":
        return {
            **common,
            **source,
            "formats": ["[onnx]", "[safetensors]", "[torchscript]", "[torch_export]", "[]", "[nope]", "onnx"],
            "formats.sub": ["x"],
            "check_batches": ["1", "0", "-1", "1000000000"],
            "batch_size": ["1", "0", "-1"],
            "atol": ["0", "-1", "nan", "inf", "abc"],
        }
    if command == "quantize":
        return {
            **common,
            **source,
            **latency,
            "modes": ["[dynamic]", "[static]", "[]", "[nope]", "dynamic"],
            "calibration": ["1", "0", "-1", "1000000000"],
            "per_channel": BOOLS,
            "static_format": ["qdq", "qoperator", "nope"],
            "limit": ["1", "0", "-1"],
        }
    raise ValueError(command)


def typo(key: str) -> st.SearchStrategy[str]:
    """A key with one character dropped, doubled or swapped with the next."""
    i = st.integers(0, max(0, len(key) - 2))
    return st.one_of(
        i.map(lambda k: key[:k] + key[k + 1 :]),
        i.map(lambda k: key[: k + 1] + key[k:]),
        i.map(lambda k: key[:k] + key[k + 1 : k + 2] + key[k : k + 1] + key[k + 2 :]),
    )


@st.composite
def override(draw, vocabulary: dict[str, list[str]], odd: list[str]) -> str:
    key = draw(st.sampled_from(sorted(vocabulary)))
    value = draw(st.sampled_from(vocabulary[key]) if draw(st.integers(0, 3)) else st.sampled_from(odd))
    form = draw(st.integers(0, 19))
    if form == 0:
        key = draw(typo(key))
    if form == 1:
        return f"~{key}"
    if form == 2:
        return f"+{key}={value}"
    if form == 3:
        return f"++{key}={value}"
    if form == 4:
        return key  # no value at all
    if form == 5:  # a sweep: a job per value
        return f"{key}={value},{draw(st.sampled_from(vocabulary[key]))}"
    return f"{key}={value}"


@st.composite
def command_line(draw, command: str, w: World) -> list[str]:
    odd = odd_strings(w)
    if command == "report":
        paths = [*map(str, w.reports), str(w.loop), "/proc/1", *odd[:3]]
        return draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3))
    if command == "list":
        words = ["models", "losses", "features", "methods", "datasets", "res*", "*", "vgg?", "nope", "[", "mlp"]
        words += ["dataset=mnist5k", "dataset=imagefolder", "dataset=nope", "input=3,32,32", "input=0,1,1"]
        words += ["input=3,1000,1000", "input=abc", "classes=10", "classes=0", "classes=²", "classes=-1"]
        words += ["imports=[nope]", "imports=[/dev/null]", "--help", *(f"dataset={s}" for s in odd[:4])]
        return draw(st.lists(st.sampled_from(words), max_size=4))
    vocabulary = keys(command, w)
    args = draw(st.lists(override(vocabulary, odd), min_size=1, max_size=3))
    flag = draw(st.sampled_from([[]] * 6 + [["-m"]] * 3 + [["--cfg", "job"], ["--help"], ["--info"]]))
    # Half the lines start from a real model, so that the odd values reach the code that uses them.
    model = {
        "distill": ["teacher=mlp", f"teacher.ckpt={w.teacher}"],
        "evaluate": [f"checkpoints=[{w.teacher}]"],
        "export": [f"checkpoint={w.teacher}"],
        "quantize": [f"checkpoint={w.teacher}"],
    }.get(command, [])
    args = ["debug=smoke", *(model if draw(st.booleans()) else []), *args]
    at = draw(st.integers(0, len(args)))  # a flag may stand anywhere among the overrides
    return args[:at] + flag + args[at:]


# ----------------------------------------------------------------------------------------------
# Running one line, and what its outcome must be


def written_out(arg: str) -> str:
    return arg.replace(LONG, "x" * 5000).replace(NAME_300, "y" * 300)


def outcome(command: str, args: list[str], w: World) -> str | None:
    """None if `kd command args` ended as it must, else what went wrong."""
    cwd = Path(tempfile.mkdtemp(dir=w.root, prefix="example-"))
    env = {**kd_env(cwd), "KDCLI_DATA": str(w.data)}
    line = f"kd {command} {shlex.join(args)}"
    p = subprocess.Popen(
        [sys.executable, "-m", "kdcli", command, *map(written_out, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,  # a hang is ended with all its processes (loader workers, joblib)
    )
    try:
        out, err = p.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return f"no exit within {HANG_S} s (a hang): {line}"
    finally:
        try:  # what the command left running (loader workers ignore SIGTERM) ends with the example
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = (out + err).replace("x" * 5000, LONG)
    shutil.rmtree(cwd, ignore_errors=True)
    if p.returncode not in (0, 1):
        return f"exit code {p.returncode}: {line}\n{text[-3000:]}"
    if "Traceback" in text or "HYDRA_FULL_ERROR" in text:
        return f"a traceback: {line}\n{text[-3000:]}"
    if p.returncode == 1 and not any(row.startswith("error:") for row in text.splitlines()):
        return f"exit 1 without an error: line: {line}\n{text[-3000:]}"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example is a real command (seconds)
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_fuzzed_command_line_ends_in_exit_0_or_1_with_an_error_line_and_no_traceback(world, command, data):
    args = data.draw(command_line(command, world), label="args")
    problem = outcome(command, args, world)
    assert problem is None, problem
