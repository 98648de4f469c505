"""method=born_again: the student's architecture trained on labels, then N generations each distilled
from the previous, and the ensemble of the generations (Furlanello et al. 2018)."""

from __future__ import annotations

import logging

from kdcli.methods.objective import build_objective, labels_only
from kdcli.methods.shared import Run, as_teacher, refuse, settings_label
from kdcli.training.engine import predict

log = logging.getLogger("kdcli")


def born_again(run: Run) -> dict:
    """Generation 0 is the student architecture trained on labels (the scratch run); generation
    k is a fresh copy distilled from generation k - 1."""
    cfg, data = run.cfg, run.data
    refuse(cfg, "born_again", teacher=True, transfer=True, prune=True)
    model, spec = run.fresh_student()
    res = run.fit(run.trainee("scratch", model, labels_only(cfg, data.device), spec))
    run.record("scratch", "generation 0 (labels only) = scratch", res, spec)
    run.reference = predict(res.model, data.test, cfg.trainer.eval_batch_size)
    previous, generations = res.model, []
    n = int(cfg.method.generations)
    for k in range(1, n + 1):
        teachers = [as_teacher(previous, data)]
        model, spec = run.fresh_student(seed_offset=k)
        objective = build_objective(cfg, data, model, teachers[0], teachers)
        role = "student" if k == n else f"gen{k}"
        res = run.distill(
            role, f"generation {k}, from generation {k - 1} ({settings_label(cfg)})", model, spec, teachers, objective
        )
        previous = res.model
        generations.append(res.model)
    run.record_ensemble(f"ensemble of generations 1-{n}", generations)
    return run.finish()
