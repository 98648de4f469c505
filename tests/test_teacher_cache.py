"""The teacher-output cache: used only for inputs that do not change between epochs, keyed by
everything the outputs depend on, equal to running the teacher, shared by the runs of a sweep."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kdcli.core.files import read_jsonl
from kdcli.data import DeviceData, load_splits
from kdcli.models import build_model
from kdcli.teachers.cache import fingerprint, why_not
from kdcli.training import checkpoint
from kdcli.training.engine import Teacher

DATA = {"name": "mnist5k", "val_size": 200, "split_seed": 0, "classes": None, "limit": 400}


def _teacher_file(tmp_path: Path, seed: int, name: str = "t.pt") -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model("convnet", (1, 28, 28), 10).eval()
    data = {"input_shape": [1, 28, 28], "num_classes": 10, "class_names": [str(i) for i in range(10)]}
    path = tmp_path / name
    checkpoint.save(path, model, arch={"name": "convnet", "kwargs": {}}, data=data, role="teacher")
    return path, model


def test_the_fingerprint_follows_teacher_bytes_data_and_preprocessing(tmp_path):
    data = DeviceData(load_splits(DATA, "unused"), torch.device("cpu"))
    a, _ = _teacher_file(tmp_path, 0, "a.pt")
    b, _ = _teacher_file(tmp_path, 1, "b.pt")
    same, _ = _teacher_file(tmp_path, 0, "a_copy.pt")
    key = fingerprint([str(a)], data, DATA)
    assert fingerprint([str(same)], data, DATA) == key  # the bytes count, not the path
    assert fingerprint([str(b)], data, DATA) != key  # another teacher
    assert fingerprint([str(a)], data, {**DATA, "shift": 0, "flip": True}) == key  # augmentation keys: not the images
    smaller = DeviceData(load_splits({**DATA, "limit": 300}, "unused"), torch.device("cpu"))
    assert fingerprint([str(a)], smaller, {**DATA, "limit": 300}) != key  # other images
    data.info.mean = [0.5]  # other preprocessing
    assert fingerprint([str(a)], data, DATA) != key


def test_the_cache_serves_only_inputs_that_repeat_each_epoch(tmp_path):
    def cfg(augment="none", shift=2, flip=False, cache="auto"):
        return OmegaConf.create({"augment": augment, "dataset": {"shift": shift, "flip": flip}, "teacher_cache": cache})

    files = [str(_teacher_file(tmp_path, 0)[0])]
    plain = type("Objective", (), {"features": []})()

    def with_features(shape):
        term = type("FeatureTerm", (), {"teacher_shapes": [shape]})()
        return type("Objective", (), {"features": [term], "teacher_layers": ["conv2"]})()

    data = type("Data", (), {"train": range(1000)})()
    assert why_not(cfg(), plain, files) is None
    assert why_not(cfg("standard", shift=0), plain, files) is None  # nothing random to apply
    assert "random augmentation" in why_not(cfg("standard"), plain, files)
    assert "random augmentation" in why_not(cfg("standard", shift=0, flip=True), plain, files)
    assert why_not(cfg(), with_features((32, 7, 7)), files, data) is None  # 6.3 MB of features: cached
    big = why_not(cfg(), with_features((2**20,)), files, data)  # 4 bytes x 2^20 x 1000 images = 3.9 GiB
    assert "features at conv2 over the training split would take 3.9 GiB (the cache holds up to 2 GiB)" in big
    assert why_not(cfg(cache="off"), plain, files) == "teacher_cache=off"
    assert "no checkpoint file" in why_not(cfg(), plain, [None])  # a module teacher from the Python API


def test_looked_up_outputs_equal_the_teachers_own(tmp_path):
    _, model = _teacher_file(tmp_path, 0)
    x = torch.randn(50, 1, 28, 28)
    with torch.no_grad():
        full = model(x)
    teacher = Teacher(model, torch.arange(10), cache=full)
    idx = torch.tensor([7, 3, 49, 0])
    with torch.no_grad():
        torch.testing.assert_close(teacher.outputs(x[idx], idx), model(x[idx]), atol=1e-5, rtol=1e-5)
        assert torch.equal(Teacher(model, torch.arange(10)).outputs(x[idx], idx), model(x[idx]))  # no cache: runs


@pytest.mark.slow
def test_a_sweep_computes_the_teacher_outputs_once_and_trains_as_without_them(kd):
    r = kd("train-teacher", "dataset.limit=600", "trainer.epochs=2")
    assert r.returncode == 0, r.stdout + r.stderr
    teacher = next((kd.dir / "runs" / "train_teacher").glob("*/checkpoints/teacher_best.pt"))
    common = ["dataset.limit=600", "trainer.epochs=2", "augment=none", "baseline=false", f"teacher.ckpt={teacher}"]
    r = kd("distill", "-m", "T=1,4", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    sweep = next((kd.dir / "runs" / "distill-multirun").iterdir())
    caches = [json.loads((sweep / j / "metrics.json").read_text())["teacher_cache"] for j in ("0", "1")]
    assert caches[0]["used"] and caches[0]["computed"] and caches[1]["used"] and not caches[1]["computed"]
    assert caches[0]["path"] == caches[1]["path"]
    assert len(list((kd.dir / "runs" / "cache" / "teacher_outputs").iterdir())) == 1  # once for the sweep
    assert "computed once" in r.stdout and "reused" in r.stdout

    r = kd("distill", "T=4", "teacher_cache=off", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    off = max((kd.dir / "runs" / "distill").iterdir())
    assert json.loads((off / "metrics.json").read_text())["teacher_cache"] == {
        "used": False,
        "reason": "teacher_cache=off",
    }

    # the same training: cached outputs differ from per-batch ones only by float rounding
    for cached, fresh in zip(read_jsonl(sweep / "1" / "metrics.jsonl"), read_jsonl(off / "metrics.jsonl")):
        assert cached["val_acc"] == pytest.approx(fresh["val_acc"], abs=0.005)
        assert cached["train_loss"] == pytest.approx(fresh["train_loss"], rel=1e-3)

    # a changed teacher file is another key: computed again, the old file is left as it was
    r = kd("train-teacher", "dataset.limit=600", "trainer.epochs=1")
    assert r.returncode == 0, r.stdout + r.stderr
    newer = max((kd.dir / "runs" / "train_teacher").iterdir()) / "checkpoints" / "teacher_best.pt"
    r = kd("distill", "T=4", *common[:-1], f"teacher.ckpt={newer}")
    assert r.returncode == 0 and "computed once" in r.stdout
    assert len(list((kd.dir / "runs" / "cache" / "teacher_outputs").iterdir())) == 2


def test_looked_up_features_equal_the_teachers_own_layers(tmp_path):
    from kdcli.losses.taps import Taps
    from kdcli.teachers.cache import _compute

    _, model = _teacher_file(tmp_path, 0)
    data = DeviceData(load_splits(DATA, "unused"), torch.device("cpu"))
    stored = _compute([Teacher(model, torch.arange(10))], data, 64, ["conv2", "penultimate"])
    teacher = Teacher(model, torch.arange(10), cache=stored["outputs"][0], feature_cache=stored["features"])
    idx = torch.tensor([5, 0, 399, 42])
    taps = Taps(model, ["conv2", "penultimate"], "teacher", (1, 28, 28))
    with torch.no_grad():
        model(data.train.x[idx])
    for cached, own in zip(teacher.features(idx), taps.take()):
        torch.testing.assert_close(cached, own, atol=1e-5, rtol=1e-5)
    taps.remove()


@pytest.mark.slow
def test_feature_terms_use_cached_teacher_features_and_train_as_without_them(kd):
    r = kd("train-teacher", "dataset.limit=600", "trainer.epochs=1")
    assert r.returncode == 0, r.stdout + r.stderr
    common = ["dataset.limit=600", "trainer.epochs=2", "augment=none", "baseline=false", "features=[rkd]"]
    cached = kd("distill", *common)
    assert cached.returncode == 0, cached.stdout + cached.stderr
    fresh = kd("distill", *common, "teacher_cache=off")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    runs = sorted((kd.dir / "runs" / "distill").iterdir())
    info = json.loads((runs[0] / "metrics.json").read_text())["teacher_cache"]
    assert info["used"] and info["computed"] and info["layers"] == ["penultimate"]
    stored = torch.load(info["path"], weights_only=False)
    assert stored["layers"] == ["penultimate"] and tuple(stored["features"][0].shape) == (600, 50)  # every image

    for a, b in zip(read_jsonl(runs[0] / "metrics.jsonl"), read_jsonl(runs[1] / "metrics.jsonl")):
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=0.005)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


@pytest.mark.slow
def test_parallel_sweep_jobs_share_the_cache_byte_for_byte_and_train_as_one_after_the_other(kd):
    """Two joblib jobs at once with one runs_dir: whichever computes the teacher outputs (or both,
    each writing its own temporary file, then renaming), the cache file is the one a job computes
    alone, and each job's student is the one it trains in a sweep that runs one job at a time."""
    r = kd("train-teacher", "debug=smoke", "teacher=mlp")
    assert r.returncode == 0, r.stdout + r.stderr
    teacher = next((kd.dir / "runs" / "train_teacher").glob("*/checkpoints/teacher_best.pt"))
    common = ["-m", "T=1,4", "debug=smoke", "teacher=mlp", f"teacher.ckpt={teacher}", "augment=none", "baseline=false"]
    one_thread = {"OMP_NUM_THREADS": "1"}  # joblib's workers get cpu_count // n_jobs threads otherwise: other sums
    parallel = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"runs_dir={kd.dir / 'parallel'}"]
    r = kd("distill", *common, *parallel, env=one_thread)
    assert r.returncode == 0 and "Joblib.Parallel(n_jobs=2" in r.stdout + r.stderr, r.stdout + r.stderr
    r = kd("distill", *common, f"runs_dir={kd.dir / 'in_turn'}", env=one_thread)
    assert r.returncode == 0, r.stdout + r.stderr

    (shared,) = (kd.dir / "parallel" / "cache" / "teacher_outputs").iterdir()  # one file, no temporary left
    (alone,) = (kd.dir / "in_turn" / "cache" / "teacher_outputs").iterdir()
    assert shared.name == alone.name and shared.read_bytes() == alone.read_bytes()
    (parallel,) = (kd.dir / "parallel" / "distill-multirun").iterdir()
    (in_turn,) = (kd.dir / "in_turn" / "distill-multirun").iterdir()
    for job in ("0", "1"):
        m = json.loads((parallel / job / "metrics.json").read_text())
        assert m["status"] == "completed" and m["teacher_cache"]["used"] and m["teacher_cache"]["path"] == str(shared)
        alone_m = json.loads((in_turn / job / "metrics.json").read_text())
        for key in ("val_acc", "test_acc", "test_nll", "teacher_agreement"):
            assert m["student"][key] == alone_m["student"][key], (job, key)
        a = checkpoint.load(parallel / job / "checkpoints" / "student_best.pt")["state_dict"]
        b = checkpoint.load(in_turn / job / "checkpoints" / "student_best.pt")["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), job
