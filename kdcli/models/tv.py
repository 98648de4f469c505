"""Any torchvision classification model as `tv_<name>` (tv_resnet18, tv_mobilenet_v3_small,
tv_efficientnet_b0, ...), adapted to the dataset:

- input channels: the first conv is replaced by one of the same configuration with the right
  `in_channels`; its kernel is carried over, summed over RGB for one channel (as timm does);
- small inputs (min(H, W) < 64, small_input=auto): the resolution is kept early, as the CIFAR
  adaptations do. A ResNet's conv1 becomes 3x3 stride 1 and its max pool goes (with pretrained
  weights conv1 keeps its 7x7 kernel, at stride 1); other families get stride 1 in their first
  conv, and lose their first max pool unless a strided conv comes before it. A ViT is built for
  the input's side (image_size) and MaxViT for its size: their first conv cuts patches.
- stages: `kd_stages` names the last module of each spatial resolution along the model's trunk
  `layer1..layerK`, so feature losses can name stages alike across families
  (`features.at.teacher_layer=layer3`); a model that has real `layerN` modules (ResNets) keeps them.

torchvision is imported only when a tv_ model is built, and its list of models is cached per
torchvision version: importing it takes about as long as importing torch.
"""

from __future__ import annotations

import contextvars
import functools
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

from kdcli.core.errors import KdError
from kdcli.core.registry import MODELS

PREFIX = "tv_"
# True while a model is rebuilt to receive a checkpoint's weights (kdcli.models.for_checkpoint).
WEIGHTS_FROM_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar("weights_from_checkpoint", default=False)
SMALL = 64  # inputs with a side below this keep their resolution early (small_input=auto)
# Containers whose children are the model's stages, where a model has one.
TRUNKS = ("features", "layers", "trunk_output", "blocks")


def _cache_file() -> Path:
    from importlib.metadata import version

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "kdcli" / f"torchvision-{version('torchvision')}-models.txt"


@functools.cache
def tv_names() -> list[str]:
    """torchvision's classification models. They are listed by importing torchvision.models
    (1 to 2 s) once per torchvision version; a file keeps them for later starts, which list
    them for the teacher/student config groups."""
    cache = _cache_file()
    if "torchvision.models" not in sys.modules:
        try:
            names = cache.read_text().split()
            if names:
                return names
        except OSError:
            pass
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("\n".join(names) + "\n")
        tmp.replace(cache)
    except OSError:  # a read-only home: list them again next time
        pass
    return names


def describe(arch: str) -> str:
    """The first sentence of torchvision's docstring for the model, and the ImageNet top-1 of its
    default weights."""
    import torchvision.models as tvm

    doc = " ".join((tvm.get_model_builder(arch).__doc__ or "").strip().split("\n\n")[0].split())
    doc = re.sub(r"`([^`<]+?)\s*<[^>]*>`_+", r"\1", doc)  # reST links: keep their text
    doc = re.sub(r"^Constructs an? ", "", doc)
    doc = doc[:1].upper() + doc[1:]
    top1 = tvm.get_model_weights(arch).DEFAULT.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return f"{doc} Pretrained: {top1:.1f}% ImageNet top-1." if top1 else doc


def adapt_conv(conv: nn.Conv2d, in_channels: int | None = None, stride: int | None = None) -> nn.Conv2d:
    """A copy of `conv` with other input channels and/or stride, its kernel carried over: summed
    over the input channels for one channel, else tiled over them and scaled by 3/in_channels
    (timm's adapt_input_conv), so a pretrained RGB filter answers a grey image alike."""
    cin = in_channels or conv.in_channels
    new = nn.Conv2d(
        cin,
        conv.out_channels,
        conv.kernel_size,
        stride or conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        weight = conv.weight
        if cin != conv.in_channels:
            if cin == 1:
                weight = weight.sum(dim=1, keepdim=True)
            else:
                repeats = -(-cin // conv.in_channels)
                weight = weight.repeat(1, repeats, 1, 1)[:, :cin] * (conv.in_channels / cin)
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _adapt_input(model: nn.Module, channels: int, small: bool, pretrained: bool) -> None:
    """Input channels and small inputs (see the module docstring)."""
    import torchvision.models as tvm

    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    first = model.get_submodule(convs[0])
    if small and isinstance(model, tvm.ResNet) and not pretrained:
        conv1 = nn.Conv2d(channels, first.out_channels, 3, 1, 1, bias=False, device=first.weight.device)
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's ResNet
        model.conv1, model.maxpool = conv1, nn.Identity()
        return
    # A ViT's or MaxViT's first conv cuts patches or fixes the grid its attention windows assume.
    keep_stride = isinstance(model, (tvm.VisionTransformer, tvm.MaxVit)) or not small
    if first.in_channels != channels or not keep_stride:
        _set(model, convs[0], adapt_conv(first, channels, None if keep_stride else 1))
    if keep_stride:
        return
    # The max pool that would now be the first to halve the resolution goes too.
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and max(_pair(module.stride)) > 1:
            break
        if isinstance(module, nn.MaxPool2d):
            _set(model, name, nn.Identity())
            break


def _pair(value) -> tuple:
    return value if isinstance(value, tuple) else (value, value)


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """The last layer with ImageNet's 1000 outputs (a Linear, or SqueezeNet's 1x1 conv) gets num_classes."""
    heads = [
        (n, m)
        for n, m in model.named_modules()
        if 1000 in (getattr(m, "out_features", 0), getattr(m, "out_channels", 0))
    ]
    name, head = heads[-1]
    device = head.weight.device
    if isinstance(head, nn.Linear):
        _set(model, name, nn.Linear(head.in_features, num_classes, head.bias is not None, device=device))
    else:
        _set(model, name, nn.Conv2d(head.in_channels, num_classes, head.kernel_size, device=device))


def _builder_kwargs(arch: str, input_shape, pretrained: bool) -> dict:
    c, h, w = input_shape
    kwargs = {}
    if arch in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False  # training wants the logits, not (logits, aux logits)
        if not pretrained:
            kwargs["init_weights"] = True  # what torchvision does, without its FutureWarning
        if c != 3:
            kwargs["transform_input"] = False  # it re-normalises three RGB channels
    if not pretrained and arch.startswith("vit_") and h == w:
        kwargs["image_size"] = h  # else the ViT takes 224x224 only
    if not pretrained and arch.startswith("maxvit"):
        kwargs["input_size"] = (h, w)
    return kwargs


def _cannot(arch: str, input_shape, reason: str, pretrained: bool) -> KdError:
    c, h, w = input_shape
    if arch.startswith("maxvit") and not pretrained:
        hint = "MaxViT's 7x7 windows take sides that are multiples of 224 (7 windows at 1/32 of the input)"
    elif arch.startswith("vit") and not pretrained:
        hint = "A ViT takes square images whose side is a multiple of its patch size (the number in its name)"
    elif pretrained:
        hint = "With pretrained=true some models keep the input size of their weights (224x224); try pretrained=false"
    else:
        hint = "Choose another model (kd list models 'tv_*' shows which build for a dataset) or larger images"
    first = reason.strip().splitlines()[0] if reason.strip() else "no reason given"
    return KdError(f"model '{PREFIX}{arch}' cannot take {c}x{h}x{w} inputs ({first}). {hint}.")


def find_stages(model: nn.Module, input_shape) -> dict[str, str]:
    """layer1..layerK -> the last module of each spatial resolution along the model's trunk:
    the children of its `features`-like container, or else its own children, in the order they
    run, up to the global pooling or the first output that is not a feature map. Runs one
    forward (which is also what tells that the model takes this input)."""
    trunk = next((n for n in TRUNKS if isinstance(getattr(model, n, None), (nn.Sequential, nn.ModuleList))), None)
    if trunk is not None:
        prefix, candidates = f"{trunk}.", list(model.get_submodule(trunk).named_children())
    else:
        prefix, candidates = "", list(model.named_children())
    ran: list[tuple[str, nn.Module, object]] = []
    handles = [
        module.register_forward_hook(lambda m, args, out, name=prefix + name: ran.append((name, m, out)))
        for name, module in candidates
    ]
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    stages: list[tuple[str, tuple]] = []
    for name, module, out in ran:
        if not (isinstance(out, torch.Tensor) and out.dim() == 4) or isinstance(
            module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
        ):
            break
        # The last two dims: (H, W), or (W, C) for Swin's channels-last maps, which change together.
        size = tuple(out.shape[-2:])
        if stages and stages[-1][1] == size:
            stages[-1] = (name, size)
        else:
            stages.append((name, size))
    if any(re.fullmatch(r"layer\d+", n) for n, _ in model.named_modules()):
        return {}  # the model names its stages itself (ResNets)
    return {f"layer{i}": name for i, (name, _) in enumerate(stages, 1)}


@MODELS.register_family(PREFIX, tv_names, describe)
def tv(arch: str, input_shape, num_classes, *, pretrained: bool = False, small_input: bool | str = "auto") -> nn.Module:
    """Any torchvision classification model, adapted to the input's channels and size."""
    import torchvision.models as tvm

    c, h, w = input_shape
    choice = str(small_input).lower()
    if choice not in ("auto", "true", "false"):
        raise KdError(f"model '{PREFIX}{arch}': small_input takes auto, true or false; got {small_input!r}.")
    small = min(h, w) < SMALL if choice == "auto" else choice == "true"
    kwargs = _builder_kwargs(arch, input_shape, pretrained)
    try:
        if pretrained and WEIGHTS_FROM_CHECKPOINT.get():
            # The structure that the pretrained weights give, without fetching them: a checkpoint's
            # weights replace them (evaluate, export and teacher.ckpt work offline).
            if arch in ("googlenet", "inception_v3") and c == 3:
                kwargs["transform_input"] = True  # torchvision sets it with the weights
            model = tvm.get_model(arch, weights=None, num_classes=1000, **kwargs)
        elif pretrained:
            model = tvm.get_model(arch, weights="DEFAULT", **kwargs)
        else:
            model = tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except OSError as e:  # urllib's errors included: no network, no such file
        raise KdError(
            f"model '{PREFIX}{arch}': could not download its pretrained weights ({e}). They are fetched once into "
            f"{torch.hub.get_dir()}/checkpoints: run once with network access, or set pretrained=false."
        ) from None
    except (AssertionError, ValueError) as e:  # builders that check the input size
        raise _cannot(arch, input_shape, str(e), pretrained) from None
    if pretrained and num_classes != 1000:
        _replace_head(model, num_classes)
    _adapt_input(model, c, small, pretrained)
    try:
        model.kd_stages = find_stages(model, input_shape)
    except (RuntimeError, AssertionError, ValueError, IndexError) as e:
        raise _cannot(arch, input_shape, str(e), pretrained) from None
    return model
