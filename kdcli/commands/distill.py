"""kd distill: train the student to match the teacher's softened outputs, next to the same
student trained from scratch with the same seed, initial weights and recipe."""

from __future__ import annotations

import copy
import logging
from datetime import datetime
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from kdcli import checkpoint
from kdcli.app import Context
from kdcli.commands import train_teacher
from kdcli.commands.common import (
    DATA_IDENTITY,
    ckpt_meta,
    data_identity,
    dataset_config,
    device_data,
    find_teacher_run,
    new_model,
)
from kdcli.config import group_kwargs, model_spec
from kdcli.data import DeviceData
from kdcli.engine import agreement, fit, predict, scores
from kdcli.errors import KdError
from kdcli.files import write_json, write_text
from kdcli.losses import build_loss
from kdcli.models import count_flops, count_params
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
    if info["num_classes"] != data.info.num_classes or info["class_names"] != data.info.class_names:
        raise KdError(
            f"Teacher {path} predicts {info['num_classes']} classes ({', '.join(info['class_names'])}); this "
            f"dataset has {data.info.num_classes} ({', '.join(data.info.class_names)}). "
            "Their outputs cannot be matched."
        )
    theirs = data_identity(info.get("dataset") or {})
    if theirs != data_identity(dataset_cfg):
        diff = ", ".join(f"dataset.{k}" for k in DATA_IDENTITY if theirs.get(k) != dataset_cfg.get(k))
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
    """Teacher from teacher.ckpt, else the latest matching train-teacher run, else train one
    now (as a train-teacher run of its own, so later runs and sweeps reuse it)."""
    dataset_cfg = dataset_config(cfg)
    path = cfg.teacher.ckpt
    if path:
        source = "teacher.ckpt"
    else:
        spec = model_spec(cfg.teacher)
        path = find_teacher_run(cfg.runs_dir, spec, dataset_cfg)
        source = "latest train-teacher run"
        if path is None:
            stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
            run_dir = Path(cfg.runs_dir).expanduser().resolve() / "train_teacher" / stamp
            log.info(
                f"teacher  no trained {spec['name']} teacher for this dataset under {Path(cfg.runs_dir).expanduser()}; "
                f"training one first in {run_dir} (or pass teacher.ckpt=PATH)"
            )
            run_dir.mkdir(parents=True)
            write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            figures = train_teacher.train(cfg, data, run_dir, ctx)
            write_json(
                run_dir / "metrics.json",
                {"command": "train_teacher", "status": "completed", "teacher": figures, "dataset": dataset_cfg},
            )
            path, source = figures["checkpoint"], "trained now"
    ckpt = checkpoint.load(path)
    if source == "teacher.ckpt":
        _check_teacher_arch(ckpt, Path(path), model_spec(cfg.teacher))
    _check_teacher_data(ckpt, Path(path), data, dataset_cfg)
    model = checkpoint.build_from(ckpt, path).to(ctx.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info(f"teacher  {checkpoint.describe(ckpt)} from {path} ({source})")
    return model, ckpt, str(path)


def run(cfg, ctx: Context) -> dict:
    data = device_data(cfg, ctx.device)
    # The student first: a bad student config fails before a teacher is trained.
    student, spec = new_model(cfg.student, data, ctx.device, int(cfg.seed))
    init_state = copy.deepcopy(student.state_dict())  # scratch and KD students start identical
    teacher, teacher_ckpt, teacher_path = obtain_teacher(cfg, data, ctx)
    tcfg = cfg.trainer
    shape = data.info.input_shape
    t_logits = predict(teacher, data.test.x, tcfg.eval_batch_size)
    t_test = scores(t_logits, data.test.y)
    results = {
        "teacher": {
            "arch": teacher_ckpt["arch"],
            "checkpoint": teacher_path,
            "test_acc": t_test["acc"],
            "test_nll": t_test["nll"],
            "params": count_params(teacher),
            "flops": count_flops(teacher, shape),
        }
    }
    meta = ckpt_meta(spec, data, dataset_config(cfg))
    show = ctx.show_progress and tcfg.progress
    runs = [("scratch", build_loss("ce", cfg.T, cfg.alpha), None)] if cfg.baseline else []
    runs.append(("student", build_loss(cfg.loss.name, cfg.T, cfg.alpha, group_kwargs(cfg.loss)), teacher))
    for role, loss_fn, teacher_model in runs:
        student.load_state_dict(init_state)
        torch.manual_seed(int(cfg.seed))  # the same dropout masks too
        res = fit(
            student,
            data,
            loss_fn,
            cfg,
            role=role,
            run_dir=ctx.run_dir,
            ckpt_meta=meta,
            teacher=teacher_model,
            show_progress=show,
        )
        results[role] = {
            "arch": spec,
            "flops": count_flops(res.model, shape),
            "teacher_agreement": agreement(predict(res.model, data.test.x, tcfg.eval_batch_size), t_logits),
            **res.metrics,
        }

    if cfg.baseline:
        results["kd_gain"] = results["student"]["test_acc"] - results["scratch"]["test_acc"]
    _print_results(results, cfg)
    results.update(T=cfg.T, alpha=cfg.alpha, loss=cfg.loss.name, dataset=dataset_config(cfg))
    return results


def _print_results(results: dict, cfg) -> None:
    rows = []
    for role, label in (
        ("teacher", "teacher"),
        ("scratch", "student, from scratch"),
        ("student", f"student, distilled (T={cfg.T:g}, alpha={cfg.alpha:g})"),
    ):
        r = results.get(role)
        if r is None:
            continue
        rows.append(
            [
                label,
                r["arch"]["name"],
                pct(r["test_acc"]),
                pct(r.get("test_acc_last")),
                f"{r['params']:,}",
                f"{r['flops'] / 1e6:.2f}",
            ]
        )
    console.print(
        table(
            "Test accuracy (checkpoint chosen on validation)",
            ["", "model", "test acc %", "last epoch %", "params", "MFLOPs/img"],
            rows,
        )
    )
    if "kd_gain" in results:
        gain = 100 * results["kd_gain"]
        console.print(f"KD gain over the scratch student: [bold]{gain:+.2f}[/bold] points of test accuracy")
