"""`kd list`: models with their weights and forward FLOPs for a dataset's input, glob patterns,
and clear errors for inputs it cannot know."""

import pytest
import torch.nn as nn

from kdcli.commands.list_cmd import count, empty_weights, measure
from kdcli.models import build_model, count_flops, count_params

# convnet, by hand (FLOPs = 2 per multiply-add of the convs and linears; pools, ReLUs and biases are free):
#   mnist5k, 1x28x28, 10 classes: conv1 5x5 1->10 on 24x24 = 10*24*24*25 = 144,000 MACs; pool -> 12;
#   conv2 5x5 10->20 on 8x8 = 20*8*8*250 = 320,000; pool -> 4; fc1 320->50 = 16,000; fc2 50->10 = 500.
#   480,500 MACs = 961,000 FLOPs. Weights: 260 + 5,020 + 16,050 + 510 = 21,840.
#   cifar100, 3x32x32, 100 classes: conv1 3->10 on 28x28 = 10*28*28*75 = 588,000; pool -> 14;
#   conv2 on 10x10 = 20*10*10*250 = 500,000; pool -> 5; fc1 500->50 = 25,000; fc2 50->100 = 5,000.
#   1,118,000 MACs = 2,236,000 FLOPs. Weights: 760 + 5,020 + 25,050 + 5,100 = 35,930.
MNIST_FLOPS, MNIST_WEIGHTS = 961_000, 21_840
CIFAR100_FLOPS, CIFAR100_WEIGHTS = 2_236_000, 35_930


def row(stdout: str, name: str) -> list[str]:
    """The cells of the table row that starts with `name`, its wrapped lines joined."""
    found = None
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if found is not None and len(cells) == len(found) and not cells[0]:
            found = [f"{a} {b}".strip() for a, b in zip(found, cells)]
        elif found is not None:
            return found
        elif cells[0] == name:
            found = cells
    assert found is not None, f"no row for {name} in:\n{stdout}"
    return found


def test_convnet_counts_match_the_hand_computation():
    for shape, classes, flops, weights in [
        ((1, 28, 28), 10, MNIST_FLOPS, MNIST_WEIGHTS),
        ((3, 32, 32), 100, CIFAR100_FLOPS, CIFAR100_WEIGHTS),
    ]:
        model = build_model("convnet", shape, classes)
        assert (count_params(model), count_flops(model, shape)) == (weights, flops)
        assert measure("convnet", shape, classes) == (weights, flops)  # built on the meta device


def test_counts_read_at_a_glance():
    assert [count(n) for n in (0, 1_234, 99_999, 271_000, 961_000, 41_230_000, 387_400_000, 1_660_000_000)] == [
        "0",
        "1,234",
        "99,999",
        "0.27M",
        "0.96M",
        "41.2M",
        "387M",
        "1.66G",
    ]


def test_empty_weights_allocate_nothing_and_restore_torch():
    with empty_weights():
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    assert {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {"meta"}
    assert nn.Linear(2, 2).weight.device.type == "cpu"


def test_models_table_for_mnist5k_by_default(kd):
    r = kd("list", "models")
    assert r.returncode == 0, r.stderr
    assert "1x28x28 input, 10 classes (mnist5k)" in r.stdout
    assert row(r.stdout, "convnet")[2:4] == ["21,840", "0.96M"]
    assert row(r.stdout, "mlp")[3] == count(2 * (784 * 256 + 256 * 10))
    # The torchvision family is one row, its models listed on request only.
    assert "kd list models 'tv_*'" in " ".join(row(r.stdout, "tv_<name>"))
    assert "tv_resnet18" not in r.stdout


def test_models_table_for_cifar100(kd):
    r = kd("list", "models", "dataset=cifar100")
    assert r.returncode == 0, r.stderr
    assert "3x32x32 input, 100 classes (cifar100)" in r.stdout
    assert row(r.stdout, "convnet")[2:4] == ["35,930", "2.24M"]


def test_a_pattern_lists_and_counts_only_matching_models(kd):
    r = kd("list", "models", "tv_resnet1?", "tv_maxvit_t", "input=3,32,32", "classes=100")
    assert r.returncode == 0, r.stderr
    assert "3x32x32 input, 100 classes" in r.stdout
    cells = row(r.stdout, "tv_resnet18")
    assert cells[1] == "pretrained=False, small_input=auto" and cells[2] == "11.2M"
    assert cells[3].endswith("G") and "ResNet-18" in cells[4]
    assert "convnet" not in r.stdout and "tv_<name>" not in r.stdout
    # A model that cannot be built for that input: '-' and the reason under the table.
    assert row(r.stdout, "tv_maxvit_t")[2:4] == ["-", "-"]
    assert "Not counted for 3x32x32 inputs:" in r.stdout and "tv_maxvit_t' cannot take 3x32x32" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["models", "dataset=cifar1000"], "Unknown dataset 'cifar1000'. Did you mean 'cifar100'?"),
        (["models", "dataset=imagefolder"], "kd list models input=3,64,64 classes=N"),
        (["models", "input=3,32"], "input=3,32: give channels, height and width, e.g. input=3,32,32."),
        (["modles"], "kd list: unknown argument 'modles'. Did you mean 'models'?"),
        (["losses", "zzz*"], "kd list: no name among the losses matches zzz*."),
    ],
)
def test_bad_arguments_get_a_clear_error(kd, args, message):
    r = kd("list", *args)
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 1, out
    assert message in out and "Traceback" not in out


def test_patterns_apply_to_every_kind(kd):
    r = kd("list", "k?", "stand*")
    assert r.returncode == 0, r.stderr
    assert row(r.stdout, "kd") and row(r.stdout, "standard")
    assert "mnist5k" not in r.stdout and "convnet" not in r.stdout
