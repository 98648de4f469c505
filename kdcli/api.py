"""kdcli from Python (notebooks, scripts): the pieces the commands use, without the command line.

    import kdcli

    data = kdcli.load_data("mnist5k")
    teacher = kdcli.train_teacher("convnet", data, epochs=5)
    student = kdcli.distill(teacher, "mlp", data, T=4, epochs=5)
    student.metrics["test_acc"], student.checkpoint

Every call composes the command's config with Hydra's compose API (configs/train_teacher.yaml,
configs/distill.yaml), so the defaults, the schema, the command line's checks of keys and
options and `validate` all apply, and a bad value raises `KdError` with the message `kd` prints.
Training is `engine.fit`, as in the commands; a run directory (default
`<runs_dir>/api/<command>/<date_time>`, runs_dir from $KDCLI_RUNS or ./runs) receives the same
checkpoints, metrics.jsonl, metrics.json and config.yaml as a `kd` run, and `kd evaluate run=DIR`
reads it. The commands' own searches do not look under api/, though: `kd distill` does not find a
teacher trained here (it globs train_teacher/*), and `kd evaluate` / `kd export` without run= or a
checkpoint take the latest distill/* run, not an API one. Pass the Result (from Python) or its
.checkpoint (teacher.ckpt=..., checkpoints=[...], checkpoint=...) instead.

kdcli logs to the "kdcli" logger: `logging.basicConfig(level=logging.INFO)` shows the epoch lines.
"""

from __future__ import annotations

import contextlib
import copy
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from kdcli.app import Context, finisher, run_record, seed_everything
from kdcli.config import resolve_device
from kdcli.core.errors import KdError
from kdcli.core.files import write_json, write_text
from kdcli.overrides import as_overrides as _as_overrides
from kdcli.overrides import fmt as _fmt
from kdcli.training import checkpoint

__all__ = ["Result", "load_data", "build_model", "train_teacher", "distill", "KdError"]

# The override strings that rebuild the config of each data object load_data returned (its
# dataset node, device, data_root, augment), and the registry spec of each model build_model
# returned. Kept beside the objects, not on them: they are other modules' types.
_DATA_OVERRIDES: "weakref.WeakKeyDictionary[Any, list[str]]" = weakref.WeakKeyDictionary()
_ARCH: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()

# Keys fixed by load_data: a run's config must describe the data it trains on.
_DATA_KEYS = ("dataset", "device", "data_root", "augment")


@dataclass(repr=False)
class Result:
    """What train_teacher and distill return.

    model: the trained module, with the weights trainer.selection keeps (the very object passed in,
    if a module was). metrics: its figures (test_acc, test_nll, test_acc_last, val_acc,
    best_epoch, params, flops, arch, checkpoint; distill adds teacher_agreement, and kd_gain and
    kd_gain_test (its paired test) with baseline=True). checkpoint: its best checkpoint, a kdcli
    checkpoint like any other.
    run_dir: where the run's files are. results: every model of the run, as metrics.json records
    them (distill: teacher, student, and scratch with baseline=True)."""

    model: nn.Module
    metrics: dict
    checkpoint: Path
    run_dir: Path
    results: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        m = self.metrics
        figures = [f"test_acc={m['test_acc']:.4f}"]
        if "teacher_agreement" in m:
            figures.append(f"teacher_agreement={m['teacher_agreement']:.4f}")
        return f"Result({m['arch']['name']}, {', '.join(figures)}, checkpoint='{self.checkpoint}')"


# --- overrides ------------------------------------------------------------------------------


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _merge(given: list[str], overrides: Iterable[str], keys: dict, fixed: dict[str, str]) -> list[str]:
    """The API's own overrides, then the caller's `overrides` and keyword `keys`. A key set by
    two of them, or one that load_data or an argument fixes, is refused rather than silently
    won by one. `fixed` maps keys the arguments fix to why."""
    if isinstance(overrides, str):
        raise KdError(f"overrides takes a list of strings, e.g. overrides=['{overrides}'].")
    theirs = list(overrides) + [o for k, v in keys.items() for o in _as_overrides(k, v)]
    seen = {_key(o): "an argument" for o in given}
    for o in theirs:
        key = _key(o)
        top = key.split(".")[0]
        if top in _DATA_KEYS:
            raise KdError(f"'{o}': {top} belongs to the data; give it to kdcli.load_data(...) instead.")
        if top == "resume":
            raise KdError("resume= is for the kd command; from Python, start a new run.")
        for prefix, why in fixed.items():
            if key == prefix or key.startswith(prefix + "."):
                raise KdError(f"'{o}': {why}")
        if key in seen:
            raise KdError(f"'{o}': {key} is already set by {seen[key]}; set it once.")
        seen[key] = f"'{o}'"
    return given + theirs


def _compose(command: str, overrides: list[str]) -> DictConfig:
    """The command's config as `kd <command> <overrides>` composes it (debug=smoke's data keys left
    out: the data is loaded already)."""
    from kdcli.compose import compose_command

    return compose_command(command, overrides, lambda o: _key(o).split(".")[0] not in _DATA_KEYS)


# --- data and models -------------------------------------------------------------------------


def load_data(
    dataset: str = "mnist5k",
    *,
    device: str = "auto",
    data_root: str | Path | None = None,
    augment: str = "standard",
    **dataset_keys: Any,
):
    """The dataset as the commands hold it: splits normalised on the device (DeviceData), or
    streamed when they do not fit (StreamData). `dataset` is a dataset config name (`kd list
    datasets`); keyword arguments set its keys, e.g. load_data("fashion_mnist", limit=2000) or
    load_data("mnist5k", classes=[0, 1, 2]). data_root: where downloaded datasets live (default
    $KDCLI_DATA or ~/.cache/kdcli/data). augment: standard (the dataset's shifts/flips on the
    training split) or none. Splits are data.train, data.val, data.test (x, y on data.device)."""
    from kdcli.training.build import open_dataset

    chosen = [f"dataset={_fmt(dataset)}"]
    chosen += [o for k, v in dataset_keys.items() for o in _as_overrides(f"dataset.{k}", v)]
    chosen.append(f"augment={_fmt(augment)}")
    if data_root is not None:
        chosen.append(f"data_root={_fmt(str(Path(data_root).expanduser()))}")
    cfg = _compose("train_teacher", [*chosen, f"device={_fmt(device)}"])
    dev = resolve_device(cfg.device)
    data = open_dataset(cfg, dev)  # what the commands' device_data opens, without a run to note it in
    _DATA_OVERRIDES[data] = [*chosen, f"device={_fmt(str(dev))}"]  # the device it is on, not "auto"
    return data


def _data_overrides(data) -> list[str]:
    try:
        return list(_DATA_OVERRIDES[data])
    except (KeyError, TypeError):
        raise KdError(
            f"data: pass what kdcli.load_data(...) returned (got {type(data).__name__}); checkpoints record "
            "the dataset config it was loaded with."
        ) from None


def build_model(name: str, data, **kwargs: Any) -> nn.Module:
    """A registry model (`kd list models`) for the data's input shape and classes, on its
    device, initialised from torch's global random state. Its checkpoints are rebuildable by
    `kd evaluate` / `kd export` like those of a model named in a config."""
    from kdcli.core.registry import MODELS, load_builtins
    from kdcli.models import build_model as build

    load_builtins()
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in MODELS.params(name).items()}
    spec = {"name": name, "kwargs": {**defaults, **kwargs}}
    model = build(name, data.info.input_shape, data.info.num_classes, spec["kwargs"])
    _ARCH[model] = spec
    return model.to(data.device)


def _spec_of(model: nn.Module) -> dict:
    """The registry spec of a model build_model made; for any other module a name that says what
    it is (kd evaluate / kd export cannot rebuild such a checkpoint unless the class is registered)."""
    return _ARCH.get(model) or {"name": f"<custom:{type(model).__name__}>", "kwargs": {}}


def _model_overrides(role: str, model) -> list[str]:
    """teacher=<name> / student=<name> (+ its keys) for a registry name or {"name": ..., key: value}."""
    if isinstance(model, str):
        return [f"{role}={_fmt(model)}"]
    if isinstance(model, Mapping):
        if "name" not in model:
            raise KdError(f"{role}: a dict names a registry model: {{'name': 'mlp', ...}} (got {dict(model)}).")
        return _as_overrides(role, model)
    raise KdError(
        f"{role}: give a registry model name (`kd list models`), a dict {{'name': ..., key: value}} or an "
        f"nn.Module (got {type(model).__name__})."
    )


# --- runs ------------------------------------------------------------------------------------


def _run_dir(cfg, command: str, run_dir) -> Path:
    if run_dir is None:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        return Path(cfg.runs_dir).expanduser().resolve() / "api" / command / stamp
    run_dir = Path(run_dir).expanduser().resolve()
    if (run_dir / "metrics.json").is_file():
        raise KdError(f"run_dir={run_dir} holds an earlier run (metrics.json); give a new directory or leave it unset.")
    return run_dir


@contextlib.contextmanager
def _session(command: str, cfg, overrides: list[str], run_dir, data) -> Iterator[Context]:
    """What `kd` does around a command: a run directory with config.yaml and a metrics.json
    whose status says how the run ended; seeding. The caller adds its results to ctx.metrics."""
    from kdcli.training.build import storage_of

    run_dir = _run_dir(cfg, command, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = {**run_record(command, overrides, api=True), "storage": storage_of(data)}
    ctx = Context(run_dir, data.device, multirun=False, metrics=metrics)
    finish = finisher(run_dir, metrics)
    write_json(run_dir / "metrics.json", metrics)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    try:
        yield ctx
    except KdError as e:
        finish("failed", error=str(e))
        raise
    except KeyboardInterrupt:
        finish("interrupted")
        raise
    except Exception as e:
        finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    finish("completed")


def _common_overrides(epochs, progress: bool) -> list[str]:
    out = [] if epochs is None else [f"trainer.epochs={_fmt(epochs)}"]
    return out + [f"trainer.progress={_fmt(progress)}"]


def train_teacher(
    model: Union[str, Mapping, nn.Module],
    data,
    *,
    epochs: int | None = None,
    run_dir: str | Path | None = None,
    overrides: Iterable[str] = (),
    progress: bool = False,
    **keys: Any,
) -> Result:
    """Train a teacher on the labels, like `kd train-teacher`.

    model: a registry name ("convnet"), {"name": "resnet8", key: value}, or an nn.Module (yours,
    or from build_model; trained in place). data: from load_data. epochs: trainer.epochs
    (default: the config's, 30). overrides: `kd` overrides such as ["optimizer=adam",
    "trainer.batch_size=128"]; keyword arguments set top-level keys (seed=1) or nodes
    (trainer={"batch_size": 128}). run_dir: default <runs_dir>/api/train_teacher/<date_time>.

    The checkpoint works with `kd distill teacher.ckpt=...` and `kd evaluate` when the model is
    a registry one; that of your own module records arch "<custom:ClassName>", which `kd` can
    rebuild only once the class is registered (imports=[...], see README)."""
    from kdcli.teachers import recipe as command
    from kdcli.training.build import new_model

    mine = [] if isinstance(model, nn.Module) else _model_overrides("teacher", model)
    fixed = {} if not isinstance(model, nn.Module) else {"teacher": "the teacher is the module given."}
    given = _data_overrides(data) + mine + _common_overrides(epochs, progress)
    all_overrides = _merge(given, overrides, keys, fixed)
    cfg = _compose("train_teacher", all_overrides)
    with _session("train_teacher", cfg, all_overrides, run_dir, data) as ctx:
        if isinstance(model, nn.Module):
            net, spec = model.to(data.device), _spec_of(model)
        else:
            net, spec = new_model(cfg.teacher, data, ctx.device, int(cfg.seed))  # as command.train would
        figures = command.train(cfg, data, ctx.run_dir, ctx, model=(net, spec))  # trains net in place
        _ARCH[net] = spec  # passed on as a module (distill(teacher.model, ...)), it keeps its registry name
        ctx.metrics.update(command.results(cfg, figures))
    return Result(net, figures, Path(figures["checkpoint"]), ctx.run_dir, {"teacher": figures})


# --- distill ---------------------------------------------------------------------------------


def _is_path(t) -> bool:
    from kdcli.core.registry import MODELS, load_builtins

    if isinstance(t, Path):
        return True
    if not isinstance(t, str):
        return False
    load_builtins()
    if t in MODELS:
        return False
    return "/" in t or os.sep in t or t.endswith((".pt", ".pth")) or Path(t).expanduser().is_file()


def _kind(teacher) -> str:
    if isinstance(teacher, nn.Module):
        return "module"
    if isinstance(teacher, Result):
        return "result"
    return "path" if _is_path(teacher) else "name"


def _teacher_overrides(teachers: list) -> tuple[list[str], dict]:
    """The overrides that record the teachers in the config, and the keys then left to the caller."""
    kinds = [_kind(t) for t in teachers]
    fixed = {
        "teachers": "give several teachers as a list: distill([a, b], student, data).",
        "teacher.ckpt": "give the checkpoint as distill's teacher: distill(path, student, data).",
    }
    if kinds == ["name"]:
        return _model_overrides("teacher", teachers[0]), fixed
    if "name" in kinds:
        raise KdError(
            "A teacher given by name is trained first, which makes sense for one teacher only: give several "
            "teachers as checkpoints, Results or modules."
        )
    if "module" in kinds and len(teachers) > 1:
        raise KdError("Several teachers are given as checkpoints or Results (each records its data), not modules.")
    fixed["teacher"] = "the teacher is given as a checkpoint, Result or module, which fixes its model."
    if kinds == ["module"]:
        return [], fixed
    paths = [str(Path(t.checkpoint if isinstance(t, Result) else t).expanduser().resolve()) for t in teachers]
    return ([f"teacher.ckpt={_fmt(paths[0])}"] if len(paths) == 1 else [f"teachers={_fmt(paths)}"]), fixed


def _features_overrides(features) -> list[str]:
    """features=["at"] or {"at": {"weight": 100, "student_layer": "conv2"}} (or a name)."""
    if features is None:
        return []
    if isinstance(features, str):
        features = [features]
    if isinstance(features, Mapping):
        out = [f"features={_fmt(list(features))}"]
        for name, params in features.items():
            out += [o for k, v in (params or {}).items() for o in _as_overrides(f"features.{name}.{k}", v)]
        return out
    return [f"features={_fmt(list(features))}"]


def _loaded_teachers(teachers: list, cfg, data) -> list[tuple] | None:
    """(model, checkpoint dict, path) of each teacher given as a module, Result or checkpoint,
    checked against the data as `kd distill` checks teacher.ckpt; None for a registry name, which
    the distill method obtains from the config as `kd distill` does."""
    from kdcli.teachers.load import _check_teacher_data, _load_teacher, freeze_teacher
    from kdcli.training.build import ckpt_meta, dataset_config

    if _kind(teachers[0]) == "name":
        return None
    dcfg = dataset_config(cfg)
    loaded = []
    for t in teachers:
        if isinstance(t, nn.Module):  # used as is: this data's inputs and classes
            ckpt = ckpt_meta(_spec_of(t), data, dcfg)
            loaded.append((freeze_teacher(t.to(data.device)), ckpt, None))
        elif isinstance(t, Result):  # its module: a checkpoint of an unregistered class cannot be rebuilt
            ckpt = checkpoint.read(t.checkpoint)
            _check_teacher_data(ckpt, Path(t.checkpoint), data, dcfg)
            loaded.append((freeze_teacher(t.model.to(data.device)), ckpt, str(Path(t.checkpoint).resolve())))
        else:
            loaded.append(_load_teacher(Path(t).expanduser().resolve(), "teacher", data, dcfg, data.device))
    return loaded


def _module_run(student: nn.Module, cfg, data, ctx):
    """methods.Run with the caller's module as the student, in place of one built from
    cfg.student; the scratch baseline starts from a copy of its initial weights."""
    from kdcli.methods.shared import Run

    class ModuleRun(Run):
        def fresh_student(self, seed_offset: int = 0):
            if seed_offset:  # methods that need other initial weights are not offered here
                raise KdError("A student given as a module has one set of initial weights.")
            model = copy.deepcopy(self.student)
            model.load_state_dict(self.init_state)
            return model, self.spec

    return ModuleRun(cfg, data, ctx, student=(student.to(data.device), _spec_of(student)))


def distill(
    teacher,
    student: Union[str, Mapping, nn.Module],
    data,
    *,
    loss: Union[str, Mapping] = "kd",
    T: float = 4.0,
    alpha: float = 0.0,
    features=None,
    epochs: int | None = None,
    baseline: bool = False,
    run_dir: str | Path | None = None,
    overrides: Iterable[str] = (),
    progress: bool = False,
    **keys: Any,
) -> Result:
    """Distill a teacher into a student, as `kd distill` does (method=standard); returns the student.

    teacher: a checkpoint path, a Result of train_teacher, an nn.Module (used as is: it must take
    this data's inputs and predict its classes), a list of checkpoints/Results (an ensemble, or
    teachers of class subsets; see teacher_merge), or a registry name: then, as with
    `kd distill teacher=NAME`, the latest matching `kd train-teacher` run under runs_dir is used, or
    one is trained first (as a train_teacher run of its own, with this call's trainer settings).
    A module given, or a Result's .model, is frozen in place as `kd distill` freezes its teacher:
    left in eval mode with requires_grad False (call .requires_grad_(True) to train it again).
    student: a registry name, {"name": "mlp", "hidden": [64]}, or an nn.Module (trained in place).
    loss: a loss name or {"name": "dkd", "nckd": 8}. T, alpha: as in the config. features: ["at"]
    or {"at": {"weight": 1000, "student_layer": "conv2", "teacher_layer": "conv2"}}. baseline:
    also train the student from scratch and report kd_gain (off here, unlike `kd distill`: it
    doubles the time). epochs, overrides, run_dir, progress and keyword arguments as in
    train_teacher (e.g. transfer={"init_from_teacher": True}; run_dir default:
    <runs_dir>/api/distill/<date_time>).

    The student's checkpoint of a registry model works with `kd evaluate` and `kd export`; that of
    your own module records arch "<custom:ClassName>", which `kd` rebuilds only once the class is
    registered."""
    from kdcli import methods
    from kdcli.commands.distill import settings

    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    if not teachers:
        raise KdError("distill needs a teacher.")
    t_overrides, fixed = _teacher_overrides(teachers)
    if isinstance(student, nn.Module):
        s_overrides = []
        fixed["student"] = "the student is the module given."
    else:
        s_overrides = _model_overrides("student", student)
    fixed["method"] = "the Python API runs method=standard; use `kd distill method=...` for the others."
    given = _data_overrides(data) + t_overrides + s_overrides + _as_overrides("loss", loss)
    given += [f"T={_fmt(T)}", f"alpha={_fmt(alpha)}", f"baseline={_fmt(baseline)}"]
    given += _features_overrides(features) + _common_overrides(epochs, progress)
    all_overrides = _merge(given, overrides, keys, fixed)
    cfg = _compose("distill", all_overrides)
    with _session("distill", cfg, all_overrides, run_dir, data) as ctx:
        run = _module_run(student, cfg, data, ctx) if isinstance(student, nn.Module) else methods.Run(cfg, data, ctx)
        results = methods.standard(run, _loaded_teachers(teachers, cfg, data))
        ctx.metrics.update(results, **settings(cfg))
    metrics = dict(results["student"])
    _ARCH[run.models["student"]] = run.spec
    if "kd_gain" in results:
        metrics["kd_gain"], metrics["kd_gain_test"] = results["kd_gain"], results["kd_gain_test"]
    return Result(run.models["student"], metrics, Path(metrics["checkpoint"]), ctx.run_dir, results)
