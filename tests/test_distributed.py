"""Several processes (torchrun, gloo on the CPU): each rank's part of a batch, put back together,
is the one-process batch; a 2-process `kd distill` follows the 1-process run; rank 0 alone writes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kd_env, run_kd

from kdcli.core import distributed
from kdcli.core.files import read_jsonl
from kdcli.data import DeviceData, load_splits
from kdcli.data.stream import StreamData

DATA = {"name": "mnist5k", "val_size": 200, "split_seed": 0, "classes": None, "limit": 450}


def _as_rank(monkeypatch, r: int, w: int) -> None:
    monkeypatch.setattr(distributed, "rank", lambda: r)
    monkeypatch.setattr(distributed, "world", lambda: w)


@pytest.mark.parametrize("storage", ["memory", "stream"])
@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_parts_make_up_the_one_process_batches(monkeypatch, storage, world):
    """With augmentation (shift and flip), batch 64 and a ragged world of 3: rank r's rows of batch k
    are rows r*n//w:(r+1)*n//w of the one-process batch k, images, labels and indices alike."""
    splits = load_splits(DATA, "unused")
    cls = DeviceData if storage == "memory" else StreamData
    data = cls(splits, torch.device("cpu"), shift=2, flip=True)
    whole = list(data.train_batches(64, seed=7, start=1))
    parts = []
    for r in range(world):
        _as_rank(monkeypatch, r, world)
        parts.append(list(data.train_batches(64, seed=7, start=1)))
    monkeypatch.undo()
    assert len(whole) == len(data.train) // 64 - 1 and all(len(p) == len(whole) for p in parts)
    for k, (x, y, idx) in enumerate(whole):
        sizes = [len(p[k][1]) for p in parts]
        assert sizes == [(r + 1) * 64 // world - r * 64 // world for r in range(world)]
        for got, want in zip(zip(*(p[k] for p in parts)), (x, y, idx)):
            assert torch.equal(torch.cat(got), want)
    plain = DeviceData(splits, torch.device("cpu")).train.x[whole[0][2]]
    assert not torch.allclose(whole[0][0], plain, atol=1e-3)  # the batches are augmented


def test_a_batch_smaller_than_the_world_size_is_shared_out(monkeypatch):
    parts = []
    for r in range(3):
        _as_rank(monkeypatch, r, 3)
        parts.append(distributed.part(5))
    assert parts == [(0, 1), (1, 3), (3, 5)]


def test_outside_torchrun_everything_is_rank_0_of_1():
    assert not distributed.launched() or os.environ.get("WORLD_SIZE") == "1"
    assert (distributed.rank(), distributed.world(), distributed.is_main()) == (0, 1, True)
    assert distributed.part(64) == (0, 64)
    assert distributed.same({"a": 1}) == {"a": 1} and distributed.most(3) == 3
    assert distributed.decided_by_main(lambda: "x") == "x"


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["evaluate"], {"WORLD_SIZE": "2"}, "kd evaluate runs in one process; torchrun (several processes) is for"),
        (["distill", "-m", "T=1,2"], {"WORLD_SIZE": "2"}, "A sweep (-m) does not run under torchrun"),
        (["distill"], {"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT is not"),
    ],
)
def test_what_torchrun_cannot_run_is_refused(tmp_path, args, env, message):
    r = run_kd(*args, cwd=tmp_path, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert message in " ".join((r.stdout + r.stderr).split())
    assert "Traceback" not in r.stdout + r.stderr


def _torchrun_cmd(n: int, *args: str) -> list[str]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    return [*torchrun, "-m", "kdcli", *args]


def _torchrun(n: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = kd_env(cwd, OMP_NUM_THREADS="1")
    return subprocess.run(_torchrun_cmd(n, *args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _only_run(runs: Path, command: str) -> Path:
    dirs = sorted((runs / command).iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.slow
def test_two_processes_follow_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m kdcli distill` (gloo): the epoch rows and test accuracy of the
    one-process run (an MLP without batch norm or dropout: the same arithmetic up to the order of
    the gradient sums), one run directory, files written once, the teacher outputs computed once."""
    data = ["dataset.limit=900", "trainer.epochs=2", "augment=none"]
    assert run_kd("train-teacher", "teacher=mlp", *data, cwd=tmp_path).returncode == 0
    teacher = next((tmp_path / "runs" / "train_teacher").glob("*/checkpoints/teacher_best.pt"))
    args = ["distill", f"teacher.ckpt={teacher}", "teacher=mlp", "student=mlp", "baseline=false", *data]
    one = tmp_path / "one"
    one.mkdir()
    r1 = run_kd(*args, cwd=one)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    two = tmp_path / "two"
    two.mkdir()
    r2 = _torchrun(2, *args, cwd=two)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "parallel 2 processes" in r2.stdout

    run1, run2 = _only_run(one / "runs", "distill"), _only_run(two / "runs", "distill")
    rows1, rows2 = read_jsonl(run1 / "metrics.jsonl"), read_jsonl(run2 / "metrics.jsonl")
    assert [r["epoch"] for r in rows2] == [1, 2]  # written once, by rank 0
    for a, b in zip(rows1, rows2):
        assert b["val_acc"] == pytest.approx(a["val_acc"], abs=0.0051)  # one image of 200 at most
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["train_acc"] == pytest.approx(a["train_acc"], abs=0.003)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (run1, run2))
    assert m2["processes"] == 2 and "processes" not in m1
    assert m2["student"]["test_acc"] == pytest.approx(m1["student"]["test_acc"], abs=0.006)
    assert m2["teacher_cache"]["computed"] is True
    assert len(list((two / "runs" / "cache" / "teacher_outputs").glob("*.pt"))) == 1
    log = (run2 / "distill.log").read_text()
    assert log.count("student  epoch   1/2") == 1  # rank 1 logs to no file
    assert (run2 / ".hydra" / "config.yaml").is_file()
    assert not list(run2.rglob("*.tmp"))
    best = torch.load(run2 / "checkpoints" / "student_best.pt", weights_only=False)
    assert best["epoch"] in (1, 2) and "state_dict" in best


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["features=[crd]"], "features.crd keeps state over the training samples"),
        (["trainer.batch_size=1"], "trainer.batch_size=1 is split between 2 processes: each needs one image at least"),
    ],
)
def test_what_two_processes_cannot_share_is_refused(tmp_path, args, message):
    r = _torchrun(2, "distill", "teacher=mlp", "student=mlp", "debug=smoke", *args, cwd=tmp_path)
    assert r.returncode != 0
    assert message in " ".join(r.stdout.split())


def test_a_non_finite_loss_on_another_rank_stops_this_one_at_the_same_step(monkeypatch):
    """nonfinite=stop: the step's finite flag is reduced over the ranks (here: another rank saw a NaN)."""
    from omegaconf import OmegaConf

    from kdcli.training.engine import _Loop

    monkeypatch.setattr(distributed, "most_inplace", lambda t: t.fill_(1))
    data = type("Data", (), {"device": torch.device("cpu")})()
    cfg = OmegaConf.create({"seed": 0, "trainer": {"save_every_min": None, "nonfinite": "stop"}})
    trainee = type(
        "T", (), {"role": "student", "optimizer": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)}
    )()
    loop = _Loop([trainee], data, cfg, Path("unused"), epochs=2, steps=10, speed=None)
    assert loop.step_is_finite(torch.tensor(1.0), epoch=2, step=3)  # the step runs (the check is deferred)
    assert int(loop.bad) == 14  # step 4 of epoch 2, recorded though this rank's loss was finite


@pytest.mark.slow
def test_a_two_process_run_stopped_by_sigterm_continues_in_one_process(tmp_path):
    """SIGTERM to torchrun inside epoch 2: both ranks stop at the same step, rank 0 saves the state and
    prints how to continue; `kd distill resume=DIR` (one process: the batches are split, not changed)
    ends with the figures of an uninterrupted 2-process run."""
    data = ["dataset.limit=600", "augment=none", "optimizer.lr=0.01"]
    assert run_kd("train-teacher", "teacher=mlp", "trainer.epochs=1", *data, cwd=tmp_path).returncode == 0
    args = [
        "distill",
        "teacher=mlp",
        "student=mlp",
        "baseline=false",
        "trainer.epochs=4",
        "trainer.batch_size=4",
        *data,
    ]
    reference = _torchrun(2, *args, cwd=tmp_path)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    (ref_run,) = (tmp_path / "runs" / "distill").iterdir()

    env = kd_env(tmp_path, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        _torchrun_cmd(2, *args), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    live = lambda: [d for d in (tmp_path / "runs" / "distill").iterdir() if d != ref_run]  # noqa: E731
    end = time.time() + 300
    while not any((d / "metrics.jsonl").is_file() for d in live()):
        assert proc.poll() is None and time.time() < end, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    (stopped,) = live()
    metrics = json.loads((stopped / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["signal"] == "SIGTERM", out
    assert f"To continue: torchrun --nproc_per_node=2 -m kdcli distill resume={stopped}" in " ".join(out.split())
    saved = torch.load(stopped / "checkpoints" / "student_resume.pt", weights_only=False)
    assert (saved["epochs_done"], saved["step"]) > (1, 0) and saved["epochs_done"] < 4

    again = run_kd("distill", f"resume={stopped}", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    (resumed,) = [d for d in live() if d != stopped]
    ref_rows, new_rows = read_jsonl(ref_run / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["epoch"] for r in new_rows] == [1, 2, 3, 4]
    for a, b in zip(ref_rows, new_rows):
        assert b["val_acc"] == pytest.approx(a["val_acc"], abs=0.011)
    done = json.loads((resumed / "metrics.json").read_text())
    ref = json.loads((ref_run / "metrics.json").read_text())
    assert done["student"]["test_acc"] == pytest.approx(ref["student"]["test_acc"], abs=0.011)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["features=[fitnet]", "features.fitnet.weight=1", "features.fitnet.hint_epochs=1"],  # the head idle in stage 1
        ["method=dml"],  # two models trained together
        ["transfer.init_from_teacher=true", "transfer.freeze=[1]", "transfer.freeze_epochs=1"],  # a freeze ends
    ],
    ids=["fitnets-hint", "dml", "freeze"],
)
def test_methods_whose_trained_parameters_change_run_in_two_processes(tmp_path, extra):
    args = ["distill", "teacher=mlp", "student=mlp", "baseline=false", "dataset.limit=600", "augment=none"]
    args += ["trainer.epochs=2", *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    r1 = run_kd(*args, cwd=one)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = _torchrun(2, *args, cwd=two)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    m1, m2 = (json.loads((_only_run(d / "runs", "distill") / "metrics.json").read_text()) for d in (one, two))
    for role in [k for k in m1 if isinstance(m1[k], dict) and "test_acc" in m1[k]]:
        assert m2[role]["test_acc"] == pytest.approx(m1[role]["test_acc"], abs=0.006), role
