"""kd export: TorchScript and ONNX files of a trained model, each checked against PyTorch on
real test images before the command reports success."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from kdcli import checkpoint
from kdcli.app import Context
from kdcli.commands.common import checkpoint_data, latest_run
from kdcli.engine import predict
from kdcli.errors import KdError
from kdcli.files import atomic_write, write_json
from kdcli.report import console, pct, table

log = logging.getLogger("kdcli")


def _default_checkpoint(cfg) -> Path:
    run = latest_run(cfg.runs_dir, "distill")
    path = run / "checkpoints" / "student_best.pt" if run else None
    if path is None or not path.is_file():
        raise KdError(
            f"Nothing to export: no checkpoint=PATH and no distilled student under {Path(cfg.runs_dir).expanduser()}. "
            "Run `kd distill` first or pass checkpoint=PATH."
        )
    return path


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """opset is ONNX's; TorchScript has none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice; the format is still what many runtimes load
        traced = torch.jit.trace(model, example, check_trace=False)
    atomic_write(path, lambda tmp: traced.save(tmp))


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
        program.save(tmp)

    atomic_write(path, write)


def _torchscript_runner(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu").eval()
    return lambda x: module(x).detach().numpy()


def _onnx_runner(path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


FORMATS = {
    "torchscript": (".torchscript.pt", export_torchscript, _torchscript_runner),
    "onnx": (".onnx", export_onnx, _onnx_runner),
}


def run(cfg, ctx: Context) -> dict:
    path = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else _default_checkpoint(cfg)
    ck = checkpoint.load(path)
    model = checkpoint.build_from(ck, path).eval()
    test = checkpoint_data(ck["data"], cfg.data_root, torch.device("cpu")).test
    x = test.head(cfg.check_batches * cfg.batch_size)
    reference = predict(model, x, cfg.batch_size).numpy()

    out_dir = Path(cfg.out_dir).expanduser() if cfg.out_dir else ctx.run_dir
    stem = f"{ck['arch']['name']}_{ck.get('role', 'model')}"
    results = {}
    for fmt in cfg.formats:
        suffix, export_fn, runner = FORMATS[fmt]
        target = out_dir / f"{stem}{suffix}"
        try:
            export_fn(model, x[:1].clone(), target, cfg.opset)
        except Exception as e:  # exporters raise many types; name the format and the cause
            raise KdError(f"{fmt} export of {path} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        run_fn = runner(target)
        got = np.concatenate([run_fn(x[i : i + cfg.batch_size]) for i in range(0, len(x), cfg.batch_size)])
        diff = float(np.abs(got - reference).max())
        agree = float((got.argmax(1) == reference.argmax(1)).mean())
        ok = bool(np.allclose(got, reference, atol=cfg.atol, rtol=cfg.atol))
        results[fmt] = {
            "path": str(target),
            "max_abs_diff": diff,
            "top1_agreement": agree,
            "checked_images": len(x),
            "ok": ok,
        }
    # What a deployment needs besides the graph: how to preprocess and how to name the outputs.
    write_json(
        out_dir / f"{stem}.json",
        {
            "source_checkpoint": str(path),
            "arch": ck["arch"],
            "input_shape": ck["data"]["input_shape"],
            "preprocess": "x = (pixels / 255 - mean) / std, per channel, NCHW float32",
            "mean": ck["data"]["mean"],
            "std": ck["data"]["std"],
            "class_names": ck["data"]["class_names"],
            "exports": results,
        },
    )
    console.print(
        table(
            f"Exports of {path} into {out_dir}, checked on {len(x)} test images",
            ["format", "file", "max |diff|", "top-1 agreement %", "check"],
            (
                [
                    fmt,
                    Path(r["path"]).name,
                    f"{r['max_abs_diff']:.2e}",
                    pct(r["top1_agreement"]),
                    "ok" if r["ok"] else "FAILED",
                ]
                for fmt, r in results.items()
            ),
        )
    )
    failed = [fmt for fmt, r in results.items() if not r["ok"]]
    if failed:
        raise KdError(
            f"{', '.join(failed)} export differs from PyTorch by more than atol={cfg.atol} "
            f"(see the table); the files are kept in {out_dir} for inspection."
        )
    return {"checkpoint": str(path), "exports": results}
