"""The teachers of a distillation run: from teacher.ckpt or teachers=[...], else the latest
train-teacher run of the same recipe, else one trained now; each checked against the run's data,
frozen, and wrapped to see the student's inputs and classes."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kdcli.config import model_spec
from kdcli.core import distributed
from kdcli.core.errors import KdError
from kdcli.core.files import write_json, write_text
from kdcli.core.run import Context
from kdcli.data import DeviceData
from kdcli.data.splits import SPLIT_VERSION
from kdcli.losses import Objective
from kdcli.teachers import recipe
from kdcli.training import checkpoint
from kdcli.training.build import augmentation, completed_runs, data_identity, dataset_config, open_dataset
from kdcli.training.engine import Teacher, batches
from kdcli.training.resume import config_diff

log = logging.getLogger("kdcli")


def _check_teacher_data(ckpt: dict, path: Path, data: DeviceData, dataset_cfg: dict) -> None:
    info = ckpt["data"]
    if info["name"] != data.info.name or list(info["input_shape"]) != list(data.info.input_shape):
        raise KdError(
            f"Teacher {path} was trained on {info['name']} (input {info['input_shape']}), but this run "
            f"uses {data.info.name} (input {data.info.input_shape}). Pick a teacher for this dataset or "
            "leave teacher.ckpt unset to find or train one."
        )
    unknown = [c for c in info["class_names"] if c not in data.info.class_names]
    if unknown:
        raise KdError(
            f"Teacher {path} predicts classes that this run's data does not have: {', '.join(unknown)} (the "
            f"student's classes: {', '.join(data.info.class_names)}). Their outputs cannot be matched."
        )
    # Teachers of class subsets share the student's validation split when these agree.
    keys = ("name", "val_size", "split_seed")
    theirs = info.get("dataset") or {}
    diff = ", ".join(f"dataset.{k}" for k in keys if theirs.get(k) != dataset_cfg.get(k))
    if diff:
        log.warning(
            f"warning  teacher {path} was trained with different data splits ({diff}): "
            "it may have seen this run's validation images."
        )


def _check_teacher_arch(ckpt: dict, path: Path, asked: dict) -> None:
    """A checkpoint describes its own model; refuse it only when the command line asked for
    another one (teacher=... or teacher.<param>=...), since the group default is no request."""
    held = ckpt["arch"]
    if held == asked:
        return
    explicit = [
        o for o in HydraConfig.get().overrides.task if o.split("=")[0].split(".")[0] == "teacher" and "ckpt" not in o
    ]
    if explicit:
        raise KdError(
            f"teacher.ckpt={path} holds {held['name']} with {held.get('kwargs')}, but the command line asks for "
            f"{asked['name']} with {asked['kwargs']} ({' '.join(explicit)}). Drop those overrides to use the "
            "checkpoint's own model, or pass a checkpoint of the model you asked for."
        )
    log.info(
        f"teacher  teacher.ckpt holds {held['name']}; using it (the default teacher={asked['name']} does not apply)"
    )


def obtain_teacher(cfg, data: DeviceData, ctx: Context) -> tuple:
    """Teacher from teacher.ckpt, else the latest train-teacher run of the same recipe (kd
    train-teacher's, with the keys of teacher_train: recipe.recipe), else train one now
    with that recipe (as a train-teacher run of its own, so later runs and sweeps reuse it). A
    resumed run uses the teacher its first part used, and finishes training it if it was."""
    dataset_cfg = dataset_config(cfg)
    path = cfg.teacher.ckpt
    if path:
        source = "teacher.ckpt"
    else:
        tcfg = recipe.recipe(cfg)
        same_augmentation = augmentation(tcfg) == augmentation(cfg)  # then the run's data serves the teacher too
        unfinished = ctx.previous.get("teacher_run") if ctx.resume else None
        path = None if unfinished else distributed.decided_by_main(lambda: find_teacher_run(cfg.runs_dir, tcfg))
        source = "latest train-teacher run of this recipe"
        if path is None:
            path, source = _train_teacher(tcfg, unfinished, ctx, data if same_augmentation else None), "trained now"
    asked = model_spec(cfg.teacher) if source == "teacher.ckpt" else None
    return _load_teacher(path, source, data, dataset_cfg, ctx.device, asked)


def _train_teacher(tcfg, unfinished: str | None, ctx: Context, data=None) -> str:
    """Train the teacher of recipe `tcfg` on `data`, or, when its augmentation differs from the
    student's (data None), on the dataset opened anew with its own; in a train-teacher run directory
    that records it as `kd train-teacher` would. Returns its kept checkpoint."""
    if unfinished:
        run_dir = Path(unfinished)
        log.info(f"teacher  continuing the teacher this run was training, in {run_dir}")
    else:
        stamp = distributed.same(datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f"))  # one dir for all ranks
        run_dir = Path(tcfg.runs_dir).expanduser().resolve() / "train_teacher" / stamp
        log.info(
            f"teacher  no {tcfg.teacher.name} teacher of this recipe for this dataset under "
            f"{Path(tcfg.runs_dir).expanduser()}; training one first in {run_dir} ({tcfg.trainer.epochs} epochs, "
            f"augment={tcfg.augment}; teacher_train.KEY=VALUE changes the recipe, teacher.ckpt=PATH gives a teacher)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx.note("teacher_run", str(run_dir))
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(tcfg, resolve=True))
    write_json(run_dir / "metrics.json", {"command": "train_teacher", "status": "running", "for": str(ctx.run_dir)})
    data = data if data is not None else open_dataset(tcfg, ctx.device)
    figures = recipe.train(tcfg, data, run_dir, ctx, resume=bool(unfinished))
    write_json(
        run_dir / "metrics.json",
        {"command": "train_teacher", "status": "completed", **recipe.results(tcfg, figures)},
    )
    return figures["checkpoint"]


def _load_teacher(path, source: str, data: DeviceData, dataset_cfg: dict, device, asked=None) -> tuple:
    """(frozen model in eval mode, checkpoint, path), after checking it fits this run's data
    (and the architecture the command line asked for, if any)."""
    ckpt = checkpoint.read(path)
    if asked is not None:
        _check_teacher_arch(ckpt, Path(path), asked)
    _check_teacher_data(ckpt, Path(path), data, dataset_cfg)
    model = freeze_teacher(checkpoint.build_from(ckpt, path).to(device))
    log.info(f"teacher  {checkpoint.describe(ckpt)} from {path} ({source})")
    return model, ckpt, str(path)


def freeze_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """A pretrained teacher as distillation uses it: eval mode (dropout off, batch-norm statistics
    fixed), no gradients for its parameters. In place; returns the module."""
    return model.eval().requires_grad_(False)


def obtain_teachers(cfg, data: DeviceData, ctx: Context) -> list[tuple]:
    """(model, checkpoint, path) of each teacher: teachers=[...] or the single teacher. A
    resumed run takes the very checkpoints its first part used."""
    used = ctx.previous.get("teacher_checkpoints") if ctx.resume else None
    if used:
        loaded = [_load_teacher(p, "as before the run stopped", data, dataset_config(cfg), ctx.device) for p in used]
    elif not cfg.teachers:
        loaded = [obtain_teacher(cfg, data, ctx)]
    else:
        loaded = [_load_teacher(p, "teachers", data, dataset_config(cfg), ctx.device) for p in cfg.teachers]
    ctx.note("teacher_checkpoints", [str(Path(p).resolve()) for _, _, p in loaded])
    return loaded


def frozen_teachers(loaded: list[tuple], data: DeviceData) -> list[Teacher]:
    """Wrap each teacher with the renormalisation of its inputs (from the student's statistics to
    the ones it was trained with) and the map of its classes to the student's."""
    device, names = data.device, data.info.class_names
    out = []
    for model, ckpt, _ in loaded:
        info = ckpt["data"]
        teacher = Teacher(model, torch.tensor([names.index(c) for c in info["class_names"]], device=device))
        if info["mean"] != data.info.mean or info["std"] != data.info.std:
            mean_s, std_s, mean_t, std_t = (
                torch.tensor(v, device=device).view(1, -1, 1, 1)
                for v in (data.info.mean, data.info.std, info["mean"], info["std"])
            )
            teacher.scale, teacher.shift = std_s / std_t, (mean_s - mean_t) / std_t
        out.append(teacher)
    covered = set(torch.cat([t.class_map for t in out]).tolist())
    missing = [names[i] for i in range(len(names)) if i not in covered]
    if missing:
        raise KdError(
            f"The teachers cover {len(covered)} of the student's {len(names)} classes; no teacher knows "
            f"{', '.join(missing)}. Add a teacher trained on them (kd train-teacher dataset.classes=[...])."
        )
    return out


@torch.no_grad()
def teacher_logits(teachers: list[Teacher], objective: Objective, source, batch_size: int) -> torch.Tensor:
    """The (merged) teachers' logits over the student's classes at T=1, batch by batch."""
    return torch.cat(
        [objective.teacher_logits([t(x) for t in teachers], 1.0).float() for x in batches(source, batch_size)]
    )


def find_teacher_run(runs_dir: str | Path, recipe: DictConfig) -> Path | None:
    """The kept checkpoint of the latest completed train-teacher run whose configuration is
    `recipe` (a train-teacher config: model, data, augmentation, optimizer, schedule, epochs, seed;
    only the keys that cannot change the teacher, such as the device, may differ), or None. A
    teacher of the same model and data trained another way is named in the log, not used."""
    wanted = OmegaConf.to_container(recipe, resolve=True)
    other = None
    for run, m in reversed(completed_runs(runs_dir, "train_teacher/*", "train_teacher-multirun/*/*")):
        ckpt = Path((m.get("teacher") or {}).get("checkpoint", ""))
        config = run / "config.yaml"
        if m.get("split_version") != SPLIT_VERSION or not ckpt.is_file() or not config.is_file():
            continue
        try:
            previous = OmegaConf.load(config)
            recorded = {**OmegaConf.to_container(previous, resolve=False), "dataset": dataset_config(previous)}
            diff = config_diff(wanted, recorded)  # (dataset_config: a folder's root made absolute, as in wanted)
        except Exception:  # an unreadable record is no match
            continue
        if not diff:
            return ckpt
        same_model = (m.get("teacher") or {}).get("arch") == model_spec(recipe.teacher)
        if other is None and same_model and data_identity(m.get("dataset") or {}) == data_identity(wanted["dataset"]):
            other = (ckpt, diff)
    if other is not None:
        log.info(
            f"teacher  {other[0]} has this model and data but another recipe ({'; '.join(other[1][:3])}): not "
            "reused. Pass teacher.ckpt=PATH to distill from it anyway."
        )
    return None
