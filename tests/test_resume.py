"""Interrupted runs continue exactly: real `kd` processes killed (SIGKILL), interrupted (SIGINT,
SIGTERM, twice), and resumed; non-finite losses stopped or skipped.

With trainer.deterministic=true a resumed run must end with the same weights and the same
epoch rows (timings aside) as a run that was never interrupted."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import start_kd

from kdcli.training import checkpoint
from kdcli.training import resume as resume_mod

pytestmark = pytest.mark.slow

# Batches of 16: epochs of a few seconds on two cores, long enough to be interrupted inside one.
TEACHER = ["teacher=mlp", "trainer.epochs=3", "trainer.batch_size=16", "trainer.deterministic=true"]
# For the tests that stop a run inside its second epoch: small batches, so an epoch lasts long enough
# (about 0.8 s on an idle 2-core machine, against 0.25 s with TEACHER) for the stop to land in it.
LONG_EPOCHS = [*TEACHER[:2], "trainer.batch_size=4", *TEACHER[3:]]


start = start_kd


def run_kd_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = start(cwd, *args)
    out, _ = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def run_dirs(cwd: Path, command: str) -> list[Path]:
    return sorted((cwd / "runs" / command).glob("*/"))


def rows(run: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    return [{k: v for k, v in r.items() if k != "epoch_s"} for r in map(json.loads, open(run / "metrics.jsonl"))]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"kd ended before the awaited point:\n{proc.stdout.read()}")
        if time.time() > end:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def epochs_done(run_glob, role: str):
    def check() -> int:
        for run in run_glob():
            f = run / "metrics.jsonl"
            if f.is_file():
                return sum(1 for r in map(json.loads, f.read_text().splitlines()) if r["role"] == role)
        return 0

    return check


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = checkpoint.load(a)["state_dict"], checkpoint.load(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_train_teacher_killed_mid_epoch_resumes_to_the_same_weights(kd):
    # Mid-epoch states every 0.12 s, so the kill lands after one of them: the resume starts inside an epoch.
    # CutMix too: each step's draws follow from its seed, so the resumed steps mix as the first run's did.
    args = [*LONG_EPOCHS, "trainer.save_every_min=0.002", "mix=cutmix"]
    ref = kd("train-teacher", *args)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    (reference,) = run_dirs(kd.dir, "train_teacher")

    proc = start(kd.dir, "train-teacher", *args)
    live = lambda: [d for d in run_dirs(kd.dir, "train_teacher") if d != reference]  # noqa: E731
    wait_for(lambda: epochs_done(live, "teacher")() >= 1, proc)
    state = live()[0] / "checkpoints" / "teacher_resume.pt"
    # A mid-epoch state of epoch 2: epochs_done too, since the last state of epoch 1 (step > 0) is still
    # on disk between epoch 1's metrics line and its end-of-epoch state.
    mid_epoch_2 = lambda s: s.get("epochs_done") == 1 and s.get("step", 0) > 0  # noqa: E731
    wait_for(lambda: state.is_file() and mid_epoch_2(resume_mod.load(state)), proc)  # none yet if epoch 1 was quick
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed,) = live()
    assert json.loads((killed / "metrics.json").read_text())["status"] == "running"  # no chance to say more
    saved = resume_mod.load(state)
    assert saved["epochs_done"] == 1 and saved["step"] > 0

    again = kd("train-teacher", *args, "resume=auto")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"continuing {killed}" in " ".join(again.stdout.split())
    (resumed,) = [d for d in live() if d != killed]
    assert json.loads((killed / "metrics.json").read_text())["status"] == "resumed"
    assert rows(resumed) == rows(reference) and len(rows(resumed)) == 3
    for name in ("teacher_best.pt", "teacher_last.pt"):
        assert same_weights(resumed / "checkpoints" / name, reference / "checkpoints" / name)
    done = [json.loads((d / "metrics.json").read_text())["teacher"] for d in (resumed, reference)]
    assert done[0]["test_acc"] == done[1]["test_acc"] and done[0]["test_nll"] == done[1]["test_nll"]
    # Nothing left to resume: resume=auto now starts afresh.
    fresh = kd("train-teacher", *args, "resume=auto", "trainer.epochs=1")
    assert fresh.returncode == 0 and "starting afresh" in " ".join(fresh.stdout.split())


def _teacher(kd) -> str:
    r = kd("train-teacher", "teacher=mlp", "trainer.epochs=1", "dataset.limit=1000")
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = run_dirs(kd.dir, "train_teacher")
    return json.loads((run / "metrics.json").read_text())["teacher"]["checkpoint"]


@pytest.mark.parametrize(
    "method, killed_role, reused",
    [
        (["method=standard"], "student", "scratch"),  # the scratch baseline, then the distilled student
        # FitNets: the hint stage trains the adapters that the second stage goes on with
        (["features=[fitnet]", "features.fitnet.hint_epochs=1", "baseline=false"], "student", "student_hint"),
        (["method=born_again", "method.generations=2"], "student", "gen1"),  # generation 2 is the student
        (["method=dml", "baseline=false"], "peer2", None),  # two peers in one loop
    ],
    ids=["standard", "fitnet_hint", "born_again", "dml"],
)
def test_distill_killed_in_its_last_phase_reuses_finished_phases_and_ends_the_same(kd, method, killed_role, reused):
    pretrained = not any(m in method for m in ("method=born_again", "method=dml"))
    teacher = [f"teacher.ckpt={_teacher(kd)}"] if pretrained else []
    args = [*teacher, "student=mlp", *TEACHER[1:], *method]
    ref = kd("distill", *args)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    (reference,) = run_dirs(kd.dir, "distill")

    proc = start(kd.dir, "distill", *args)
    live = lambda: [d for d in run_dirs(kd.dir, "distill") if d != reference]  # noqa: E731
    wait_for(lambda: epochs_done(live, killed_role)() >= 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed,) = live()
    again = kd("distill", f"resume={killed}")  # the run's own overrides come back with it
    assert again.returncode == 0, again.stdout + again.stderr
    out = " ".join(again.stdout.split())
    if reused:
        assert f"{reused} already trained before the run stopped" in out
    (resumed,) = [d for d in live() if d != killed]
    assert rows(resumed) == rows(reference)
    for ckpt in sorted((reference / "checkpoints").glob("*_best.pt")):
        assert same_weights(resumed / "checkpoints" / ckpt.name, ckpt), ckpt.name
    m_ref, m_res = (json.loads((d / "metrics.json").read_text()) for d in (reference, resumed))
    assert m_res["student"]["test_acc"] == m_ref["student"]["test_acc"]
    assert m_res.get("kd_gain") == m_ref.get("kd_gain")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_reached_and_the_printed_command_continues_it(kd, sig, code):
    ref = kd("train-teacher", *LONG_EPOCHS)
    (reference,) = run_dirs(kd.dir, "train_teacher")
    assert ref.returncode == 0
    proc = start(kd.dir, "train-teacher", *LONG_EPOCHS)
    live = lambda: [d for d in run_dirs(kd.dir, "train_teacher") if d != reference]  # noqa: E731
    wait_for(lambda: epochs_done(live, "teacher")() >= 1, proc)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out
    (stopped,) = live()
    text = " ".join(out.split())
    assert f"Interrupted ({sig.name}). To continue: kd train-teacher resume={stopped}" in text
    metrics = json.loads((stopped / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["signal"] == sig.name
    saved = resume_mod.load(stopped / "checkpoints" / "teacher_resume.pt")
    # The step reached: inside an epoch, or an epoch's end if the signal came during its validation
    # (a mid-epoch state is asserted in the SIGKILL test above).
    assert (saved["epochs_done"], saved["step"]) > (1, 0)  # past the end of epoch 1, seen before the signal
    again = kd("train-teacher", f"resume={stopped}")
    assert again.returncode == 0, again.stdout + again.stderr
    (resumed,) = [d for d in live() if d != stopped]
    assert rows(resumed) == rows(reference)
    assert same_weights(resumed / "checkpoints" / "teacher_best.pt", reference / "checkpoints" / "teacher_best.pt")


def test_ctrl_c_to_the_whole_group_with_loader_processes(kd):
    """A terminal's Ctrl-C reaches the loader processes too: they leave it to the training process.
    The convnet has dropout: the resumed epoch must draw the same masks (loaders take no draws
    from the global generator)."""
    args = [
        "teacher=convnet",
        "trainer.deterministic=true",
        "dataset.storage=stream",
        "dataset.workers=1",
        "trainer.epochs=2",
    ]
    proc = start(kd.dir, "train-teacher", *args, new_session=True)
    wait_for(lambda: epochs_done(lambda: run_dirs(kd.dir, "train_teacher"), "teacher")() >= 1, proc)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "data loader process died" not in out and "Traceback" not in out
    (stopped,) = run_dirs(kd.dir, "train_teacher")
    again = kd("train-teacher", f"resume={stopped}")
    assert again.returncode == 0, again.stdout + again.stderr
    ref = kd("train-teacher", *args)
    assert ref.returncode == 0
    resumed, reference = [d for d in run_dirs(kd.dir, "train_teacher") if d != stopped]
    assert rows(resumed) == rows(reference)


SLOW_MODEL = """
import time
import torch.nn as nn
from kdcli.core.registry import MODELS


class Slow(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc = nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes)

    def forward(self, x):
        if self.training:
            time.sleep(3)  # a long training step
        return self.fc(x.flatten(1))


@MODELS.register("slow_net")
def slow_net(input_shape, num_classes):
    return Slow(input_shape, num_classes)
"""


def test_a_second_ctrl_c_stops_at_once_and_leaves_readable_files(kd):
    module = kd.dir / "slow_models.py"
    module.write_text(SLOW_MODEL)
    proc = start(kd.dir, "train-teacher", f"imports=[{module}]", "teacher=slow_net", "trainer.epochs=1")
    wait_for(lambda: bool(run_dirs(kd.dir, "train_teacher")), proc)
    (run,) = run_dirs(kd.dir, "train_teacher")
    wait_for(lambda: (run / "config.yaml").is_file(), proc)
    busy = kd("train-teacher", f"resume={run}")  # a run still going is not taken over
    said = " ".join(busy.stdout.split())
    assert busy.returncode == 1 and f"that run is not continued: it is still running (process {proc.pid}" in said
    time.sleep(1)  # inside a training step
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert time.time() - sent < 2.5, "the second Ctrl-C did not stop the run at once"  # a step takes 3 s
    assert proc.returncode == 130, out
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    for f in (run / "checkpoints").glob("*.pt") if (run / "checkpoints").is_dir() else []:
        (resume_mod.load if f.name.endswith("_resume.pt") else checkpoint.load)(f)


NAN_MODEL = """
import torch
import torch.nn as nn
from kdcli.core.registry import MODELS


class EveryThirdNaN(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc = nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes)
        self.calls = 0

    def forward(self, x):
        out = self.fc(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls % 3 == 0:
                out = out * float("nan")
        return out


@MODELS.register("nan_net")
def nan_net(input_shape, num_classes):
    return EveryThirdNaN(input_shape, num_classes)
"""


def test_a_non_finite_loss_stops_with_its_step_and_keeps_the_last_good_checkpoint(kd):
    # The step schedule multiplies the learning rate by 1000 after the first epoch: epoch 2 diverges.
    r = kd(
        "train-teacher",
        "teacher=mlp",
        "trainer.epochs=3",
        "dataset.limit=512",
        "scheduler=step",
        "scheduler.step_epochs=1",
        "scheduler.gamma=1000",
    )
    out = " ".join(r.stdout.split())
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    # lr 50 in epoch 2 overflows the loss to NaN, or only to 1e16 and then lr 5e4 in epoch 3 does
    m = re.search(r"The training loss became NaN or infinite at step \d+ of epoch (\d)", out)
    epoch = int(m.group(1))
    assert epoch in (2, 3), out
    assert f"a learning rate too high ({'50' if epoch == 2 else '5e+04'} at that step; optimizer.lr=0.05)" in out
    (run,) = run_dirs(kd.dir, "train_teacher")
    last = run / "checkpoints" / "teacher_last.pt"
    assert f"The last good checkpoints are kept: {last} (epoch {epoch - 1})" in out
    ckpt = checkpoint.load(last)
    assert ckpt["epoch"] == epoch - 1 and all(bool(v.isfinite().all()) for v in ckpt["state_dict"].values())
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"


def test_skipping_non_finite_steps_finishes_the_run_and_counts_them(kd):
    module = kd.dir / "nan_models.py"
    module.write_text(NAN_MODEL)
    common = [f"imports=[{module}]", "teacher=nan_net", "trainer.epochs=2", "dataset.limit=640"]
    stopped = kd("train-teacher", *common)
    assert stopped.returncode == 1 and "at step 3 of epoch 1 (step 3 of the run)" in " ".join(stopped.stdout.split())
    r = kd("train-teacher", *common, "trainer.nonfinite=skip")
    assert r.returncode == 0, r.stdout + r.stderr
    # 640 images, batches of 64: 10 steps per epoch; every third forward is NaN -> 3 skipped in epoch 1
    # (calls 3, 6, 9) and 3 in epoch 2 (calls 12, 15, 18; validation runs in eval mode and does not count).
    assert "skipped 3 of 10 steps with a non-finite loss (first at step 3)" in " ".join(r.stdout.split())
    run = sorted(run_dirs(kd.dir, "train_teacher"))[-1]
    assert [row.get("skipped_steps") for row in rows(run)] == [3, 3]
    assert json.loads((run / "metrics.json").read_text())["teacher"]["skipped_steps"] == 6


def test_a_distill_stopped_while_training_its_teacher_finishes_that_teacher(kd, tmp_path_factory):
    args = ["teacher=mlp", "student=mlp", *TEACHER[1:], "trainer.epochs=2", "baseline=false"]
    other = tmp_path_factory.mktemp("reference")  # its own runs_dir: the reference trains its own teacher
    assert run_kd_in(other, "distill", *args).returncode == 0
    proc = start(kd.dir, "distill", *args)
    teacher_runs = lambda: run_dirs(kd.dir, "train_teacher")  # noqa: E731
    wait_for(lambda: epochs_done(teacher_runs, "teacher")() >= 1, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    (stopped,) = run_dirs(kd.dir, "distill")
    (teacher_run,) = teacher_runs()
    assert json.loads((stopped / "metrics.json").read_text())["teacher_run"] == str(teacher_run)
    again = kd("distill", *args, "resume=auto")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"continuing the teacher this run was training, in {teacher_run}" in " ".join(again.stdout.split())
    assert teacher_runs() == [teacher_run]  # no second teacher
    resumed = [d for d in run_dirs(kd.dir, "distill") if d != stopped][0]
    ((ref_teacher,), (reference,)) = run_dirs(other, "train_teacher"), run_dirs(other, "distill")
    assert rows(teacher_run) == rows(ref_teacher) and rows(resumed) == rows(reference)
    assert same_weights(teacher_run / "checkpoints/teacher_best.pt", ref_teacher / "checkpoints/teacher_best.pt")
    assert same_weights(resumed / "checkpoints/student_best.pt", reference / "checkpoints/student_best.pt")


def test_a_sweep_re_run_in_its_directory_keeps_finished_jobs_and_continues_the_rest(kd):
    args = ["-m", "T=2,4", "teacher=mlp", "student=mlp", *TEACHER[1:], "trainer.epochs=2", "baseline=false"]
    proc = start(kd.dir, "distill", *args)
    sweeps = lambda: sorted((kd.dir / "runs" / "distill-multirun").glob("*/"))  # noqa: E731
    wait_for(lambda: bool(sweeps()) and epochs_done(lambda: [sweeps()[0] / "1"], "student")() >= 1, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    (sweep,) = sweeps()
    assert proc.returncode == 130
    assert f"re-run the sweep with hydra.sweep.dir={sweep} resume=auto" in " ".join(out.split())
    first = json.loads((sweep / "0" / "metrics.json").read_text())
    assert first["status"] == "completed"
    again = kd("distill", *args, f"hydra.sweep.dir={sweep}", "resume=auto")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"Already completed: {sweep / '0'}" in " ".join(again.stdout.split())
    assert json.loads((sweep / "0" / "metrics.json").read_text()) == first  # kept as it was
    job1 = json.loads((sweep / "1" / "metrics.json").read_text())
    assert job1["status"] == "completed" and [r["epoch"] for r in rows(sweep / "1")] == [1, 2]
    summary = (sweep / "summary.csv").read_text().splitlines()
    assert [line.split(",")[2] for line in summary[1:]] == ["completed", "completed"]
    # Another sweep in that directory is refused, not passed off with the old results.
    other = kd("distill", *[a.replace("T=2,4", "T=3,5") for a in args], f"hydra.sweep.dir={sweep}", "resume=auto")
    assert other.returncode == 1 and "holds a run of another configuration (T: 2.0 -> 3.0)" in " ".join(
        other.stdout.split()
    )
    assert json.loads((sweep / "0" / "metrics.json").read_text()) == first
