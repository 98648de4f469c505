"""Input shape and class count of a dataset without loading it (for `kd list models`)."""

from __future__ import annotations

# (input_shape, num_classes) of the datasets whose files have a fixed format.
KNOWN = {
    "mnist5k": ([1, 28, 28], 10),
    "mnist": ([1, 28, 28], 10),
    "fashion_mnist": ([1, 28, 28], 10),
    "kmnist": ([1, 28, 28], 10),
    "cifar10": ([3, 32, 32], 10),
    "cifar100": ([3, 32, 32], 100),
    "svhn": ([3, 32, 32], 10),
}


def dataset_shape(name: str) -> tuple[list[int], int] | None:
    """(input_shape, num_classes) of a built-in dataset; None for one whose shape depends on
    its files or config (imagefolder, a user's own)."""
    known = KNOWN.get(name)
    return (list(known[0]), known[1]) if known else None
