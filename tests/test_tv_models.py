"""torchvision models as tv_<name>: adapted to the input's channels and size, with stage aliases
layer1..layerK that feature losses can name, registered without importing torchvision at start."""

import os
import subprocess
import sys
import urllib.error

import pytest
import torch
import torch.nn as nn

from kdcli.core.errors import KdError
from kdcli.core.registry import MODELS, Registry
from kdcli.losses.taps import Taps, describe_layers, layer_shapes
from kdcli.models import build_model
from kdcli.models.tv import adapt_conv

CIFAR100 = ((3, 32, 32), 100)


@pytest.fixture(scope="module")
def built():
    """Each model built once for the module: (name, input_shape) -> model."""
    cache = {}

    def get(name, shape, classes=10):
        if (name, shape, classes) not in cache:
            cache[name, shape, classes] = build_model(name, shape, classes)
        return cache[name, shape, classes]

    return get


def test_resnet18_on_digits_keeps_the_resolution(built):
    model = built("tv_resnet18", (1, 28, 28))
    assert (model.conv1.in_channels, model.conv1.kernel_size, model.conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    # ResNets name their stages layer1..4 themselves: no aliases, and layer4 sees 28 / 8.
    assert model.kd_stages == {}
    assert layer_shapes(model, (1, 28, 28))["layer4"] == (512, 4, 4)


def test_small_input_false_keeps_the_imagenet_stem():
    model = build_model("tv_resnet18", (3, 32, 32), 10, {"small_input": False})
    assert (model.conv1.kernel_size, model.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(model.maxpool, nn.MaxPool2d)
    with pytest.raises(KdError, match="small_input takes auto, true or false; got 'maybe'"):
        build_model("tv_resnet18", (3, 32, 32), 10, {"small_input": "maybe"})


@pytest.mark.parametrize("name", ["tv_mobilenet_v3_small", "tv_efficientnet_b0"])
def test_mobile_models_on_cifar100_have_stages_by_resolution(built, name):
    model = built(name, *CIFAR100)
    assert model.features[0][0].stride == (1, 1)  # the stem keeps 32x32
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    shapes = layer_shapes(model, CIFAR100[0])
    aliases = [f"layer{i}" for i in range(1, len(model.kd_stages) + 1)]
    assert list(model.kd_stages) == aliases and len(aliases) >= 4
    modules = dict(model.named_modules())
    sides = []
    for alias in aliases:
        real = model.kd_stages[alias]
        assert real in modules and alias not in modules
        assert shapes[alias] == shapes[real]
        sides.append(shapes[alias][-1])
    assert sides == sorted(set(sides), reverse=True)  # strictly decreasing: one alias per resolution
    assert sides[0] == 32
    assert f"layer3 (= {model.kd_stages['layer3']})" in describe_layers(model, CIFAR100[0])


def test_taps_on_an_alias_see_the_real_module(built):
    model = built("tv_mobilenet_v3_small", *CIFAR100).eval()
    real = model.get_submodule(model.kd_stages["layer3"])
    seen = []
    handle = real.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    taps = Taps(model, ["layer3"], "student", CIFAR100[0])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    handle.remove()
    taps.remove()
    (value,) = taps.take()
    assert torch.equal(value, seen[0])
    with pytest.raises(KdError, match=r"student_layer=layer9: the student has no layer of that name"):
        Taps(model, ["layer9"], "student", CIFAR100[0])


def test_an_alias_never_hides_a_real_module():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 3, 3))
    model.kd_stages = {"0": "1", "layer1": "1", "layer2": "missing"}
    taps = Taps(model, ["0", "layer1"], "teacher", (1, 8, 8))
    model(torch.zeros(1, 1, 8, 8))
    first, second = taps.take()
    assert first.shape == (1, 2, 6, 6) and second.shape == (1, 3, 4, 4)
    assert list(layer_shapes(model, (1, 8, 8))) == ["layer1", "0", "1"]


def test_unknown_tv_name_suggests_the_closest():
    assert "tv_resnet18" in MODELS and "tv_resnet81" not in MODELS
    with pytest.raises(KdError, match=r"Unknown model 'tv_resnet81'\. Did you mean 'tv_resnet18'\?.*tv_<name>"):
        build_model("tv_resnet81", (3, 32, 32), 10)


def test_adapt_conv_sums_rgb_for_one_channel_and_tiles_for_more():
    conv = nn.Conv2d(3, 4, 7, stride=2, padding=3)
    grey = adapt_conv(conv, 1)
    assert (grey.in_channels, grey.kernel_size, grey.stride, grey.padding) == (1, (7, 7), (2, 2), (3, 3))
    assert torch.equal(grey.weight, conv.weight.sum(dim=1, keepdim=True)) and torch.equal(grey.bias, conv.bias)
    two = adapt_conv(conv, 2)
    assert torch.allclose(two.weight, conv.weight[:, :2] * 1.5)
    strided = adapt_conv(conv, stride=1)
    assert strided.stride == (1, 1) and torch.equal(strided.weight, conv.weight)


def test_pretrained_weights_are_adapted(monkeypatch):
    """A stand-in for the download: torchvision loads our state dict as if it were ResNet-18's."""
    import torchvision.models as tvm
    import torchvision.models._api as api

    state = tvm.resnet18().state_dict()
    monkeypatch.setattr(api, "load_state_dict_from_url", lambda url, *args, **kwargs: state)
    model = build_model("tv_resnet18", (1, 28, 28), 10, {"pretrained": True})
    # Pretrained: conv1 keeps its 7x7 kernel, now stride 1 and summed over RGB; a new 10-way head.
    assert (model.conv1.kernel_size, model.conv1.stride) == ((7, 7), (1, 1))
    assert torch.equal(model.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert model.fc.out_features == 10 and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_failed_download_says_what_to_do(monkeypatch):
    import torchvision.models._api as api

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(
        KdError, match="'tv_resnet18': could not download .*run once with network access, or set pretrained=false"
    ):
        build_model("tv_resnet18", (3, 32, 32), 10, {"pretrained": True})


@pytest.mark.parametrize(
    "name,shape,message",
    [
        ("tv_maxvit_t", (3, 32, 32), "model 'tv_maxvit_t' cannot take 3x32x32 inputs .* multiples of 224"),
        ("tv_vit_b_16", (1, 28, 28), "model 'tv_vit_b_16' cannot take 1x28x28 inputs .* multiple of its patch size"),
    ],
)
def test_models_that_cannot_take_small_inputs_say_so(name, shape, message):
    with pytest.raises(KdError, match=message):
        build_model(name, shape, 10)


def test_a_vit_is_built_for_the_input_side():
    model = build_model("tv_vit_b_32", (3, 64, 64), 10)
    assert model.image_size == 64 and model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_tv_models_are_hydra_options(hydra_cfg):
    cfg = hydra_cfg("distill", ["teacher=tv_resnet18", "student=tv_mobilenet_v3_small", "student.small_input=false"])
    assert cfg.teacher.name == "tv_resnet18" and cfg.teacher.pretrained is False
    assert cfg.student.small_input is False


def test_a_family_is_enumerated_only_when_needed():
    calls = []

    def lister():
        calls.append(1)
        return ["a", "b"]

    reg = Registry("widget")

    @reg.register("plain")
    def plain(*, size: int = 1):
        """A plain widget."""
        return size

    @reg.register_family("fam_", lister, describe=lambda member: f"member {member}")
    def fam(member, *, size: int = 2):
        """Family widgets."""
        return member * size

    assert reg.names(families=False) == ["plain"] and calls == []
    assert reg.names() == ["fam_a", "fam_b", "plain"] and reg.names("fam_*") == ["fam_a", "fam_b"]
    assert "fam_a" in reg and "fam_c" not in reg
    assert reg.build("fam_b", size=3) == "bbb" and reg.params("fam_a") == {"size": 2}
    assert reg.summary("fam_a") == "member a" and reg.summary("plain") == "A plain widget."
    with pytest.raises(KdError, match=r"Unknown widget 'fam_bb'\. Did you mean 'fam_b'\?.*fam_<name>"):
        reg.get("fam_bb")
    with pytest.raises(KdError, match="'size' takes int values"):
        reg.build("fam_a", size="x")


def test_kd_starts_without_torchvision(tmp_path):
    """Importing torchvision costs about as much as importing torch: the model names come from a
    cache file after the first listing, and torchvision is imported only to build a tv_ model."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    code = (
        "import sys; from kdcli.registry import MODELS, load_builtins; load_builtins(); "
        "n = len(MODELS.names()); print(n, 'torchvision' in sys.modules)"
    )
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    count = int(first.stdout.split()[0])
    assert first.stdout.split() == [str(count), "True"]  # listed by torchvision, then cached
    assert again.stdout.split() == [str(count), "False"]
    assert list(tmp_path.glob("kdcli/torchvision-*-models.txt"))


def test_a_pretrained_checkpoint_rebuilds_without_a_download(monkeypatch):
    """evaluate/export/teacher.ckpt rebuild the model and load its weights: nothing to fetch."""
    import torchvision.models as tvm
    import torchvision.models._api as api

    from kdcli.training import checkpoint

    state = tvm.resnet18().state_dict()
    monkeypatch.setattr(api, "load_state_dict_from_url", lambda url, *args, **kwargs: state)
    model = build_model("tv_resnet18", (1, 28, 28), 10, {"pretrained": True})

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    ckpt = {
        "arch": {"name": "tv_resnet18", "kwargs": {"pretrained": True}},
        "data": {"input_shape": [1, 28, 28], "num_classes": 10},
        "state_dict": model.state_dict(),
    }
    rebuilt = checkpoint.build_from(ckpt).eval()
    x = torch.randn(2, 1, 28, 28)
    assert rebuilt.conv1.kernel_size == (7, 7) and torch.equal(rebuilt(x), model.eval()(x))
