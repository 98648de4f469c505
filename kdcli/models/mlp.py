import math

import torch.nn as nn

from kdcli.core.errors import KdError
from kdcli.core.registry import MODELS


def check_sizes(model: str, dropout: float, **widths) -> None:
    """A width below 1 builds a layer of no units (or fails deep inside torch), and a dropout
    outside [0, 1) is no probability: refused with the key, before anything is built."""
    for key, values in widths.items():
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 for v in values):
            raise KdError(f"{model} {key}={values}: layer widths are whole numbers >= 1.")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise KdError(f"{model} dropout={dropout}: a probability in [0, 1) (0: no dropout).")


@MODELS.register("mlp")
def mlp(input_shape, num_classes, *, hidden: list = (256,), dropout: float = 0.0) -> nn.Module:
    """Multi-layer perceptron on the flattened input; `hidden` lists the hidden widths."""
    check_sizes("mlp", dropout, hidden=hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
