"""method=standard: the teacher(s), frozen, teach the student (the default)."""

from __future__ import annotations

import logging

import torch

from kdcli.core.errors import KdError
from kdcli.methods.objective import build_objective
from kdcli.methods.shared import Run, settings_label
from kdcli.models import count_flops, count_params
from kdcli.teachers import cache
from kdcli.teachers.load import frozen_teachers, obtain_teachers, teacher_logits
from kdcli.training.engine import epoch_steps
from kdcli.training.prune import plan
from kdcli.training.transfer import check_module_names, copy_matching, summarise

log = logging.getLogger("kdcli")


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
    run.results["teacher_cache"] = cache.attach(cfg, data, teachers, [p for _, _, p in loaded], objective)
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
        f"student, distilled ({settings_label(cfg)})",
        student,
        run.spec,
        teachers,
        objective,
        freeze=list(tr.freeze),
        freeze_epochs=tr.freeze_epochs,
        pruning=pruning,
    )
    return run.finish()
