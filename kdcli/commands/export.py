"""kd export: a trained model as deployable files (TorchScript, ONNX, a torch.export program,
safetensors weights), each read back with its own runtime and checked against PyTorch on real
test images before the command reports success.

From a distill run only the student is exported: its checkpoint holds the student's weights
alone (adapters, teachers, memory banks live in the training state, not in it)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kdcli.core.errors import KdError
from kdcli.core.files import write_json
from kdcli.core.run import Context
from kdcli.deploy import formats
from kdcli.deploy.export import check, export_file, stem_of
from kdcli.report import console, pct, table
from kdcli.training import checkpoint
from kdcli.training.build import checkpoint_data, latest_run
from kdcli.training.engine import predict

log = logging.getLogger("kdcli")


def source_checkpoint(cfg, verb: str = "export") -> Path:
    """checkpoint=PATH, else the distilled student of run=DIR, else of the latest distill run."""
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        if path.is_file() and (fmt := formats.detect(path)) != "checkpoint":
            raise KdError(
                f"{path} is an exported {fmt} file; kd {verb} starts from a kdcli checkpoint (checkpoints/*_best.pt "
                "of a run), which its model card names as source_checkpoint."
            )
        return path
    run = Path(cfg.run).expanduser() if cfg.run else latest_run(cfg.runs_dir, "distill")
    if cfg.run and not run.is_dir():
        raise KdError(f"run={run}: no such directory.")
    path = run / "checkpoints" / "student_best.pt" if run else None
    if path is None or not path.is_file():
        where = f"in {run}" if cfg.run else f"under {Path(cfg.runs_dir).expanduser()}"
        raise KdError(
            f"Nothing to {verb}: no distilled student {where} (checkpoints/student_best.pt). "
            "Run `kd distill` first, or pass checkpoint=PATH."
        )
    return path


def run(cfg, ctx: Context) -> dict:
    path = source_checkpoint(cfg)
    ck = checkpoint.read(path)
    model = checkpoint.build_from(ck, path).eval()
    test = checkpoint_data(ck["data"], cfg.data_root, torch.device("cpu")).test
    x = test.head(cfg.check_batches * cfg.batch_size)
    reference = predict(model, x, cfg.batch_size)

    out_dir = Path(cfg.out_dir).expanduser() if cfg.out_dir else ctx.run_dir
    stem = stem_of(ck)
    card = formats.card_of(ck, path.resolve())
    results = {}
    for fmt in cfg.formats:
        target = out_dir / f"{stem}{formats.SUFFIXES[fmt]}"
        written = export_file(fmt, model, x, target, card, cfg.opset, path)
        results[fmt] = check(target, x, reference, cfg.batch_size, cfg.atol, written)
        log.info(f"export   {fmt}: {target}")
    # The card again, next to the files, with the checks: what a deployment reads first, and the
    # description that rebuilds the module for the safetensors weights.
    write_json(
        out_dir / f"{stem}.json",
        {
            **card,
            "input_shape": ck["data"]["input_shape"],
            "mean": ck["data"]["mean"],
            "std": ck["data"]["std"],
            "class_names": ck["data"]["class_names"],
            "onnx_opset": cfg.opset if "onnx" in cfg.formats else None,
            "exports": results,
        },
    )
    console.print(
        table(
            f"Exports of {path} into {out_dir}, checked on {len(x)} test images",
            ["format", "file", "MB", "max |diff|", "top-1 agreement %", "check"],
            (
                [
                    fmt,
                    Path(r["path"]).name,
                    f"{Path(r['path']).stat().st_size / 2**20:.3f}",
                    f"{r['max_abs_diff']:.2e}",
                    pct(r["top1_agreement"]),
                    "ok" if r["ok"] else "FAILED",
                ]
                for fmt, r in results.items()
            ),
        )
    )
    if "onnx" in results:
        console.print(
            f"ONNX: opset {cfg.opset}, input 'input' [batch, {', '.join(map(str, ck['data']['input_shape']))}]"
            " with a dynamic batch axis, output 'logits'.",
            markup=False,
            highlight=False,
        )
    failed = [fmt for fmt, r in results.items() if not r["ok"]]
    if failed:
        raise KdError(
            f"{', '.join(failed)} export differs from PyTorch by more than atol={cfg.atol} "
            f"(see the table); the files are kept in {out_dir} for inspection."
        )
    return {"checkpoint": str(path), "exports": results}
