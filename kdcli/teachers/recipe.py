"""A teacher trained by kdcli: `train` (kd train-teacher's training, also used by kd distill and
kdcli.api) and the `recipe` kd distill trains a missing teacher with (kd train-teacher's config)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from kdcli.compose import compose_command
from kdcli.core.errors import KdError
from kdcli.core.run import Context
from kdcli.data import DeviceData
from kdcli.data.splits import SPLIT_VERSION
from kdcli.losses import Objective
from kdcli.models import count_flops
from kdcli.overrides import as_overrides, fmt
from kdcli.training.build import ckpt_meta, dataset_config, new_model
from kdcli.training.engine import Trainee, fit


def train(
    cfg, data: DeviceData, run_dir: Path, ctx: Context, resume: bool | None = None, model: tuple | None = None
) -> dict:
    """Train cfg.teacher on `data`; returns the teacher's figures (also used by distill and kdcli.api).
    resume (default: ctx.resume) continues from the training state in run_dir. model: (module, registry
    spec) to train in place instead of building cfg.teacher (kdcli.api: a module already built)."""
    net, spec = model if model is not None else new_model(cfg.teacher, data, ctx.device, int(cfg.seed))
    objective = Objective(label_smoothing=float(cfg.trainer.label_smoothing))
    result = fit(
        Trainee("teacher", net, objective, ckpt_meta(spec, data, dataset_config(cfg))),
        data,
        cfg,
        run_dir=run_dir,
        show_progress=ctx.show_progress and cfg.trainer.progress,
        resume=ctx.resume if resume is None else resume,
    )
    return {"arch": spec, "flops": count_flops(result.model, data.info.input_shape), **result.metrics}


def recipe(cfg: DictConfig) -> DictConfig:
    """The kd train-teacher config of the teacher that kd distill trains when it finds none: the
    recipe of `kd train-teacher` (its own augmentation, optimizer, schedule, epochs, selection and
    seed, never the student's) with the keys of cfg.teacher_train, for the distill run's
    teacher model and dataset, on its device and under its folders. Teacher reuse compares it
    with the config.yaml of earlier train-teacher runs."""
    from hydra.core.hydra_config import HydraConfig

    smoke = HydraConfig.initialized() and "debug=smoke" in HydraConfig.get().overrides.task
    given = [f"imports=[{','.join(repr(str(i)) for i in cfg.imports)}]"] if cfg.imports else []
    given += _user_config_dirs()
    asked = OmegaConf.to_container(cfg.get("teacher_train") or OmegaConf.create({}), resolve=True)
    for key in asked:
        if key in ("teacher", "dataset", "device", "runs_dir", "data_root", "imports", "resume"):
            raise KdError(
                f"teacher_train.{key}: the teacher's model, data, device and folders are kd distill's own "
                "(teacher=..., dataset=..., device=...); teacher_train takes kd train-teacher's recipe keys "
                "(teacher_train.trainer.epochs=60, teacher_train.augment=none, teacher_train.optimizer=adam, ...)."
            )
    overrides = [*given, *(["debug=smoke"] if smoke else [])]
    overrides += [o for key, value in asked.items() for o in as_overrides(key, value)]
    try:
        tcfg = compose_command("train_teacher", overrides, lambda o: o.split("=")[0].split(".")[0] != "dataset")
    except KdError as e:
        raise KdError(f"teacher_train ({' '.join(overrides[len(given) :])}): {e}") from None
    with open_dict(tcfg):
        tcfg.teacher = {**OmegaConf.to_container(cfg.teacher, resolve=True), "ckpt": None}
        tcfg.dataset = dataset_config(cfg)
        for key in ("device", "runs_dir", "data_root"):
            tcfg[key] = cfg[key]
    return tcfg


def _user_config_dirs() -> list[str]:
    """The running app's config folders beyond the packaged ones (-cd DIR, hydra.searchpath), as the
    override that composes the teacher's recipe with them too (teacher_train.optimizer=mine)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    theirs = [
        f"{s.schema}://{s.path}"
        for s in HydraConfig.get().runtime.config_sources
        if s.provider == "command-line" or s.provider.startswith("hydra.searchpath")
    ]
    return [f"hydra.searchpath={fmt(theirs)}"] if theirs else []


def results(cfg, teacher: dict) -> dict:
    """What a train-teacher run records in metrics.json beside its status: the teacher's figures and
    the data split they hold for (distill's search for an earlier teacher reads them)."""
    return {"teacher": teacher, "dataset": dataset_config(cfg), "split_version": SPLIT_VERSION}
