"""The training loop and evaluation, shared by every command.

`fit` trains one or several models (trainees) on the same (augmented) batches, each with its
objective against frozen teachers or against the other trainees (online distillation); keeps
the best-on-validation and the last checkpoints of each, appends one line per epoch and model
to metrics.jsonl, and reports test accuracy of both checkpoints. Model selection never looks at
the test split.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcli import checkpoint
from kdcli.data import DeviceData
from kdcli.data.device import DeviceSplit
from kdcli.data.stream import StreamData, StreamSplit
from kdcli.errors import KdError
from kdcli.losses.objective import Objective
from kdcli.losses.taps import Taps
from kdcli.models import count_params
from kdcli.optim import build_optimizer, build_scheduler
from kdcli.report import progress_bar

log = logging.getLogger("kdcli")


def batches(source, batch_size: int):
    """The inputs of `source` batch by batch: a tensor, or a split (in memory or streamed)."""
    if isinstance(source, torch.Tensor):
        return (source[i : i + batch_size] for i in range(0, len(source), batch_size))
    return source.batches(batch_size)


@torch.no_grad()
def predict(model: nn.Module, source, batch_size: int) -> torch.Tensor:
    """Logits for every input of `source` (a tensor or a split), in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x).float() for x in batches(source, batch_size)])
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


def evaluate(model: nn.Module, split: DeviceSplit | StreamSplit, batch_size: int) -> dict:
    return scores(predict(model, split, batch_size), split.y)


@dataclass
class FitResult:
    model: nn.Module  # the best-on-validation weights (the last ones with keep="last")
    metrics: dict
    best_path: Path
    last_path: Path


@dataclass
class Trainee:
    """One model being trained, with its objective.

    `sources` names co-trained trainees whose (detached) outputs act as its teachers (online
    methods: deep mutual learning, joint training); with none, it learns from the frozen
    teachers given to `fit`, if its objective needs a teacher. `freeze` holds the module
    names to keep fixed during the first `freeze_epochs` epochs (all of them if None)."""

    role: str
    model: nn.Module
    objective: Objective
    ckpt_meta: dict
    sources: list[str] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)
    freeze_epochs: Optional[int] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: object = None
    taps: Optional[Taps] = None  # the layers its objective reads (as a student)
    source_taps: Optional[Taps] = None  # the layers other trainees read from it (as a teacher)


@dataclass
class Teacher:
    """A frozen teacher. Its input is renormalised from the student's normalisation to its own
    (they differ when it was trained on another class subset), and its classes map to the
    student's class indices `class_map`."""

    model: nn.Module
    class_map: torch.Tensor
    scale: Optional[torch.Tensor] = None  # per channel: x_teacher = x * scale + shift; None: same inputs
    shift: Optional[torch.Tensor] = None
    taps: Optional[Taps] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x if self.scale is None else x * self.scale + self.shift)


def _set_frozen(trainee: Trainee, epoch: int) -> None:
    """Freeze the named modules (no gradients, batch-norm statistics fixed) while it applies."""
    if not trainee.freeze:
        return
    frozen = trainee.freeze_epochs is None or epoch <= trainee.freeze_epochs
    modules = dict(trainee.model.named_modules())
    for name in trainee.freeze:
        modules[name].requires_grad_(not frozen)
        if frozen:
            modules[name].eval()
    if trainee.freeze_epochs is not None and epoch == trainee.freeze_epochs + 1:
        log.info(f"{trainee.role:<8} epoch {epoch}: unfreezing {', '.join(trainee.freeze)}")


def _forward(trainee: Trainee, x: torch.Tensor):
    logits = trainee.model(x)
    feats = trainee.taps.take() if trainee.taps else []
    source_feats = trainee.source_taps.take() if trainee.source_taps else []
    return logits, feats, source_feats


def fit(
    trainees: list[Trainee] | Trainee,
    data: DeviceData | StreamData,
    cfg,
    *,
    run_dir: Path,
    teachers: list[Teacher] = (),
    epochs: Optional[int] = None,
    hint: bool = False,
    show_progress: bool = False,
) -> dict[str, FitResult] | FitResult:
    """Train the trainees together on data.train, one shared batch per step.

    Each step runs the frozen teachers (no gradients) and every trainee on the same (augmented)
    batch, then each trainee's objective against its teachers: the frozen ones, or the detached
    outputs of its `sources` (averaged over them). cfg holds the trainer, optimizer and scheduler
    nodes and the seed. Per trainee: checkpoints run_dir/checkpoints/{role}_best.pt (best on
    validation) and {role}_last.pt, one metrics.jsonl line per epoch, test accuracy of both.
    hint=True runs a FitNets first stage (hint terms only) and returns the last weights, since
    validation accuracy means nothing there. A single Trainee gives a single FitResult."""
    single = isinstance(trainees, Trainee)
    trainees = [trainees] if single else list(trainees)
    tcfg = cfg.trainer
    epochs = int(epochs or tcfg.epochs)
    steps = data.steps_per_epoch(tcfg.batch_size)
    if tcfg.max_batches:
        steps = min(steps, tcfg.max_batches)
    for t in trainees:
        params = list(t.model.parameters()) + list(t.objective.parameters())
        t.optimizer = build_optimizer(params, cfg.optimizer)
        t.scheduler = build_scheduler(t.optimizer, cfg.scheduler, steps, epochs)
    generator = torch.Generator(device=data.device).manual_seed(int(cfg.seed))
    for teacher in teachers:
        teacher.model.eval()
    use_teachers = any(t.objective.needs_teacher and not t.sources for t in trainees) and len(teachers) > 0
    keep = "last" if hint else "best"

    ckpt_dir = Path(run_dir) / "checkpoints"
    state = {t.role: {"best_acc": -1.0, "best_epoch": 0, "best_state": None, "rows": []} for t in trainees}
    started = time.perf_counter()
    label = "+".join(t.role for t in trainees)
    with progress_bar(show_progress, label, epochs * steps) as advance:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            sched = {}
            for t in trainees:
                t.model.train()
                _set_frozen(t, epoch)
                if not any(p.requires_grad for g in t.optimizer.param_groups for p in g["params"]):
                    raise KdError(
                        f"{t.role}: no parameter is left to train in epoch {epoch} (transfer.freeze="
                        f"{list(t.freeze)} covers the whole model). Freeze fewer modules."
                    )
                sched[t.role] = t.objective.set_epoch(epoch, epochs, hint=hint)
            sums = {t.role: torch.zeros(2, device=data.device) for t in trainees}  # loss, correct
            seen = 0
            for step, (x, y, idx) in enumerate(data.train_batches(tcfg.batch_size, generator)):
                if step >= steps:
                    break
                t_logits, t_feats = None, []
                if use_teachers:
                    with torch.no_grad():
                        t_logits = [teacher(x) for teacher in teachers]
                        t_feats = [f for teacher in teachers if teacher.taps for f in teacher.taps.take()]
                outs = {t.role: _forward(t, x) for t in trainees}
                total = 0.0
                for t in trainees:
                    logits, feats, _ = outs[t.role]
                    if t.sources:
                        losses = [
                            t.objective(
                                logits,
                                [outs[s][0].detach()],
                                y,
                                feats,
                                [f.detach() for f in outs[s][2]],
                                idx,
                            )[0]
                            for s in t.sources
                        ]
                        loss = sum(losses) / len(losses)
                    else:
                        loss, _ = t.objective(logits, t_logits, y, feats, t_feats, idx)
                    total = total + loss
                    sums[t.role] += torch.stack([loss.detach() * len(y), (logits.detach().argmax(1) == y).sum()])
                for t in trainees:
                    t.optimizer.zero_grad(set_to_none=True)
                total.backward()
                for t in trainees:
                    if tcfg.grad_clip:  # the model's and the objective's (adapters) parameters
                        params = [p for g in t.optimizer.param_groups for p in g["params"]]
                        nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
                    t.optimizer.step()
                    if t.scheduler is not None:
                        t.scheduler.step()
                seen += len(y)
                advance()
            for t in trainees:
                _end_epoch(
                    keep,
                    t,
                    state[t.role],
                    sums[t.role],
                    seen,
                    epoch,
                    epochs,
                    sched[t.role],
                    data,
                    cfg,
                    run_dir,
                    ckpt_dir,
                    t0,
                )

    results = {}
    for t in trainees:
        st = state[t.role]
        model = t.model
        test_last = evaluate(model, data.test, tcfg.eval_batch_size)
        if keep == "best":
            model.load_state_dict(st["best_state"])
        test_best = evaluate(model, data.test, tcfg.eval_batch_size)
        metrics = {
            "params": count_params(model),
            "best_epoch": st["best_epoch"] if keep == "best" else epochs,
            "val_acc": st["best_acc"] if keep == "best" else st["rows"][-1]["val_acc"],
            "test_acc": test_best["acc"],
            "test_nll": test_best["nll"],
            "test_acc_last": test_last["acc"],
            "train_s": time.perf_counter() - started,
            "checkpoint": str(ckpt_dir / f"{t.role}_{keep}.pt"),
        }
        results[t.role] = FitResult(model, metrics, ckpt_dir / f"{t.role}_best.pt", ckpt_dir / f"{t.role}_last.pt")
    return results[trainees[0].role] if single else results


def _end_epoch(
    keep: str, t: Trainee, st: dict, sums, seen, epoch, epochs, sched, data, cfg, run_dir, ckpt_dir, t0
) -> None:
    """Validation, checkpoints, the metrics line and the log line of one trainee's epoch."""
    tcfg = cfg.trainer
    role = t.role
    loss_sum, correct = sums.tolist()
    train_loss = loss_sum / seen
    last_path = ckpt_dir / f"{role}_last.pt"
    if not math.isfinite(train_loss):
        raise KdError(
            f"{role}: the training loss became {train_loss} in epoch {epoch}. Likely causes: a "
            f"learning rate too high (optimizer.lr={cfg.optimizer.lr}) or an extreme temperature. "
            f"The last good checkpoint is {last_path if epoch > 1 else 'none (first epoch)'}."
        )
    val = evaluate(t.model, data.val, tcfg.eval_batch_size)
    row = {
        "role": role,
        "epoch": epoch,
        "train_loss": train_loss,
        "train_acc": correct / seen,
        "val_acc": val["acc"],
        "val_nll": val["nll"],
        "lr": t.optimizer.param_groups[0]["lr"],
        **sched,
        "epoch_s": time.perf_counter() - t0,
    }
    st["rows"].append(row)
    improved = val["acc"] > st["best_acc"] and keep == "best"
    if improved:
        st["best_acc"], st["best_epoch"] = val["acc"], epoch
        st["best_state"] = copy.deepcopy(t.model.state_dict())
        checkpoint.save(ckpt_dir / f"{role}_best.pt", t.model, role=role, epoch=epoch, metrics=row, **t.ckpt_meta)
    checkpoint.save(last_path, t.model, role=role, epoch=epoch, metrics=row, **t.ckpt_meta)
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if epoch == min(2, epochs) and val["acc"] <= 1.5 / data.info.num_classes:
        log.warning(
            f"warning  {role}: validation accuracy {val['acc']:.1%} is at chance after {epoch} epoch(s); the "
            f"model may have collapsed. Try a lower optimizer.lr (now {cfg.optimizer.lr}; the KD term's "
            "gradients grow with T) or optimizer=adam."
        )
    extra = "".join(f"  {k} {v:g}" for k, v in sched.items())
    log.info(
        f"{role:<8} epoch {epoch:>3}/{epochs}  loss {train_loss:7.4f}  "
        f"train {row['train_acc']:7.2%}  val {val['acc']:7.2%}{' *' if improved else '  '}  "
        f"lr {row['lr']:.2e}{extra}  {row['epoch_s']:5.1f}s"
    )
