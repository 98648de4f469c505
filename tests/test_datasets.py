"""Datasets read from files in their real formats (written by tests/dataset_files.py), and the
choice between in-memory and streamed data."""

import pickle

import numpy as np
import pytest
import torch
from dataset_files import cifar10, cifar100, image_folder, mnist_family, svhn

from kdcli.core.errors import KdError
from kdcli.data import DeviceData, load_splits
from kdcli.data import stream as stream_mod
from kdcli.data.shapes import dataset_shape
from kdcli.data.splits import COMMON_DEFAULTS
from kdcli.data.stream import StreamData, open_data


def cfg(name, **kw):
    return {"name": name, **COMMON_DEFAULTS, "val_size": 10, **kw}


def test_kmnist_reads_idx_files_through_torchvision(tmp_path):
    mnist_family(tmp_path, "KMNIST")
    s = load_splits(cfg("kmnist", download=False), str(tmp_path))
    assert (len(s.train), len(s.val), len(s.test)) == (50, 10, 20)
    assert s.info.input_shape == [1, 28, 28] and s.info.class_names[:2] == ["o", "ki"]
    assert s.test.y.tolist() == [i % 10 for i in range(20)]


def test_cifar10_batches_are_read_plane_by_plane(tmp_path):
    folder = cifar10(tmp_path)
    # Mark one pixel of the first training image: the rows hold R, then G, then B planes.
    with open(folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f)
    batch["data"][0, :] = 0
    batch["data"][0, 1024 + 32 * 3 + 5] = 255  # G plane, row 3, column 5
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    s = load_splits(cfg("cifar10", download=False, val_size=0.1), str(tmp_path))
    assert (len(s.train) + len(s.val), len(s.test)) == (100, 20)
    assert s.info.input_shape == [3, 32, 32] and s.info.class_names[3] == "cat"
    images = torch.cat([s.train.x, s.val.x])
    marked = images[(images.flatten(1).sum(1) == 255)]
    assert len(marked) == 1 and marked[0, 1, 3, 5] == 255
    assert sorted(torch.cat([s.train.y, s.val.y]).tolist()) == sorted(i % 10 for i in range(100))


def test_cifar100_uses_fine_labels_and_their_names(tmp_path):
    cifar100(tmp_path, n_train=1000)  # 10 images of each class
    s = load_splits(cfg("cifar100", download=False, val_size=0.3, classes=["class7", "class42"]), str(tmp_path))
    assert s.info.num_classes == 2 and s.info.class_names == ["class7", "class42"]
    assert sorted(set(s.test.y.tolist())) == [0, 1] and len(s.test) == 2  # one test image of each


def test_a_pickled_code_payload_in_a_batch_is_refused_and_not_run(tmp_path):
    folder = cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": Payload(), "labels": [0]}, f, protocol=2)
    with pytest.raises(KdError, match="data_batch_3 is not a readable CIFAR batch .*refusing to load posix.system"):
        load_splits(cfg("cifar10", download=False), str(tmp_path))
    assert not marker.exists()


def test_a_truncated_batch_is_a_clear_error(tmp_path):
    folder = cifar10(tmp_path)
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    with pytest.raises(KdError, match="test_batch is not a readable CIFAR batch .*Fix: delete it"):
        load_splits(cfg("cifar10", download=False), str(tmp_path))


def test_missing_cifar_files_offline_name_files_folder_and_fix(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(KdError) as e:
        load_splits(cfg("cifar10", download=False), str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "test_batch" in msg and "batches.meta" in msg
    assert "cifar-10-python.tar.gz" in msg and "Fix:" in msg and "\n" not in msg


def test_svhn_mat_files_are_transposed_and_zero_relabelled(tmp_path):
    from scipy.io import savemat

    folder = svhn(tmp_path)
    x = np.zeros((32, 32, 3, 2), dtype=np.uint8)
    x[4, 7, 2, 1] = 200  # image 1, blue channel, row 4, column 7
    savemat(folder / "test_32x32.mat", {"X": x, "y": np.array([[10], [3]])})
    s = load_splits(cfg("svhn", download=False), str(tmp_path))
    assert s.test.y.tolist() == [0, 3]
    assert s.test.x.shape == (2, 3, 32, 32) and s.test.x[1, 2, 4, 7] == 200 and s.test.x.sum() == 200
    assert sorted(set(s.train.y.tolist()) | set(s.val.y.tolist())) == list(range(10))


def test_missing_svhn_offline_names_the_mat_files(tmp_path):
    with pytest.raises(KdError, match=r"SVHN files are missing under .*SVHN: expected train_32x32.mat, test_32x32.mat"):
        load_splits(cfg("svhn", download=False), str(tmp_path))


def test_imagefolder_with_train_and_test_folders(tmp_path):
    image_folder(tmp_path / "train", ["cat", "dog", "eel"], 8, size=(40, 36))
    image_folder(tmp_path / "test", ["cat", "dog", "eel"], 3, size=(50, 50), seed=1)
    s = load_splits(cfg("imagefolder", root=str(tmp_path), val_size=3), str(tmp_path))
    data = open_data(s, torch.device("cpu"), storage="memory", workers=0)
    assert isinstance(data, DeviceData)
    # Resized on the shorter side (36) and centre-cropped: every image is 3x36x36.
    assert s.info.input_shape == [3, 36, 36] and s.info.class_names == ["cat", "dog", "eel"]
    assert (len(data.train), len(data.val), len(data.test)) == (21, 3, 9)
    assert data.test.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Class k is 60*k brighter; the normalised class means keep that order.
    means = [data.test.x[data.test.y == k].mean().item() for k in range(3)]
    assert means[0] < means[1] < means[2]


def test_imagefolder_of_class_folders_holds_out_a_stratified_test_share(tmp_path):
    image_folder(tmp_path / "pics", ["a", "b"], 10, mode="L")
    s = load_splits(cfg("imagefolder", root="pics", test_size=0.3, val_size=2, image_size=16), str(tmp_path))
    assert s.info.input_shape == [1, 16, 16]  # grayscale files give one channel
    assert sorted(s.test.y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert len(s.train) + len(s.val) == 14
    assert not set(s.test.paths) & set(s.train.paths + s.val.paths)
    again = load_splits(cfg("imagefolder", root="pics", test_size=0.3, val_size=2, image_size=16), str(tmp_path))
    assert again.test.paths == s.test.paths


def test_imagefolder_errors(tmp_path):
    with pytest.raises(KdError, match="dataset.root=nowhere is not a folder"):
        load_splits(cfg("imagefolder", root="nowhere"), str(tmp_path))
    image_folder(tmp_path / "x" / "train", ["a", "b"], 4)
    image_folder(tmp_path / "x" / "test", ["a", "c"], 2)
    with pytest.raises(KdError, match="class folders that the training folder lacks: c"):
        load_splits(cfg("imagefolder", root=str(tmp_path / "x"), val_size=1), str(tmp_path))
    image_folder(tmp_path / "y", ["a", "b"], 5)
    (tmp_path / "y" / "b" / "3.png").write_bytes(b"not a png")
    s = load_splits(cfg("imagefolder", root=str(tmp_path / "y"), val_size=1), str(tmp_path))
    with pytest.raises(KdError, match=r"cannot decode image .*3.png.* Fix: remove or replace the file"):
        open_data(s, torch.device("cpu"), storage="memory", workers=0)


def _stream_and_memory(s, **kw):
    memory = open_data(s, torch.device("cpu"), storage="memory", workers=0, **kw)
    streamed = open_data(s, torch.device("cpu"), storage="stream", workers=1, **kw)
    assert isinstance(memory, DeviceData) and isinstance(streamed, StreamData)
    return memory, streamed


def test_streamed_splits_hold_the_same_inputs_as_in_memory(tmp_path):
    image_folder(tmp_path / "train", ["a", "b"], 6)
    image_folder(tmp_path / "test", ["a", "b"], 2)
    s = load_splits(cfg("imagefolder", root=str(tmp_path), val_size=2), str(tmp_path))
    memory, streamed = _stream_and_memory(s)
    for name in ("val", "test"):
        got = torch.cat(list(streamed.split(name).batches(3)))
        assert torch.allclose(got, memory.split(name).x, atol=1e-6)
        assert torch.equal(streamed.split(name).y, memory.split(name).y)
    assert torch.allclose(streamed.test.head(2), memory.test.x[:2], atol=1e-6)
    assert len(streamed.test.subset(3)) == 3


def test_streamed_training_batches_cover_the_epoch_and_repeat_with_the_seed(tmp_path):
    cifar10(tmp_path, per_batch=10, n_test=10)
    s = load_splits(cfg("cifar10", download=False), str(tmp_path))  # 40 train images
    _, streamed = _stream_and_memory(s, shift=4, flip=True)

    def epoch(seed):
        return list(streamed.train_batches(16, seed))

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert [len(b[0]) for b in first] == [16, 16]  # the partial batch is dropped
    idx = torch.cat([b[2] for b in first])
    assert len(set(idx.tolist())) == 32 and torch.equal(torch.cat([b[1] for b in first]), s.train.y[idx])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # order and crops follow the seed
    resumed = list(streamed.train_batches(16, 0, start=1))  # an interrupted epoch continues at batch 1
    assert len(resumed) == 1 and torch.equal(resumed[0][0], first[1][0]) and torch.equal(resumed[0][2], first[1][2])
    assert not torch.equal(idx, torch.cat([b[2] for b in other]))


def test_stream_crops_pad_with_black_like_the_in_memory_path(tmp_path):
    image_folder(tmp_path / "train", ["a", "b"], 8, size=(16, 16))
    image_folder(tmp_path / "test", ["a", "b"], 1, size=(16, 16))
    s = load_splits(cfg("imagefolder", root=str(tmp_path), val_size=2), str(tmp_path))
    memory, streamed = _stream_and_memory(s, shift=4)
    batch = torch.cat([b[0] for b in streamed.train_batches(4, 0)])
    black = memory.fill.view(-1, 1)

    def padded(img):  # a whole border row or column is black padding
        return any((edge == black).all() for edge in (img[:, 0, :], img[:, -1, :], img[:, :, 0], img[:, :, -1]))

    # Shifts are uniform in -4..4 on each axis: an image stays in place with probability 1/81.
    assert batch.shape == (12, 3, 16, 16) and sum(padded(img) for img in batch) >= 9  # 14 images: 3 batches
    # What the engine reads of the training split (evaluation, feature shapes) is not augmented.
    assert torch.allclose(streamed.train.head(14), memory.train.x, atol=1e-6)


def test_auto_storage_streams_what_exceeds_the_memory_budget(tmp_path, monkeypatch):
    cifar10(tmp_path, per_batch=4, n_test=4)
    s = load_splits(cfg("cifar10", download=False, val_size=2), str(tmp_path))
    need = 24 * 3 * 32 * 32 * 4  # 18 + 2 + 4 images as float32
    assert stream_mod.float_bytes(s) == need
    monkeypatch.setattr(stream_mod, "memory_budget", lambda device: need)
    assert isinstance(open_data(s, torch.device("cpu")), DeviceData)
    monkeypatch.setattr(stream_mod, "memory_budget", lambda device: need - 1)
    assert isinstance(open_data(s, torch.device("cpu"), workers=0), StreamData)
    with pytest.raises(KdError, match="dataset.storage=disk: choose auto"):
        open_data(s, torch.device("cpu"), storage="disk")


def test_known_dataset_shapes():
    assert dataset_shape("cifar100") == ([3, 32, 32], 100)
    assert dataset_shape("kmnist") == ([1, 28, 28], 10)
    assert dataset_shape("imagefolder") is None


def test_a_teacher_is_reused_only_for_the_same_images():
    from kdcli.training.build import data_identity

    a = {"name": "imagefolder", "root": "/a", "image_size": 32, "val_size": 0.1, "shift": 4, "storage": "auto"}
    assert data_identity(a) == data_identity({**a, "shift": 0, "flip": True, "storage": "stream", "workers": 2})
    assert data_identity(a) != data_identity({**a, "root": "/b"})
    assert data_identity(a) != data_identity({**a, "image_size": 64})


def test_streamed_augmentation_does_not_depend_on_the_worker_count(tmp_path):
    cifar10(tmp_path, per_batch=10, n_test=10)
    s = load_splits(cfg("cifar10", download=False), str(tmp_path))
    batches = []
    for workers in (0, 1, 2):
        data = open_data(s, torch.device("cpu"), shift=4, flip=True, storage="stream", workers=workers)
        batches.append(torch.cat([b[0] for b in data.train_batches(8, 3)]))
    assert torch.equal(batches[0], batches[1]) and torch.equal(batches[0], batches[2])
    again = open_data(s, torch.device("cpu"), shift=4, flip=True, storage="stream", workers=0)
    assert torch.equal(torch.cat([b[0] for b in again.train_batches(8, 3)]), batches[0])


def test_class_folders_named_by_numbers_are_chosen_by_name(tmp_path):
    image_folder(tmp_path / "n", [str(i) for i in range(1, 12)], 4, size=(8, 8))
    (tmp_path / "n" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    s = load_splits(cfg("imagefolder", root=str(tmp_path / "n"), val_size=1, test_size=0.25), str(tmp_path))
    assert len(s.info.class_names) == 11 and s.info.class_names[:3] == ["1", "10", "11"]
    s = load_splits(cfg("imagefolder", root=str(tmp_path / "n"), val_size=0.5, classes=["2", "10"]), str(tmp_path))
    assert s.info.class_names == ["2", "10"]


def test_a_class_of_one_image_leaves_the_test_split_empty_and_says_so(tmp_path):
    image_folder(tmp_path / "one", ["a", "b"], 1, size=(8, 8))
    with pytest.raises(KdError, match="the test split is empty"):
        load_splits(cfg("imagefolder", root=str(tmp_path / "one"), val_size=1), str(tmp_path))


def test_cifar_batches_from_newer_pickles_load_and_wrong_layouts_are_refused(tmp_path):
    folder = cifar10(tmp_path, per_batch=4, n_test=4)
    with open(folder / "data_batch_2", "rb") as f:
        batch = pickle.load(f)
    batch["labels"] = list(np.asarray(batch["labels"], dtype=np.int64))  # numpy scalars
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(batch, f, protocol=5)
    s = load_splits(cfg("cifar10", download=False, val_size=2), str(tmp_path))
    assert len(s.train) + len(s.val) == 20
    batch["data"] = batch["data"].reshape(-1, 32, 32, 3)  # rows of pixels, not planes
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(KdError, match=r"data_batch_2: not a CIFAR batch .*'data' is uint8 of shape \(4, 32, 32, 3\)"):
        load_splits(cfg("cifar10", download=False, val_size=2), str(tmp_path))


def test_statistics_match_the_formula():
    x = torch.randint(0, 256, (50, 3, 5, 7), dtype=torch.uint8)
    from kdcli.data.splits import Split, _statistics

    shape, mean, std = _statistics(Split(x, torch.zeros(50)), {}, torch.Generator())
    pixels = x.double() / 255
    assert shape == [3, 5, 7]
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), pixels.mean(dim=(0, 2, 3)))
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), pixels.std(dim=(0, 2, 3)))


def test_a_folder_root_found_under_data_root_is_stored_absolute(tmp_path):
    from omegaconf import OmegaConf

    from kdcli.training.build import dataset_config

    image_folder(tmp_path / "pics", ["a", "b"], 2, size=(8, 8))
    c = OmegaConf.create({"data_root": str(tmp_path), "dataset": {"name": "imagefolder", "root": "pics"}})
    assert dataset_config(c)["root"] == str((tmp_path / "pics").resolve())


def test_evaluating_on_changed_files_is_refused(tmp_path):
    from kdcli.training.build import checkpoint_data

    image_folder(tmp_path / "f" / "train", ["a", "b", "c"], 4, size=(8, 8))
    image_folder(tmp_path / "f" / "test", ["a", "b", "c"], 1, size=(8, 8))
    dcfg = cfg("imagefolder", root=str(tmp_path / "f"), val_size=1)
    s = load_splits(dcfg, str(tmp_path))
    data = {**s.info.to_dict(), "dataset": dcfg}
    assert len(checkpoint_data(data, str(tmp_path), torch.device("cpu")).test) == 3
    image_folder(tmp_path / "f" / "train", ["aa"], 4, size=(8, 8))  # a class inserted before b
    with pytest.raises(KdError, match=r"no longer matches the checkpoint's: its classes \['a', 'b', 'c'\], now"):
        checkpoint_data(data, str(tmp_path), torch.device("cpu"))


def test_a_val_folder_beside_train_and_test_is_the_validation_split(tmp_path):
    for part, n in (("train", 5), ("val", 2), ("test", 3)):
        image_folder(tmp_path / "t" / part, ["a", "b"], n, size=(8, 8), seed=len(part))
    s = load_splits(cfg("imagefolder", root=str(tmp_path / "t"), val_size=0.5), str(tmp_path))
    assert (len(s.train), len(s.val), len(s.test)) == (10, 4, 6)
    assert all("/val/" in p for p in s.val.paths) and all("/test/" in p for p in s.test.paths)
