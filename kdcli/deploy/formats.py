"""The model files kdcli writes and reads: its own checkpoints, and the deployable exports
(TorchScript, ONNX, a torch.export program, safetensors weights).

Every export carries a *model card* inside the file (ONNX metadata, TorchScript and
torch.export extra files, safetensors metadata): the architecture, the role, and the data the
model expects (dataset, input shape, class names, normalisation). So `kd evaluate` can score any
of these files on the right split without the checkpoint it came from, and a renamed file still
knows what it is."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from kdcli.config.choices import EXPORT_FORMATS
from kdcli.core.errors import KdError
from kdcli.core.files import atomic_write
from kdcli.training import checkpoint

CARD = "kdcli"  # the metadata key (ONNX, safetensors) or extra file stem (TorchScript, torch.export)
CARD_FORMAT = "kdcli-model-card"
PREPROCESS = "x = (pixels / 255 - mean) / std, per channel, NCHW float32"

# format name -> file suffix written by kd export (kd quantize adds .int8-<mode> before .onnx)
SUFFIXES = {
    "torchscript": ".torchscript.pt",
    "onnx": ".onnx",
    "torch_export": ".pt2",
    "safetensors": ".safetensors",
}


def card_of(ck: dict, source: Path | str, **extra) -> dict:
    """The model card of a kdcli checkpoint: what a runtime needs to feed the model and name
    its outputs, and what kdcli needs to rebuild it or score it on its data."""
    card = {
        "format": CARD_FORMAT,
        "version": 1,
        "role": ck.get("role", "model"),
        "arch": ck["arch"],
        "data": ck["data"],
        "preprocess": PREPROCESS,
        "source_checkpoint": str(source),
        "epoch": ck.get("epoch"),
    }
    if ck.get("pruning"):
        card["pruning"] = ck["pruning"]
    return {**card, **extra}


# ---------------------------------------------------------------- writers


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, card: dict, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice; the format is still what many runtimes load
        traced = torch.jit.trace(model, example, check_trace=False)
    extra = {f"{CARD}.json": json.dumps(card)}

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(traced, tmp, _extra_files=extra)

    atomic_write(path, write)


def _dynamic_batch() -> tuple:
    return ({0: torch.export.Dim("batch", min=1)},)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, card: dict, opset: int) -> None:
    """ONNX through the dynamo exporter, with a dynamic batch axis and the model card in the
    model's metadata."""

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
                dynamic_shapes=_dynamic_batch(),
                verbose=False,
            )
        program.save(tmp)
        set_onnx_card(tmp, card)

    atomic_write(path, write)


def set_onnx_card(path: str | Path, card: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props if p.key != CARD}
    onnx.helper.set_model_props(model, {**props, CARD: json.dumps(card)})
    onnx.save(model, str(path))


def export_torch_export(model: nn.Module, example: torch.Tensor, path: Path, card: dict, opset: int) -> None:
    """A torch.export program (.pt2) with a dynamic batch axis: loads with torch.export.load,
    runs without the model's Python code, and is what AOTInductor and ExecuTorch compile."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())
    buffer = io.BytesIO()  # torch.export.save wants a .pt2 name: the temp file of atomic_write has none
    torch.export.save(program, buffer, extra_files={f"{CARD}.json": json.dumps(card)})
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def export_safetensors(model: nn.Module, example: torch.Tensor, path: Path, card: dict, opset: int) -> None:
    """The weights as safetensors (no code, no pickle), the card in its metadata; the card's
    arch (registry name and kwargs) rebuilds the module they belong to."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={CARD: json.dumps(card)}))


EXPORTERS = {
    "torchscript": export_torchscript,
    "onnx": export_onnx,
    "torch_export": export_torch_export,
    "safetensors": export_safetensors,
}
assert tuple(EXPORTERS) == EXPORT_FORMATS, "formats=: the schema's names and EXPORTERS differ"


# ---------------------------------------------------------------- readers


@dataclass
class ModelFile:
    """A model file opened for inference: `run(x)` maps a float batch to logits (on the CPU
    for exported formats, on `device` for checkpoints)."""

    path: Path
    fmt: str
    card: dict
    run: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    module: Optional[nn.Module] = None  # the PyTorch module, when the format gives one
    threads: Optional[int] = None  # intra-op threads of the runtime
    # For formats that hide the module: its float weights by parameter name (int8 files have none)
    weights: Optional[Callable[[], dict]] = None

    def logits(self, source, batch_size: int) -> torch.Tensor:
        """Logits on the CPU for every input of `source` (a tensor or a split), batch by batch."""
        from kdcli.training.engine import batches

        return torch.cat([self.run(x).float().cpu() for x in batches(source, batch_size)])

    @property
    def label(self) -> str:
        bits = [] if self.fmt == "checkpoint" else [self.fmt]
        if q := self.card.get("quantization"):
            bits.insert(0, f"int8 {q['mode']}")
        if p := self.card.get("pruning"):
            bits.insert(0, f"pruned {p['final']:.0%} {p['kind']}")
        return self.card["role"] + (f" ({', '.join(bits)})" if bits else "")


# Formats whose files are programs: loading one unpickles the objects it holds (torch.export
# falls back to a full pickle for its sample inputs, weights and constants) and runs its code, so
# it runs whatever its author put there. Checkpoints (weights_only=True), ONNX (protobuf) and
# safetensors (no pickle) are data, read by default.
PROGRAMS = {"torchscript": "TorchScript", "torch_export": "torch.export"}


def detect(path: Path) -> str:
    """The format of a model file, from its name and, for zip files, its members (read from the
    zip's directory, nothing unpickled): a program renamed to .pt is still a program."""
    name = path.name.lower()
    if name.endswith(".onnx"):
        return "onnx"
    if name.endswith(".safetensors"):
        return "safetensors"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        names = []
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if name.endswith(".pt2") or any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return "torch_export"
    return "checkpoint"


def untrusted(path: Path, fmt: str) -> KdError:
    return KdError(
        f"Refusing to load {path}: it is a {PROGRAMS[fmt]} program, and loading one runs the code and pickled "
        "objects it holds. Evaluate its checkpoint, .onnx or .safetensors file instead, or pass "
        "trust_programs=true if you made this file or trust whoever did."
    )


def open_model(path: str | Path, device: torch.device | None = None, trust_programs: bool = False) -> ModelFile:
    """Any model file kdcli writes; a file that is none of them, or has no card, is a KdError, and
    so is a program (TorchScript, torch.export) unless trust_programs. Checkpoints run on `device`
    (default CPU); exported formats on the CPU, with PyTorch's thread count."""
    path = Path(path).expanduser()
    device = device or torch.device("cpu")
    if not path.is_file():
        raise KdError(
            f"Model file not found: {path}. Check the path (relative paths start from the current directory)."
        )
    fmt = detect(path)
    if fmt in PROGRAMS and not trust_programs:  # before a byte of it is unpickled
        raise untrusted(path, fmt)
    threads = torch.get_num_threads()
    if fmt == "checkpoint":
        ck = checkpoint.read(path)
        return module_file(path, "checkpoint", card_of(ck, path), checkpoint.build_from(ck, path), device)
    try:
        return OPENERS[fmt](path, threads)
    except KdError:
        raise
    except Exception as e:  # each runtime fails in its own way on a bad file; name the file and the cause
        raise KdError(
            f"Cannot read {path} as {fmt}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}. "
            f"Re-export it with `kd export`, or point to another file."
        ) from None


def module_file(path: Path, fmt: str, card: dict, model: nn.Module, device: torch.device) -> ModelFile:
    """A PyTorch module (a checkpoint's, or rebuilt for safetensors weights) as a ModelFile."""
    model = model.to(device).eval()
    return ModelFile(path, fmt, card, _torch_runner(model, device), device, model, torch.get_num_threads())


def _torch_runner(module: nn.Module, device: torch.device) -> Callable:
    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        return module(x.to(device)).float()

    return run


def _card(text: str | bytes | None, path: Path) -> dict:
    try:
        card = json.loads(text) if text else None
    except ValueError:
        card = None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise KdError(
            f"{path} has no kdcli model card, so kdcli cannot tell which data it expects. Files written by "
            "`kd export` and `kd quantize` carry one; export the checkpoint with kdcli."
        )
    return card


def _open_program(path: Path, threads: int, fmt: str, load: Callable[[str, dict], nn.Module]) -> ModelFile:
    """A TorchScript or torch.export file: its module and the card in its extra files."""
    if problem := checkpoint.zip_damage(path):  # neither runtime checks the zip's CRCs
        raise KdError(f"Cannot read {path}: the file is corrupt ({problem}). Export it again with `kd export`.")
    extra = {f"{CARD}.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = load(str(path), extra)
    cpu = torch.device("cpu")
    card = _card(extra[f"{CARD}.json"], path)
    return ModelFile(path, fmt, card, _torch_runner(module, cpu), cpu, None, threads, module.state_dict)


def _open_torchscript(path: Path, threads: int) -> ModelFile:
    load = lambda p, extra: torch.jit.load(p, map_location="cpu", _extra_files=extra).eval()  # noqa: E731
    return _open_program(path, threads, "torchscript", load)


def _open_torch_export(path: Path, threads: int) -> ModelFile:
    return _open_program(
        path, threads, "torch_export", lambda p, extra: torch.export.load(p, extra_files=extra).module()
    )


def _open_onnx(path: Path, threads: int) -> ModelFile:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # as many as PyTorch uses, so latencies compare
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    card = _card(session.get_modelmeta().custom_metadata_map.get(CARD), path)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        try:
            return torch.from_numpy(session.run(None, {name: x.detach().cpu().float().numpy()})[0])
        except Exception as e:  # e.g. an op this build of ONNX Runtime does not implement
            raise KdError(f"ONNX Runtime cannot run {path}: {str(e).strip().splitlines()[0][:300]}") from None

    def weights() -> dict:
        import onnx
        from onnx import numpy_helper

        # Tensors kept in other files are skipped: the file's own bytes say where they are
        graph = onnx.load(str(path), load_external_data=False).graph
        inside = (t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
        return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in inside}

    # int8 files hold no float weights by parameter name: nothing to read for sparsity
    float_weights = None if "quantization" in (card or {}) else weights
    return ModelFile(path, "onnx", card, run, torch.device("cpu"), None, threads, float_weights)


def _open_safetensors(path: Path, threads: int) -> ModelFile:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        card = _card((f.metadata() or {}).get(CARD), path)
        state = {k: f.get_tensor(k) for k in f.keys()}
    model = checkpoint.build_from({"arch": card["arch"], "data": card["data"], "state_dict": state}, path)
    return module_file(path, "safetensors", card, model, torch.device("cpu"))


OPENERS = {
    "torchscript": _open_torchscript,
    "onnx": _open_onnx,
    "torch_export": _open_torch_export,
    "safetensors": _open_safetensors,
}


def rebuild(card: dict, path: Path | None = None) -> nn.Module | None:
    """The float architecture a card names, with fresh weights (for FLOPs and parameter counts
    of formats that hide the module); None when the registry does not know it. Counted on the
    meta device first: a card of `path` that claims more weights than the file has bytes (one
    per int8 weight) is refused before anything is allocated."""
    from kdcli.core.registry import MODELS

    if card["arch"]["name"] not in MODELS:
        return None
    if path is not None:
        with torch.device("meta"):
            claimed = sum(p.numel() for p in checkpoint.build_arch(card["arch"], card["data"]).parameters())
        if claimed > path.stat().st_size + 2**20:
            raise KdError(
                f"The model card of {path} claims {card['arch']['name']} with {card['arch'].get('kwargs')}: "
                f"{claimed:,} weights, more than the file's {path.stat().st_size:,} bytes can hold. Export it again."
            )
    return checkpoint.build_arch(card["arch"], card["data"]).eval()
