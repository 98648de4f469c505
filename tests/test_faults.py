"""Faults provoked for real: a process killed in the middle of a write, a disk that fills up
during a run, and bad files handed to the command line. Each test checks what kdcli does:
exit code, message, and what is left on disk (file hashes, what still loads)."""

import builtins
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from kdcli.core.errors import KdError
from kdcli.training import checkpoint, resume

# A quick mlp teacher on part of the embedded mnist5k (an epoch is well under a second).
QUICK = ["teacher=mlp", "dataset.limit=512"]


def flat(text: str) -> str:
    """The console wraps at 120 columns and pads lines: one space between words again."""
    return " ".join(text.split())


def squash(text: str) -> str:
    """No whitespace at all: a long path may be wrapped anywhere."""
    return "".join(text.split())


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_one_error(r: subprocess.CompletedProcess, *phrases: str, names: Path | None = None) -> str:
    """Exit 1, one `error:` paragraph holding `phrases` (and naming `names`), no traceback."""
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Traceback" not in out, out
    assert flat(out).count("error:") == 1, out
    for phrase in phrases:
        assert phrase in flat(out), out
    if names is not None:
        assert squash(str(names)) in squash(out), out
    return flat(out)


def stale_tmps(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


def epochs_of(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def kd_env(runs: Path, data: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(KDCLI_RUNS=str(runs), KDCLI_DATA=str(data), COLUMNS="200")
    return env


# ----------------------------------------------------------------------------------------------
# 1. SIGKILL in the middle of a write


# Run in a child process: start replacing `target` with a new checkpoint, write half of its
# bytes to the temporary file, say so through `marker` (the number of bytes written), then wait
# to be killed. Mode atomic_write uses kdcli.core.files.atomic_write with a write function of its
# own; mode checkpoint.write goes through kdcli.training.checkpoint.write, whose torch.save is replaced
# by one that stalls half way.
WRITER = r"""
import io, os, sys, time
from pathlib import Path

import torch

from kdcli.training import checkpoint
from kdcli.core import files

mode, target, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
new = {"format": checkpoint.FORMAT, "version": 1, "epoch": 2, "state_dict": {"w": torch.full((256, 256), 2.0)}}
buf = io.BytesIO()
torch.save(new, buf)
data = buf.getvalue()


def stall(f):
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    marker.write_text(str(len(data) // 2))
    time.sleep(300)


if mode == "atomic_write":
    def write(tmp):
        with open(tmp, "wb") as f:
            stall(f)

    files.atomic_write(target, write)
else:
    torch.save = lambda obj, f, **kw: stall(f)
    checkpoint.write(target, new)
sys.exit(3)  # not reached: the test kills this process during the write
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["atomic_write", "checkpoint.write"])
def test_sigkill_during_a_write_leaves_the_previous_file_intact(tmp_path, mode):
    target = tmp_path / "teacher_best.pt"
    good = {"format": checkpoint.FORMAT, "version": 1, "epoch": 1, "state_dict": {"w": torch.ones(256, 256)}}
    checkpoint.write(target, good)
    before = sha256(target)
    marker = tmp_path / "half-written"

    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, mode, str(target), str(marker)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"the writer exited ({child.returncode}) before the write: {child.communicate()}")
            assert time.monotonic() < deadline, "the writer never reached the middle of its write"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    # The target holds the previous checkpoint, byte for byte, and it loads.
    assert sha256(target) == before
    loaded = checkpoint.load(target)
    assert loaded["epoch"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(256, 256))

    # What remains of the interrupted write: one stale `.teacher_best.pt.XXXX.tmp` beside it,
    # holding the half that was written. It is not a *.pt file (globs for checkpoints skip it),
    # and it does not pass for a checkpoint either.
    tmps = stale_tmps(tmp_path)
    assert len(tmps) == 1 and re.fullmatch(r"\.teacher_best\.pt\..+\.tmp", tmps[0]), tmps
    assert (tmp_path / tmps[0]).stat().st_size == int(marker.read_text())
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["teacher_best.pt"]
    with pytest.raises(KdError, match="Cannot read checkpoint .* truncated, corrupt or not a PyTorch file"):
        checkpoint.load(tmp_path / tmps[0])

    # The next write of the target replaces it and removes the leftover.
    checkpoint.write(target, {**good, "epoch": 3})
    assert checkpoint.load(target)["epoch"] == 3 and stale_tmps(tmp_path) == []


@pytest.mark.slow
def test_sigkill_of_a_training_run_mid_write_leaves_only_whole_checkpoints(kd):
    """Kill `kd train-teacher` while a checkpoint's temporary file exists (the second epoch's
    writes, once the first epoch's training state is on disk), then continue with resume=auto."""
    runs = kd.dir / "runs"
    args = [*QUICK, "trainer.epochs=3"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdcli", "train-teacher", *args],
        cwd=kd.dir,
        env=kd_env(runs, kd.dir / "data"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while not seen and proc.poll() is None and time.monotonic() < deadline:
            for ckpt_dir in runs.glob("train_teacher/*/checkpoints"):
                try:
                    names = os.listdir(ckpt_dir)
                except FileNotFoundError:
                    continue
                if "teacher_resume.pt" in names and any(n.endswith(".tmp") for n in names):
                    proc.send_signal(signal.SIGKILL)
                    seen = sorted(names)
                    break
            else:
                time.sleep(0.0005)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen, f"no temporary checkpoint file was seen before the run ended ({proc.returncode}):\n{out}"
    assert proc.returncode == -signal.SIGKILL, out

    (run_dir,) = list((runs / "train_teacher").iterdir())
    ckpt_dir = run_dir / "checkpoints"
    # Every checkpoint file there loads whole: no half-written *.pt.
    state = resume.load(ckpt_dir / "teacher_resume.pt")
    done = state["epochs_done"]
    assert state["status"] == "running" and done in (1, 2) and state["step"] == 0
    for name in ("teacher_best.pt", "teacher_last.pt"):
        ck = checkpoint.load(ckpt_dir / name)
        assert ck["format"] == checkpoint.FORMAT and done <= ck["epoch"] <= done + 1, (name, ck["epoch"], done)
        checkpoint.build_from(ck, ckpt_dir / name)  # the weights fit the model they describe
    assert sorted(p.name for p in ckpt_dir.glob("*.pt")) == ["teacher_best.pt", "teacher_last.pt", "teacher_resume.pt"]
    # Left behind: the temporary file(s) of the write that was cut short, nothing else.
    leftovers = [n for n in os.listdir(ckpt_dir) if not n.endswith(".pt")]
    assert leftovers and all(re.fullmatch(r"\.teacher_(best|last|resume)\.pt\..+\.tmp", n) for n in leftovers), seen
    rows = epochs_of(run_dir)
    assert rows[:done] == list(range(1, done + 1)) and len(rows) <= done + 1, rows
    # Killed outright, the run could not record its end: metrics.json still says running.
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"

    r = kd("train-teacher", *args, "resume=auto")
    out = flat(r.stdout + r.stderr)
    assert r.returncode == 0, out
    assert f"resuming after epoch {done} + 0 step(s)" in out
    (new_dir,) = [d for d in (runs / "train_teacher").iterdir() if d != run_dir]
    metrics = json.loads((new_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["resumed_from"] == str(run_dir.resolve())
    assert epochs_of(new_dir) == [1, 2, 3]
    assert checkpoint.load(new_dir / "checkpoints" / "teacher_last.pt")["epoch"] == 3
    assert stale_tmps(new_dir / "checkpoints") == []  # the stale temporary files were not carried over
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "resumed"


# ----------------------------------------------------------------------------------------------
# 2. The disk fills up during a run (a small tmpfs in a private mount namespace)

# $1 the mount point, $2 a folder outside it for the results, $3 python; the rest: overrides.
# KDCLI_RUNS points into the mount point.
FULL_DISK = r"""
set -u
disk=$1; out=$2; py=$3; shift 3
mount -t tmpfs -o size=20m tmpfs "$disk" || exit 90
cd "$disk"
"$py" -m kdcli train-teacher "$@" > "$out/first.out" 2>&1 &
pid=$!
while ! ls "$disk"/runs/train_teacher/*/checkpoints/teacher_resume.pt > /dev/null 2>&1; do
    kill -0 $pid 2> /dev/null || break
    sleep 0.01
done
kill -STOP $pid 2> /dev/null  # hold the run while the disk fills: no race with epoch 2's end
sha256sum "$disk"/runs/train_teacher/*/checkpoints/*.pt > "$out/before.sha256" 2>&1
dd if=/dev/zero of="$disk/filler" bs=64k > "$out/dd.out" 2>&1
df -k "$disk" > "$out/df.out" 2>&1
kill -CONT $pid 2> /dev/null
wait $pid
echo $? > "$out/first.rc"
cp -a "$disk/runs" "$out/runs-after-failure"
rm -f "$disk/filler"
"$py" -m kdcli train-teacher "$@" resume=auto > "$out/resumed.out" 2>&1
echo $? > "$out/resumed.rc"
cp -a "$disk/runs" "$out/runs-after-resume"
"""


def _namespaces_or_skip() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command (util-linux)")
    r = subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"`unshare -r -m` is not allowed here: {r.stderr.strip()}")


@pytest.mark.slow
def test_full_disk_during_training_keeps_the_last_epoch_and_resumes(tmp_path):
    _namespaces_or_skip()
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    # Small batches: a longer second epoch, so the run is held (SIGSTOP) well before its end.
    args = [*QUICK, "trainer.epochs=3", "trainer.batch_size=16"]
    r = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", FULL_DISK, "sh", str(disk), str(out), sys.executable, *args],
        cwd=tmp_path,
        env=kd_env(disk / "runs", tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode == 90:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    first = (out / "first.out").read_text()
    assert "No space left on device" in (out / "dd.out").read_text()  # the filler did fill the disk

    # The run stops with one clear error naming the checkpoint it could not write.
    assert (out / "first.rc").read_text().strip() == "1", first
    assert "Traceback" not in first, first
    assert flat(first).count("error:") == 1, first
    assert "The previous version of the file, if any, is intact" in flat(first), first
    assert "continue the run with resume=auto" in flat(first), first
    assert re.search(r"Nospacelefttowrite\S+/checkpoints/teacher_(best|last)\.pt\(", squash(first)), first

    # What it left: epoch 1's checkpoints and training state, unchanged, whole, no temporary files.
    (failed,) = list((out / "runs-after-failure" / "train_teacher").iterdir())
    ckpts = failed / "checkpoints"
    before = dict(reversed(line.split()) for line in (out / "before.sha256").read_text().splitlines())
    assert sorted(Path(p).name for p in before) == ["teacher_best.pt", "teacher_last.pt", "teacher_resume.pt"]
    for path, digest in before.items():
        assert sha256(ckpts / Path(path).name) == digest, path
    for name in ("teacher_best.pt", "teacher_last.pt"):
        assert checkpoint.load(ckpts / name)["epoch"] == 1
    state = resume.load(ckpts / "teacher_resume.pt")
    assert state["status"] == "running" and state["epochs_done"] == 1
    assert epochs_of(failed) == [1]
    assert [p.name for p in failed.rglob("*.tmp")] == []
    # metrics.json could not be rewritten on the full disk either: kdcli says so and the previous
    # version stays (status running, with the pid of a process that has ended, which resume=auto
    # treats as unfinished). Should kdcli manage to record the failure, it must say why.
    metrics = json.loads((failed / "metrics.json").read_text())
    if metrics["status"] == "failed":
        assert "No space left to write" in metrics["error"]
    else:
        assert metrics["status"] == "running", metrics
        assert re.search(r"couldnotwrite\S+/metrics\.json:Nospacelefttowrite", squash(first)), first

    # Space freed, resume=auto continues from epoch 1 in a new run directory and finishes.
    resumed_out = (out / "resumed.out").read_text()
    assert (out / "resumed.rc").read_text().strip() == "0", resumed_out
    assert "resuming after epoch 1 + 0 step(s)" in flat(resumed_out)
    runs = out / "runs-after-resume" / "train_teacher"
    (new_dir,) = [d for d in runs.iterdir() if d.name != failed.name]
    metrics = json.loads((new_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["resumed_from"] == str(disk.resolve() / "runs" / "train_teacher" / failed.name)
    assert epochs_of(new_dir) == [1, 2, 3]
    assert checkpoint.load(new_dir / "checkpoints" / "teacher_last.pt")["epoch"] == 3
    assert json.loads((runs / failed.name / "metrics.json").read_text())["status"] == "resumed"


# ----------------------------------------------------------------------------------------------
# 3. Bad files on the command line


class RunsCode:
    """Unpickling this calls `func(arg)`: what a malicious checkpoint would do."""

    def __init__(self, func, arg: str):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.slow
def test_bad_checkpoints_and_run_directories_are_refused(kd):
    r = kd("train-teacher", *QUICK, "trainer.epochs=1")
    assert r.returncode == 0, r.stdout + r.stderr
    (teacher_run,) = list((kd.dir / "runs" / "train_teacher").iterdir())
    good = Path(json.loads((teacher_run / "metrics.json").read_text())["teacher"]["checkpoint"])
    good_sha = sha256(good)
    data = good.read_bytes()

    bad = kd.dir / "bad"
    bad.mkdir()
    truncated = bad / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    (bad / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    (bad / "notes.txt").write_text("epoch,val_acc\n1,0.73\n")
    torch.save({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, bad / "tensors.pt")
    marker_os, marker_exec = kd.dir / "ran-os-system", kd.dir / "ran-exec"
    with open(bad / "payload.pkl", "wb") as f:  # the standard library's pickle, a GLOBAL posix.system
        pickle.dump(RunsCode(os.system, f"touch {marker_os}"), f, protocol=2)
    torch.save(
        {
            "format": checkpoint.FORMAT,
            "state_dict": {},
            "x": RunsCode(builtins.exec, f"open({str(marker_exec)!r}, 'w')"),
        },
        bad / "payload.pt",
    )
    ck = torch.load(good, weights_only=True)
    assert ck["arch"]["kwargs"]["hidden"] == [256]
    ck["arch"]["kwargs"]["hidden"] = [128]
    torch.save(ck, bad / "edited_arch.pt")

    unreadable = "the file is truncated, corrupt or not a PyTorch file"
    refused = "it holds pickled Python objects"
    cases = [
        # (file, overrides, phrases the error must hold)
        (truncated, [], [unreadable, "Cannot read checkpoint"]),
        (bad / "random.pt", [], [unreadable, "Cannot read checkpoint"]),
        (bad / "notes.txt", [], [unreadable, "Cannot read checkpoint"]),
        (bad / "tensors.pt", [], ["is a PyTorch file but not a kdcli checkpoint"]),
        (bad / "payload.pkl", [], ["Refusing to load", refused, "it would import posix.system", "could run code"]),
        (bad / "payload.pt", [], ["Refusing to load", refused, "could run code"]),
        (good, ["teacher=convnet"], ["holds mlp with", "but the command line asks for convnet", "teacher=convnet"]),
        (bad / "edited_arch.pt", [], ["do not fit model 'mlp' with {'hidden': [128]", "size mismatch"]),
    ]

    def distill(case):
        path, overrides, _ = case
        return kd("distill", *overrides, f"teacher.ckpt={path}", "trainer.epochs=1", "dataset.limit=512")

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        results = list(pool.map(distill, cases))
        evaluated = pool.submit(kd, "evaluate", f"checkpoints=[{truncated}]")
        missing = pool.submit(kd, "train-teacher", f"resume={kd.dir / 'no-such-run'}")
        plain = kd.dir / "plain-folder"
        plain.mkdir()
        (plain / "notes.txt").write_text("not a run\n")
        not_a_run = pool.submit(kd, "train-teacher", f"resume={plain}")
        completed = pool.submit(kd, "train-teacher", f"resume={teacher_run}")

    for (path, _, phrases), r in zip(cases, results):
        assert_one_error(r, *phrases, names=path)
    assert not marker_os.exists() and not marker_exec.exists(), "loading a checkpoint ran code"
    # The distill runs that were refused say so in their metrics.json.
    for run in (kd.dir / "runs" / "distill").iterdir():
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "failed" and metrics["error"], metrics

    assert_one_error(evaluated.result(), "Cannot read checkpoint", unreadable, names=truncated)
    assert_one_error(missing.result(), "no such run directory", names=kd.dir / "no-such-run")
    assert_one_error(not_a_run.result(), "is not a kdcli run directory (no config.yaml)", names=plain)
    assert_one_error(completed.result(), "that run completed; there is nothing to continue", names=teacher_run)

    # None of this touched the teacher's checkpoint or its run.
    assert sha256(good) == good_sha
    assert json.loads((teacher_run / "metrics.json").read_text())["status"] == "completed"

    # The payloads are live: loading them without weights_only would have run their code.
    with open(bad / "payload.pkl", "rb") as f:
        pickle.load(f)
    torch.load(bad / "payload.pt", weights_only=False)
    assert marker_os.exists() and marker_exec.exists()


def test_random_bytes_are_called_corrupt_not_pickled_objects(tmp_path):
    for seed in range(5):
        path = tmp_path / f"random{seed}.pt"
        path.write_bytes(random.Random(seed).randbytes(2000))
        with pytest.raises(KdError, match="Cannot read checkpoint .* truncated, corrupt or not a PyTorch file"):
            checkpoint.load(path)


def test_a_write_removes_dead_writers_temp_files_but_not_a_live_ones(tmp_path):
    """Jobs of a sweep may write the same file (the teacher-output cache) at once: a finished
    write must not delete the temporary file another live process is still filling."""
    import subprocess
    import sys

    from kdcli.core.files import write_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live_tmp = tmp_path / f".out.json.{os.getpid()}-live.tmp"
    dead_tmp = tmp_path / f".out.json.{dead.stdout.strip()}-dead.tmp"
    old_style = tmp_path / ".out.json.abc123.tmp"  # a name without a pid: an older kdcli's leftover
    for f in (live_tmp, dead_tmp, old_style):
        f.write_text("partial")
    write_text(tmp_path / "out.json", "{}")
    assert (tmp_path / "out.json").read_text() == "{}"
    assert live_tmp.exists() and not dead_tmp.exists() and not old_style.exists()
