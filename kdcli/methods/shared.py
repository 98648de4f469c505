"""What the methods share: `Run` (data, seed, the student's initial weights, the results, how one
model is distilled and recorded), the learning-rate scale of distilled models, the refusals."""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
import torch.nn.functional as F

from kdcli.core.errors import KdError
from kdcli.core.metrics import agreement, paired_gain, scores
from kdcli.core.run import Context
from kdcli.data import DeviceData
from kdcli.losses.taps import Taps
from kdcli.methods.objective import labels_only
from kdcli.models import count_flops
from kdcli.teachers.load import freeze_teacher, teacher_logits
from kdcli.training.build import ckpt_meta, dataset_config, new_model
from kdcli.training.engine import Teacher, Trainee, fit, predict
from kdcli.training.prune import Pruner

log = logging.getLogger("kdcli")


class Run:
    """What the methods share: data, seed, the student's initial weights, the results."""

    def __init__(self, cfg, data: DeviceData, ctx: Context, student: tuple | None = None):
        """student: (module, registry spec) of a student built elsewhere (kdcli.api) instead of cfg.student's;
        fresh_student rebuilds cfg.student, so such a caller overrides it too."""
        self.cfg, self.data, self.ctx = cfg, data, ctx
        self.results: dict = {}
        self.models: dict = {}  # role -> trained model
        self.test_logits: dict = {}  # role -> its logits on the test split (the paired test of the KD gain)
        self.reference = None  # test logits that agreement is measured against
        self.show = ctx.show_progress and cfg.trainer.progress
        if student is None:
            student = new_model(cfg.student, data, ctx.device, int(cfg.seed))
        self.student, self.spec = student
        self.init_state = copy.deepcopy(self.student.state_dict())

    def fresh_student(self, seed_offset: int = 0):
        """The student's architecture: the shared initial weights, or new ones from seed + offset."""
        if seed_offset == 0:
            model, spec = new_model(self.cfg.student, self.data, self.ctx.device, int(self.cfg.seed))
            model.load_state_dict(self.init_state)
            return model, spec
        return new_model(self.cfg.student, self.data, self.ctx.device, int(self.cfg.seed) + seed_offset)

    def meta(self, spec: dict) -> dict:
        return ckpt_meta(spec, self.data, dataset_config(self.cfg))

    def trainee(self, role: str, model, objective, spec: dict, **kw) -> Trainee:
        taps = (
            Taps(model, objective.student_layers, "student", self.data.info.input_shape) if objective.features else None
        )
        scale = distill_lr_scale(self.cfg, objective)
        if scale != 1.0:
            lr = self.cfg.optimizer.lr
            log.info(
                f"{role:<8} learning rate {lr:g} x {scale:.3g} = {lr * scale:.3g}: "
                + (
                    f"the T^2-scaled {self.cfg.loss.name} term's gradient is up to T times the labels' "
                    "(distill_lr_scale=1 keeps optimizer.lr)"
                    if self.cfg.get("distill_lr_scale", "auto") == "auto"
                    else "distill_lr_scale"
                )
            )
        return Trainee(role, model, objective, self.meta(spec), taps=taps, lr_scale=scale, **kw)

    def fit(self, trainees, teachers=(), **kw):
        torch.manual_seed(int(self.cfg.seed))  # the same dropout masks in every run
        return fit(
            trainees,
            self.data,
            self.cfg,
            run_dir=self.ctx.run_dir,
            teachers=teachers,
            show_progress=self.show,
            resume=self.ctx.resume,
            **kw,
        )

    def record(self, role: str, label: str, res, spec: dict) -> None:
        logits = predict(res.model, self.data.test, self.cfg.trainer.eval_batch_size)
        self.test_logits[role] = logits
        entry = {"label": label, "arch": spec, "flops": count_flops(res.model, self.data.info.input_shape)}
        if self.reference is not None:
            entry["teacher_agreement"] = agreement(logits, self.reference)
        self.results[role] = {**entry, **res.metrics}
        self.models[role] = res.model

    def record_teacher(self, label: str, model_name: str, logits: torch.Tensor, extra: dict) -> None:
        s = scores(logits, self.data.test.y)
        self.reference = logits
        self.results["teacher"] = {
            "label": label,
            "model": model_name,
            "test_acc": s["acc"],
            "test_nll": s["nll"],
            **extra,
        }

    def record_ensemble(self, label: str, models: list) -> None:
        """Test accuracy of the mean of the models' softmax outputs."""
        bs = self.cfg.trainer.eval_batch_size
        probs = torch.stack([F.softmax(predict(m, self.data.test, bs), 1) for m in models]).mean(0)
        s = scores(probs.log(), self.data.test.y)
        self.results["ensemble"] = {
            "label": label,
            "model": f"{len(models)} x {self.spec['name']}",
            "test_acc": s["acc"],
        }

    def scratch(self) -> None:
        """The student trained on labels only from the shared initial weights: the baseline."""
        if not self.cfg.baseline:
            return
        model, spec = self.fresh_student()
        res = self.fit(self.trainee("scratch", model, labels_only(self.cfg, self.data.device), spec))
        self.record("scratch", "student, from scratch", res, spec)

    def distill(self, role: str, label: str, model, spec: dict, teachers: list[Teacher], objective, pruning=None, **kw):
        """Train `model` from frozen teachers, with a FitNets hint stage first if asked; pruned
        along the schedule `pruning` (prune.plan's settings) in the main stage, if given."""
        trainee = self.trainee(role, model, objective, spec, **kw)
        if objective.features:
            teachers[0].taps = Taps(teachers[0].model, objective.teacher_layers, "teacher", self.data.info.input_shape)
        try:
            if objective.hint_epochs:
                log.info(f"{role:<8} FitNets stage 1: {objective.hint_epochs} epoch(s) of hint training only")
                hint = dataclasses.replace(trainee, role=f"{role}_hint")
                self.fit(hint, teachers, epochs=objective.hint_epochs, hint=True)
            if pruning:  # attached after the hint stage, a fit of its own that prunes nothing
                trainee.pruner = Pruner(model, **pruning)
                trainee.ckpt_meta = {**trainee.ckpt_meta, "pruning": pruning}  # kd evaluate shows it
            res = self.fit(trainee, teachers)
        finally:  # hooks off, also when training fails: the models may be used again in-process
            if trainee.pruner is not None:
                trainee.pruner.make_permanent()
            for taps in [trainee.taps] + [t.taps for t in teachers]:
                if taps:
                    taps.remove()
            for t in teachers:
                t.taps = None
        self.record(role, label, res, spec)
        if pruning:
            self.results[role]["pruning"] = pruning
        return res

    def check_teacher(self, teachers: list[Teacher], objective) -> None:
        """Before the student trains: warn when the teacher is not clearly better than the student
        trained on labels (on the validation split, paired), since then it has little to teach."""
        if "scratch" not in self.models:
            return
        bs = self.cfg.trainer.eval_batch_size
        val = self.data.val
        t = paired_gain(predict(self.models["scratch"], val, bs), teacher_logits(teachers, objective, val, bs), val.y)
        self.results["teacher_vs_scratch_val"] = t
        gap = f"{100 * t['gain']:+.2f} points on the validation split (paired test p = {t['p_value']:.2g}"
        if t["gain"] >= TEACHER_MARGIN:
            if t["p_value"] >= 0.05:  # a real gap may not reach significance on a few hundred images
                log.info(
                    f"teacher  better than the student trained on labels by {gap}, not significant on "
                    f"{len(val.y)} images); the KD gain below says whether distilling paid"
                )
            return
        log.warning(
            f"warning  the teacher is not clearly better than the student trained on labels: {gap}). "
            "Distillation has little to add then. Fix: a stronger teacher (e.g. teacher=resnet20) or one trained "
            "longer (a larger teacher_train.trainer.epochs), or pass a better one with teacher.ckpt=PATH."
        )

    def finish(self, final: str = "student") -> dict:
        if "scratch" in self.results and final in self.results:
            self.results["kd_gain"] = self.results[final]["test_acc"] - self.results["scratch"]["test_acc"]
            self.results["kd_gain_test"] = paired_gain(
                self.test_logits["scratch"], self.test_logits[final], self.data.test.y
            )
        return self.results


# Logit losses multiplied by T^2 (Hinton et al. 2015): their gradient on the student's logits is
# T * (softmax(s/T) - softmax(t/T)), up to T times the cross-entropy's softmax(s) - y.
T2_SCALED = ("kd", "soft_ce", "dkd", "ls")


def distill_lr_scale(cfg, objective) -> float:
    """The factor on optimizer.lr for a trainee with this objective. distill_lr_scale=auto: for a
    T^2-scaled logit term, 1 / (alpha + (1 - alpha) * T) at the first epoch's T and alpha, so the
    step of SGD on the combined gradient is at most the step on the labels alone (measured in
    README "Distillation that pays": at lr 0.05 small students collapse or lose points under
    KD, at the scaled rate they train); a number: that factor; 1 for objectives without a term."""
    if objective.term is None or not objective.needs_teacher:
        return 1.0
    value = cfg.get("distill_lr_scale", "auto")
    if value != "auto":
        return float(value)
    if cfg.loss.name not in T2_SCALED:
        return 1.0
    T, alpha = objective.T_schedule.at(1, 2), objective.alpha_schedule.at(1, 2)
    return 1.0 / (alpha + (1 - alpha) * max(T, 1.0))


# The teacher should beat the scratch student on validation by this much (and significantly) for
# distillation to have something to teach.
TEACHER_MARGIN = 0.01


def as_teacher(model, data: DeviceData) -> Teacher:
    """A model trained in this run as a frozen teacher: same inputs and classes as the student."""
    return Teacher(freeze_teacher(model), torch.arange(data.info.num_classes).to(data.device))


def settings_label(cfg) -> str:
    parts = [f"T={cfg.T:g}", f"alpha={cfg.alpha:g}"]
    if cfg.loss.name != "kd":
        parts.insert(0, cfg.loss.name)
    if cfg.features:
        parts.append("+" + "+".join(cfg.features))
    return ", ".join(parts)


def refuse(cfg, method: str, *, features=False, teacher=False, transfer=False, prune=False) -> None:
    if features and cfg.features:
        raise KdError(
            f"method={method} does not take feature terms (features={list(cfg.features)}): they name layers of one "
            "frozen teacher. Use them with method=standard, born_again or joint."
        )
    if teacher and (cfg.teachers or cfg.teacher.ckpt):
        raise KdError(f"method={method} trains without a pretrained teacher: drop teacher.ckpt / teachers.")
    if transfer and (cfg.transfer.init_from_teacher or cfg.transfer.freeze):
        raise KdError(f"transfer.* applies to method=standard (one pretrained teacher); not to method={method}.")
    if prune and cfg.prune.kind != "none":
        raise KdError(
            f"prune.kind={cfg.prune.kind} prunes the distilled student of method=standard; method={method} does "
            "not prune. Use method=standard, or drop prune.kind (none)."
        )
