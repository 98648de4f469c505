"""kd quantize: post-training int8 quantization of a trained model with ONNX Runtime's
quantizer, and what it changes: accuracy, size on disk, latency.

- dynamic: the weights of the linear layers (MatMul/Gemm) stored as int8, activations
  quantized on the fly per batch; needs no data.
- static: weights and activations of every supported op (Conv, MatMul, Gemm, ...) in int8,
  activation ranges calibrated on training images (QDQ or QOperator graph).

PyTorch's own eager/FX quantization (torch.ao.quantization) is deprecated in torch 2.x and
warns of its removal, so kdcli quantizes the ONNX export, which is also what ships."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from kdcli.commands.evaluate import costs_of
from kdcli.commands.export import source_checkpoint
from kdcli.core.errors import KdError
from kdcli.core.files import write_json
from kdcli.core.metrics import agreement, reliability, scores
from kdcli.core.run import Context
from kdcli.deploy import formats, latency
from kdcli.deploy.export import export_file, stem_of
from kdcli.deploy.quantize import quantize_onnx, quiet
from kdcli.report import console, pct, table
from kdcli.training import checkpoint
from kdcli.training.build import checkpoint_data

log = logging.getLogger("kdcli")


def run(cfg, ctx: Context) -> dict:
    with latency.threads(cfg.latency.threads):
        return _run(cfg, ctx)


def _run(cfg, ctx: Context) -> dict:
    path = source_checkpoint(cfg, "quantize")
    ck = checkpoint.read(path)
    model = checkpoint.build_from(ck, path).eval()
    data = checkpoint_data(ck["data"], cfg.data_root, torch.device("cpu"))
    test = data.test.subset(cfg.limit) if cfg.limit else data.test
    out_dir = Path(cfg.out_dir).expanduser() if cfg.out_dir else ctx.run_dir
    stem = stem_of(ck)  # from the checkpoint: one safe path component
    card = formats.card_of(ck, path.resolve())

    # .float.onnx: never the name of kd export's checked file, should out_dir be an export's
    float_onnx = out_dir / f"{stem}.float.onnx"
    export_file("onnx", model, test.head(2), float_onnx, card, cfg.opset, path)
    # ONNX Runtime's pre-processing (shape inference, graph optimisation) before quantizing
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_dir / f".{stem}.prepared.onnx"
    try:
        files = {"float, onnx": float_onnx}
        calib = data.train.head(cfg.calibration) if "static" in cfg.modes else None
        for mode in cfg.modes:
            target = out_dir / f"{stem}.int8-{mode}.onnx"
            settings = {
                "mode": mode,
                "weights": "int8",
                "activations": "uint8, calibrated" if mode == "static" else "uint8, per batch at run time",
                "per_channel": cfg.per_channel,
                "tool": "onnxruntime.quantization",
            }
            if mode == "static":
                settings.update(calibration_images=len(calib), graph=cfg.static_format)
            try:  # the quantizer's failures name the op or the tensor it cannot handle
                with quiet():
                    if not prepared.exists():
                        quant_pre_process(str(float_onnx), str(prepared))
                    quantize_onnx(mode, prepared, target, cfg, calib, {**card, "quantization": settings})
            except Exception as e:
                raise KdError(
                    f"{mode} quantization of {path} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}. "
                    + (
                        "Try modes=[dynamic] (linear layers only)."
                        if mode != "dynamic"
                        else "Check that onnx and onnxruntime are the versions of .ci/constraints.txt (or newer)."
                    )
                ) from None
            files[f"int8 {mode}, onnx"] = target
    finally:
        if prepared.exists():
            os.unlink(prepared)

    y = test.y
    x_large = test.head(cfg.latency.batch_size)
    rows = {}
    pytorch = formats.module_file(path, "checkpoint", formats.card_of(ck, path), model, torch.device("cpu"))
    reference = pytorch.logits(test, 1000)
    for name, m in [("float, pytorch", pytorch)] + [(n, formats.open_model(f)) for n, f in files.items()]:
        out = reference if m is pytorch else m.logits(test, 1000)
        figures = {**scores(out, y), "ece": reliability(out, y)["ece"]}
        rows[name] = {"path": str(m.path), **figures, "agreement_with_float": agreement(out, reference)}
        rows[name].update(costs_of(m, x_large, cfg, counts=False))
    base = rows["float, pytorch"]
    for r in rows.values():
        r["acc_change"] = r["acc"] - base["acc"]
        r["size_ratio"] = r["size_mb"] / base["size_mb"]
        if "latency_ms_bs1" in r:  # a speed-up from timings that are noise is not given
            trusted = not (r["latency_noisy"] or base["latency_noisy"])
            r["speedup_bs1"] = base["latency_ms_bs1"] / r["latency_ms_bs1"] if trusted else None
            r["speedup_batch"] = base["latency_ms_batch"] / r["latency_ms_batch"] if trusted else None
    _print(rows, path, len(y), cfg, out_dir)
    summary = {"checkpoint": str(path), "images": len(y), "threads": torch.get_num_threads(), "models": rows}
    write_json(out_dir / f"{stem}.quantization.json", summary)
    return summary


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _print(rows: dict, path: Path, images: int, cfg, out_dir: Path) -> None:
    timed = bool(cfg.latency.repeats)
    batch = next(iter(rows.values())).get("latency_batch", cfg.latency.batch_size)
    columns = ["model", "acc %", "change", "agrees %", "MB", "x smaller"]
    if timed:
        columns += ["ms bs 1", "x faster", f"ms bs {batch}", "x faster "]
    out = []
    for name, r in rows.items():
        row = [
            name,
            pct(r["acc"]),
            f"{100 * r['acc_change']:+.2f}",
            pct(r["agreement_with_float"]),
            f"{r['size_mb']:.3f}",
            f"{1 / r['size_ratio']:.2f}",
        ]
        if timed:
            row += [
                f"{r['latency_ms_bs1']:.3f}",
                _times(r["speedup_bs1"]),
                f"{r['latency_ms_batch']:.2f}",
                _times(r["speedup_batch"]),
            ]
        out.append(row)
    console.print(
        table(f"int8 quantization of {path}, test split ({images} images); agreement with float", columns, out)
    )
    if timed:
        console.print(
            f"Latency: median of {cfg.latency.repeats} runs after {cfg.latency.warmup} warm-up runs, "
            f"{torch.get_num_threads()} CPU thread(s); changes are against the PyTorch float model."
        )
        noisy = latency.noisy_warning(rows)
        if noisy:
            log.warning(f"warning  {noisy}")
    console.print(
        f"Files: {', '.join(Path(r['path']).name for r in list(rows.values())[1:])} in {out_dir}", soft_wrap=True
    )
