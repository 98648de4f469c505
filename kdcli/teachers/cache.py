"""Teacher outputs computed once: when the training inputs are the same every epoch (no random
augmentation), the frozen teachers' logits for every training image (and the outputs of the
teacher layers that feature terms read, when they fit in FEATURE_LIMIT) are computed in one pass,
stored under `<runs_dir>/cache/teacher_outputs/<fingerprint>.pt`, and looked up by sample index
at each step instead of running the teachers. The runs of a sweep share runs_dir, so a T or
alpha sweep computes them once.

The fingerprint covers what the outputs depend on: the bytes of each teacher checkpoint, the
dataset and its split (the keys that choose the images, the split version, the training
labels), the preprocessing (the normalisation the inputs get) and the stored teacher layers. Any change gives another
file; a stale one is never read. With random augmentation the teachers run on each augmented
batch, as before."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from kdcli.core import distributed
from kdcli.core.errors import KdError
from kdcli.data.mix import mixing
from kdcli.data.splits import SPLIT_VERSION
from kdcli.losses.taps import Taps
from kdcli.training import checkpoint
from kdcli.training.build import augmentation, data_identity, dataset_config
from kdcli.training.engine import Teacher, batches

log = logging.getLogger("kdcli")

FORMAT = "kdcli-teacher-outputs"
FEATURE_LIMIT = 2 * 2**30  # bytes of teacher features the cache keeps (on the training device)


def feature_bytes(objective, data) -> int:
    """The size of the teachers' features over the training split, float32."""
    per_image = sum(math.prod(s) for f in objective.features for s in f.teacher_shapes)
    return 4 * per_image * len(data.train)


def why_not(cfg, objective, teacher_paths: list, data=None) -> str | None:
    """Why the cache cannot serve this run, or None if it can."""
    if cfg.teacher_cache == "off":
        return "teacher_cache=off"
    if not all(p and Path(p).is_file() for p in teacher_paths):
        return "a teacher given as a module (kdcli.distill) has no checkpoint file to key the outputs by"
    if any(augmentation(cfg)):
        return "random augmentation (augment=standard with dataset.shift/flip): the teachers see each augmented batch"
    if mixing(cfg)[0] != "none":
        return f"mix={cfg.mix}: the teachers see each mixed batch"
    size = feature_bytes(objective, data) if objective.features and data is not None else 0
    if size > FEATURE_LIMIT:
        return (
            f"the teacher's features at {', '.join(objective.teacher_layers)} over the training split would take "
            f"{size / 2**30:.1f} GiB (the cache holds up to {FEATURE_LIMIT / 2**30:.0f} GiB); a later layer is smaller"
        )
    return None


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(teacher_paths: list[str], data, dataset_cfg: dict, layers: list[str] = ()) -> str:
    labels = data.train.y.detach().cpu().numpy().tobytes()
    key = {
        "format": FORMAT,
        "teachers": [_file_sha256(p) for p in teacher_paths],
        "dataset": data_identity(dataset_cfg),
        "split_version": SPLIT_VERSION,
        "train_images": len(data.train),
        "train_labels": hashlib.sha256(labels).hexdigest(),
        "mean": list(data.info.mean),
        "std": list(data.info.std),
    }
    if layers:  # the teacher layers whose outputs are stored too
        key["layers"] = list(layers)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _read(path: Path, teachers: list[Teacher], n: int, layers: list[str]) -> dict | None:
    """The stored outputs, or None when the file is unreadable or does not fit (it is rewritten)."""
    try:
        stored = checkpoint.load(path, kind=FORMAT)
    except KdError as e:  # a truncated or foreign file: computed again, never trusted
        log.warning(f"warning  computing the teacher outputs again: {e}")
        return None
    outs, feats = stored["outputs"], stored.get("features") or []
    fits = len(outs) == len(teachers) and all(len(o) == n for o in outs)
    return stored if fits and stored.get("layers", []) == layers and all(len(f) == n for f in feats) else None


@torch.no_grad()
def _compute(teachers: list[Teacher], data, batch_size: int, layers: list[str]) -> dict:
    """Every teacher's logits over the training split and, with `layers`, the first teacher's
    outputs at those layers (feature terms take one teacher), on the CPU."""
    outs, feats = [], []
    for k, t in enumerate(teachers):
        t.model.eval()
        taps = Taps(t.model, layers, "teacher", data.info.input_shape) if layers and k == 0 else None
        logits, parts = [], []
        try:
            for x in batches(data.train, batch_size):
                logits.append(t(x).cpu())  # float32 (Teacher.__call__)
                if taps is not None:
                    parts.append([f.float().cpu() for f in taps.take()])
        finally:
            if taps is not None:
                taps.remove()
        outs.append(torch.cat(logits))
        if parts:
            feats = [torch.cat(layer) for layer in zip(*parts)]
    return {"outputs": outs, "features": feats}


def attach(cfg, data, teachers: list[Teacher], teacher_paths: list[str], objective) -> dict:
    """Give each teacher its outputs over the training split (teacher.cache; the features the
    feature terms read, teacher.feature_cache) when the run allows it; returns what happened,
    for metrics.json and the summary."""
    reason = why_not(cfg, objective, teacher_paths, data)
    if reason:
        log.info(f"teacher  outputs computed at every step: {reason}")
        return {"used": False, "reason": reason}
    t0 = time.perf_counter()
    layers = objective.teacher_layers if objective.features else []
    # rank 0 hashes the checkpoint files (several processes: the others take its key)
    key = distributed.decided_by_main(lambda: fingerprint(teacher_paths, data, dataset_config(cfg), layers))
    path = Path(cfg.runs_dir).expanduser() / "cache" / "teacher_outputs" / f"{key}.pt"
    with distributed.main_first():  # several processes: rank 0 computes and stores, the others read its file
        stored = _read(path, teachers, len(data.train), layers) if path.is_file() else None
        computed = stored is None
        if computed:
            stored = _compute(teachers, data, int(cfg.trainer.eval_batch_size), layers)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                record = {"format": FORMAT, "fingerprint": key, "teachers": teacher_paths, "layers": layers}
                checkpoint.write(path, {**record, **stored})
            except (OSError, KdError) as e:  # a read-only or full runs_dir: the run still uses them in memory
                log.warning(f"warning  could not store the teacher outputs in {path} ({e}); used in memory only")
    for t, out in zip(teachers, stored["outputs"]):
        t.cache = out.to(data.device)
    if layers:
        teachers[0].feature_cache = [f.to(data.device) for f in stored["features"]]
    seconds = time.perf_counter() - t0
    what = f"outputs and features at {', '.join(layers)}" if layers else "outputs"
    log.info(
        f"teacher  {what} over the {len(data.train)} training images {'computed' if computed else 'reused'} "
        f"({seconds:.1f} s): {path}"
    )
    return {"used": True, "computed": computed, "path": str(path), "seconds": round(seconds, 3), "layers": layers}
