"""How kd distill trains (method=...), one module each; a new method is a module here and an entry in
METHODS (and in kdcli/config METHODS, which `kd list` shows): every method returns the results dict of the run, one
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

from kdcli.core.run import Context
from kdcli.data import DeviceData
from kdcli.methods.born_again import born_again
from kdcli.methods.dml import dml
from kdcli.methods.joint import joint
from kdcli.methods.shared import Run
from kdcli.methods.standard import standard
from kdcli.methods.ta import ta

METHODS = {"standard": standard, "ta": ta, "born_again": born_again, "dml": dml, "joint": joint}


def run(cfg, data: DeviceData, ctx: Context) -> dict:
    return METHODS[cfg.method.name](Run(cfg, data, ctx))
