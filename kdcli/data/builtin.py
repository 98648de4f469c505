"""Built-in datasets: the embedded mnist5k, and MNIST / Fashion-MNIST through torchvision."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from kdcli.core.errors import KdError
from kdcli.core.registry import DATASETS
from kdcli.data.formats import error_cause, read_cifar, read_svhn
from kdcli.data.splits import RawData, Split

DIGITS = [str(i) for i in range(10)]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@DATASETS.register("mnist5k")
def mnist5k(data_root: str) -> RawData:
    """5,000 real MNIST digits shipped inside kdcli (works offline); 1,000 held out as test."""
    with np.load(files("kdcli.data") / "mnist5k.npz") as f:
        x = torch.from_numpy(f["x"]).unsqueeze(1)
        y = torch.from_numpy(f["y"]).long()
    # A fixed, seed-independent test set: 100 images per class.
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        test_mask[order[y[order] == c][:100]] = True
    return RawData(Split(x[~test_mask], y[~test_mask]), Split(x[test_mask], y[test_mask]), DIGITS)


def _torchvision_idx(cls, data_root: str, download: bool, debian_dir: Path | None = None) -> RawData:
    """Load an MNIST-family dataset with torchvision from data_root/<ClassName>/raw."""
    from torchvision.datasets.utils import extract_archive

    root = Path(data_root).expanduser()
    raw_dir = root / cls.__name__ / "raw"
    wanted = [os.path.basename(url).removesuffix(".gz") for url, _ in cls.resources]
    # torchvision reads the extracted IDX files; extract gzipped ones found in raw_dir or in
    # Debian's dataset package ourselves, so that no download is attempted for them.
    for f in (f for f in wanted if not (raw_dir / f).is_file()):
        gz = next((d / f"{f}.gz" for d in (raw_dir, debian_dir) if d is not None and (d / f"{f}.gz").is_file()), None)
        if gz is not None:
            raw_dir.mkdir(parents=True, exist_ok=True)
            extract_archive(str(gz), str(raw_dir))
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as e:
        cause = error_cause(e)
        debian = (
            f" On Debian/Ubuntu: `apt-get install dataset-fashion-mnist` (files land in {debian_dir})."
            if debian_dir is not None
            else ""
        )
        raise KdError(
            f"{cls.__name__} files are missing under {raw_dir}: expected {', '.join(wanted)} (plain or .gz)"
            f"{f'; the download failed: {cause}' if download else ' and dataset.download=false'}. "
            f"Fix: run once with network access (dataset.download=true), or copy the IDX files "
            f"into {raw_dir}, or point data_root=... at a folder that has them.{debian}"
        ) from None

    def split(ds) -> Split:
        return Split(ds.data.unsqueeze(1).contiguous(), ds.targets.long())

    return RawData(split(train), split(test), list(train.classes))


@DATASETS.register("mnist")
def mnist(data_root: str, *, download: bool = True) -> RawData:
    """MNIST (60k/10k) via torchvision, from data_root/MNIST/raw (downloaded when online)."""
    from torchvision.datasets import MNIST

    return _torchvision_idx(MNIST, data_root, download)


@DATASETS.register("fashion_mnist")
def fashion_mnist(data_root: str, *, download: bool = True) -> RawData:
    """Fashion-MNIST (60k/10k) via torchvision; also found in Debian's dataset-fashion-mnist."""
    from torchvision.datasets import FashionMNIST

    return _torchvision_idx(FashionMNIST, data_root, download, DEBIAN_FASHION_MNIST)


@DATASETS.register("kmnist")
def kmnist(data_root: str, *, download: bool = True) -> RawData:
    """Kuzushiji-MNIST (Clanuwat et al. 2018), 60k/10k cursive Japanese characters, from data_root/KMNIST/raw."""
    from torchvision.datasets import KMNIST

    return _torchvision_idx(KMNIST, data_root, download)


@DATASETS.register("cifar10")
def cifar10(data_root: str, *, download: bool = True) -> RawData:
    """CIFAR-10 (Krizhevsky 2009), 50k/10k 32x32 colour images, from data_root/cifar-10-batches-py."""
    return read_cifar(data_root, 10, download)


@DATASETS.register("cifar100")
def cifar100(data_root: str, *, download: bool = True) -> RawData:
    """CIFAR-100 (Krizhevsky 2009), 50k/10k 32x32 colour images of 100 classes, from data_root/cifar-100-python."""
    return read_cifar(data_root, 100, download)


@DATASETS.register("svhn")
def svhn(data_root: str, *, download: bool = True, extra: bool = False) -> RawData:
    """SVHN (Netzer et al. 2011), 73k/26k 32x32 house-number digits (+531k with extra=true), from data_root/SVHN."""
    return read_svhn(data_root, download, extra)
