"""Magnitude pruning during distillation (prune.kind=unstructured|channel).

The target sparsity follows the polynomial schedule of Zhu & Gupta 2017, "To prune, or not to
prune" (arXiv:1710.01878): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^power between
steps t0 and t1, dense before t0, s_f after t1. Every `every` steps (and at t1) each prunable
layer is pruned on its own to s_t of its weights (per layer, not global), by torch.nn.utils.prune:
the smallest |w| (unstructured) or the output channels / rows of lowest L2 norm (channel).

While training, the layers carry prune's reparametrisation (`weight_orig` and the buffer
`weight_mask`, weight = orig * mask), so training states save and restore the masks; the
checkpoints are always written plain (`plain_state_dict`), with the pruned weights as zeros.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from kdcli.config.choices import PRUNE_KINDS
from kdcli.core.errors import KdError

KINDS = PRUNE_KINDS
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
END_FRACTION = 0.75  # prune.end_step=null: the schedule ends at 75 % of the run's training steps


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear and Conv1d/2d/3d layer whose weight is pruned: all of them
    but the last in `model.modules()` order, taken to be the classifier that produces the logits
    (pruning its rows would remove classes). That holds for every built-in model."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LAYERS)]
    return layers[:-1]


def _layers(model: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    layers = prunable(model)
    if not layers:
        raise KdError(
            f"prune.kind={kind}: the student ({type(model).__name__}) has no Linear or Conv layer besides its "
            "classifier, which is never pruned. Use a larger student or prune.kind=none."
        )
    return layers


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer computes with: orig * mask while pruning is attached."""
    if hasattr(module, "weight_mask"):  # module.weight is only refreshed at the next forward
        return module.weight_orig * module.weight_mask
    return module.weight


@torch.no_grad()
def sparsity(model: nn.Module) -> float:
    """Share of exactly-zero weights over the prunable layers' weights (0.0 if there are none)."""
    zeros = total = 0
    for _, module in prunable(model):
        w = _weight(module)
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


def target_sparsity(step: int, initial: float, final: float, start: int, end: int, power: float) -> float:
    """The schedule's sparsity after `step` training steps (Zhu & Gupta 2017)."""
    if step < start:
        return 0.0
    if step >= end:
        return final
    return final + (initial - final) * (1 - (step - start) / (end - start)) ** power


def _bypassed(model: nn.Module, input_shape) -> list[str]:
    """Prunable layers whose forward never runs: attention blocks (nn.MultiheadAttention,
    torchvision's Swin) read their projections' .weight directly, so prune's forward pre-hook,
    which applies the mask, would never fire for them."""
    from kdcli.losses.taps import layer_shapes

    ran = layer_shapes(model, input_shape)  # the modules whose forward ran on one input
    return [n for n, _ in prunable(model) if n not in ran]


def plan(node, total_steps: int, model: nn.Module, input_shape=None) -> dict:
    """The settings of a prune config node for `model` and a run of `total_steps` training steps,
    with end_step resolved (null: 75 % of the run). Raises KdError if they do not fit."""
    _layers(model, node.kind)
    skipped = _bypassed(model, input_shape) if input_shape is not None else []
    if skipped:
        raise KdError(
            f"prune.kind={node.kind}: the student's layers {', '.join(skipped[:3])}"
            f"{' ...' if len(skipped) > 3 else ''} are used without calling their forward (attention projections), "
            "so their masks would not apply. Pruning supports convolutional and MLP students; use one of them, "
            "or prune.kind=none."
        )
    end = node.end_step
    if end is None:
        end = max(1, int(END_FRACTION * total_steps))
        where = f"prune.end_step=null (75 % of the run's {total_steps} steps) gives {end}"
    else:
        where = f"prune.end_step={end}"
    if end > total_steps:
        raise KdError(
            f"{where}, past the run's end: it has {total_steps} training steps (epochs x steps per epoch, after "
            f"trainer.max_batches). The final sparsity would never be reached. Fix: prune.end_step <= {total_steps}."
        )
    if node.start_step >= end:
        raise KdError(
            f"prune.start_step={node.start_step} is not before the schedule's end: {where}. Fix: a smaller "
            "prune.start_step or a later prune.end_step."
        )
    settings = {k: node[k] for k in ("kind", "initial", "final", "start_step", "end_step", "every", "power")}
    return {**settings, "end_step": int(end)}


class Pruner:
    """Prunes a model's prunable layers along the schedule. Built before the optimizer: prune
    keeps each weight's Parameter object (as `weight_orig`), so the optimizer trains it on."""

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str,
        initial: float,
        final: float,
        start_step: int,
        end_step: int,
        every: int,
        power: float,
    ):
        if kind not in KINDS[1:]:
            raise KdError(f"prune.kind={kind}: choose one of {', '.join(KINDS[1:])} to prune.")
        self.kind, self.initial, self.final, self.power = kind, float(initial), float(final), float(power)
        self.start, self.end, self.every = int(start_step), int(end_step), int(every)
        self.layers = _layers(model, kind)
        for _, module in self.layers:  # masks of ones: the state dict has weight_orig/weight_mask from the start
            prune.identity(module, "weight")

    def is_update(self, step: int) -> bool:
        return self.start <= step <= self.end and ((step - self.start) % self.every == 0 or step == self.end)

    def reached(self, step: int) -> bool:
        """Whether the final sparsity is in place after `step` training steps."""
        return step >= self.end

    def update(self, step: int) -> bool:
        """New masks if `step` is a mask-update step. remove() first folds the old mask into the
        weight: pruned weights are zeros, the smallest magnitudes, so they are picked again."""
        if not self.is_update(step):
            return False
        amount = target_sparsity(step, self.initial, self.final, self.start, self.end, self.power)
        for _, module in self.layers:
            prune.remove(module, "weight")
            if self.kind == "unstructured":
                prune.l1_unstructured(module, "weight", amount=amount)
            else:
                prune.ln_structured(module, "weight", amount=amount, n=2, dim=0)
        return True

    def make_permanent(self) -> None:
        """Plain `weight` Parameters holding the zeros, no hooks (idempotent)."""
        for _, module in self.layers:
            if hasattr(module, "weight_mask"):
                prune.remove(module, "weight")


def plain_state_dict(state: dict) -> dict:
    """A state dict with every `{name}_orig` / `{name}_mask` pair folded into `{name}` = orig * mask,
    so it loads into the plain architecture; other entries unchanged."""
    out = {}
    for key, value in state.items():
        if key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state:
            continue
        mask = state.get(key[: -len("_orig")] + "_mask") if key.endswith("_orig") else None
        if mask is not None:
            out[key[: -len("_orig")]] = value * mask
        else:
            out[key] = value
    return out
