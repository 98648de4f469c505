"""Small convolutional nets for digit-sized images."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcli.core.errors import KdError
from kdcli.core.registry import MODELS
from kdcli.models.mlp import check_sizes


def _feature_size(name: str, input_shape, pad1: int) -> tuple[int, int]:
    """Spatial size after conv5x5(padding=pad1) -> pool2 -> conv5x5 -> pool2."""
    h, w = (((s + 2 * pad1 - 4) // 2 - 4) // 2 for s in input_shape[1:])
    if h < 1 or w < 1:
        raise KdError(
            f"model '{name}' needs larger inputs than {input_shape[1]}x{input_shape[2]} pixels "
            "(two 5x5 convs and two 2x2 pools); choose another model for such small inputs."
        )
    return h, w


class ConvNet(nn.Module):
    def __init__(self, input_shape, num_classes, channels=(10, 20), hidden=50, dropout=0.5):
        super().__init__()
        c1, c2 = channels
        h, w = _feature_size("convnet", input_shape, 0)
        self.conv1 = nn.Conv2d(input_shape[0], c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * h * w, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = self.drop(F.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)


class LeNet5(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        # The original pads 28x28 digits to 32x32; padding=2 on conv1 does the same.
        h, w = _feature_size("lenet5", input_shape, 2)
        self.conv1 = nn.Conv2d(input_shape[0], 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * h * w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@MODELS.register("convnet")
def convnet(input_shape, num_classes, *, channels: list = (10, 20), hidden: int = 50, dropout: float = 0.5):
    """The classic PyTorch MNIST example CNN: two 5x5 convs (10, 20 channels), max-pool, 50 hidden units."""
    if len(channels) != 2:
        raise KdError(f"convnet.channels takes two widths, e.g. [10,20]; got {list(channels)}.")
    check_sizes("convnet", dropout, channels=channels, hidden=hidden)
    return ConvNet(input_shape, num_classes, tuple(int(c) for c in channels), int(hidden), float(dropout))


@MODELS.register("lenet5")
def lenet5(input_shape, num_classes) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pool: convs of 6 and 16 channels, fc 120-84."""
    return LeNet5(input_shape, num_classes)
