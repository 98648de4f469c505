"""The training loop and evaluation, shared by every command.

`fit` trains one or several models (trainees) on the same (augmented) batches, each with its
objective against frozen teachers or against the other trainees (online distillation); keeps
the checkpoint trainer.selection keeps and the last one of each, appends one line per epoch and model
to metrics.jsonl, and reports test accuracy of both checkpoints. Model selection never looks at
the test split.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.profiler import record_function as _record_function

from kdcli.core import distributed, interrupt
from kdcli.core.errors import KdError
from kdcli.core.files import append_jsonl
from kdcli.core.metrics import scores
from kdcli.data import DeviceData
from kdcli.data.device import DeviceSplit, mix_seed
from kdcli.data.mix import mix_batch, mixing
from kdcli.data.stream import StreamData, StreamSplit
from kdcli.losses.objective import Objective
from kdcli.losses.taps import Taps
from kdcli.models import count_params
from kdcli.report import progress_bar
from kdcli.training import checkpoint
from kdcli.training import resume as resume_mod
from kdcli.training.accel import Speed
from kdcli.training.optim import build_optimizer, build_scheduler
from kdcli.training.prune import Pruner, sparsity

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


def evaluate(model: nn.Module, split: DeviceSplit | StreamSplit, batch_size: int) -> dict:
    return scores(predict(model, split, batch_size), split.y)


@dataclass
class FitResult:
    model: nn.Module  # the weights trainer.selection kept (the last ones with keep="last")
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
    pruner: Optional[Pruner] = None  # magnitude pruning along a schedule of training steps (kdcli/training/prune.py)
    lr_scale: float = 1.0  # times optimizer.lr (distillation objectives: methods.distill_lr_scale)


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
    cache: Optional[torch.Tensor] = None  # its outputs over the training split, by sample (kdcli/teachers/cache.py)
    feature_cache: Optional[list[torch.Tensor]] = None  # and those of its tapped layers, when feature terms read them

    def outputs(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Its logits for the training batch x (samples idx): looked up when cached, else computed."""
        if self.cache is None:
            return self(x)
        return self.cache[idx.to(self.cache.device)].to(x.device, non_blocking=True)

    def features(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of its tapped layers for the training batch (samples idx), float32: looked up
        when cached, else those of its last forward."""
        if self.feature_cache is not None:
            i = idx.to(self.feature_cache[0].device)
            return [f[i].to(idx.device, non_blocking=True) for f in self.feature_cache]
        return [f.float() for f in self.taps.take()] if self.taps else []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x if self.scale is None else x * self.scale + self.shift).float()


def record_function(name: str):
    """A torch.profiler mark while a profiler runs (scripts/profile_step.py); else nothing (a mark costs
    microseconds, a step of a small model a few milliseconds)."""
    return _record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext()


def _marked(batches):
    """The training batches, each one's making (indexing, augmentation, a loader's wait) marked
    "kd:data" and the step that uses it "kd:step", for torch.profiler."""
    it = iter(batches)
    while True:
        with record_function("kd:data"):
            try:
                batch = next(it)
            except StopIteration:
                return
        with record_function("kd:step"):  # the loop's body, until it asks for the next batch
            yield batch


def epoch_steps(data, tcfg) -> int:
    """Training steps per epoch: the batches of the training split, at most trainer.max_batches."""
    steps = data.steps_per_epoch(tcfg.batch_size)
    return min(steps, tcfg.max_batches) if tcfg.max_batches else steps


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


class _Step(nn.Module):
    """The forward half of a training step: every trainee on the batch, then each objective
    against the frozen teachers' outputs or its sources' (detached) ones. A module of the models
    and objectives, so that DistributedDataParallel sees every parameter the loss reaches (the
    objectives' own: FitNets' adapters, CRD's embeddings) and none it does not (a hint stage)."""

    def __init__(self, trainees: list[Trainee], speed: Speed):
        super().__init__()
        self.trainees, self.speed = trainees, speed
        self.models = nn.ModuleList(t.model for t in trainees)
        self.objectives = nn.ModuleList(t.objective for t in trainees)
        self.forwards = [speed.forward_of(t.model) for t in trainees]

    def forward(self, x, y, idx, t_logits, t_feats, mixed=None):
        outs = {}
        for t, run in zip(self.trainees, self.forwards):
            logits = run(x)
            feats = t.taps.take() if t.taps else []
            source_feats = t.source_taps.take() if t.source_taps else []
            if self.speed.dtype is not None:  # the objectives in float32: distances and Gram matrices cancel in bf16
                logits, feats, source_feats = (
                    logits.float(),
                    [f.float() for f in feats],
                    [f.float() for f in source_feats],
                )
            outs[t.role] = (logits, feats, source_feats)
        with self.speed.full_precision():
            return self._losses(outs, y, idx, t_logits, t_feats, mixed)

    def _losses(self, outs: dict, y, idx, t_logits, t_feats, mixed):
        total, losses = 0.0, []
        for t in self.trainees:
            logits, feats, _ = outs[t.role]
            if t.sources:
                terms = [
                    t.objective(logits, [outs[s][0].detach()], y, feats, [f.detach() for f in outs[s][2]], idx, mixed)[
                        0
                    ]
                    for s in t.sources
                ]
                loss = sum(terms) / len(terms)
            else:
                loss, _ = t.objective(logits, t_logits, y, feats, t_feats, idx, mixed)
            total = total + loss
            # Logits detached: what DDP finds reachable from the outputs is what the loss reaches
            losses.append((loss, logits.detach()))
        return total, losses


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
    resume: bool = False,
) -> dict[str, FitResult] | FitResult:
    """Train the trainees together on data.train, one shared batch per step.

    Each step runs the frozen teachers (no gradients) and every trainee on the same (augmented)
    batch, then each trainee's objective against its teachers: the frozen ones, or the detached
    outputs of its `sources` (averaged over them). cfg holds the trainer, optimizer and scheduler
    nodes and the seed. Per trainee: checkpoints run_dir/checkpoints/{role}_best.pt (best on
    validation) and {role}_last.pt, one metrics.jsonl line per epoch, test accuracy of both.
    hint=True runs a FitNets first stage (hint terms only) and returns the last weights, since
    validation accuracy means nothing there. A single Trainee gives a single FitResult.
    A trainee with a `pruner` has its masks updated after each step (its state dict holds them, so
    training states restore them); it comes back plain, the pruned weights made permanent zeros.

    A training state (kdcli/training/resume.py) is saved at each epoch's end, every
    trainer.save_every_min minutes and on Ctrl-C/SIGTERM; with resume=True the loop continues
    from the one in run_dir, or returns its results if the loop had finished."""
    single = isinstance(trainees, Trainee)
    trainees = [trainees] if single else list(trainees)
    tcfg = cfg.trainer
    mix, mix_alpha = mixing(cfg)
    if mix != "none":
        log.info(
            f"mix      {mix} of each training batch with itself shuffled, lam ~ Beta({mix_alpha:g}, {mix_alpha:g})"
            f"{'; the teachers label the mixed images' if teachers else ''}; train accuracy is against each "
            "mixed image's larger part"
        )
    epochs = int(epochs or tcfg.epochs)
    steps = epoch_steps(data, tcfg)
    for t in trainees:
        params = list(t.model.parameters()) + list(t.objective.parameters())
        # (a freeze that ends mid-run gives some parameters their first gradient late, which the
        # fused SGD kernel does not take: the per-tensor update then)
        t.optimizer = build_optimizer(params, cfg.optimizer, fused=not t.freeze, lr_scale=t.lr_scale)
        t.scheduler = build_scheduler(t.optimizer, cfg.scheduler, steps, epochs)
    speed = Speed.of(tcfg, data.device)
    for t in trainees:
        speed.prepare(t.model)
    for teacher in teachers:
        teacher.model.eval()
        speed.prepare(teacher.model)
    step_module = _Step(trainees, speed)
    runner, trainable = step_module, None
    global_batch = min(tcfg.batch_size, len(data.train))  # under several processes, each takes a part of it
    if global_batch < distributed.world():
        raise KdError(
            f"trainer.batch_size={global_batch} is split between {distributed.world()} processes: each needs one "
            "image at least. Raise trainer.batch_size or start fewer processes."
        )
    if distributed.active():
        log.info(
            f"parallel {distributed.world()} processes: each takes its part of every batch of {global_batch}, "
            "gradients averaged over them (DistributedDataParallel)"
        )
    use_teachers = any(t.objective.needs_teacher and not t.sources for t in trainees) and len(teachers) > 0
    keep = "last" if hint else "best"
    ckpt_dir = Path(run_dir) / "checkpoints"
    roles = [t.role for t in trainees]
    loop = _Loop(trainees, data, cfg, resume_mod.state_path(ckpt_dir, roles), epochs, steps, speed)
    if resume and loop.path.is_file():
        saved = resume_mod.load(loop.path)
        if saved.get("status") == "completed":
            return _finished(trainees, saved, ckpt_dir, single)
        loop.restore(saved)
        log.info(f"{'+'.join(roles):<8} resuming after epoch {loop.epochs_done} + {loop.step} step(s) from {loop.path}")
    if resume:  # rows written after the state was saved (or before the first one) are written again
        resume_mod.trim_metrics(Path(run_dir) / "metrics.jsonl", roles, loop.epochs_done)

    if loop.epochs_done == 0 and loop.step == 0:  # a fresh loop: prune.start_step=0 prunes before the first step
        for t in trainees:
            if t.pruner is not None:
                t.pruner.update(0)

    started = time.perf_counter() - loop.elapsed
    with progress_bar(show_progress, "+".join(roles), epochs * steps) as advance, interrupt.training():
        for _ in range(loop.epochs_done * steps + loop.step):
            advance()
        for epoch in range(loop.epochs_done + 1, epochs + 1):
            t0 = time.perf_counter()
            loop.start_epoch(epoch)
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
            # Several processes: DistributedDataParallel over the parameters that train now (again
            # when a freeze ends, since it reduces the gradients of those it was built with).
            now = tuple(p.requires_grad for p in step_module.parameters())
            if now != trainable:
                runner, trainable = distributed.wrap(step_module), now
            for step, (x, y, idx) in enumerate(
                _marked(data.train_batches(tcfg.batch_size, loop.epoch_seed, start=loop.step)), start=loop.step
            ):
                if step >= steps:
                    break
                x, y, idx, mixed = mix_batch(x, y, idx, mix, mix_alpha, mix_seed(loop.epoch_seed, step))
                x = speed.layout(x)
                t_logits, t_feats = None, []
                if use_teachers:
                    with torch.no_grad(), speed.teacher_autocast(), record_function("kd:teacher"):
                        t_logits = [teacher.outputs(x, idx) for teacher in teachers]
                        t_feats = [f for teacher in teachers for f in teacher.features(idx)]
                with speed.autocast(), record_function("kd:forward+loss"):
                    total, losses = runner(x, y, idx, t_logits, t_feats, mixed)
                batch_sums = [
                    torch.stack([loss.detach().float() * len(y), (logits.detach().argmax(1) == y).sum()])
                    for loss, logits in losses
                ]
                for t in trainees:
                    t.optimizer.zero_grad(set_to_none=True)
                finite = loop.step_is_finite(total, epoch, step)
                if finite or distributed.active():  # every rank takes part in the gradients' reduction
                    # With unequal parts of the batch, DDP's mean over ranks is made the batch's mean.
                    share = len(y) * distributed.world() / global_batch
                    with record_function("kd:backward"):
                        speed.backward(total * share if share != 1 else total)
                if finite:
                    with record_function("kd:optimizer"):
                        for t, bs in zip(trainees, batch_sums):
                            loop.sums[t.role] += bs
                            if tcfg.grad_clip:  # the model's and the objective's (adapters) parameters
                                speed.unscale(t.optimizer)
                                params = [p for g in t.optimizer.param_groups for p in g["params"]]
                                nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
                            speed.step(t.optimizer)
                        speed.update()
                    loop.seen += len(y)
                for t in trainees:
                    if t.scheduler is not None:
                        t.scheduler.step()
                    if t.pruner is not None:  # masks from the magnitudes after this step
                        t.pruner.update((epoch - 1) * steps + step + 1)
                loop.step = step + 1
                advance()
                signum = interrupt.requested_anywhere()
                if signum is not None:
                    loop.save(started)
                    raise interrupt.Interrupted(signum)
                loop.save_if_due(started)
            loop.end_epoch(epoch)
            for t in trainees:
                distributed.sync_buffers(t.model)
                _end_epoch(keep, t, loop, epoch, sched[t.role], run_dir, t0)
            loop.save(started)
            interrupt.check()  # a signal during validation: the epoch's state is saved, stop here

    results = {}
    for t in trainees:
        st = loop.best[t.role]
        model = t.model
        test_last = evaluate(model, data.test, tcfg.eval_batch_size)
        if keep == "best":
            model.load_state_dict(st["best_state"])
        test_best = evaluate(model, data.test, tcfg.eval_batch_size)
        if t.pruner is not None:  # callers get a plain module, its pruned weights zeros
            t.pruner.make_permanent()
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
        if loop.skipped_total:
            metrics["skipped_steps"] = loop.skipped_total
        if t.pruner is not None:
            metrics["sparsity"] = sparsity(model)
        results[t.role] = FitResult(model, metrics, ckpt_dir / f"{t.role}_best.pt", ckpt_dir / f"{t.role}_last.pt")
    # The finished loop's state shrinks to its results: a resumed run reuses them.
    resume_mod.save(
        loop.path,
        status="completed",
        keep=keep,
        results={r: res.metrics for r, res in results.items()},
        objectives={t.role: t.objective.state_dict() for t in trainees},  # FitNets adapters go on to stage 2
    )
    distributed.barrier()  # what rank 0 wrote (checkpoints, the state) is there for every rank to read
    return results[trainees[0].role] if single else results


def _finished(trainees: list[Trainee], saved: dict, ckpt_dir: Path, single: bool):
    """The results of a loop that had finished before the run stopped, weights from its checkpoints."""
    results = {}
    for t in trainees:
        metrics = dict(saved["results"][t.role])
        path = ckpt_dir / f"{t.role}_{saved['keep']}.pt"
        if t.pruner is not None:  # checkpoints are plain: so must the model be to load one
            t.pruner.make_permanent()
        t.model.load_state_dict(checkpoint.load(path)["state_dict"])
        t.objective.load_state_dict(saved["objectives"][t.role])
        metrics["checkpoint"] = str(path)
        results[t.role] = FitResult(t.model, metrics, ckpt_dir / f"{t.role}_best.pt", ckpt_dir / f"{t.role}_last.pt")
    log.info(f"{'+'.join(results):<8} already trained before the run stopped: its results and checkpoints are kept")
    return results[trainees[0].role] if single else results


class _Loop:
    """The position and the running figures of a training loop, and its training state on disk."""

    def __init__(self, trainees: list[Trainee], data, cfg, path: Path, epochs: int, steps: int, speed: Speed):
        self.trainees, self.data, self.cfg, self.path, self.speed = trainees, data, cfg, path, speed
        self.epochs, self.steps = epochs, steps
        self.seeds = torch.Generator().manual_seed(int(cfg.seed))  # one seed per epoch: order and augmentation
        self.epochs_done, self.step, self.epoch_seed = 0, 0, 0
        self.best = {t.role: {"best_acc": -1.0, "best_epoch": 0, "best_state": None, "rows": []} for t in trainees}
        self.sums: dict = {}
        self.seen = self.skipped = self.skipped_total = 0
        self.first_skip: Optional[int] = None
        self.elapsed = 0.0
        self.every = float(cfg.trainer.get("save_every_min") or 0) * 60
        self.last_save = time.perf_counter()
        self.nonfinite = cfg.trainer.get("nonfinite", "stop")
        self.bad = torch.tensor(-1, device=data.device)  # first step (of the run) with a non-finite loss
        self.lrs: dict[int, float] = {}  # learning rate at each step of the epoch, to report a bad one

    def start_epoch(self, epoch: int) -> None:
        if self.step == 0:  # a fresh epoch (not the rest of an interrupted one)
            self.epoch_seed = int(torch.randint(0, 2**62, (1,), generator=self.seeds))
            self.sums = {t.role: torch.zeros(2, device=self.data.device) for t in self.trainees}
            self.seen = self.skipped = 0
            self.first_skip = None
            self.lrs = {}

    def step_is_finite(self, total: torch.Tensor, epoch: int, step: int) -> bool:
        """With nonfinite=stop, record the first bad step without waiting for the device (checked
        before anything is saved); with nonfinite=skip, say whether to apply this step."""
        finite = torch.isfinite(total.detach())
        global_step = (epoch - 1) * self.steps + step + 1
        if self.nonfinite == "skip":
            if not distributed.most(int(not bool(finite))):  # several processes skip a step together
                return True
            self.skipped += 1
            self.skipped_total += 1
            self.first_skip = self.first_skip or step + 1
            return False
        nonfinite = (~finite).to(torch.int64)
        distributed.most_inplace(nonfinite)  # a NaN on one rank reaches every rank's weights: all must stop
        self.bad = torch.where((nonfinite > 0) & (self.bad < 0), global_step, self.bad)
        self.lrs[global_step] = self.trainees[0].optimizer.param_groups[0]["lr"]
        return True

    def _check_finite(self) -> None:
        bad = int(self.bad)
        if bad < 0:
            return
        epoch, step = (bad - 1) // self.steps + 1, (bad - 1) % self.steps + 1
        temperature = f" or an extreme temperature (T={self.cfg.T})" if "T" in self.cfg else ""
        lasts = [p for t in self.trainees if (p := self.path.parent / f"{t.role}_last.pt").is_file()]
        kept = (
            f"The last good checkpoints are kept: {', '.join(map(str, lasts))} (epoch {self.epochs_done})."
            if lasts and self.epochs_done
            else "No epoch had finished: no checkpoint was written."
        )
        raise KdError(
            f"The training loss became NaN or infinite at step {step} of epoch {epoch} (step {bad} of the run). "
            f"Likely causes: a learning rate too high ({self.lrs.get(bad, float('nan')):.3g} at that step; "
            f"optimizer.lr={self.cfg.optimizer.lr}){temperature}, or "
            f"inputs with NaNs. {kept} Fix: lower optimizer.lr or set trainer.grad_clip=1.0; "
            "trainer.nonfinite=skip skips such steps instead of stopping."
        )

    def end_epoch(self, epoch: int) -> None:
        self._check_finite()
        if distributed.active():  # the epoch's figures over every rank's part of the batches
            self.seen = int(distributed.all_sum(torch.tensor(self.seen)))  # (skipped steps: the same on every rank)
            self.sums = {role: distributed.all_sum(v) for role, v in self.sums.items()}
        if self.seen == 0:
            raise KdError(
                f"Every step of epoch {epoch} had a non-finite loss (trainer.nonfinite=skip skipped all "
                f"{self.skipped}). Lower optimizer.lr (now {self.cfg.optimizer.lr}) or check the inputs."
            )
        if self.skipped:
            log.warning(
                f"warning  epoch {epoch}: skipped {self.skipped} of {self.steps} steps with a non-finite loss "
                f"(first at step {self.first_skip}); a lower optimizer.lr (now {self.cfg.optimizer.lr}) may help"
            )
        for t in self.trainees:
            bad = [n for n, v in t.model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
            if bad:
                raise KdError(
                    f"{t.role}: the model's {', '.join(bad[:3])} hold NaN or infinite values after epoch {epoch}. "
                    f"Lower optimizer.lr (now {self.cfg.optimizer.lr}) or check the inputs."
                )
        self.epochs_done, self.step = epoch, 0

    def save_if_due(self, started: float) -> None:
        if self.every and time.perf_counter() - self.last_save >= self.every and self.step < self.steps:
            self.save(started)

    def save(self, started: float) -> None:
        """Write the training state at the current position (never past a non-finite loss); under
        several processes, rank 0's (mid-epoch figures are its part of the batches until then)."""
        self._check_finite()
        if not distributed.is_main():
            return
        device = self.data.device
        models = {
            t.role: {
                "model": t.model.state_dict(),
                "optimizer": t.optimizer.state_dict(),
                "scheduler": t.scheduler.state_dict() if t.scheduler is not None else None,
                "objective": t.objective.state_dict(),
                **self.best[t.role],
            }
            for t in self.trainees
        }
        resume_mod.save(
            self.path,
            status="running",
            epochs=self.epochs,
            epochs_done=self.epochs_done,
            step=self.step,
            epoch_seed=self.epoch_seed,
            seeds=self.seeds.get_state(),
            rng=resume_mod.rng_state(device),
            sums={k: v.cpu() for k, v in self.sums.items()},
            seen=self.seen,
            skipped=[self.skipped, self.skipped_total, self.first_skip or 0],
            elapsed=time.perf_counter() - started,
            trainees=models,
            grad_scaler=self.speed.state_dict(),
        )
        self.last_save = time.perf_counter()

    def _restore_best_file(self, t: Trainee) -> None:
        """A run killed between writing {role}_best.pt and its state left a best checkpoint that
        the state does not know of: put back the one it does (the epoch is done again anyway)."""
        st, path = self.best[t.role], self.path.parent / f"{t.role}_best.pt"
        if st["best_state"] is None or not path.is_file() or checkpoint.load(path).get("epoch") == st["best_epoch"]:
            return
        model = copy.deepcopy(t.model)
        model.load_state_dict(st["best_state"])
        row = st["rows"][st["best_epoch"] - 1] if len(st["rows"]) >= st["best_epoch"] else {}
        checkpoint.save(path, model, role=t.role, epoch=st["best_epoch"], metrics=row, **t.ckpt_meta)

    def restore(self, saved: dict) -> None:
        device = self.data.device
        roles = [t.role for t in self.trainees]
        if sorted(saved["trainees"]) != sorted(roles) or saved["epochs"] != self.epochs:
            raise KdError(
                f"The training state {self.path} is of {'+'.join(saved['trainees'])} for {saved['epochs']} epochs, "
                f"not of {'+'.join(roles)} for {self.epochs}: it belongs to another configuration."
            )
        try:
            for t in self.trainees:
                s = saved["trainees"][t.role]
                t.model.load_state_dict(s["model"])
                t.objective.load_state_dict(s["objective"])
                t.optimizer.load_state_dict(s["optimizer"])
                if t.scheduler is not None:
                    t.scheduler.load_state_dict(s["scheduler"])
                self.best[t.role] = {k: s[k] for k in ("best_acc", "best_epoch", "best_state", "rows")}
                self._restore_best_file(t)
        except (RuntimeError, KeyError, ValueError) as e:
            raise KdError(
                f"The training state {self.path} does not fit this run's models ({str(e).splitlines()[0]}): "
                "it belongs to another configuration."
            ) from None
        self.epochs_done, self.step, self.epoch_seed = saved["epochs_done"], saved["step"], saved["epoch_seed"]
        self.seeds.set_state(saved["seeds"])
        self.sums = {k: v.to(device) for k, v in saved["sums"].items()}
        self.seen = saved["seen"]
        self.skipped, self.skipped_total, first = saved["skipped"]
        self.first_skip = first or None
        self.elapsed = saved["elapsed"]
        self.speed.load_state_dict(saved.get("grad_scaler"))
        resume_mod.set_rng_state(saved["rng"], device)
        if distributed.rank() > 0:  # the saved running sums are rank 0's part: the others start theirs anew
            self.sums = {k: torch.zeros_like(v) for k, v in self.sums.items()}
            self.seen = 0


def _better(selection: str, row: dict, st: dict) -> bool:
    """Whether this epoch's row replaces the selected one. Ties go to the later epoch: on a
    validation split of a few hundred images where models score 98-99 %, strict improvement keeps
    an early epoch that noise favoured, while the learning rate is still high."""
    if st["best_state"] is None or selection == "last":
        return True
    best = st["rows"][st["best_epoch"] - 1]
    if selection == "val_nll":
        return row["val_nll"] <= best["val_nll"]
    return row["val_acc"] >= best["val_acc"]


def _end_epoch(keep: str, t: Trainee, loop: "_Loop", epoch: int, sched: dict, run_dir: Path, t0: float) -> None:
    """Validation, checkpoints, the metrics line and the log line of one trainee's epoch."""
    cfg, data, epochs, seen, skipped = loop.cfg, loop.data, loop.epochs, loop.seen, loop.skipped
    st, ckpt_dir = loop.best[t.role], loop.path.parent
    tcfg = cfg.trainer
    role = t.role
    loss_sum, correct = loop.sums[role].tolist()
    train_loss = loss_sum / seen
    last_path = ckpt_dir / f"{role}_last.pt"
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
    if skipped:
        row["skipped_steps"] = skipped
    if t.pruner is not None:
        row["sparsity"] = sparsity(t.model)
    st["rows"].append(row)
    # While pruning, only epochs ending at the final sparsity may be best (an earlier, denser one would win
    # on validation); end_step fits in the run, so the last epoch always may.
    final = t.pruner is None or t.pruner.reached(epoch * loop.steps)
    improved = keep == "best" and final and _better(tcfg.get("selection", "val_acc"), row, st)
    if improved:
        st["best_acc"], st["best_epoch"] = val["acc"], epoch
        st["best_state"] = copy.deepcopy(t.model.state_dict())
        checkpoint.save(ckpt_dir / f"{role}_best.pt", t.model, role=role, epoch=epoch, metrics=row, **t.ckpt_meta)
    checkpoint.save(last_path, t.model, role=role, epoch=epoch, metrics=row, **t.ckpt_meta)
    append_jsonl(Path(run_dir) / "metrics.jsonl", row)
    if epoch == min(2, epochs) and val["acc"] <= 1.5 / data.info.num_classes:
        # The hint is for a model that learns from softened logits (a teacher trained on labels has no such term)
        distills = t.objective.term is not None and t.objective.alpha < 1
        why = "; the KD term's gradients grow with T" if distills else ""
        log.warning(
            f"warning  {role}: validation accuracy {val['acc']:.1%} is at chance after {epoch} epoch(s); the "
            f"model may have collapsed. Try a lower optimizer.lr (now {cfg.optimizer.lr}{why}) or optimizer=adam."
        )
    extra = "".join(f"  {k} {v:g}" for k, v in sched.items())
    if "sparsity" in row:
        extra += f"  sparsity {row['sparsity']:.1%}"
    log.info(
        f"{role:<8} epoch {epoch:>3}/{epochs}  loss {train_loss:7.4f}  "
        f"train {row['train_acc']:7.2%}  val {val['acc']:7.2%}{' *' if improved else '  '}  "
        f"lr {row['lr']:.2e}{extra}  {row['epoch_s']:5.1f}s"
    )
