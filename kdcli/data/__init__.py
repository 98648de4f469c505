"""Datasets: registered builders return raw uint8 images; `load_splits` turns them into
train/val/test splits (validation carved from training with a fixed seed), and
`DeviceData` keeps them normalised on the training device and batches them by index."""

from kdcli.data import builtin, folder  # noqa: F401  (registers the built-in datasets)
from kdcli.data.device import DeviceData, augment_batch
from kdcli.data.splits import DataInfo, Split, Splits, load_splits

__all__ = ["DataInfo", "Split", "Splits", "load_splits", "DeviceData", "augment_batch"]
