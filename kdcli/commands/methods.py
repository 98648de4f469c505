"""How kd distill trains (method=...): every method returns the results dict of the run, one
entry per model trained or used, with a table label, and `kd_gain` of the final student over
the scratch student when the baseline runs.

- standard: the teacher(s), frozen, teach the student (the default).
- ta: teacher -> assistant(s) -> student, each distilled from the previous (Mirzadeh et al. 2020).
- born_again: the student's architecture trained on labels, then N generations each distilled
  from the previous, and the ensemble of the generations (Furlanello et al. 2018).
- dml: deep mutual learning, peers trained together, each distilling from the others
  (Zhang et al. 2018).
- joint: teacher and student trained together from scratch, the student distilling from the
  teacher as it learns.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdcli import teacher_cache
from kdcli.app import Context
from kdcli.commands.common import ckpt_meta, dataset_config, new_model
from kdcli.commands.distill import (
    build_objective,
    freeze_teacher,
    frozen_teachers,
    labels_only,
    obtain_teachers,
    teacher_logits,
)
from kdcli.data import DeviceData
from kdcli.engine import Teacher, Trainee, epoch_steps, fit, predict
from kdcli.errors import KdError
from kdcli.losses.taps import Taps
from kdcli.metrics import agreement, paired_gain, scores
from kdcli.models import count_flops, count_params
from kdcli.prune import Pruner, plan
from kdcli.transfer import check_module_names, copy_matching, summarise

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
        if t["gain"] >= TEACHER_MARGIN and t["p_value"] < 0.05:
            return
        log.warning(
            f"warning  the teacher is not clearly better than the student trained on labels: "
            f"{100 * t['gain']:+.2f} points on the validation split (paired test p = {t['p_value']:.2g}). Distillation "
            "has little to add then. Fix: a stronger teacher (e.g. teacher=resnet20) or one trained longer "
            "(teacher_train.trainer.epochs=120), or pass a better one with teacher.ckpt=PATH."
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


def _frozen(model, data: DeviceData) -> Teacher:
    """A model trained in this run as a frozen teacher: same inputs and classes as the student."""
    return Teacher(freeze_teacher(model), torch.arange(data.info.num_classes).to(data.device))


def _label(cfg) -> str:
    parts = [f"T={cfg.T:g}", f"alpha={cfg.alpha:g}"]
    if cfg.loss.name != "kd":
        parts.insert(0, cfg.loss.name)
    if cfg.features:
        parts.append("+" + "+".join(cfg.features))
    return ", ".join(parts)


def _refuse(cfg, method: str, *, features=False, teacher=False, transfer=False, prune=False) -> None:
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


def standard(run: Run, loaded: list[tuple] | None = None) -> dict:
    """`loaded`: the teachers as (model, checkpoint, path) when the caller has them already
    (kdcli.api: modules, checkpoints); by default they come from the config."""
    cfg, data = run.cfg, run.data
    if cfg.features and cfg.teachers and len(cfg.teachers) > 1:
        raise KdError("Feature terms take one teacher; with teachers=[...] use logit losses only.")
    # A schedule that does not fit the run fails before a teacher or the baseline trains.
    pruning = None
    if cfg.prune.kind != "none":
        total = cfg.trainer.epochs * epoch_steps(data, cfg.trainer)
        pruning = plan(cfg.prune, total, run.student, data.info.input_shape)
    loaded = obtain_teachers(cfg, data, run.ctx) if loaded is None else loaded
    teachers = frozen_teachers(loaded, data)
    objective = build_objective(cfg, data, run.student, teachers[0], teachers)
    t_logits = teacher_logits(teachers, objective, data.test, cfg.trainer.eval_batch_size)
    run.results["teacher_cache"] = teacher_cache.attach(cfg, data, teachers, [p for _, _, p in loaded], objective)
    extra = {}
    if len(loaded) == 1:
        model, ckpt, path = loaded[0]
        extra = {"arch": ckpt["arch"], "checkpoint": path, "params": count_params(model)}
        extra["flops"] = count_flops(model, data.info.input_shape)
        label, name = "teacher", ckpt["arch"]["name"]
    else:
        extra = {
            "teachers": [
                {"checkpoint": p, "arch": c["arch"], "classes": c["data"]["class_names"]} for _, c, p in loaded
            ]
        }
        extra["params"] = sum(count_params(m) for m, _, _ in loaded)
        label, name = (
            f"{len(loaded)} teachers, merged ({objective.merge})",
            "+".join(c["arch"]["name"] for _, c, _ in loaded),
        )
    run.record_teacher(label, name, t_logits, extra)
    # Transfer first: a bad transfer setting fails before the baseline trains.
    student = run.student
    student.load_state_dict(run.init_state)
    tr = cfg.transfer
    if tr.init_from_teacher:
        if len(loaded) > 1 or not torch.equal(
            teachers[0].class_map, torch.arange(data.info.num_classes).to(data.device)
        ):
            raise KdError(
                "transfer.init_from_teacher needs one teacher with the student's classes in the same order, "
                "not teachers=[...] or a class subset."
            )
        copied, kept = copy_matching(student, loaded[0][0])
        if not copied:
            raise KdError(
                f"transfer.init_from_teacher: no tensor of the teacher ({loaded[0][1]['arch']['name']}) matches the "
                f"student ({run.spec['name']}) in name and shape; nothing to copy."
            )
        log.info(f"transfer copied {len(copied)} tensors from the teacher: {summarise(copied)}")
        if kept:
            log.info(f"transfer kept the student's own {len(kept)}: {summarise(kept)}")
        run.results["transfer"] = {"copied": copied, "kept": kept}
    if tr.freeze:
        check_module_names(student, list(tr.freeze), "transfer.freeze")
        span = f"for {tr.freeze_epochs} epoch(s)" if tr.freeze_epochs is not None else "for the whole run"
        log.info(f"transfer freezing {', '.join(tr.freeze)} {span}")
    run.scratch()
    run.check_teacher(teachers, objective)
    run.distill(
        "student",
        f"student, distilled ({_label(cfg)})",
        student,
        run.spec,
        teachers,
        objective,
        freeze=list(tr.freeze),
        freeze_epochs=tr.freeze_epochs,
        pruning=pruning,
    )
    return run.finish()


def ta(run: Run) -> dict:
    """Teacher -> assistants -> student; each link uses the logit loss of the config."""
    cfg, data = run.cfg, run.data
    _refuse(cfg, "ta", features=True, transfer=True, prune=True)
    loaded = obtain_teachers(cfg, data, run.ctx)
    teachers = frozen_teachers(loaded, data)
    objective = build_objective(cfg, data, run.student, None, teachers)
    t_logits = teacher_logits(teachers, objective, data.test, cfg.trainer.eval_batch_size)
    run.record_teacher(
        "teacher",
        "+".join(c["arch"]["name"] for _, c, _ in loaded),
        t_logits,
        {"params": sum(count_params(m) for m, _, _ in loaded)},
    )
    run.scratch()
    for i, name in enumerate(cfg.method.assistants, 1):
        model, spec = new_model(OmegaConf.create({"name": name}), data, run.ctx.device, int(cfg.seed) + i)
        objective = build_objective(cfg, data, model, None, teachers)
        res = run.distill(f"assistant{i}", f"assistant {i}, distilled", model, spec, teachers, objective)
        teachers = [_frozen(res.model, data)]
    student = run.student
    student.load_state_dict(run.init_state)
    objective = build_objective(cfg, data, student, None, teachers)
    run.distill("student", f"student, from the last assistant ({_label(cfg)})", student, run.spec, teachers, objective)
    return run.finish()


def born_again(run: Run) -> dict:
    """Generation 0 is the student architecture trained on labels (the scratch run); generation
    k is a fresh copy distilled from generation k - 1."""
    cfg, data = run.cfg, run.data
    _refuse(cfg, "born_again", teacher=True, transfer=True, prune=True)
    model, spec = run.fresh_student()
    res = run.fit(run.trainee("scratch", model, labels_only(cfg, data.device), spec))
    run.record("scratch", "generation 0 (labels only) = scratch", res, spec)
    run.reference = predict(res.model, data.test, cfg.trainer.eval_batch_size)
    previous, generations = res.model, []
    n = int(cfg.method.generations)
    for k in range(1, n + 1):
        teachers = [_frozen(previous, data)]
        model, spec = run.fresh_student(seed_offset=k)
        objective = build_objective(cfg, data, model, teachers[0], teachers)
        role = "student" if k == n else f"gen{k}"
        res = run.distill(
            role, f"generation {k}, from generation {k - 1} ({_label(cfg)})", model, spec, teachers, objective
        )
        previous = res.model
        generations.append(res.model)
    run.record_ensemble(f"ensemble of generations 1-{n}", generations)
    return run.finish()


def dml(run: Run) -> dict:
    """Peers (copies of the student architecture, each its own initial weights) trained
    together; each one's objective averages its distillation term over the other peers."""
    cfg, data = run.cfg, run.data
    _refuse(cfg, "dml", features=True, teacher=True, transfer=True, prune=True)
    run.scratch()
    n = int(cfg.method.peers)
    roles = ["student"] + [f"peer{k}" for k in range(2, n + 1)]
    trainees = []
    for k, role in enumerate(roles):
        model, spec = run.fresh_student(seed_offset=k)
        objective = build_objective(cfg, data, model)
        trainees.append(run.trainee(role, model, objective, spec, sources=[r for r in roles if r != role]))
    res = run.fit(trainees)
    for k, role in enumerate(roles):
        run.record(
            role, f"peer {k + 1} of {n}, mutual learning ({_label(cfg)})", res[role], trainees[k].ckpt_meta["arch"]
        )
    run.record_ensemble(f"ensemble of the {n} peers", [res[r].model for r in roles])
    return run.finish()


def joint(run: Run) -> dict:
    """The teacher, from fresh weights, trains on labels while the student distills from its
    current (detached) outputs and features at every step."""
    cfg, data = run.cfg, run.data
    _refuse(cfg, "joint", teacher=True, transfer=True, prune=True)
    if any(node.get("hint_epochs") for node in (cfg.features or {}).values()):
        raise KdError("features.fitnet.hint_epochs needs a trained teacher; method=joint trains it alongside.")
    teacher, t_spec = new_model(cfg.teacher, data, run.ctx.device, int(cfg.seed) + 1)
    run.scratch()
    student = run.student
    student.load_state_dict(run.init_state)
    objective = build_objective(cfg, data, student, teacher)
    source_taps = (
        Taps(teacher, objective.teacher_layers, "teacher", data.info.input_shape) if objective.features else None
    )
    t_trainee = Trainee("teacher", teacher, labels_only(cfg, data.device), run.meta(t_spec), source_taps=source_taps)
    s_trainee = run.trainee("student", student, objective, run.spec, sources=["teacher"])
    try:
        res = run.fit([t_trainee, s_trainee])
    finally:
        for taps in (source_taps, s_trainee.taps):
            if taps:
                taps.remove()
    run.record_teacher(
        "teacher, trained jointly",
        t_spec["name"],
        predict(res["teacher"].model, data.test, cfg.trainer.eval_batch_size),
        {**res["teacher"].metrics, "arch": t_spec, "flops": count_flops(res["teacher"].model, data.info.input_shape)},
    )
    run.record("student", f"student, distilled jointly ({_label(cfg)})", res["student"], run.spec)
    if "scratch" in run.results:  # trained before the teacher existed: measure agreement now
        logits = predict(run.models["scratch"], data.test, cfg.trainer.eval_batch_size)
        run.results["scratch"]["teacher_agreement"] = agreement(logits, run.reference)
    return run.finish()


METHODS = {"standard": standard, "ta": ta, "born_again": born_again, "dml": dml, "joint": joint}


def run(cfg, data: DeviceData, ctx: Context) -> dict:
    return METHODS[cfg.method.name](Run(cfg, data, ctx))
