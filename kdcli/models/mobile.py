"""Mobile networks of the distillation benchmarks (RepDistiller/CRD, Tian et al. 2020; mdistiller), with
CIFAR strides: MobileNetV2 (Sandler et al. 2018), ShuffleNetV1 (Zhang et al. 2018), ShuffleNetV2 (Ma et al. 2018).

Stages, for a 32x32 input:
  mobilenetv2   `stem` 3x3 conv-BN-ReLU, stride 2 (16x16); the seven inverted-residual settings grouped by
                resolution: `layer1` settings 1-2 (16x16), `layer2` setting 3 (8x8), `layer3` settings 4-5
                (4x4), `layer4` settings 6-7 (2x2); `head` 1x1 conv-BN-ReLU to 1280 channels; pool; `fc`.
  shufflenetv1  `stem` 1x1 conv-BN-ReLU to 24 channels (32x32); `layer1` 16x16, `layer2` 8x8, `layer3` 4x4,
                each opened by a stride-2 unit; pool; `fc`.
  shufflenetv2  `stem` as v1; `layer1`..`layer3` as v1; `head` 1x1 conv-BN-ReLU to 1024 channels; pool; `fc`.
Each `layerK` output is that stage's last block output (after its ReLU and, for ShuffleNets, channel shuffle).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcli.core.errors import KdError
from kdcli.core.registry import MODELS
from kdcli.models.resnet import conv_bn, init_weights


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` groups, so the next grouped conv sees every group."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


# --- MobileNetV2 -------------------------------------------------------------------------------------------

# (channels, blocks, stride of the first block) per inverted-residual setting; the first setting does not
# expand, the others by `expansion`. CIFAR strides as RepDistiller: the stem strides 2 and the second setting 1
# (ImageNet: 2 and 2), 16x downsampling in all.
MOBILENETV2 = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))
MOBILENETV2_STAGES = ((0, 1), (2,), (3, 4), (5, 6))  # settings per layer1..layer4, one stage per resolution


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (linear), plus the input when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        # The expand conv is kept at expansion 1 too (torchvision drops it), as the reference whose counts we match.
        self.conv = nn.Sequential(
            conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, stride, groups=mid), conv_bn(mid, cout, 1, relu=False)
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: float, expansion: int):
        super().__init__()
        cin = int(32 * width)
        self.stem = conv_bn(in_channels, cin, 3, 2)
        stages = []
        for settings in MOBILENETV2_STAGES:
            blocks = []
            for i in settings:
                c, n, s = MOBILENETV2[i]
                cout = int(c * width)
                for j in range(n):
                    blocks.append(InvertedResidual(cin, cout, s if j == 0 else 1, 1 if i == 0 else expansion))
                    cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        last = int(1280 * width) if width > 1 else 1280
        self.head = conv_bn(cin, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(self.head(x)).flatten(1))


@MODELS.register("mobilenetv2")
def mobilenetv2(input_shape, num_classes, *, width: float = 0.5, expansion: int = 6) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018), CIFAR strides, width 0.5 as in CRD: stem, layer1-4 by resolution, head."""
    if width <= 0 or int(16 * width) < 1:
        raise KdError(f"mobilenetv2.width must be at least 0.0625 (16 channels x width >= 1); got {width}.")
    if expansion < 1:
        raise KdError(f"mobilenetv2.expansion must be a positive integer; got {expansion}.")
    return MobileNetV2(input_shape[0], num_classes, float(width), int(expansion))


# --- ShuffleNetV1 ------------------------------------------------------------------------------------------


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1-BN-ReLU, channel shuffle, 3x3 depthwise-BN-ReLU, grouped 1x1-BN; added to the input, or
    with stride 2 concatenated to the 3x3-average-pooled input; ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, group_first: bool):
        super().__init__()
        branch = cout - cin if stride == 2 else cout  # a stride-2 unit concatenates its input's cin channels
        mid = branch // 4
        # The first unit of the network has too few input channels (24) to split them: its first conv is dense.
        self.first_groups = groups if group_first else 1
        self.conv1 = conv_bn(cin, mid, 1, groups=self.first_groups)
        # ReLU after the depthwise conv as in the reference implementation (the paper has none there).
        self.conv2 = conv_bn(mid, mid, 3, stride, groups=mid)
        self.conv3 = conv_bn(mid, branch, 1, groups=groups, relu=False)
        self.pool = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(channel_shuffle(self.conv1(x), self.first_groups)))
        out = out + x if self.pool is None else torch.cat([out, self.pool(x)], 1)
        return F.relu(out)


class ShuffleNetV1(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths, blocks, groups: int):
        super().__init__()
        self.stem = conv_bn(in_channels, 24, 1)
        cin, stages = 24, []
        for i, (cout, n) in enumerate(zip(widths, blocks)):
            units = [
                ShuffleUnitV1(cin if j == 0 else cout, cout, 2 if j == 0 else 1, groups, i + j > 0) for j in range(n)
            ]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


@MODELS.register("shufflenetv1")
def shufflenetv1(input_shape, num_classes) -> nn.Module:
    """ShuffleNetV1 (Zhang et al. 2018), 3 groups, CIFAR variant of CRD: stem, layer1-3 of 4/8/4 units, 240/480/960."""
    return ShuffleNetV1(input_shape[0], num_classes, (240, 480, 960), (4, 8, 4), 3)


# --- ShuffleNetV2 ------------------------------------------------------------------------------------------


class ShuffleUnitV2(nn.Module):
    """Keep half the channels, pass the other half through 1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU; concat,
    shuffle. With stride 2 both halves see the whole input: left 3x3 depthwise-BN, 1x1-BN-ReLU; right as above."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = cout // 2
        self.stride = stride
        if stride == 2:
            self.left = nn.Sequential(conv_bn(cin, cin, 3, 2, groups=cin, relu=False), conv_bn(cin, mid, 1))
        right_in = cin if stride == 2 else cin - cin // 2
        self.right = nn.Sequential(
            conv_bn(right_in, mid, 1), conv_bn(mid, mid, 3, stride, groups=mid, relu=False), conv_bn(mid, mid, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            out = torch.cat([self.left(x), self.right(x)], 1)
        else:
            keep, rest = x.split([x.shape[1] // 2, x.shape[1] - x.shape[1] // 2], 1)
            out = torch.cat([keep, self.right(rest)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths, blocks, last: int):
        super().__init__()
        self.stem = conv_bn(in_channels, 24, 1)
        cin, stages = 24, []
        for cout, n in zip(widths, blocks):
            # A stride-2 unit opens each stage, then n basic units (the reference's 3/7/3 counts these).
            stages.append(nn.Sequential(ShuffleUnitV2(cin, cout, 2), *(ShuffleUnitV2(cout, cout, 1) for _ in range(n))))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.head = conv_bn(cin, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(self.head(x)).flatten(1))


@MODELS.register("shufflenetv2")
def shufflenetv2(input_shape, num_classes) -> nn.Module:
    """ShuffleNetV2 1x (Ma et al. 2018), CIFAR variant of CRD: stem, layer1-3 of 4/8/4 units, 116/232/464, head 1024."""
    return ShuffleNetV2(input_shape[0], num_classes, (116, 232, 464), (3, 7, 3), 1024)
