"""One export written (formats.EXPORTERS) and read back with its own runtime to be checked against
PyTorch's logits; the file names every export and quantization starts with."""

from __future__ import annotations

from pathlib import Path

import torch

from kdcli.core.errors import KdError
from kdcli.core.files import safe_name
from kdcli.core.metrics import agreement
from kdcli.core.run import plain
from kdcli.deploy import formats


def stem_of(ck: dict) -> str:
    """<arch>_<role>, the start of every file name an export or quantization writes: the names come
    from the checkpoint, so they are made one harmless path component (no `../`, no `/`)."""
    return safe_name(f"{safe_name(ck['arch']['name'])}_{safe_name(ck.get('role', 'model'))}")


def export_file(fmt: str, model, x: torch.Tensor, target: Path, card: dict, opset: int, source: Path) -> tuple:
    """Write one export; returns the identity of the file written (see `check`)."""
    try:
        # an example batch of 2: with 1, torch.export would fix the batch axis to 1
        formats.EXPORTERS[fmt](model, x[:2].clone(), target, card, opset)
    except KdError:
        raise
    except Exception as e:  # exporters raise many types; name the format and the cause
        first = plain(str(e)).splitlines()[0] if str(e) else ""
        raise KdError(f"{fmt} export of {source} failed: {type(e).__name__}: {first}") from None
    return identity(target)


def identity(path: Path) -> tuple:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check(
    target: Path, x: torch.Tensor, reference: torch.Tensor, batch_size: int, atol: float, written: tuple | None = None
) -> dict:
    """Read an exported file back with its runtime and compare its logits with PyTorch's. A program
    (TorchScript, torch.export) is loaded, which runs its code: only the file this process has just
    written (`written`, its identity) is trusted so, not one that replaced it since."""
    if written is not None and identity(target) != written:
        raise KdError(f"{target} changed after kd export wrote it (another process?); it is not read back.")
    got = formats.open_model(target, trust_programs=written is not None).logits(x, batch_size)
    return {
        "path": str(target),
        "max_abs_diff": (got - reference).abs().max().item(),
        "top1_agreement": agreement(got, reference),
        "checked_images": len(x),
        "ok": bool(torch.allclose(got, reference, atol=atol, rtol=atol)),
    }
