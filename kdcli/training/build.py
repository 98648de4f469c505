"""What a run is built from: the dataset on the device (or streamed), a model from its config node,
the checkpoint metadata that describes them, and the completed runs found under runs_dir."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kdcli.config import augmenting, model_spec
from kdcli.core import distributed
from kdcli.core.errors import KdError
from kdcli.data import DeviceData, load_splits
from kdcli.data.mix import mixing
from kdcli.data.stream import StreamData, open_data
from kdcli.models import build_model
from kdcli.training.resume import read_metrics

log = logging.getLogger("kdcli")

# Dataset keys that do not change which images land in which split (augmentation, how the data
# is read): a teacher is reusable for a student only if all the other keys agree (name, split,
# classes, and a builder's own keys such as imagefolder's root and image_size).
NOT_IDENTITY = ("shift", "flip", "affine", "storage", "workers", "download")


def dataset_config(cfg) -> dict:
    """The dataset config as a dict; a folder given relative to the current directory (an
    imagefolder's root) is made absolute, so checkpoints and teacher reuse do not depend on
    where kd ran."""
    dcfg = OmegaConf.to_container(cfg.dataset, resolve=True, throw_on_missing=False)
    root = dcfg.get("root")
    if isinstance(root, str) and root != "???":
        from kdcli.data.folder import resolve_root

        dcfg["root"] = str(resolve_root(root, cfg.data_root).resolve())
    return dcfg


def data_identity(dataset_cfg: dict) -> dict:
    return {k: v for k, v in dataset_cfg.items() if k not in NOT_IDENTITY}


def device_data(cfg, ctx) -> DeviceData | StreamData:
    """The run's data, in memory or streamed (dataset.storage); a resumed run keeps the choice
    its first part made (they shuffle and augment differently), which metrics.json records."""
    data = open_dataset(cfg, ctx.device, (ctx.resume and ctx.previous.get("storage")) or None)
    ctx.note("storage", storage_of(data))
    return data


def storage_of(data) -> str:
    return "stream" if isinstance(data, StreamData) else "memory"


def augmentation(cfg) -> tuple[int, bool, bool]:
    """The random shift, flip and rotation/scaling (augment=affine) the training batches get
    ((0, False, False): the same images every epoch)."""
    if not augmenting(cfg):
        return 0, False, False
    affine = str(cfg.augment).lower() == "affine" or bool(cfg.dataset.get("affine", False))
    return cfg.dataset.get("shift", 0), cfg.dataset.get("flip", False), affine


def open_dataset(cfg, device: torch.device, storage: str | None = None) -> DeviceData | StreamData:
    """The data cfg.dataset names on `device`, augmented as cfg says, in memory or streamed
    (`storage`, default dataset.storage). Needs no run: kdcli.load_data calls it directly."""
    dcfg = dataset_config(cfg)
    with distributed.main_first():  # one process downloads or unpacks; the others then read its files
        splits = load_splits(dcfg, cfg.data_root)
    shift, flip, affine = augmentation(cfg)
    mix = mixing(cfg)[0]
    data = open_data(splits, device, shift, flip, storage or dcfg.get("storage", "auto"), dcfg.get("workers"), affine)
    if isinstance(data, StreamData):
        where = f"streamed ({data.workers} loader process{'' if data.workers == 1 else 'es'})"
    else:
        where = f"in memory on {device}"
    log.info(
        f"data     {dcfg['name']}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test, "
        f"input {data.info.input_shape}, {data.info.num_classes} classes, {where}, "
        f"augmentation: {f'shift {shift}px' if shift else 'no shift'}{', flip' if flip else ''}"
        f"{', rotation and scale (affine)' if affine else ''}"
        f"{f', {mix} of each batch' if mix != 'none' else ''}"
    )
    return data


def new_model(node, data: DeviceData, device: torch.device, seed: int) -> tuple[torch.nn.Module, dict]:
    """Build the model a teacher/student node names, initialised from `seed`."""
    spec = model_spec(node)
    torch.manual_seed(seed)
    model = build_model(spec["name"], data.info.input_shape, data.info.num_classes, spec["kwargs"])
    return model.to(device), spec


def ckpt_meta(spec: dict, data: DeviceData, dataset_cfg: dict) -> dict:
    return {"arch": spec, "data": {**data.info.to_dict(), "dataset": dataset_cfg}}


def completed_runs(runs_dir: str | Path, *patterns: str) -> list[tuple[Path, dict]]:
    """(run directory, metrics) of every completed run whose metrics.json matches one of the
    glob patterns under runs_dir, oldest first."""
    root = Path(runs_dir).expanduser()
    found = []
    for f in (f for pattern in patterns for f in root.glob(f"{pattern}/metrics.json")):
        metrics = read_metrics(f.parent)
        if metrics.get("status") == "completed":
            found.append((f.stat().st_mtime, f.parent, metrics))
    return [(run, metrics) for _, run, metrics in sorted(found, key=lambda t: t[0])]


def latest_run(runs_dir: str | Path, command: str) -> Path | None:
    """The most recent completed single run of `command` under runs_dir."""
    runs = completed_runs(runs_dir, f"{command}/*")
    return runs[-1][0] if runs else None


def checkpoint_data(data: dict, data_root: str, device: torch.device) -> DeviceData | StreamData:
    """The splits a checkpoint's model was trained on, normalised as in its training (the
    statistics stored in the checkpoint)."""
    dcfg = data["dataset"]
    splits = load_splits(dcfg, data_root, stats=(data["mean"], data["std"]))
    ours = {"classes": splits.info.class_names, "input shape": splits.info.input_shape}
    theirs = {"classes": list(data["class_names"]), "input shape": list(data["input_shape"])}
    for what in ours:
        if ours[what] != theirs[what]:
            raise KdError(
                f"the data under {dcfg.get('root') or data_root} no longer matches the checkpoint's: its {what} "
                f"{theirs[what]}, now {ours[what]} (files added, removed or renamed?). Fix: restore the files the "
                "model was trained on, or train again."
            )
    # Images in files are streamed: evaluating or exporting reads each once, decoding all is slower.
    lazy = hasattr(splits.train, "image")
    storage = "stream" if lazy else dcfg.get("storage", "auto")
    return open_data(splits, device, storage=storage, workers=dcfg.get("workers"))
