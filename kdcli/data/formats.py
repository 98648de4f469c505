"""Readers for the standard on-disk formats that torchvision downloads: CIFAR's pickled
batches and SVHN's MATLAB files. torchvision fetches and checks the archives when online; the
files are read here, so copies placed by hand (or re-packed, or subsets) load too, and a
pickled batch can only ever produce arrays: it is unpickled with an allow-list, so a
tampered file cannot run code."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from kdcli.core.errors import KdError
from kdcli.data.splits import RawData, Split

# The only callables a CIFAR batch needs to rebuild its numpy arrays.
# The only callables a CIFAR batch needs to rebuild its numpy arrays and scalars (whichever
# numpy and pickle protocol wrote it); each builds an array or a scalar from a dtype and bytes.
_ALLOWED = {
    (package, name)
    for package in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a dataset batch holds only arrays)")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # pickled by numpy 1.x
            module = module.replace("numpy.core.", "numpy._core.", 1)
        return super().find_class(module, name)


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise KdError(
            f"{path} is not a readable CIFAR batch ({type(e).__name__}: {e}). "
            "Fix: delete it and download again (dataset.download=true), or extract the original archive."
        ) from None
    if not isinstance(d, dict):
        raise KdError(f"{path} is not a CIFAR batch (a pickled dict); found {type(d).__name__}.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _images(batch: dict, path: Path, label_key: str, classes: int) -> Split:
    """A batch's images: `data` holds one row of 3072 bytes per image (the R plane, then G, then B)."""
    what = f"{path}: not a CIFAR batch (uint8 'data' of shape (N, 3072) and N '{label_key}' below {classes})"
    try:
        data = np.asarray(batch["data"])
        y = np.asarray(batch[label_key]).astype(np.int64, casting="same_kind").reshape(-1)
    except (KeyError, ValueError, TypeError) as e:
        raise KdError(f"{what}: {type(e).__name__} {e}.") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise KdError(f"{what}: 'data' is {data.dtype} of shape {data.shape}.")
    if len(data) != len(y) or not len(y) or not 0 <= y.min() <= y.max() < classes:
        span = f" in {y.min()}..{y.max()}" if len(y) else ""
        raise KdError(f"{what}: {len(data)} images, {len(y)} labels{span}.")
    return Split(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y))


def _missing(title: str, folder: Path, names: list[str], url: str, where: str, cause: str | None) -> KdError:
    return KdError(
        f"{title} files are missing under {folder}: expected {', '.join(names)}"
        f"{f'; the download failed: {cause}' if cause else ' and dataset.download=false'}. "
        f"Fix: run once with network access (dataset.download=true), or download {url} and {where}, "
        "or point data_root=... at a folder that has them."
    )


def error_cause(e: Exception) -> str:
    """The line of a torchvision download or load error that says what failed."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return next((line for line in reversed(lines) if "error" in line.lower()), lines[0])


def _download_cause(download_fn) -> str | None:
    """Run a torchvision download; what failed, or None when it worked."""
    try:
        download_fn()
    except (RuntimeError, OSError, ValueError) as e:
        return error_cause(e)
    return None


def read_cifar(data_root: str, classes: int, download: bool) -> RawData:
    """CIFAR-10 or CIFAR-100 from data_root/cifar-10-batches-py or data_root/cifar-100-python
    (the folders the python-version archives extract to)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if classes == 10 else CIFAR100
    root = Path(data_root).expanduser()
    folder = root / cls.base_folder
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    cause = None
    if not all((folder / n).is_file() for n in names):
        if download:
            cause = _download_cause(lambda: cls(str(root), download=True))
        if not all((folder / n).is_file() for n in names):
            missing = [n for n in names if not (folder / n).is_file()]
            raise _missing(cls.__name__, folder, missing, cls.url, f"extract it into {root}", cause or None)
    label_key = "labels" if classes == 10 else "fine_labels"

    def split(files: list) -> Split:
        parts = [_images(_load_batch(folder / n), folder / n, label_key, classes) for n, _ in files]
        return Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))

    meta = _load_batch(folder / cls.meta["filename"])
    class_names = [str(n) for n in meta.get(cls.meta["key"], [])]
    train, test = split(cls.train_list), split(cls.test_list)
    if len(class_names) != classes:
        raise KdError(f"{folder / cls.meta['filename']}: expected {classes} class names; found {len(class_names)}.")
    return RawData(train, test, class_names)


SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"


def read_svhn(data_root: str, download: bool, extra: bool) -> RawData:
    """SVHN (cropped digits, format 2) from data_root/SVHN/{train,test,extra}_32x32.mat."""
    from scipy.io import loadmat
    from torchvision.datasets import SVHN

    folder = Path(data_root).expanduser() / "SVHN"
    parts = ["train", "test"] + (["extra"] if extra else [])
    names = {p: SVHN.split_list[p][1] for p in parts}
    for part, name in names.items():
        if (folder / name).is_file():
            continue
        cause = _download_cause(lambda p=part: SVHN(str(folder), split=p, download=True)) if download else None
        if not (folder / name).is_file():
            raise _missing(
                "SVHN", folder, [names[p] for p in parts], SVHN_URL, f"place the .mat files in {folder}", cause
            )

    def split(part: str) -> Split:
        path = folder / names[part]
        try:
            mat = loadmat(path)
            x, y = mat["X"], mat["y"].astype(np.int64).reshape(-1)
        except Exception as e:  # scipy raises several types for a damaged file
            raise KdError(f"{path} is not a readable SVHN .mat file ({type(e).__name__}: {e}).") from None
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
            raise KdError(f"{path}: expected X of shape (32, 32, 3, N) and N labels; got X {x.shape}, {len(y)} labels.")
        y[y == 10] = 0  # SVHN labels the digit 0 as 10
        return Split(
            torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8)), torch.from_numpy(y)
        )

    train = split("train")
    if extra:
        more = split("extra")
        train = Split(torch.cat([train.x, more.x]), torch.cat([train.y, more.y]))
    return RawData(train, split("test"), [str(i) for i in range(10)])
