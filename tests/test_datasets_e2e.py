"""`kd distill` end to end on a small dataset of each on-disk format, with teacher/student pairs
from the distillation papers' tables (RepDistiller / CRD, mdistiller)."""

import json

import pytest
import torch
from dataset_files import cifar10, cifar100, image_folder, mnist_family, svhn

pytestmark = pytest.mark.slow


def _imagefolder(root):
    image_folder(root / "photos" / "train", ["cat", "dog", "owl"], 30, size=(40, 32))
    image_folder(root / "photos" / "val", ["cat", "dog", "owl"], 6, size=(32, 32), seed=1)


CASES = {
    # dataset: (write the files under data_root, teacher, student, extra overrides, class names)
    "kmnist": (lambda r: mnist_family(r, "KMNIST", 120, 40), "resnet56", "resnet20", [], ["o", "ki"]),
    "cifar10": (lambda r: cifar10(r, 24, 40), "resnet32x4", "resnet8x4", [], ["airplane", "automobile"]),
    "cifar100": (lambda r: cifar100(r, 300, 100), "vgg13", "vgg8", [], ["class0", "class1"]),
    "svhn": (lambda r: svhn(r, 120, 40), "wrn_40_2", "wrn_16_2", [], ["0", "1"]),
    "imagefolder": (_imagefolder, "vgg13", "mobilenetv2", ["dataset.root=data/photos"], ["cat", "dog"]),
}


@pytest.mark.parametrize("dataset", list(CASES))
def test_a_paper_pair_distills_on_each_file_format(kd, dataset):
    write, teacher, student, extra, names = CASES[dataset]
    write(kd.dir / "data")
    r = kd(
        "distill",
        f"teacher={teacher}",
        f"student={student}",
        f"dataset={dataset}",
        "dataset.val_size=0.2",
        "dataset.download=false" if dataset != "imagefolder" else "dataset.storage=stream",
        "debug=smoke",
        *extra,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    run = next((kd.dir / "runs" / "distill").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert {"teacher", "scratch", "student"} <= set(metrics)
    assert all(0 <= metrics[role]["test_acc"] <= 1 for role in ("teacher", "scratch", "student"))
    ckpt = torch.load(run / "checkpoints" / "student_best.pt", weights_only=True)
    assert ckpt["arch"]["name"] == student and ckpt["data"]["class_names"][:2] == names
    if dataset == "imagefolder":
        assert "streamed" in r.stdout + r.stderr and ckpt["data"]["input_shape"] == [3, 32, 32]
        # The root given relative to the current directory is stored absolute.
        assert ckpt["data"]["dataset"]["root"] == str((kd.dir / "data" / "photos").resolve())
        # The streamed checkpoint evaluates and exports (the files are read again, not decoded in memory).
        r = kd("evaluate", f"run={run}")
        assert r.returncode == 0 and "student" in r.stdout, r.stdout + r.stderr
        r = kd("export", f"checkpoint={run / 'checkpoints' / 'student_best.pt'}", "formats=[onnx]", "debug=smoke")
        assert r.returncode == 0, r.stdout + r.stderr
        assert len(list((kd.dir / "runs").glob("export/*/*.onnx"))) == 1


def test_feature_distillation_on_named_stages_across_the_zoo(kd):
    cifar10(kd.dir / "data", 24, 40)
    r = kd(
        "distill",
        "teacher=wrn_40_2",
        "student=resnet8x4",
        "dataset=cifar10",
        "dataset.download=false",
        "dataset.val_size=0.2",
        "features=[at]",
        "features.at.teacher_layer=[layer1,layer2,layer3]",
        "features.at.student_layer=[layer1,layer2,layer3]",
        "baseline=false",
        "debug=smoke",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # Output shapes for 32x32 inputs: the stages halve the resolution, wrn_40_2 is twice as wide.
    assert (
        "features at: student layer1 (64, 32, 32), layer2 (128, 16, 16), layer3 (256, 8, 8) -> "
        "teacher layer1 (32, 32, 32), layer2 (64, 16, 16), layer3 (128, 8, 8)"
    ) in " ".join(r.stdout.split())
