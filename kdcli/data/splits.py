"""From a registered dataset to train/val/test splits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kdcli.errors import KdError
from kdcli.registry import DATASETS

# Keys that every dataset config has (the rest go to the dataset's builder), with the defaults
# of a dataset registered in code without a YAML file in configs/dataset/.
COMMON_DEFAULTS = {
    "val_size": 0.1,
    "split_seed": 0,
    "classes": None,
    "limit": None,
    "shift": 0,
    "flip": False,
    "storage": "auto",
    "workers": None,
}
COMMON_KEYS = ("name", *COMMON_DEFAULTS)
# Bumped when the same dataset config starts to give other splits (2: validation images are
# chosen before a class subset is taken), so older teacher runs are not reused by mistake.
SPLIT_VERSION = 2
# Images decoded to estimate the mean and std of a dataset read from files.
STATS_SAMPLE = 500


@dataclass
class Split:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: torch.Tensor) -> "Split":
        return Split(self.x[idx], self.y[idx])


@dataclass
class DataInfo:
    """What a checkpoint must know about its data to be rebuilt and fed correctly."""

    name: str
    input_shape: list[int]
    num_classes: int
    class_names: list[str]
    mean: list[float]
    std: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    info: DataInfo


@dataclass
class RawData:
    """What a dataset builder returns: uint8 images (N, C, H, W) and int64 labels, or image
    files (kdcli.data.folder.FileSplit) that are decoded when needed."""

    train: Split  # or FileSplit
    test: Split
    class_names: list[str]


def _select_classes(names: list[str], classes):
    """(a function keeping the chosen classes of a split, relabelled 0..k-1, their names)."""
    chosen = []
    for c in classes:
        if isinstance(c, str) and not c.lstrip("-").isdigit():
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


def _sample_pixels(train, cfg: dict, g: torch.Generator) -> torch.Tensor:
    """Training pixels in [0, 1] for the normalisation statistics: all of an in-memory split,
    STATS_SAMPLE random images of a split of files (decoded here)."""
    if isinstance(train, Split):
        return train.x.float().div_(255)
    from kdcli.data.stream import check_workers, decode_all

    sample = train.take(torch.randperm(len(train), generator=g)[:STATS_SAMPLE])
    return decode_all(sample, check_workers(cfg.get("workers")), "sample").x.float().div_(255)


def load_splits(cfg: dict, data_root: str) -> Splits:
    """Build the splits that a dataset config describes (see configs/dataset/*.yaml)."""
    builder_kwargs = {k: v for k, v in cfg.items() if k not in COMMON_KEYS}
    raw: RawData = DATASETS.build(cfg["name"], data_root, **builder_kwargs)
    # The validation images are chosen before a class subset is taken, so teachers trained on
    # different subsets and a student on all classes share one split: no teacher has trained
    # on the student's validation images.
    g = torch.Generator().manual_seed(int(cfg.get("split_seed", 0)))
    perm = torch.randperm(len(raw.train), generator=g)
    n_val = _carve(len(perm), cfg["val_size"])
    train, val, test = raw.train.take(perm[n_val:]), raw.train.take(perm[:n_val]), raw.test
    class_names = list(raw.class_names)
    if cfg.get("classes"):
        keep, class_names = _select_classes(class_names, cfg["classes"])
        train, val, test = keep(train), keep(val), keep(test)
        if not (len(train) and len(val)):
            raise KdError(f"dataset.classes={list(cfg['classes'])} leaves no training or no validation images.")
    if cfg.get("limit"):  # a random (seeded) subset of each split: stored order may be sorted by class
        limit = int(cfg["limit"])
        train, val, test = (s.take(torch.randperm(len(s), generator=g)[:limit]) for s in (train, val, test))

    pixels = _sample_pixels(train, cfg, g)
    info = DataInfo(
        name=cfg["name"],
        input_shape=list(pixels.shape[1:]),
        num_classes=len(class_names),
        class_names=class_names,
        mean=pixels.mean(dim=(0, 2, 3)).tolist(),
        std=pixels.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist(),
    )
    return Splits(train, val, test, info)
