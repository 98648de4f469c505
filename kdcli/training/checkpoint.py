"""Self-describing checkpoints: plain dicts of tensors and containers that load with
`torch.load(..., weights_only=True)` and carry what it takes to rebuild the model (registry
name and kwargs) and to feed it (dataset config, input shape, classes, normalisation)."""

from __future__ import annotations

import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kdcli.core import distributed
from kdcli.core.errors import KdError
from kdcli.core.files import atomic_write
from kdcli.models import build_model
from kdcli.training.prune import plain_state_dict

FORMAT = "kdcli-checkpoint"
RESUME_FORMAT = "kdcli-training-state"  # checkpoints/<roles>_resume.pt: everything a run needs to continue
VERSION = 1


def save(path: Path, model: nn.Module, *, arch: dict, data: dict, role: str, **extra: Any) -> None:
    if not distributed.is_main():  # several processes: rank 0 writes (not even the CPU copy here)
        return
    """arch = {"name", "kwargs"}; data = DataInfo.to_dict() plus "dataset" (its config). A model being
    pruned is saved plain (weight = orig * mask): the file loads into the architecture as built."""
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "role": role,
        "arch": arch,
        "data": data,
        "state_dict": {k: v.detach().cpu() for k, v in plain_state_dict(model.state_dict()).items()},
        **extra,
    }
    write(path, ckpt)


def write(path: Path, obj: dict) -> None:
    """torch.save through a Python file object, so that a full disk is an OSError with its errno
    (atomic_write turns it into a KdError) rather than an opaque error of torch's own writer."""

    def dump(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, dump)


def load(path: str | Path, kind: str = FORMAT) -> dict:
    """Read and check a checkpoint (or, with kind=RESUME_FORMAT, a training state); every
    failure is a KdError naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KdError(
            f"Checkpoint not found: {path}. Check the path (relative paths start from the current directory)."
        )
    if problem := zip_damage(path):
        raise KdError(
            f"Cannot read checkpoint {path}: the file is corrupt ({problem}). Re-run the command that wrote it, "
            "or point to another checkpoint."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails in many ways on a bad file; sort them into two
        text = str(e)
        name = None
        if isinstance(e, pickle.UnpicklingError):  # what the pickle would import: from torch's message, or its opcodes
            code = re.search(r"GLOBAL ([\w.]+)", text) if zipfile.is_zipfile(path) else None
            name = code.group(1) if code else _pickled_global(path)
        if name:
            raise KdError(
                f"Refusing to load {path}: it holds pickled Python objects (it would import {name}), not only "
                "tensors and containers, and loading it could run code. kdcli only reads checkpoints it wrote, "
                "always with weights_only=True and no way around it; re-save the weights as a plain state dict."
            ) from None
        detail = text.splitlines()[0].split(". ")[0] if text else "no detail"  # torch's first sentence
        raise KdError(
            f"Cannot read checkpoint {path}: the file is truncated, corrupt or not a PyTorch file "
            f"({type(e).__name__}: {detail}). Re-run the command that wrote it, or point to another checkpoint."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != kind:
        what = "training state" if kind == RESUME_FORMAT else "checkpoint"
        raise KdError(
            f"{path} is a PyTorch file but not a kdcli {what} (no '{kind}' header). "
            "kdcli needs the files written by `kd train-teacher` or `kd distill`."
        )
    return ckpt


def read(path: str | Path) -> dict:
    """A model checkpoint as the commands use it: load() and then check that it holds the fields
    kdcli writes (role, arch, data, state_dict), each of its type, before any of them is used."""
    ckpt = load(path)
    if problem := _missing_field(ckpt):
        raise KdError(
            f"{Path(path).expanduser()} is not a complete kdcli checkpoint: {problem}. Re-run the command that "
            "wrote it, or point to another checkpoint."
        )
    return ckpt


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _missing_field(ckpt: dict) -> str | None:
    """What a checkpoint lacks of what save() writes, or None."""
    arch, data, state = ckpt.get("arch"), ckpt.get("data"), ckpt.get("state_dict")
    if not isinstance(ckpt.get("role", "model"), str):
        return "its role is not a name"
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        return "no arch {name, kwargs}"
    if not isinstance(arch.get("kwargs") or {}, dict):
        return "arch.kwargs is not a mapping"
    if not isinstance(data, dict):
        return "no data {input_shape, num_classes, class_names, mean, std}"
    shape, classes = data.get("input_shape"), data.get("num_classes")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(_int_at_least(s, 1) for s in shape)):
        return "data.input_shape is not [channels, height, width]"
    if not _int_at_least(classes, 1):
        return "data.num_classes is not a count"
    names = data.get("class_names")
    if not (isinstance(names, list) and len(names) == classes and all(isinstance(n, str) for n in names)):
        return "data.class_names is not one name per class"
    for key in ("mean", "std"):
        value = data.get(key)
        if not (isinstance(value, (list, tuple)) and len(value) == shape[0] and all(map(_number, value))):
            return f"data.{key} is not one number per channel"
    if not isinstance(data.get("dataset", {}), dict):
        return "data.dataset is not a mapping"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "state_dict is not a mapping of tensors"
    return None


def _int_at_least(x, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def zip_damage(path: Path) -> str | None:
    """What is wrong with a zip file (torch.save's format), or None: a member whose bytes fail
    the CRC the zip stores for them (torch.load itself never checks it, so flipped bytes would
    load as other weights), or members that claim far more bytes than the file holds (a compressed
    bomb; torch.save stores tensors uncompressed, TorchScript deflates only its code). None for a
    file that is not a zip."""
    try:
        with zipfile.ZipFile(path) as z:
            claimed, size = sum(info.file_size for info in z.infolist()), path.stat().st_size
            if claimed > 2 * size + 2**20:
                return f"its members claim {claimed:,} bytes, far more than the file's {size:,}"
            bad = z.testzip()
    except zipfile.BadZipFile:
        return None  # not a zip (or not one zipfile can read): torch.load says what it is
    except Exception as e:  # a damaged member header or compressed stream
        return f"{type(e).__name__}: {e}"
    return f"member {bad} fails its CRC check" if bad else None


def _pickled_global(path: Path) -> str | None:
    """For a file that is a bare pickle stream (not torch's zip format): the first global it
    would import ("module.name"), read from its opcodes without running anything; None if it
    imports nothing or is not a pickle at all."""
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if op.name == "STACK_GLOBAL":
                    return ".".join(strings[-2:]) if len(strings) >= 2 else "a global"
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle: random bytes, text, a truncated stream
        return None
    return None


def build_arch(arch: dict, data: dict) -> nn.Module:
    """The model an arch entry names, for the data it describes, before its weights are loaded."""
    from kdcli.models.tv import WEIGHTS_FROM_CHECKPOINT

    token = WEIGHTS_FROM_CHECKPOINT.set(True)  # no download of pretrained weights that are replaced here
    try:
        return build_model(arch["name"], data["input_shape"], data["num_classes"], arch.get("kwargs"))
    finally:
        WEIGHTS_FROM_CHECKPOINT.reset(token)


def build_from(ckpt: dict, path: str | Path = "<checkpoint>") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights. The architecture is built
    on the meta device first (no memory) and its shapes compared with the tensors the file
    holds: a file that claims hidden=[10**12] is refused before anything is allocated."""
    arch = ckpt["arch"]
    _check_shapes(arch, ckpt["data"], ckpt["state_dict"], path)
    try:
        model = build_arch(arch, ckpt["data"])
    except KdError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:  # kwargs no module can be built from
        raise KdError(
            f"Cannot build model '{arch['name']}' with {arch.get('kwargs')}, which {path} describes: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else 'no detail'}"
        ) from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise KdError(
            f"The weights in {path} do not fit model '{arch['name']}' with {arch.get('kwargs')}: "
            f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}"
        ) from None
    return model


def _check_shapes(arch: dict, data: dict, state: dict, path: str | Path) -> None:
    with torch.device("meta"):
        try:
            want = {k: tuple(v.shape) for k, v in build_arch(arch, data).state_dict().items()}
        except KdError:
            raise
        except Exception:  # a builder that needs real tensors: load_state_dict compares after the build
            return
    have = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()} if isinstance(state, dict) else {}
    if want == have:
        return
    if missing := [k for k in want if k not in have]:
        detail = f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    elif extra := [k for k in have if k not in want]:
        detail = f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}"
    else:
        k = next(k for k in want if want[k] != have[k])
        detail = f"size mismatch for {k}: the file holds {list(have[k])}, the model has {list(want[k])}"
    raise KdError(f"The weights in {path} do not fit model '{arch['name']}' with {arch.get('kwargs')}: {detail}")


def describe(ckpt: dict) -> str:
    arch, data = ckpt["arch"], ckpt["data"]
    kw = ", ".join(f"{k}={v}" for k, v in (arch.get("kwargs") or {}).items())
    return f"{arch['name']}({kw}) on {data['name']} ({data['num_classes']} classes, input {data['input_shape']})"
