"""Model builders: each takes (input_shape, num_classes, *, kwargs) and returns an nn.Module
with stably named submodules."""

import torch.nn as nn

from kdcli.core.registry import MODELS
from kdcli.models import cnn, mlp, mobile, resnet, tv, vgg  # noqa: F401  (registers the built-in models)


def build_model(name: str, input_shape, num_classes: int, kwargs: dict | None = None) -> nn.Module:
    return MODELS.build(name, tuple(input_shape), int(num_classes), **(kwargs or {}))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape) -> int:
    """Forward FLOPs for one input (torch.utils.flop_counter; a multiply-add counts as 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())
