"""Frozen teachers: inputs renormalised to the teacher's own statistics, classes mapped by name."""

import pytest
import torch
import torch.nn as nn

from kdcli.core.errors import KdError
from kdcli.data import DeviceData, load_splits
from kdcli.teachers.load import frozen_teachers

DATA = {"name": "mnist5k", "val_size": 500, "split_seed": 0, "classes": None, "limit": 300}


def fake_teacher(mean: float, std: float, classes: list[str]):
    ckpt = {"data": {"mean": [mean], "std": [std], "class_names": classes}}
    return (nn.Flatten(), ckpt, "fake.pt")


def test_teacher_inputs_use_the_teachers_normalisation():
    splits = load_splits(DATA, "unused")
    data = DeviceData(splits, torch.device("cpu"))
    (teacher,) = frozen_teachers([fake_teacher(0.2, 0.4, data.info.class_names)], data)
    raw = splits.train.x[:4].float() / 255
    expected = ((raw - 0.2) / 0.4).flatten(1)
    torch.testing.assert_close(teacher(data.train.x[:4]), expected, rtol=1e-5, atol=1e-5)


def test_classes_map_by_name_and_must_be_covered():
    data = DeviceData(load_splits(DATA, "unused"), torch.device("cpu"))
    low, high = fake_teacher(0.1, 0.3, ["4", "0", "2"]), fake_teacher(0.1, 0.3, ["1", "3", "5", "6", "7", "8", "9"])
    a, b = frozen_teachers([low, high], data)
    assert a.class_map.tolist() == [4, 0, 2] and b.class_map.tolist() == [1, 3, 5, 6, 7, 8, 9]
    with pytest.raises(KdError, match="no teacher knows 1, 3, 5, 6, 7, 8, 9"):
        frozen_teachers([low], data)
