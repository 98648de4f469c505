"""From a registered dataset to train/val/test splits."""

from __future__ import annotations

import torch

from kdcli.config.choices import COMMON_DEFAULTS
from kdcli.core.errors import KdError
from kdcli.core.registry import DATASETS
from kdcli.data.stream import check_workers, decode_all
from kdcli.data.types import DataInfo, RawData, Split, Splits

COMMON_KEYS = ("name", *COMMON_DEFAULTS)
# Bumped when the same dataset config starts to give other splits (2: validation images are
# chosen before a class subset is taken), so older teacher runs are not reused by mistake.
SPLIT_VERSION = 2
# Images decoded to estimate the mean and std of a dataset read from files.
STATS_SAMPLE = 500


def _select_classes(names: list[str], classes):
    """(a function keeping the chosen classes of a split, relabelled 0..k-1, their names)."""
    chosen = []
    for c in classes:
        # A class is named by its name first (folders may be called "1", "10", ...), else by index.
        if isinstance(c, str) and (c in names or not c.lstrip("-").isdigit()):
            if c not in names:
                raise KdError(f"dataset.classes: unknown class '{c}'. Classes: {', '.join(names)}.")
            chosen.append(names.index(c))
        else:
            i = int(c)
            if not 0 <= i < len(names):
                raise KdError(f"dataset.classes: index {i} is out of range 0..{len(names) - 1}.")
            chosen.append(i)
    if len(set(chosen)) != len(chosen) or len(chosen) < 2:
        raise KdError(f"dataset.classes needs at least two distinct classes; got {list(classes)}.")
    remap = torch.full((len(names),), -1, dtype=torch.long)
    remap[torch.tensor(chosen)] = torch.arange(len(chosen))

    def keep(split):
        new = remap[split.y]
        idx = (new >= 0).nonzero().flatten()
        out = split.take(idx)
        out.y = new[idx]
        return out

    return keep, [names[i] for i in chosen]


def _carve(n: int, size: float | int) -> int:
    count = int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)
    if not 0 < count < n:
        raise KdError(f"dataset.val_size={size} leaves no training or no validation data ({n} training images).")
    return count


def _statistics(train, cfg: dict, g: torch.Generator) -> tuple[list[int], list[float], list[float]]:
    """(input shape, per-channel mean, std) of the training images in [0, 1]: over all of an
    in-memory split (in chunks, without a float copy of it), over STATS_SAMPLE random images of
    a split of files (decoded here)."""
    if isinstance(train, Split):
        x = train.x
    else:
        sample = train.take(torch.randperm(len(train), generator=g)[:STATS_SAMPLE])
        x = decode_all(sample, check_workers(cfg.get("workers")), "sample").x
    total = torch.zeros(2, x.shape[1], dtype=torch.float64)  # sum, sum of squares per channel
    for i in range(0, len(x), 4096):
        chunk = x[i : i + 4096].double().div_(255).transpose(0, 1).flatten(1)
        total += torch.stack([chunk.sum(1), chunk.square().sum(1)])
    n = x[0].numel() // x.shape[1] * len(x)
    mean = total[0] / n
    std = ((total[1] - n * mean.square()) / max(n - 1, 1)).clamp_min(0).sqrt()
    return list(x.shape[1:]), mean.tolist(), std.clamp_min(1e-6).tolist()


def load_splits(cfg: dict, data_root: str, stats: tuple[list, list] | None = None) -> Splits:
    """Build the splits that a dataset config describes (see configs/dataset/*.yaml). `stats`
    (mean, std) replaces the statistics computed from the training images (a checkpoint's)."""
    builder_kwargs = {k: v for k, v in cfg.items() if k not in COMMON_KEYS}
    raw: RawData = DATASETS.build(cfg["name"], data_root, **builder_kwargs)
    # The validation images are chosen before a class subset is taken, so teachers trained on
    # different subsets and a student on all classes share one split: no teacher has trained
    # on the student's validation images.
    g = torch.Generator().manual_seed(int(cfg.get("split_seed", 0)))
    if raw.val is not None:
        train, val, test = raw.train, raw.val, raw.test
    else:
        perm = torch.randperm(len(raw.train), generator=g)
        n_val = _carve(len(perm), cfg["val_size"])
        train, val, test = raw.train.take(perm[n_val:]), raw.train.take(perm[:n_val]), raw.test
    class_names = list(raw.class_names)
    if cfg.get("classes"):
        keep, class_names = _select_classes(class_names, cfg["classes"])
        train, val, test = keep(train), keep(val), keep(test)
    if cfg.get("limit"):  # a random (seeded) subset of each split: stored order may be sorted by class
        limit = int(cfg["limit"])
        train, val, test = (s.take(torch.randperm(len(s), generator=g)[:limit]) for s in (train, val, test))

    for name, split in (("training", train), ("validation", val), ("test", test)):
        if not len(split):
            raise KdError(
                f"dataset {cfg['name']}: the {name} split is empty"
                f"{' for the classes chosen' if cfg.get('classes') else ''}. Fix: give it images (more per class, "
                "another dataset.classes, val_size or test_size)."
            )
    if stats is None:
        shape, mean, std = _statistics(train, cfg, g)
    else:
        (mean, std), shape = stats, list(train.x.shape[1:] if isinstance(train, Split) else train.shape)
    info = DataInfo(
        name=cfg["name"],
        input_shape=shape,
        num_classes=len(class_names),
        class_names=class_names,
        mean=list(mean),
        std=list(std),
    )
    return Splits(train, val, test, info)
