"""method=ta: teacher -> assistant(s) -> student, each distilled from the previous (Mirzadeh et al. 2020)."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from kdcli.methods.objective import build_objective
from kdcli.methods.shared import Run, as_teacher, refuse, settings_label
from kdcli.models import count_params
from kdcli.teachers.load import frozen_teachers, obtain_teachers, teacher_logits
from kdcli.training.build import new_model

log = logging.getLogger("kdcli")


def ta(run: Run) -> dict:
    """Teacher -> assistants -> student; each link uses the logit loss of the config."""
    cfg, data = run.cfg, run.data
    refuse(cfg, "ta", features=True, transfer=True, prune=True)
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
        teachers = [as_teacher(res.model, data)]
    student = run.student
    student.load_state_dict(run.init_state)
    objective = build_objective(cfg, data, student, None, teachers)
    run.distill(
        "student", f"student, from the last assistant ({settings_label(cfg)})", student, run.spec, teachers, objective
    )
    return run.finish()
