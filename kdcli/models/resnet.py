"""CIFAR ResNets (He et al. 2016, sec. 4.2) and wide ResNets (Zagoruyko & Komodakis 2016), laid out
as in the distillation benchmarks (RepDistiller/CRD, Tian et al. 2020; mdistiller).

Stages, for a 32x32 input (28x28 gives 28/14/7):
  stem    3x3 conv-BN-ReLU (ResNet); a bare 3x3 conv of 16 channels (WRN, whose blocks are pre-activation)
  layer1  full resolution, 32x32
  layer2  first block strides 2, 16x16
  layer3  first block strides 2, 8x8
then global average pooling and `fc`. A WRN's layer3 output is taken before its final `bn` and `relu`
(pre-activation: the blocks end in a bare conv plus shortcut).

ResNet depth = 6n+2 (n basic blocks per stage). A shortcut that changes shape is a 1x1 conv with BN
(option B of He et al., as RepDistiller; He et al.'s own CIFAR models pad with zeros, option A, which
saves 2.7k parameters in resnet20). WRN depth = 6n+4, widths 16, 16k, 32k, 64k; a shape-changing
shortcut is a bare 1x1 conv fed by the block's pre-activation.
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcli.core.errors import KdError
from kdcli.core.registry import MODELS


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, as torchvision), BN weight 1 and bias 0; linears keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BN (-> ReLU)."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, add the shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, relu=False)
        self.downsample = conv_bn(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.downsample(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, add the shortcut (WRN)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.downsample = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        # A projection reads the normalised input (both branches share the first BN); identity reads x itself.
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv2(self.drop(F.relu(self.bn2(self.conv1(pre)))))
        return out + shortcut


class CifarResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, blocks: int, widths, preact: bool, dropout: float = 0.0):
        super().__init__()
        stem, *stages = widths
        block = partial(PreActBlock, dropout=dropout) if preact else BasicBlock
        self.stem = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False) if preact else conv_bn(in_channels, stem, 3)

        def stage(cin, cout, stride):
            return nn.Sequential(
                *(block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(blocks))
            )

        self.layer1 = stage(stem, stages[0], 1)
        self.layer2 = stage(stages[0], stages[1], 2)
        self.layer3 = stage(stages[1], stages[2], 2)
        if preact:
            self.bn = nn.BatchNorm2d(stages[2])
            self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(stages[2], num_classes)
        self.preact = preact
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        if self.preact:
            x = self.relu(self.bn(x))
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet(input_shape, num_classes, depth: int, widths=(16, 16, 32, 64)) -> nn.Module:
    """ResNet of depth 6n+2 with (stem, layer1, layer2, layer3) widths; the "x4" models use (32, 64, 128, 256)."""
    if depth < 8 or (depth - 2) % 6:
        raise KdError(f"a CIFAR ResNet has depth 6n+2 (8, 14, 20, 32, 44, 56, 110, ...); got {depth}.")
    return CifarResNet(input_shape[0], num_classes, (depth - 2) // 6, widths, preact=False)


def wide_resnet(input_shape, num_classes, depth: int, k: int, dropout: float = 0.0) -> nn.Module:
    """WRN-depth-k: depth 6n+4, stem 16, stages 16k/32k/64k of pre-activation blocks."""
    if depth < 10 or (depth - 4) % 6:
        raise KdError(f"a wide ResNet has depth 6n+4 (10, 16, 22, 28, 40, ...); got {depth}.")
    if not 0.0 <= dropout < 1.0:
        raise KdError(f"wrn dropout is a probability in [0, 1); got {dropout}.")
    widths = (16, 16 * k, 32 * k, 64 * k)
    return CifarResNet(input_shape[0], num_classes, (depth - 4) // 6, widths, preact=True, dropout=dropout)


X4 = (32, 64, 128, 256)  # RepDistiller's resnet8x4/resnet32x4: 4x the stages of resnet8/32, 2x the stem


def _blocks(n: int, kind: str) -> str:
    return f"{n} {kind} block{'s' if n > 1 else ''}"


def _register_resnet(depth: int, widths=(16, 16, 32, 64)) -> None:
    n, wide = (depth - 2) // 6, widths != (16, 16, 32, 64)
    source = "RepDistiller/CRD" if wide else "He et al. 2016; RepDistiller" if depth in (8, 14) else "He et al. 2016"
    width = f" at 4x width ({source}): stem {widths[0]}," if wide else f" ({source}): stem,"
    stages = "/".join(str(w) for w in widths[1:])

    def build(input_shape, num_classes) -> nn.Module:
        return cifar_resnet(input_shape, num_classes, depth, widths)

    build.__doc__ = f"CIFAR ResNet-{depth}{width} layer1-3 of {_blocks(n, 'basic')}, {stages} channels."
    MODELS.register(f"resnet{depth}{'x4' if wide else ''}")(build)


def _register_wrn(depth: int, k: int) -> None:
    def build(input_shape, num_classes, *, dropout: float = 0.0) -> nn.Module:
        return wide_resnet(input_shape, num_classes, depth, k, dropout)

    build.__doc__ = (
        f"Wide ResNet WRN-{depth}-{k} (Zagoruyko & Komodakis 2016): stem, layer1-3 of "
        f"{_blocks((depth - 4) // 6, 'pre-act')}, {16 * k}/{32 * k}/{64 * k} channels."
    )
    MODELS.register(f"wrn_{depth}_{k}")(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_resnet(_depth)
for _depth in (8, 32):
    _register_resnet(_depth, X4)
for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register_wrn(_depth, _k)
