"""kd list [models|losses|datasets] [imports=...]: what the registries hold."""

from __future__ import annotations

from kdcli.errors import KdError
from kdcli.models import build_model, count_params
from kdcli.registry import DATASETS, LOSSES, MODELS, import_user_modules, load_builtins, load_plugins
from kdcli.report import console, table

KINDS = {"models": MODELS, "losses": LOSSES, "datasets": DATASETS}
USAGE = "usage: kd list [models|losses|datasets] [imports=[module_or_file.py,...]]"
CHOOSE = {"models": "teacher=NAME / student=NAME", "losses": "loss=NAME", "datasets": "dataset=NAME"}


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
