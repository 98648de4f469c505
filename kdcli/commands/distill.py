"""kd distill: teachers, objectives and the results table. The training methods themselves
(standard, teacher-assistant chains, born-again generations, mutual and joint learning) are in
kdcli/commands/methods.py."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from kdcli import checkpoint, distributed
from kdcli.app import Context
from kdcli.commands import train_teacher
from kdcli.commands.common import augmentation, dataset_config, device_data, find_teacher_run, open_dataset
from kdcli.config import group_kwargs, model_spec
from kdcli.data import DeviceData
from kdcli.engine import Teacher, batches
from kdcli.errors import KdError
from kdcli.files import write_json, write_text
from kdcli.losses import Objective, Schedule, Shapes
from kdcli.losses.objective import FeatureTerm
from kdcli.losses.taps import Taps
from kdcli.registry import FEATURE_LOSSES, LOSSES
from kdcli.report import console, pct, table

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
    train-teacher's, with the keys of teacher_train: train_teacher.recipe), else train one now
    with that recipe (as a train-teacher run of its own, so later runs and sweeps reuse it). A
    resumed run uses the teacher its first part used, and finishes training it if it was."""
    dataset_cfg = dataset_config(cfg)
    path = cfg.teacher.ckpt
    if path:
        source = "teacher.ckpt"
    else:
        tcfg = train_teacher.recipe(cfg)
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
    figures = train_teacher.train(tcfg, data, run_dir, ctx, resume=bool(unfinished))
    write_json(
        run_dir / "metrics.json",
        {"command": "train_teacher", "status": "completed", **train_teacher.results(tcfg, figures)},
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


def _layers(node, key: str) -> list[str]:
    value = node[key]
    return [str(v) for v in value] if OmegaConf.is_list(value) or isinstance(value, list) else [str(value)]


@torch.no_grad()
def _tap_shapes(model, names: list[str], role: str, data: DeviceData) -> list[tuple]:
    taps = Taps(model, names, role, data.info.input_shape)
    was_training = model.training
    model.eval()
    try:
        model(data.train.head(2))
        values = taps.take()
        for name, v in zip(names, values):
            if v is None:
                raise KdError(
                    f"{role}_layer={name}: that layer does not run in the {role}'s forward pass; pick another."
                )
        return [tuple(v.shape[1:]) for v in values]
    finally:
        taps.remove()
        model.train(was_training)


def build_objective(cfg, data: DeviceData, student, teacher=None, teachers: list[Teacher] = ()) -> Objective:
    """The student's objective from the loss, schedule, weighting and features config. Feature
    shapes are found with one forward of two training images through student and teacher."""
    sch = cfg.schedule
    features = []
    for name, node in (cfg.features or {}).items():
        s_layers, t_layers = _layers(node, "student_layer"), _layers(node, "teacher_layer")
        if len(s_layers) != len(t_layers):
            raise KdError(
                f"features.{name}: {len(s_layers)} student layer(s) {s_layers} but {len(t_layers)} teacher layer(s) "
                f"{t_layers}; they are matched in pairs."
            )
        shapes = Shapes(
            _tap_shapes(student, s_layers, "student", data),
            _tap_shapes(teacher.model if isinstance(teacher, Teacher) else teacher, t_layers, "teacher", data),
            len(data.train),
            int(cfg.seed),
        )
        params = {k: v for k, v in group_kwargs(node).items() if k not in ("student_layer", "teacher_layer")}
        if params.get("weight", 0) < 0:
            raise KdError(f"features.{name}.weight must be >= 0 (got {params['weight']}).")
        module = FEATURE_LOSSES.build(name, shapes, **params)
        if distributed.world() > 1 and any(True for _ in module.buffers()):
            raise KdError(
                f"features.{name} keeps state over the training samples (a memory bank), which several processes "
                "would each update with their own part of the batches: run it in one process (without torchrun)."
            )
        hint_epochs = int(params.get("hint_epochs", 0))
        features.append(FeatureTerm(name, module, s_layers, t_layers, hint_epochs, shapes.teacher))
        log.info(
            f"features {name}: student {', '.join(f'{n} {s}' for n, s in zip(s_layers, shapes.student))} -> "
            f"teacher {', '.join(f'{n} {s}' for n, s in zip(t_layers, shapes.teacher))}, "
            f"weight {params.get('weight', 1):g}"
        )
    identity = torch.arange(data.info.num_classes, device=data.device)
    several = len(teachers) > 1 or any(not torch.equal(t.class_map, identity) for t in teachers)
    partial = any(len(t.class_map) < data.info.num_classes for t in teachers)
    merge = cfg.teacher_merge if cfg.teacher_merge != "auto" else ("conditional" if partial else "probs")
    weights = list(cfg.teacher_weights) or [1.0] * max(1, len(teachers))
    if several and merge == "conditional" and cfg.loss.name == "dkd":
        raise KdError("loss=dkd needs the target class in every teacher's classes; use teacher_merge=probs or logits.")
    if several and merge == "probs" and cfg.loss.name == "mse" and not cfg.loss.get("probs", False):
        raise KdError(
            "loss=mse compares logits, and teacher_merge=probs merges probabilities: use teacher_merge=logits "
            "or loss.probs=true."
        )
    if len(teachers) > 1 or partial:
        log.info(f"teachers merged: teacher_merge={merge}, weights {weights}")
    term = LOSSES.build(cfg.loss.name, **group_kwargs(cfg.loss))
    if cfg.confidence_weights:  # a batch-level term cannot be weighted per sample: say so before training
        z = torch.randn(2, data.info.num_classes, device=data.device)
        if term(z, z.flip(0), torch.zeros(2, dtype=torch.long, device=data.device), float(cfg.T)).dim() != 1:
            raise KdError(
                "confidence_weights=true needs a per-sample logit loss (kd, ls, soft_ce, mse, dkd); "
                f"loss={cfg.loss.name} is defined on the whole batch."
            )
    return Objective(
        term,
        T=Schedule(sch.T, float(cfg.T), sch.T_end, sch.step_at),
        alpha=Schedule(sch.alpha, float(cfg.alpha), sch.alpha_end, sch.step_at),
        warmup=int(sch.warmup),
        label_smoothing=float(cfg.trainer.label_smoothing),
        confidence=float(cfg.confidence_temperature) if cfg.confidence_weights else None,
        features=features,
        class_maps=[t.class_map for t in teachers] if several else None,
        teacher_weights=weights,
        merge=merge,
        num_classes=data.info.num_classes,
    ).to(data.device)


def labels_only(cfg, device) -> Objective:
    return Objective(label_smoothing=float(cfg.trainer.label_smoothing)).to(device)


def run(cfg, ctx: Context) -> dict:
    from kdcli.commands import methods

    data = device_data(cfg, ctx)
    results = methods.run(cfg, data, ctx)
    _print_results(results)
    results.update(settings(cfg))
    return results


def settings(cfg) -> dict:
    """The settings a distill run records in metrics.json beside its results (kd distill and kdcli.api)."""
    return {
        "T": cfg.T,
        "alpha": cfg.alpha,
        "loss": cfg.loss.name,
        "method": cfg.method.name,
        "dataset": dataset_config(cfg),
    }


def _print_results(results: dict) -> None:
    rows = []
    for r in results.values():
        if not isinstance(r, dict) or "label" not in r:
            continue
        rows.append(
            [
                r["label"],
                r.get("model", r.get("arch", {}).get("name", "")),
                pct(r["test_acc"]),
                pct(r.get("test_acc_last")),
                pct(r.get("teacher_agreement")),
                f"{r['params']:,}" if "params" in r else "-",
                f"{r['flops'] / 1e6:.2f}" if "flops" in r else "-",
            ]
        )
    console.print(
        table(
            "Test accuracy (the checkpoint trainer.selection keeps)",
            ["", "model", "test acc %", "last epoch %", "agrees w. teacher %", "params", "MFLOPs/img"],
            rows,
        )
    )
    cache = results.get("teacher_cache")
    if cache and cache["used"]:
        how = "computed once" if cache["computed"] else "reused"
        console.print(f"Teacher outputs: {how}, looked up at each step ({cache['path']})", soft_wrap=True)
    if "kd_gain" in results:
        console.print(gain_line(results["kd_gain_test"]), soft_wrap=True)
    for r in results.values():
        if isinstance(r, dict) and "sparsity" in r:  # params and FLOPs above count the zeros too
            console.print(
                f"{r['label']}: {r['sparsity']:.2%} of its prunable weights are zero "
                f"(prune.kind={r['pruning']['kind']}, classifier kept dense)"
            )


def gain_line(g: dict) -> str:
    """The KD gain with its uncertainty, as the results table's last line."""
    lo, hi = (100 * v for v in g["ci"])
    if g["p_value"] >= 0.05:
        verdict = "within chance"
    else:
        verdict = "a significant gain (p < 0.05)" if g["gain"] > 0 else "a significant loss (p < 0.05)"
    return (
        f"KD gain over the scratch student: [bold]{100 * g['gain']:+.2f}[/bold] points of test accuracy "
        f"({100 * g['level']:.0f} % interval {lo:+.2f} to {hi:+.2f}; McNemar exact p = {g['p_value']:.2g}: "
        f"{g['only_new']} test images only the distilled student gets right, {g['only_base']} only the scratch "
        f"one, of {g['n']}): {verdict}"
    )
