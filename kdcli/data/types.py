"""The shapes a dataset takes in memory: raw images and labels (RawData, Split), the split
train/val/test (Splits) and what a model needs to know of it (DataInfo)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


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
    val: Split | None = None  # a validation split of its own (else carved from train with val_size)
