"""kd list [models|losses|features|methods|datasets] [imports=...]: what the registries hold."""

from __future__ import annotations

from kdcli.errors import KdError
from kdcli.models import build_model, count_params
from kdcli.registry import (
    DATASETS,
    FEATURE_LOSSES,
    LOSSES,
    MODELS,
    import_user_modules,
    load_builtins,
    load_plugins,
)
from kdcli.report import console, table

KINDS = {"models": MODELS, "losses": LOSSES, "features": FEATURE_LOSSES, "methods": None, "datasets": DATASETS}
USAGE = "usage: kd list [models|losses|features|methods|datasets] [imports=[module_or_file.py,...]]"
CHOOSE = {
    "models": "teacher=NAME / student=NAME",
    "losses": "loss=NAME, on the logits",
    "features": "features=[NAME,...], each with student_layer, teacher_layer (default penultimate)",
    "methods": "method=NAME",
    "datasets": "dataset=NAME",
}
METHOD_TEXT = {
    "standard": "the frozen teacher(s) teach the student (teachers=[...]: ensemble or class subsets merged)",
    "ta": "teacher -> assistant(s) -> student, each distilled from the previous (Mirzadeh et al. 2020)",
    "born_again": "generations of the student architecture, each from the previous (Furlanello et al. 2018)",
    "dml": "deep mutual learning: peers trained together, each from the others (Zhang et al. 2018)",
    "joint": "teacher and student trained together from scratch, the student following the teacher",
}


def _params(registry, name: str) -> str:
    return ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in registry.params(name).items()) or "-"


def main(args: list[str]) -> int:
    kinds, imports = [], []
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    for a in args:
        if a.startswith("imports="):
            value = a.split("=", 1)[1].strip("[]")
            imports += [v.strip() for v in value.split(",") if v.strip()]
        elif a in KINDS:
            kinds.append(a)
        else:
            raise KdError(f"kd list: unknown argument '{a}'. {USAGE}")
    import_user_modules(imports)
    load_builtins()
    load_plugins()

    for kind in kinds or list(KINDS):
        registry = KINDS[kind]
        if registry is None:
            from kdcli.config import METHODS

            rows = [[n, ", ".join(f"{k}={v}" for k, v in p.items()) or "-", METHOD_TEXT[n]] for n, p in METHODS.items()]
            console.print(table(f"{kind} ({CHOOSE[kind]})", ["name", "parameters", "description"], rows))
            continue
        rows = []
        for name in registry.names():
            row = [name, _params(registry, name), registry.summary(name)]
            if kind == "models":
                try:
                    row.insert(2, f"{count_params(build_model(name, (1, 28, 28), 10)):,}")
                except Exception:  # a user model may need other inputs or required kwargs
                    row.insert(2, "-")
            rows.append(row)
        columns = ["name", "parameters", "description"]
        if kind == "models":
            columns.insert(2, "weights (1x28x28, 10 classes)")
        console.print(table(f"{kind} ({CHOOSE[kind]})", columns, rows))
    return 0
