"""kd evaluate: checkpoints side by side on one split of their dataset."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch.nn.functional as F

from kdcli import checkpoint
from kdcli.app import Context
from kdcli.commands.common import checkpoint_data, data_identity, latest_run
from kdcli.engine import agreement, predict, scores
from kdcli.errors import KdError
from kdcli.files import write_json
from kdcli.models import count_params
from kdcli.report import console, pct, table

log = logging.getLogger("kdcli")

ROLE_ORDER = ("teacher", "scratch", "student")


def _checkpoints_of_run(run_dir: Path) -> list[Path]:
    """The teacher (as used by the run) and the best checkpoints of a run directory."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise KdError(f"run={run_dir}: no such directory.")
    paths = []
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        teacher = (json.loads(metrics.read_text()).get("teacher") or {}).get("checkpoint")
        if teacher and Path(teacher).is_file():
            paths.append(Path(teacher).resolve())
        elif teacher:
            log.warning(f"warning  the teacher of {run_dir}, {teacher}, is gone; evaluating without it")
    for role in ROLE_ORDER:
        p = (run_dir / "checkpoints" / f"{role}_best.pt").resolve()
        if p.is_file() and p not in paths:
            paths.append(p)
    if not paths:
        raise KdError(f"run={run_dir} holds no checkpoints (looked for checkpoints/*_best.pt).")
    return paths


def _select(cfg) -> list[Path]:
    if cfg.checkpoints:
        return [Path(p).expanduser().resolve() for p in cfg.checkpoints]
    if cfg.run:
        return _checkpoints_of_run(Path(cfg.run))
    run = latest_run(cfg.runs_dir, "distill")
    if run is None:
        raise KdError(
            f"Nothing to evaluate: no checkpoints=[...], no run=DIR, and no completed distill run under "
            f"{Path(cfg.runs_dir).expanduser()}. Run `kd distill` first or name the checkpoints."
        )
    return _checkpoints_of_run(run)


def _same_data(ckpts: list[tuple[Path, dict]]) -> dict:
    """The data of the first checkpoint, after checking that all were trained on the same split
    of the same dataset (otherwise their test sets, and so their accuracies, differ)."""
    first_path, first = ckpts[0]

    def key(d: dict) -> dict:
        return {
            "input_shape": list(d["input_shape"]),
            "class_names": list(d["class_names"]),
            **data_identity(d["dataset"]),
        }

    for path, ck in ckpts[1:]:
        theirs, ours = key(ck["data"]), key(first["data"])
        if theirs != ours:
            diff = ", ".join(
                f"{k}: {ours.get(k)} vs {theirs.get(k)}" for k in {**ours, **theirs} if ours.get(k) != theirs.get(k)
            )
            raise KdError(
                f"{path} and {first_path} were trained on different data ({diff}); evaluate compares models on "
                "one split of one dataset at a time."
            )
    return first["data"]


def run(cfg, ctx: Context) -> dict:
    paths = _select(cfg)
    ckpts = [(p, checkpoint.load(p)) for p in paths]
    data_info = _same_data(ckpts)
    split = checkpoint_data(data_info, cfg.data_root, ctx.device).split(cfg.split)
    if cfg.limit:
        split = split.subset(cfg.limit)
    x, y = split, split.y

    logits = {}
    for path, ck in ckpts:
        model = checkpoint.build_from(ck, path).to(ctx.device)
        logits[path] = (predict(model, x, cfg.eval_batch_size), count_params(model))
    teacher = next((p for p, ck in ckpts if ck.get("role") == "teacher"), None)
    ref_path = Path(cfg.reference).expanduser().resolve() if cfg.reference else teacher
    if ref_path is not None and ref_path not in logits:
        ref_ck = checkpoint.load(ref_path)
        _same_data([(paths[0], ckpts[0][1]), (ref_path, ref_ck)])
        logits[ref_path] = (
            predict(checkpoint.build_from(ref_ck, ref_path).to(ctx.device), x, cfg.eval_batch_size),
            None,
        )
    ref = logits[ref_path][0] if ref_path is not None else None

    results = []
    for path, ck in ckpts:
        out, params = logits[path]
        row = {
            "checkpoint": str(path),
            "role": ck.get("role"),
            "model": ck["arch"]["name"],
            **scores(out, y),
            "params": params,
            "size_mb": path.stat().st_size / 2**20,
        }
        if ref is not None:
            row["agreement"] = agreement(out, ref)
            row["kl_to_reference"] = F.kl_div(
                F.log_softmax(out, 1), F.log_softmax(ref, 1), reduction="batchmean", log_target=True
            ).item()
        results.append(row)

    console.print(
        table(
            f"{data_info['name']} {cfg.split} split, {len(y)} images"
            + (f"; agreement with {ref_path}" if ref_path else ""),
            ["role", "model", "acc %", "NLL", "agreement %", "KL to ref", "params", "size MB", "checkpoint"],
            (
                [
                    r["role"],
                    r["model"],
                    pct(r["acc"]),
                    f"{r['nll']:.4f}",
                    pct(r.get("agreement")),
                    f"{r['kl_to_reference']:.4f}" if "kl_to_reference" in r else "-",
                    f"{r['params']:,}",
                    f"{r['size_mb']:.2f}",
                    _short(r["checkpoint"]),
                ]
                for r in results
            ),
        )
    )
    summary = {
        "split": cfg.split,
        "images": len(y),
        "reference": str(ref_path) if ref_path else None,
        "models": results,
    }
    write_json(ctx.run_dir / "evaluation.json", summary)
    return summary


def _short(path: str, keep: int = 3) -> str:
    parts = Path(path).parts
    return str(Path(*parts[-keep:])) if len(parts) > keep else path
