import gzip
import struct

import numpy as np
import pytest
import torch

from kdcli.core.errors import KdError
from kdcli.data import DeviceData, augment_batch, load_splits

MNIST5K = {"name": "mnist5k", "val_size": 500, "split_seed": 0, "classes": None, "limit": None}


def test_mnist5k_splits_are_fixed_disjoint_and_stratified():
    s = load_splits(MNIST5K, "unused")
    assert (len(s.train), len(s.val), len(s.test)) == (3500, 500, 1000)
    assert torch.bincount(s.test.y).tolist() == [100] * 10
    assert s.info.input_shape == [1, 28, 28] and s.info.num_classes == 10
    again = load_splits(MNIST5K, "unused")
    assert torch.equal(s.val.x, again.val.x) and torch.equal(s.test.y, again.test.y)
    # No image is in two splits (compare exact pixel contents).
    keys = [set(map(bytes, split.x.flatten(1).numpy())) for split in (s.train, s.val, s.test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    # The normalisation is that of the training split.
    assert s.info.mean[0] == pytest.approx(s.train.x.float().div(255).mean().item(), rel=1e-5)


def test_a_different_split_seed_changes_validation_but_not_test():
    a = load_splits(MNIST5K, "unused")
    b = load_splits({**MNIST5K, "split_seed": 1}, "unused")
    assert torch.equal(a.test.x, b.test.x)
    assert not torch.equal(a.val.x, b.val.x)


def test_class_subset_is_renumbered():
    s = load_splits({**MNIST5K, "classes": [3, 7], "val_size": 0.1}, "unused")
    assert s.info.class_names == ["3", "7"] and s.info.num_classes == 2
    assert set(s.train.y.tolist()) == {0, 1}
    # The validation split is carved before the subset is taken: a subset's validation images
    # are exactly the full split's validation images of those classes (teachers trained on
    # class subsets never see a full-data student's validation images).
    full = load_splits({**MNIST5K, "val_size": 0.1}, "unused")
    for split in ("train", "val", "test"):
        whole, part = getattr(full, split), getattr(s, split)
        chosen = (whole.y == 3) | (whole.y == 7)
        assert torch.equal(part.x, whole.x[chosen])
        assert torch.equal(part.y, (whole.y[chosen] == 7).long())
    assert len(s.test) == 200
    with pytest.raises(KdError, match="index 12 is out of range"):
        load_splits({**MNIST5K, "classes": [1, 12]}, "unused")


def test_limit_takes_a_random_subset_of_every_split():
    s = load_splits({**MNIST5K, "limit": 200}, "unused")
    assert (len(s.train), len(s.val), len(s.test)) == (200, 200, 200)
    assert all(torch.bincount(split.y, minlength=10).min() > 5 for split in (s.train, s.val, s.test))


def test_device_batches_cover_the_epoch_once():
    s = load_splits({**MNIST5K, "limit": 300}, "unused")
    data = DeviceData(s, torch.device("cpu"))
    xs = torch.cat([x for x, _, _ in data.train_batches(64, 0)])
    assert xs.shape == (256, 1, 28, 28)  # 4 full batches of 64; the partial batch of 44 is dropped
    # Each batch row is a distinct training image: no image is drawn twice in an epoch.
    rows = {bytes(r.numpy()) for r in xs.flatten(1)}
    train = {bytes(r.numpy()) for r in data.train.x.flatten(1)}
    assert len(rows) == 256 and rows <= train


def test_an_epoch_continues_exactly_at_any_batch():
    """Resuming mid-epoch: batches from `start` on are those of the whole epoch, augmentation included."""
    s = load_splits({**MNIST5K, "limit": 300}, "unused")
    data = DeviceData(s, torch.device("cpu"), shift=2, flip=True)
    whole = list(data.train_batches(64, 7))
    rest = list(data.train_batches(64, 7, start=2))
    assert len(whole) == 4 and len(rest) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(whole[2:], rest))
    assert not torch.equal(whole[0][0], list(data.train_batches(64, 8))[0][0])  # another seed, another epoch


def test_shift_moves_pixels_and_fills_with_background():
    x = torch.zeros(200, 1, 5, 5)
    x[:, 0, 2, 2] = 1.0  # one bright pixel in the centre
    out = augment_batch(x, shift=1, flip=False, fill=torch.tensor([-0.5]), generator=torch.Generator().manual_seed(0))
    rows, cols = [], []
    for img in out[:, 0]:
        r, c = (img == 1.0).nonzero()[0].tolist()
        rows.append(r)
        cols.append(c)
        assert (img == 1.0).sum() == 1
    assert set(rows) == {1, 2, 3} and set(cols) == {1, 2, 3}  # moved by at most 1 in each direction
    assert (out == -0.5).any()  # uncovered border takes the fill value


def test_flip_mirrors_about_half_the_images():
    x = torch.arange(4.0).view(1, 1, 1, 4).repeat(400, 1, 1, 1)
    out = augment_batch(x, shift=0, flip=True, fill=torch.zeros(1), generator=torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == 3).sum().item()
    assert 150 < flipped < 250
    assert torch.equal(out[out[:, 0, 0, 0] == 3][0, 0, 0], torch.tensor([3.0, 2, 1, 0]))


def _write_idx(path, array: np.ndarray, gz: bool = False):
    """IDX format (LeCun): magic 0x0000 0x08 ndim, big-endian dims, then uint8 data."""
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_mnist_loads_idx_files_through_torchvision(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    s = load_splits(
        {"name": "mnist", "download": False, "val_size": 10, "split_seed": 0, "classes": None, "limit": None},
        str(tmp_path),
    )
    assert (len(s.train), len(s.val), len(s.test)) == (50, 10, 20)
    assert s.test.y.tolist() == [i % 10 for i in range(20)]
    assert s.info.class_names[0].startswith("0")


def test_gzipped_idx_files_are_extracted_without_a_download(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", np.full((n, 28, 28), 7), gz=True)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, gz=True)
    cfg = {"name": "fashion_mnist", "download": False, "val_size": 5, "split_seed": 0, "classes": None, "limit": None}
    s = load_splits(cfg, str(tmp_path))
    assert (len(s.train), len(s.val), len(s.test)) == (25, 5, 10)
    assert s.info.class_names[0] == "T-shirt/top" and int(s.test.x.max()) == 7


def test_missing_files_offline_name_the_files_root_and_fix(tmp_path):
    with pytest.raises(KdError) as e:
        load_splits({"name": "mnist", "download": False, "val_size": 10, "split_seed": 0}, str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "MNIST" / "raw") in msg
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "Fix:" in msg
