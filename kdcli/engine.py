"""The training loop and evaluation, shared by every command.

`fit` trains one model with a loss that may look at a teacher's logits on the same
(augmented) batch, keeps the best-on-validation and the last checkpoints, appends one line per
epoch to metrics.jsonl, and reports test accuracy of both checkpoints. Model selection never
looks at the test split.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcli import checkpoint
from kdcli.data import DeviceData
from kdcli.data.device import DeviceSplit
from kdcli.errors import KdError
from kdcli.models import count_params
from kdcli.optim import build_optimizer, build_scheduler
from kdcli.report import progress_bar

log = logging.getLogger("kdcli")

LossFn = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor], tuple]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits for every row of x, in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def scores(logits: torch.Tensor, y: torch.Tensor) -> dict:
    return {
        "acc": (logits.argmax(1) == y).float().mean().item(),
        "nll": F.cross_entropy(logits, y).item(),
    }


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of rows on which the two sets of logits pick the same class."""
    return (logits.argmax(1) == reference.argmax(1)).float().mean().item()


def evaluate(model: nn.Module, split: DeviceSplit, batch_size: int) -> dict:
    return scores(predict(model, split.x, batch_size), split.y)


@dataclass
class FitResult:
    model: nn.Module  # the best-on-validation weights
    metrics: dict
    best_path: Path
    last_path: Path


def fit(
    model: nn.Module,
    data: DeviceData,
    loss_fn: LossFn,
    cfg,
    *,
    role: str,
    run_dir: Path,
    ckpt_meta: dict,
    teacher: Optional[nn.Module] = None,
    show_progress: bool = False,
) -> FitResult:
    """Train `model` on data.train with `loss_fn(student_logits, teacher_logits, labels)`.

    cfg holds the trainer, optimizer and scheduler nodes and the seed. Checkpoints go to
    run_dir/checkpoints/{role}_best.pt and {role}_last.pt with `ckpt_meta` (arch, data).
    """
    tcfg = cfg.trainer
    steps = data.steps_per_epoch(tcfg.batch_size)
    if tcfg.max_batches:
        steps = min(steps, tcfg.max_batches)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, steps, tcfg.epochs)
    generator = torch.Generator(device=data.device).manual_seed(int(cfg.seed))
    if teacher is not None:
        teacher.eval()

    ckpt_dir = Path(run_dir) / "checkpoints"
    best_path, last_path = ckpt_dir / f"{role}_best.pt", ckpt_dir / f"{role}_last.pt"
    best_acc, best_epoch, best_state = -1.0, 0, None
    started = time.perf_counter()
    with progress_bar(show_progress, f"{role}", tcfg.epochs * steps) as advance:
        for epoch in range(1, tcfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), device=data.device)
            correct = torch.zeros((), device=data.device)
            seen = 0
            for step, (x, y) in enumerate(data.train_batches(tcfg.batch_size, generator)):
                if step >= steps:
                    break
                logits = model(x)
                with torch.no_grad():
                    t_logits = teacher(x) if teacher is not None else None
                loss, _ = loss_fn(logits, t_logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tcfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                advance()
            train_loss = loss_sum.item() / seen
            if not math.isfinite(train_loss):
                raise KdError(
                    f"{role}: the training loss became {train_loss} in epoch {epoch}. Likely causes: a "
                    f"learning rate too high (optimizer.lr={cfg.optimizer.lr}) or an extreme temperature. "
                    f"The last good checkpoint is {last_path if epoch > 1 else 'none (first epoch)'}."
                )
            val = evaluate(model, data.val, tcfg.eval_batch_size)
            row = {
                "role": role,
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": correct.item() / seen,
                "val_acc": val["acc"],
                "val_nll": val["nll"],
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_s": time.perf_counter() - t0,
            }
            improved = val["acc"] > best_acc
            if improved:
                best_acc, best_epoch = val["acc"], epoch
                best_state = copy.deepcopy(model.state_dict())
                checkpoint.save(best_path, model, role=role, epoch=epoch, metrics=row, **ckpt_meta)
            checkpoint.save(last_path, model, role=role, epoch=epoch, metrics=row, **ckpt_meta)
            with open(Path(run_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if epoch == min(2, tcfg.epochs) and val["acc"] <= 1.5 / data.info.num_classes:
                log.warning(
                    f"warning  {role}: validation accuracy {val['acc']:.1%} is at chance after {epoch} epoch(s); the "
                    f"model may have collapsed. Try a lower optimizer.lr (now {cfg.optimizer.lr}; the KD term's "
                    "gradients grow with T) or optimizer=adam."
                )
            log.info(
                f"{role:<8} epoch {epoch:>3}/{tcfg.epochs}  loss {train_loss:7.4f}  "
                f"train {row['train_acc']:7.2%}  val {val['acc']:7.2%}{' *' if improved else '  '}  "
                f"lr {row['lr']:.2e}  {row['epoch_s']:5.1f}s"
            )

    test_last = evaluate(model, data.test, tcfg.eval_batch_size)
    model.load_state_dict(best_state)
    test_best = evaluate(model, data.test, tcfg.eval_batch_size)
    metrics = {
        "params": count_params(model),
        "best_epoch": best_epoch,
        "val_acc": best_acc,
        "test_acc": test_best["acc"],
        "test_nll": test_best["nll"],
        "test_acc_last": test_last["acc"],
        "train_s": time.perf_counter() - started,
        "checkpoint": str(best_path),
    }
    return FitResult(model, metrics, best_path, last_path)
