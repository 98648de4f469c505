"""The names the schema accepts for keys whose implementations live in the layers above it.

The schema knows the names, not the code: each implementing module takes its names from here
(prune.KINDS, engine.SELECTIONS, ...) or checks at import that its table maps exactly these
(optim.OPTIMIZER_CLASSES, accel.DTYPES, formats.EXPORTERS). A new choice is added here and there.
"""

# optimizer.name: the torch.optim class of each (kdcli/training/optim.py builds it)
OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
# scheduler.name (kdcli/training/optim.py)
SCHEDULERS = ("cosine", "step", "onecycle", "none")
# trainer.selection: which epoch's weights become {role}_best.pt (the test split is never looked at)
SELECTIONS = ("last", "val_acc", "val_nll")
# trainer.precision and trainer.teacher_precision (kdcli/training/accel.py: DTYPES)
PRECISIONS = ("fp32", "bf16", "fp16")
# formats= of kd export (kdcli/deploy/formats.py: EXPORTERS)
EXPORT_FORMATS = ("torchscript", "onnx", "torch_export", "safetensors")
# schedule.T and schedule.alpha (kdcli/losses/objective.py)
SCHEDULES = ("constant", "linear", "cosine", "step")
# prune.kind (kdcli/training/prune.py)
PRUNE_KINDS = ("none", "unstructured", "channel")
# mix= (kdcli/data/mix.py)
MIXES = ("none", "mixup", "cutmix")

# Keys that every dataset config has (the rest go to the dataset's builder), with the defaults
# of a dataset registered in code without a YAML file in configs/dataset/ (kdcli/data/splits.py).
COMMON_DEFAULTS = {
    "val_size": 0.1,
    "split_seed": 0,
    "classes": None,
    "limit": None,
    "shift": 0,
    "flip": False,
    "affine": False,
    "storage": "auto",
    "workers": None,
}
