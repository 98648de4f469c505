import math

import torch.nn as nn

from kdcli.registry import MODELS


@MODELS.register("mlp")
def mlp(input_shape, num_classes, *, hidden: list = (256,), dropout: float = 0.0) -> nn.Module:
    """Multi-layer perceptron on the flattened input; `hidden` lists the hidden widths."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
