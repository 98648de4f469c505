"""Small datasets written in the real on-disk formats (IDX, CIFAR's pickled batches, SVHN's
MATLAB files, folders of PNG images), for tests that load them through kdcli's code path."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """IDX format (LeCun): magic 0x0000 0x08 ndim, big-endian dims, then uint8 data."""
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


def mnist_family(root: Path, folder: str, n_train: int = 60, n_test: int = 20, seed: int = 0) -> None:
    """root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte with labels i % 10 and
    images whose mean brightness grows with the label (so a model can learn them)."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, (n, 28, 28)) + (y * 19)[:, None, None]
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)


def _pickle(path: Path, obj) -> None:
    # Protocol 2, as the original Python 2 files were written.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_images(n: int, classes: int, rng) -> tuple[np.ndarray, list[int]]:
    """(n, 3072) uint8 rows, each the R plane then G then B of a 32x32 image, as CIFAR stores them."""
    y = [int(i % classes) for i in range(n)]
    x = rng.integers(0, 50, (n, 3, 32, 32)) + (np.array(y) * (200 // classes))[:, None, None, None]
    return x.reshape(n, 3072).astype(np.uint8), y


def cifar10(root: Path, per_batch: int = 20, n_test: int = 20, seed: int = 0) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(1, 6):
        x, y = cifar_images(per_batch, 10, rng)
        _pickle(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": y, "data": x})
    x, y = cifar_images(n_test, 10, rng)
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": y, "data": x})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072})
    return folder


def cifar100(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        x, y = cifar_images(n, 100, rng)
        _pickle(folder / name, {"fine_labels": y, "coarse_labels": [c // 5 for c in y], "data": x})
    _pickle(folder / "meta", {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": []})
    return folder


def svhn(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """root/SVHN/{train,test}_32x32.mat: X (32, 32, 3, N) uint8 and y (N, 1) with 10 for the digit 0."""
    from scipy.io import savemat

    folder = root / "SVHN"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        digits = np.arange(n) % 10
        x = rng.integers(0, 50, (32, 32, 3, n)) + (digits * 20)[None, None, None, :]
        savemat(
            folder / f"{name}_32x32.mat", {"X": x.astype(np.uint8), "y": np.where(digits == 0, 10, digits)[:, None]}
        )
    return folder


def image_folder(root: Path, classes: list[str], per_class: int, size=(40, 36), mode: str = "RGB", seed: int = 0):
    """root/<class>/<i>.png, each class a different brightness."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 40, (size[1], size[0], channels)) + k * 60
            img = Image.fromarray(pixels.astype(np.uint8).squeeze(-1) if channels == 1 else pixels.astype(np.uint8))
            img.convert(mode).save(root / name / f"{i}.png")
