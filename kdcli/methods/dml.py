"""method=dml: deep mutual learning, peers trained together, each distilling from the others
(Zhang et al. 2018)."""

from __future__ import annotations

import logging

from kdcli.methods.objective import build_objective
from kdcli.methods.shared import Run, refuse, settings_label

log = logging.getLogger("kdcli")


def dml(run: Run) -> dict:
    """Peers (copies of the student architecture, each its own initial weights) trained
    together; each one's objective averages its distillation term over the other peers."""
    cfg, data = run.cfg, run.data
    refuse(cfg, "dml", features=True, teacher=True, transfer=True, prune=True)
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
            role,
            f"peer {k + 1} of {n}, mutual learning ({settings_label(cfg)})",
            res[role],
            trainees[k].ckpt_meta["arch"],
        )
    run.record_ensemble(f"ensemble of the {n} peers", [res[r].model for r in roles])
    return run.finish()
