"""VGG with batch norm for CIFAR (Simonyan & Zisserman 2015), the variant of the distillation benchmarks
(RepDistiller/CRD, Tian et al. 2020; mdistiller): no fully connected hidden layers, one `fc` on 512 channels.

Stages (no stem): `layer1` .. `layer5`, blocks of 3x3 conv-BN-ReLU at 64, 128, 256, 512, 512 channels, each
block's output after its last ReLU. 2x2 max pools `pool1`..`pool3` follow layer1..layer3; `pool4` (between
layer4 and layer5) only pools inputs of 64 pixels and more, as RepDistiller, so a 32x32 input gives
layer1 32x32, layer2 16x16, layer3 8x8, layer4 and layer5 4x4. Then global average pooling and `fc`.
"""

import torch
import torch.nn as nn

from kdcli.core.registry import MODELS
from kdcli.models.resnet import init_weights

WIDTHS = (64, 128, 256, 512, 512)
# Convs per block: vgg8 is RepDistiller's config "S"; 11/13/16/19 are configs A/B/D/E of the VGG paper.
DEPTHS = {8: (1, 1, 1, 1, 1), 11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


def _block(cin: int, cout: int, convs: int) -> nn.Sequential:
    layers = []
    for i in range(convs):
        # The convs keep their bias although BN follows, as in the reference, so parameter counts match.
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, input_shape, num_classes: int, depths):
        super().__init__()
        cins = (input_shape[0], *WIDTHS[:-1])
        self.layer1, self.layer2, self.layer3, self.layer4, self.layer5 = (
            _block(cin, cout, n) for cin, cout, n in zip(cins, WIDTHS, depths)
        )
        self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(2) for _ in range(3))
        # A fourth pool would leave CIFAR's 32x32 at 2x2 for layer5; the reference keeps 4x4.
        self.pool4 = nn.MaxPool2d(2) if min(input_shape[1:]) >= 64 else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(WIDTHS[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.layer1(x))
        x = self.pool2(self.layer2(x))
        x = self.pool3(self.layer3(x))
        x = self.pool4(self.layer4(x))
        return self.fc(self.pool(self.layer5(x)).flatten(1))


def _register(depth: int, doc: str) -> None:
    def build(input_shape, num_classes) -> nn.Module:
        return VGG(input_shape, num_classes, DEPTHS[depth])

    build.__doc__ = doc
    MODELS.register(f"vgg{depth}")(build)


_PAPER = "with BN (Simonyan & Zisserman 2015, CIFAR variant): layer1-5 of"
_register(8, "VGG-8 with BN (RepDistiller/CRD CIFAR variant): layer1-5 of 1 conv each, 64-128-256-512-512 channels.")
_register(11, f"VGG-11 {_PAPER} 1,1,2,2,2 convs, 64-512 channels.")
_register(13, f"VGG-13 {_PAPER} 2 convs each, 64-512 channels.")
_register(16, f"VGG-16 {_PAPER} 2,2,3,3,3 convs, 64-512 channels.")
_register(19, f"VGG-19 {_PAPER} 2,2,4,4,4 convs, 64-512 channels.")
