"""A user's own images: `dataset=imagefolder dataset.root=PATH`.

The root holds `train/` and `test/` (or `val/`) folders of class folders, or the class
folders themselves, in which case a fixed, stratified share of each class (`test_size`)
becomes the test split. Images are decoded lazily (`FileSplit`), resized on the shorter side
and centre-cropped to `image_size`, and either decoded once into memory or streamed, as
`load_splits` decides from their size."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcli.core.errors import KdError
from kdcli.core.registry import DATASETS
from kdcli.data.splits import RawData

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
LARGE = 256  # a side above this, taken from the first image, gets a warning
log = logging.getLogger("kdcli")


@dataclass
class FileSplit:
    """Image files and their labels; `image(i)` decodes one to uint8 (C, size, size)."""

    paths: list[str]
    y: torch.Tensor
    size: int
    channels: int

    def __len__(self) -> int:
        return len(self.y)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def take(self, idx: torch.Tensor) -> "FileSplit":
        return FileSplit([self.paths[i] for i in idx.tolist()], self.y[idx], self.size, self.channels)

    def image(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.v2 import functional as TF

        path = self.paths[i]
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise KdError(f"cannot decode image {path}: {e}. Fix: remove or replace the file.") from None
        img = TF.center_crop(TF.resize(img, self.size), [self.size, self.size])
        return TF.pil_to_tensor(img)


def _scan(directory: Path, class_to_idx: dict | None = None) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) of the images in directory's class folders."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    try:
        # Class folders, sorted; hidden ones (.ipynb_checkpoints, .DS_Store...) are not classes.
        names = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        found = {n: i for i, n in enumerate(names)}
        if not names:
            raise FileNotFoundError(f"no class folders in {directory}")
        if class_to_idx is not None:
            unknown = sorted(set(names) - set(class_to_idx))
            if unknown:
                raise KdError(
                    f"{directory} has class folders that the training folder lacks: {', '.join(unknown)}. "
                    "Fix: give every test class training images, or remove those folders."
                )
            names, found = list(class_to_idx), class_to_idx
        samples = make_dataset(str(directory), found, extensions=IMG_EXTENSIONS, allow_empty=class_to_idx is not None)
    except FileNotFoundError as e:
        raise KdError(
            f"imagefolder: {e}. Expected one folder per class with images "
            f"({', '.join(IMG_EXTENSIONS)}) under {directory}."
        ) from None
    except OSError as e:  # a folder this user may not read (dataset.root=/proc/1: its cwd link)
        raise KdError(
            f"imagefolder: cannot read {e.filename or directory}: {e.strerror or e}. Fix: dataset.root=PATH, a "
            "folder of class folders that you may read."
        ) from None
    return [p for p, _ in samples], [c for _, c in samples], names


def _stratified_test(labels: torch.Tensor, share: float) -> torch.Tensor:
    """A fixed (seed 0) mask choosing round(share * n_c) images of each class c, at least one."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        k = min(max(1, round(share * len(members))), len(members) - 1)
        mask[members[:k]] = True
    return mask


def resolve_root(root: str, data_root: str) -> Path:
    for candidate in (Path(root).expanduser(), Path(data_root).expanduser() / root):
        if candidate.is_dir():
            return candidate
    raise KdError(
        f"imagefolder: dataset.root={root} is not a folder (looked in the current directory and in "
        f"data_root={data_root}). Fix: dataset.root=/path/to/images holding train/ and test/ (or val/) "
        "class folders, or the class folders themselves."
    )


@DATASETS.register("imagefolder")
def imagefolder(
    data_root: str,
    *,
    root: str = "???",
    image_size: int | None = None,
    channels: int | None = None,
    test_size: float = 0.2,
) -> RawData:
    """Your own images: root/train + root/test (or val) class folders, or class folders split by test_size.

    With train/, val/ and test/, val/ is the validation split (val_size is not used)."""
    base = resolve_root(root, data_root)
    test_dir = next((base / d for d in ("test", "val") if (base / d).is_dir()), None)
    val = None
    if (base / "train").is_dir() and test_dir is not None:
        paths, labels, names = _scan(base / "train")
        index = {n: i for i, n in enumerate(names)}
        test_paths, test_labels, _ = _scan(test_dir, index)
        if not test_paths:
            raise KdError(f"imagefolder: {test_dir} holds no images. Fix: add images, or remove the folder.")
        if test_dir.name == "test" and (base / "val").is_dir():  # train/ val/ test/: val/ is the validation split
            val = _scan(base / "val", index)[:2]
    else:
        paths, labels, names = _scan(base)
        if not 0 < float(test_size) < 1:
            raise KdError(f"dataset.test_size={test_size}: give the share of each class held out, e.g. 0.2.")
        y = torch.tensor(labels)
        mask = _stratified_test(y, float(test_size))
        test_paths = [p for p, m in zip(paths, mask.tolist()) if m]
        test_labels = y[mask].tolist()
        paths, labels = [p for p, m in zip(paths, mask.tolist()) if not m], y[~mask].tolist()
    if len(names) < 2:
        raise KdError(f"imagefolder: {base} has {len(names)} class folder(s); classification needs at least two.")

    from PIL import Image

    try:
        with Image.open(paths[0]) as first:
            size = int(image_size) if image_size else min(first.size)
            c = int(channels) if channels else (1 if first.mode in GRAY_MODES else 3)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise KdError(f"cannot decode image {paths[0]}: {e}. Fix: remove or replace the file.") from None
    if c not in (1, 3) or size < 1:
        raise KdError(f"imagefolder: channels must be 1 or 3 and image_size positive; got {c}, {size}.")
    if not image_size and size > LARGE:
        log.warning(
            f"imagefolder: images are {size} px on the shorter side (from {paths[0]}); training at that size is "
            f"slow and memory-hungry. Set dataset.image_size (e.g. 64, 128 or 224)."
        )

    def split(paths: list[str], labels: list[int]) -> FileSplit:
        return FileSplit(paths, torch.tensor(labels, dtype=torch.long), size, c)

    return RawData(split(paths, labels), split(test_paths, test_labels), names, split(*val) if val else None)
