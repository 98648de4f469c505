"""Forward hooks that keep the outputs of named modules, so feature losses need no change to
the models. A layer is named as in `model.named_modules()` (`conv2`, `layer3.1`, `0`...);
`penultimate` (the default) is the input of the model's last nn.Linear, the embedding that
relational losses (rkd, pkt, crd) use. A model may also name its stages in an attribute
`kd_stages` (alias -> module name, e.g. {"layer3": "features.6"}, as the tv_ models do), so
`layer3` means the same stage across families; an alias never hides a real module."""

from __future__ import annotations

import torch
import torch.nn as nn

from kdcli.core.errors import KdError
from kdcli.core.registry import did_you_mean

PENULTIMATE = "penultimate"


def _last_linear(model: nn.Module) -> nn.Module | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def stage_aliases(model: nn.Module) -> dict[str, str]:
    """The model's stage aliases (`kd_stages`: alias -> module name) that name a module and hide none."""
    modules = dict(model.named_modules())
    return {a: n for a, n in (getattr(model, "kd_stages", None) or {}).items() if a not in modules and n in modules}


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's named submodules and its stage aliases."""
    modules = dict(model.named_modules())
    return {**{a: modules[n] for a, n in stage_aliases(model).items()}, **modules}


@torch.no_grad()
def layer_shapes(model: nn.Module, input_shape) -> dict[str, tuple]:
    """Output shape (without batch) of every named submodule for one input; stage aliases
    (`kd_stages`) come first, with the shape of the module they name."""
    shapes, handles = {}, []

    def keep(name):
        def hook(module, args, out):  # returns None: a forward hook's return value replaces the output
            if isinstance(out, torch.Tensor):
                shapes.setdefault(name, tuple(out.shape[1:]))

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(keep(name)))
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(2, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    aliases = {a: shapes[n] for a, n in stage_aliases(model).items() if n in shapes}
    return {**aliases, **shapes}


def describe_layers(model: nn.Module, input_shape) -> str:
    shapes, aliases = layer_shapes(model, input_shape), stage_aliases(model)
    return ", ".join(f"{n}{f' (= {aliases[n]})' if n in aliases else ''} {s}" for n, s in shapes.items())


class Taps:
    """Keeps the outputs of the named layers of `model` at each forward, in `values` (same
    order as `names`). Outputs are cloned so that an in-place op after the layer (ReLU with
    inplace=True) does not change what the loss sees."""

    def __init__(self, model: nn.Module, names: list[str], role: str, input_shape):
        self.names = list(names)
        self.values: list[torch.Tensor | None] = [None] * len(self.names)
        self.handles = []
        modules = named_layers(model)
        for i, name in enumerate(self.names):
            if name == PENULTIMATE:
                linear = _last_linear(model)
                if linear is None:
                    raise KdError(
                        f"{role}_layer=penultimate: {type(model).__name__} has no nn.Linear layer whose input to take. "
                        f"Name a layer: {describe_layers(model, input_shape)}."
                    )
                self.handles.append(linear.register_forward_pre_hook(lambda m, args, i=i: self._keep(i, args[0])))
            elif name in modules and name:
                self.handles.append(modules[name].register_forward_hook(lambda m, a, out, i=i: self._keep(i, out)))
            else:
                raise KdError(
                    f"{role}_layer={name}: the {role} has no layer of that name.{did_you_mean(name, modules)} "
                    f"Its layers (output shape per sample): {describe_layers(model, input_shape)}; "
                    f"or {PENULTIMATE} (the input of the last linear layer)."
                )

    def _keep(self, i: int, value) -> None:
        if isinstance(value, (tuple, list)) and value:
            value = value[0]
        if not isinstance(value, torch.Tensor):
            raise KdError(f"layer {self.names[i]} returns {type(value).__name__}, not a tensor; pick another layer.")
        self.values[i] = value.clone()

    def take(self) -> list[torch.Tensor]:
        values, self.values = self.values, [None] * len(self.names)
        return values

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
