"""kd list [models|losses|features|methods|datasets|experiments] ['PATTERN'] [dataset=NAME | input=C,H,W classes=N]
[imports=...]: what the registries hold; models with their weights and forward FLOPs for one input."""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import re

import torch.nn as nn

from kdcli.core.errors import KdError
from kdcli.core.registry import (
    DATASETS,
    FEATURE_LOSSES,
    LOSSES,
    MODELS,
    did_you_mean,
    import_user_modules,
    load_builtins,
    load_plugins,
)
from kdcli.models import build_model, count_flops, count_params
from kdcli.report import console, table

KINDS = {
    "models": MODELS,
    "losses": LOSSES,
    "features": FEATURE_LOSSES,
    "methods": None,
    "datasets": DATASETS,
    "experiments": None,
}
USAGE = (
    "usage: kd list [models|losses|features|methods|datasets|experiments] ['PATTERN' ...] [dataset=NAME] "
    "[input=C,H,W classes=N] [imports=[module_or_file.py,...]]\n"
    "  PATTERN  a glob on the names, quoted: kd list models 'tv_res*'\n"
    "  dataset  the input for which models are counted (weights, forward FLOPs); default mnist5k\n"
    "  input, classes  that input given directly: kd list models input=3,224,224 classes=1000"
)
CHOOSE = {
    "models": "teacher=NAME / student=NAME",
    "losses": "loss=NAME, on the logits",
    "features": "features=[NAME,...], each with student_layer, teacher_layer (default penultimate)",
    "methods": "method=NAME",
    "datasets": "dataset=NAME",
    "experiments": "kd distill experiment=NAME: presets in configs/experiment/, overrides on top",
}
METHOD_TEXT = {
    "standard": "the frozen teacher(s) teach the student (teachers=[...]: ensemble or class subsets merged)",
    "ta": "teacher -> assistant(s) -> student, each distilled from the previous (Mirzadeh et al. 2020)",
    "born_again": "generations of the student architecture, each from the previous (Furlanello et al. 2018)",
    "dml": "deep mutual learning: peers trained together, each from the others (Zhang et al. 2018)",
    "joint": "teacher and student trained together from scratch, the student following the teacher",
}


def _flat(node: dict, prefix: str = "") -> list[str]:
    """A preset's values as the overrides they stand for (schedule.warmup=5)."""
    out = []
    for k, v in node.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}={v}"]
    return out


def experiments() -> dict[str, tuple[str, str]]:
    """The packaged experiment presets: name -> (what it sets, as overrides; its description, the
    first sentence of its comment)."""
    from importlib.resources import files

    import yaml

    found = {}
    for f in sorted(files("kdcli.configs").joinpath("experiment").iterdir(), key=lambda f: f.name):
        if not f.name.endswith(".yaml"):
            continue
        text = f.read_text()
        node = yaml.safe_load(text) or {}
        choices = [d for d in node.pop("defaults", []) if isinstance(d, dict)]  # {"override /loss": "dkd"}
        sets = [f"{k.split('/')[-1]}={v}" for d in choices for k, v in d.items()]
        comment = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
        comment = comment.replace("@package _global_", "").strip()
        found[f.name[: -len(".yaml")]] = (" ".join(sets + _flat(node)), re.split(r"(?<=\.)\s", comment)[0])
    return found


def _format(params: dict) -> str:
    return ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in params.items()) or "-"


def _keywords(fn) -> dict:
    """Keyword parameters of a family's builder, as Registry.params gives them for a member."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: "???" if p.default is p.empty else p.default for p in params if p.kind == p.KEYWORD_ONLY}


def count(n: int) -> str:
    """1,234 below 100k, then 0.27M, 41.2M, 387M, 1.66G."""
    if n < 100_000:
        return f"{n:,}"
    unit, scale = next((u, s) for u, s in (("T", 1e12), ("G", 1e9), ("M", 1e6)) if n >= s or u == "M")
    value = n / scale
    return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f}{unit}"


@contextlib.contextmanager
def empty_weights():
    """Modules built inside keep their parameters and buffers on the meta device: shapes without
    memory or initialisation, so counting a 600M-parameter torchvision model takes a fraction of
    a second instead of a minute and gigabytes. (A `torch.device("meta")` context would also move
    the builders' own arithmetic there, which fails where they read its values: RegNets.)"""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self, name, param):
        register_parameter(self, name, None if param is None else nn.Parameter(param.to("meta"), param.requires_grad))

    def buffer(self, name, tensor, persistent=True):
        register_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def measure(name: str, input_shape, num_classes: int) -> tuple[int, int]:
    """(weights, forward FLOPs for one input) of a registered model."""
    try:
        with empty_weights():
            model = build_model(name, input_shape, num_classes)
        return count_params(model), count_flops(model, input_shape)
    except Exception:  # a model that reads tensor values while it is built or run: build it for real
        model = build_model(name, input_shape, num_classes)
        return count_params(model), count_flops(model, input_shape)


def _shape(value: str) -> tuple[int, int, int]:
    parts = value.strip("[]()").replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise KdError(f"input={value}: give channels, height and width, e.g. input=3,32,32.")
    return shape


def model_input(dataset: str, shape: tuple | None, classes: int | None) -> tuple[tuple, int]:
    """(input_shape, num_classes) for `kd list models`: the dataset's, unless given."""
    from kdcli.data.shapes import dataset_shape

    known = dataset_shape(dataset)
    if known is None and dataset not in DATASETS:
        DATASETS.get(dataset)  # raises: unknown dataset, with the names that exist
    if known is None and (shape is None or classes is None):
        raise KdError(
            f"dataset={dataset}: its input shape and class count depend on its files, so kd list cannot tell them; "
            "give them instead, e.g. kd list models input=3,64,64 classes=N."
        )
    return shape or tuple(known[0]), classes or known[1]


def _matching(names, patterns: list[str]) -> list[str]:
    return sorted({n for p in patterns for n in fnmatch.filter(names, p)})


def _model_rows(names: list[str], families: dict, input_shape, num_classes: int) -> tuple[list, list[str]]:
    rows, notes = [], []
    with console.status("") as status:
        for name in names:
            status.update(f"counting weights and FLOPs of {name}")
            row = [name, _format(MODELS.params(name)), "-", "-", MODELS.summary(name)]
            try:
                weights, flops = measure(name, input_shape, num_classes)
                row[2:4] = count(weights), count(flops)
            except KdError as e:
                notes.append(str(e) if name in str(e) else f"{name}: {e}")
            except Exception as e:  # a user's model may need other inputs or required kwargs
                first = (str(e).strip().splitlines() or [""])[0]
                notes.append(f"{name}: {type(e).__name__}: {first}")
            rows.append(row)
    for prefix, fn in families.items():
        doc = (inspect.getdoc(fn) or "").splitlines()
        text = f"{doc[0] if doc else ''} kd list models '{prefix}*' lists and counts them."
        rows.append([f"{prefix}<name>", _format(_keywords(fn)), "-", "-", text])
    return rows, notes


def main(args: list[str]) -> int:
    kinds, patterns, imports, words = [], [], [], []
    dataset, shape, classes = "mnist5k", None, None
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    for a in args:
        key, _, value = a.partition("=")
        if key == "imports" and value:
            imports += [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        elif key == "dataset" and value:
            dataset = value
        elif key == "input" and value:
            shape = _shape(value)
        elif key == "classes" and value:
            if not (value.isascii() and value.isdigit()) or int(value) < 1:  # "²" is a digit to isdigit
                raise KdError(f"classes={value}: give the number of classes, e.g. classes=10.")
            classes = int(value)
        elif a in KINDS:
            kinds.append(a)
        elif "=" not in a:
            words.append(a)
        else:
            raise KdError(f"kd list: unknown argument '{a}'.\n{USAGE}")
    import_user_modules(imports)
    load_builtins()
    load_plugins()
    from kdcli.config import METHODS

    # A word is a glob pattern, or one name; anything else is a typo (of a kind, most likely).
    presets = experiments()
    names = [n for r in KINDS.values() if r is not None for n in r.names()] + [*METHODS, *presets] if words else []
    for w in words:
        if not any(c in w for c in "*?[") and w not in names:
            raise KdError(f"kd list: unknown argument '{w}'.{did_you_mean(w, list(KINDS) + names)}\n{USAGE}")
        patterns.append(w)

    shown = 0
    for kind in kinds or list(KINDS):
        registry = KINDS[kind]
        if kind == "experiments":
            names = _matching(presets, patterns) if patterns else list(presets)
            rows = [[n, *presets[n]] for n in names]
            columns, title = ["name", "sets", "description"], f"{kind} ({CHOOSE[kind]})"
        elif registry is None:
            names = _matching(METHODS, patterns) if patterns else list(METHODS)
            rows = [[n, _format(METHODS[n]), METHOD_TEXT[n]] for n in names]
            columns, title = ["name", "parameters", "description"], f"{kind} ({CHOOSE[kind]})"
        elif kind == "models":
            input_shape, num_classes = model_input(dataset, shape, classes)
            names = _matching(registry.names(), patterns) if patterns else registry.names(families=False)
            rows, notes = _model_rows(names, {} if patterns else registry.families(), input_shape, num_classes)
            columns = ["name", "parameters", "weights", "FLOPs", "description"]
            size = "x".join(map(str, input_shape))
            title = f"{kind} ({CHOOSE[kind]}); weights and forward FLOPs for one {size} input, {num_classes} classes"
            title += f" ({dataset})" if shape is None and classes is None else ""
        else:
            names = _matching(registry.names(), patterns) if patterns else registry.names()
            rows = [[n, _format(registry.params(n)), registry.summary(n)] for n in names]
            columns, title = ["name", "parameters", "description"], f"{kind} ({CHOOSE[kind]})"
        if patterns and not rows:
            continue
        t = table(title, columns, rows)
        for column in t.columns[2:4] if kind == "models" else ():
            column.justify = "right"  # counts with units (0.96M) that table() does not take for numbers
        console.print(t)
        if kind == "models" and notes:
            console.print(f"Not counted for {size} inputs:", highlight=False)
            for note in notes:
                console.print(f"  {note}", highlight=False, markup=False)
        shown += 1
    if not shown:
        among = f" among the {', '.join(kinds)}" if kinds else ""
        raise KdError(f"kd list: no name{among} matches {' or '.join(patterns)}.")
    return 0
