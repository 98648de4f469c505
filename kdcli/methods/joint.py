"""method=joint: teacher and student trained together from scratch, the student distilling from the
teacher as it learns."""

from __future__ import annotations

import logging

from kdcli.core.errors import KdError
from kdcli.core.metrics import agreement
from kdcli.losses.taps import Taps
from kdcli.methods.objective import build_objective, labels_only
from kdcli.methods.shared import Run, refuse, settings_label
from kdcli.models import count_flops
from kdcli.training.build import new_model
from kdcli.training.engine import Trainee, predict

log = logging.getLogger("kdcli")


def joint(run: Run) -> dict:
    """The teacher, from fresh weights, trains on labels while the student distills from its
    current (detached) outputs and features at every step."""
    cfg, data = run.cfg, run.data
    refuse(cfg, "joint", teacher=True, transfer=True, prune=True)
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
    run.record("student", f"student, distilled jointly ({settings_label(cfg)})", res["student"], run.spec)
    if "scratch" in run.results:  # trained before the teacher existed: measure agreement now
        logits = predict(run.models["scratch"], data.test, cfg.trainer.eval_batch_size)
        run.results["scratch"]["teacher_agreement"] = agreement(logits, run.reference)
    return run.finish()
