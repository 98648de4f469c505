"""The schema knows the names of the choices, the layers above implement them
(kdcli/config/choices.py): every name the schema accepts has its implementation."""

import torch
from omegaconf import OmegaConf

from kdcli.config import choices
from kdcli.deploy import formats
from kdcli.losses.objective import Schedule
from kdcli.training import accel, optim


def test_every_optimizer_name_maps_to_a_torch_optimizer():
    assert list(optim.OPTIMIZER_CLASSES) == list(choices.OPTIMIZERS) == ["sgd", "adam", "adamw"]
    assert optim.OPTIMIZER_CLASSES["sgd"] is torch.optim.SGD and optim.OPTIMIZER_CLASSES["adamw"] is torch.optim.AdamW


def test_every_precision_and_export_format_has_its_implementation():
    assert tuple(accel.DTYPES) == choices.PRECISIONS and accel.DTYPES["bf16"] is torch.bfloat16
    assert tuple(formats.EXPORTERS) == choices.EXPORT_FORMATS
    assert all(callable(f) for f in formats.EXPORTERS.values())


def test_every_schedule_name_moves_from_start_to_end():
    # 5 epochs from 4 to 1: constant stays, the others reach 1 at the last epoch, step switches at the middle
    first_last = {k: (Schedule(k, 4.0, 1.0).at(1, 5), Schedule(k, 4.0, 1.0).at(5, 5)) for k in choices.SCHEDULES}
    assert first_last == {"constant": (4.0, 4.0), "linear": (4.0, 1.0), "cosine": (4.0, 1.0), "step": (4.0, 1.0)}


def test_every_scheduler_name_builds():
    built = {}
    for name in choices.SCHEDULERS:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        cfg = {"name": name, "warmup_epochs": 0, "step_epochs": 1, "gamma": 0.1}
        built[name] = type(optim.build_scheduler(opt, OmegaConf.create(cfg), steps_per_epoch=2, epochs=3)).__name__
    assert built == {"cosine": "CosineAnnealingLR", "step": "StepLR", "onecycle": "OneCycleLR", "none": "NoneType"}
