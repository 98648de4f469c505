"""Teacher outputs computed once: when the training inputs are the same every epoch (no random
augmentation), the frozen teachers' logits for every training image are computed in one pass,
stored under `<runs_dir>/cache/teacher_outputs/<fingerprint>.pt`, and looked up by sample index
at each step instead of running the teachers. The runs of a sweep share runs_dir, so a T or
alpha sweep computes them once.

The fingerprint covers what the outputs depend on: the bytes of each teacher checkpoint, the
dataset and its split (the keys that choose the images, the split version, the training
labels), and the preprocessing (the normalisation the inputs get). Any change gives another
file; a stale one is never read. With random augmentation the teachers run on each augmented
batch, as before."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from kdcli import checkpoint, distributed
from kdcli.commands.common import augmentation, data_identity, dataset_config
from kdcli.data.splits import SPLIT_VERSION
from kdcli.engine import Teacher, batches
from kdcli.errors import KdError

log = logging.getLogger("kdcli")

FORMAT = "kdcli-teacher-outputs"


def why_not(cfg, objective, teacher_paths: list) -> str | None:
    """Why the cache cannot serve this run, or None if it can."""
    if cfg.teacher_cache == "off":
        return "teacher_cache=off"
    if not all(p and Path(p).is_file() for p in teacher_paths):
        return "a teacher given as a module (kdcli.distill) has no checkpoint file to key the outputs by"
    if any(augmentation(cfg)):
        return "random augmentation (augment=standard with dataset.shift/flip): the teachers see each augmented batch"
    if objective.features:
        return "feature terms read the teachers' intermediate layers at each step"
    return None


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(teacher_paths: list[str], data, dataset_cfg: dict) -> str:
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
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _read(path: Path, teachers: list[Teacher], n: int) -> list[torch.Tensor] | None:
    """The stored outputs, or None when the file is unreadable or does not fit (it is rewritten)."""
    try:
        outs = checkpoint.load(path, kind=FORMAT)["outputs"]
    except KdError as e:  # a truncated or foreign file: computed again, never trusted
        log.warning(f"warning  computing the teacher outputs again: {e}")
        return None
    return outs if len(outs) == len(teachers) and all(len(o) == n for o in outs) else None


@torch.no_grad()
def _compute(teachers: list[Teacher], data, batch_size: int) -> list[torch.Tensor]:
    outs = []
    for t in teachers:
        t.model.eval()
        outs.append(torch.cat([t(x).float().cpu() for x in batches(data.train, batch_size)]))
    return outs


def attach(cfg, data, teachers: list[Teacher], teacher_paths: list[str], objective) -> dict:
    """Give each teacher its outputs over the training split (teacher.cache) when the run allows
    it; returns what happened, for metrics.json and the summary."""
    reason = why_not(cfg, objective, teacher_paths)
    if reason:
        log.info(f"teacher  outputs computed at every step: {reason}")
        return {"used": False, "reason": reason}
    t0 = time.perf_counter()
    key = fingerprint(teacher_paths, data, dataset_config(cfg))
    path = Path(cfg.runs_dir).expanduser() / "cache" / "teacher_outputs" / f"{key}.pt"
    with distributed.main_first():  # several processes: rank 0 computes and stores, the others read its file
        outs = _read(path, teachers, len(data.train)) if path.is_file() else None
        computed = outs is None
        if computed:
            outs = _compute(teachers, data, int(cfg.trainer.eval_batch_size))
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                checkpoint.write(
                    path, {"format": FORMAT, "fingerprint": key, "teachers": teacher_paths, "outputs": outs}
                )
            except (OSError, KdError) as e:  # a read-only or full runs_dir: the run still uses them in memory
                log.warning(f"warning  could not store the teacher outputs in {path} ({e}); used in memory only")
    for t, out in zip(teachers, outs):
        t.cache = out.to(data.device)
    seconds = time.perf_counter() - t0
    log.info(
        f"teacher  outputs over the {len(data.train)} training images {'computed' if computed else 'reused'} "
        f"({seconds:.1f} s): {path}"
    )
    return {"used": True, "computed": computed, "path": str(path), "seconds": round(seconds, 3)}
