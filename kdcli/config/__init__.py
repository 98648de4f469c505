"""Config schemas (one dataclass per command, registered in Hydra's ConfigStore) and the
checks that run before any work starts; the names of the choices the schema accepts (choices.py)
and the objective a job returns to an optimising sweeper (search.py)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from kdcli.config import search
from kdcli.config.choices import (
    COMMON_DEFAULTS,
    EXPORT_FORMATS,
    MIXES,
    OPTIMIZERS,
    PRECISIONS,
    PRUNE_KINDS,
    SCHEDULERS,
    SCHEDULES,
    SELECTIONS,
)
from kdcli.core.errors import KdError
from kdcli.core.registry import DATASETS, FEATURE_LOSSES, LOSSES, MODELS, load_builtins


@dataclass
class TrainerConfig:
    epochs: int = 30
    batch_size: int = 64
    eval_batch_size: int = 1000
    max_batches: Optional[int] = None  # stop each epoch after this many batches (smoke runs)
    grad_clip: Optional[float] = None  # max gradient norm; null = no clipping
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    progress: bool = True  # progress bar when writing to a terminal (never in sweeps)
    label_smoothing: float = 0.0  # of the hard-label cross-entropy (teacher training and the alpha term)
    save_every_min: Optional[float] = 30.0  # also save the training state mid-epoch this often (null: epoch ends)
    nonfinite: str = "stop"  # a NaN/inf loss: stop (keeping the last good checkpoints) or skip the step
    selection: str = "last"  # the kept checkpoint: last (end of the schedule), val_acc or val_nll (ties: later)
    # GPU speed (kdcli/training/accel.py): applied on CUDA, accepted and ignored with a note on a CPU
    precision: str = "fp32"  # fp32, bf16 or fp16 autocast of the training step (fp16 with a gradient scaler)
    channels_last: bool = False  # conv nets and their inputs in channels-last layout
    compile: bool = False  # torch.compile each trained model's forward
    teacher_precision: str = "fp32"  # the frozen teacher's forward (autocast): fp32, bf16 or fp16


@dataclass
class CommonConfig:
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    data_root: str = "${oc.env:KDCLI_DATA,'~/.cache/kdcli/data'}"
    runs_dir: str = "${oc.env:KDCLI_RUNS,runs}"
    imports: List[str] = field(default_factory=list)  # modules or .py files that register models/losses


@dataclass
class TrainTeacherConfig(CommonConfig):
    teacher: Any = MISSING
    dataset: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    augment: str = "standard"  # standard: dataset.shift / dataset.flip on the training split; none
    mix: str = "none"  # none, mixup or cutmix of each training batch with itself shuffled (kdcli/data/mix.py)
    mix_alpha: float = 1.0  # lam ~ Beta(mix_alpha, mix_alpha)
    resume: Optional[str] = None  # auto (the latest unfinished run of this config) or a run directory
    objective: str = "teacher.val_acc"  # what a job returns to an optimising sweeper (kdcli/config/search.py)


@dataclass
class ScheduleConfig:
    T: str = "constant"  # constant, linear, cosine, step: from T (first epoch) to T_end (last epoch)
    T_end: Optional[float] = None
    alpha: str = "constant"  # the same for alpha, to alpha_end
    alpha_end: Optional[float] = None
    step_at: float = 0.5  # fraction of the epochs after which a step schedule takes its end value
    warmup: int = 0  # epochs over which the distillation terms ramp up from 0 (DKD uses 20)


@dataclass
class TransferConfig:
    init_from_teacher: bool = False  # copy the teacher's tensors wherever names and shapes match
    freeze: List[str] = field(default_factory=list)  # student modules kept fixed
    freeze_epochs: Optional[int] = None  # for this many epochs; null = the whole run


@dataclass
class PruneConfig:
    kind: str = "none"  # none, unstructured (smallest |w|) or channel (output channels / rows of lowest L2 norm)
    initial: float = 0.5  # sparsity of each pruned layer at start_step
    final: float = 0.75  # ... rising to this at end_step (Zhu & Gupta 2017 polynomial schedule)
    start_step: int = 0  # training steps before the first mask (0: the initialised student)
    end_step: Optional[int] = None  # null: at 75 % of the run's training steps
    every: int = 50  # training steps between mask updates
    power: float = 3.0  # exponent of the schedule: larger prunes more early


@dataclass
class DistillConfig(TrainTeacherConfig):
    student: Any = MISSING
    loss: Any = MISSING
    method: Any = MISSING
    features: Any = field(default_factory=dict)
    T: float = 4.0
    alpha: float = 0.0
    distill_lr_scale: Any = "auto"  # auto: optimizer.lr / (alpha + (1 - alpha) T) for T^2-scaled terms; or a factor
    baseline: bool = True  # also train the student from scratch and report the KD gain
    teacher_train: Dict[str, Any] = field(default_factory=dict)  # kd train-teacher keys for the teacher trained here
    teachers: List[str] = field(default_factory=list)  # several teacher checkpoints (ensemble / class subsets)
    teacher_weights: List[float] = field(default_factory=list)  # one per teacher; default equal
    teacher_merge: str = "auto"  # auto, probs, logits, conditional (see configs/distill.yaml)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    confidence_weights: bool = False  # weight samples by B * softmax(teacher confidence / temperature)
    confidence_temperature: float = 1.0
    transfer: TransferConfig = field(default_factory=TransferConfig)
    teacher_cache: str = "auto"  # auto: teacher outputs computed once when inputs are not augmented; off
    prune: PruneConfig = field(default_factory=PruneConfig)  # magnitude pruning of the student (training/prune.py)
    objective: str = "student.val_acc"


@dataclass
class LatencyConfig:
    batch_size: int = 256  # the larger batch (latency and throughput); batch 1 is always measured
    warmup: int = 5  # untimed runs first
    repeats: int = 20  # timed runs; the median is reported (0: no timing)
    threads: Optional[int] = None  # CPU threads for PyTorch and ONNX Runtime (null: PyTorch's default)


@dataclass
class EvaluateConfig(CommonConfig):
    checkpoints: List[str] = field(default_factory=list)  # checkpoints or exported files (.onnx, .pt2, ...)
    run: Optional[str] = None  # a distill or train-teacher run directory
    reference: Optional[str] = None  # model to measure agreement and KL against (default: the teacher)
    split: str = "test"
    limit: Optional[int] = None  # evaluate on at most this many images of the split
    eval_batch_size: int = 1000
    labels: List[str] = field(default_factory=list)  # names for the table, one per model
    figures: bool = True  # confusion.png, reliability.png, tradeoff.png
    # TorchScript and torch.export files are programs: loading one runs its code. Read only when true.
    trust_programs: bool = False
    latency: LatencyConfig = field(default_factory=LatencyConfig)


@dataclass
class ExportConfig(CommonConfig):
    checkpoint: Optional[str] = None  # default: the distilled student of run=DIR or of the latest distill run
    run: Optional[str] = None  # a distill run directory: its student is exported
    formats: List[str] = field(default_factory=lambda: ["torchscript", "onnx", "torch_export", "safetensors"])
    out_dir: Optional[str] = None  # default: the run directory
    opset: int = 18
    check_batches: int = 2  # batches of real test inputs compared against PyTorch
    batch_size: int = 256
    atol: float = 1e-4


@dataclass
class QuantizeConfig(CommonConfig):
    checkpoint: Optional[str] = None  # default: the distilled student of run=DIR or of the latest distill run
    run: Optional[str] = None  # a distill run directory: its student is quantized
    modes: List[str] = field(default_factory=lambda: ["dynamic", "static"])
    calibration: int = 512  # training images that calibrate the activation ranges (static)
    per_channel: bool = True  # one scale per output channel of each weight
    static_format: str = "qdq"  # qdq (QuantizeLinear/DequantizeLinear pairs) or qoperator (QLinearConv, ...)
    out_dir: Optional[str] = None  # default: this run's directory
    opset: int = 18
    limit: Optional[int] = None  # score on at most this many test images
    latency: LatencyConfig = field(default_factory=LatencyConfig)


SCHEMAS = {
    "train_teacher": TrainTeacherConfig,
    "distill": DistillConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "quantize": QuantizeConfig,
}


# What `debug=smoke` on the command line adds as overrides, for the keys the command has,
# unless given there already (configs/debug/smoke.yaml itself sets device=cpu).
SMOKE = {
    "trainer.epochs": 1,
    "trainer.max_batches": 3,
    "trainer.batch_size": 64,
    "dataset.limit": 256,
    "limit": 256,
    "check_batches": 1,
    "batch_size": 64,
    "latency.batch_size": 64,
    "latency.warmup": 1,
    "latency.repeats": 3,
    "calibration": 64,
}


# Training methods of kd distill (kdcli/methods/), with their parameters.
METHODS = {
    "standard": {},  # teacher(s) -> student
    "ta": {"assistants": ["lenet5"]},  # teacher -> assistant(s) -> student, each distilled from the previous
    "born_again": {"generations": 3},  # student arch: trained on labels, then each generation from the previous
    "dml": {"peers": 2},  # deep mutual learning: copies of the student, each distilled from the others
    "joint": {},  # the teacher trained from scratch together with the student
}


def _node(registry, name: str) -> dict:
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in registry.params(name).items()}
    return {"name": name, **params}


def _has_yaml(group: str, name: str) -> bool:
    from importlib.resources import files

    return (files("kdcli.configs") / group / f"{name}.yaml").is_file()


def register_configs() -> None:
    """Store the schemas, and group options generated from the registries: one
    `teacher/<model>` and `student/<model>` per registered model, one `loss/<loss>` per loss
    (each with its keyword parameters and their defaults), and a `dataset/<name>` for each
    registered dataset that has no YAML file. So the groups always offer exactly what the
    registries hold, the user's own models, losses and datasets included."""
    load_builtins()
    cs = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=schema)
    for name in MODELS.names():
        cs.store(group="teacher", name=name, node={**_node(MODELS, name), "ckpt": None})
        cs.store(group="student", name=name, node=_node(MODELS, name))
    for name in LOSSES.names():
        cs.store(group="loss", name=name, node=_node(LOSSES, name))
    # Several feature terms combine (features=[at,rkd]): each option sits under its own name.
    for name in FEATURE_LOSSES.names():
        layers = {"student_layer": "penultimate", "teacher_layer": "penultimate"}
        cs.store(group="features", name=name, node={name: {**layers, **_node(FEATURE_LOSSES, name)}})
    for name, params in METHODS.items():
        cs.store(group="method", name=name, node={"name": name, **params})
    for name in DATASETS.names():
        if not _has_yaml("dataset", name):
            cs.store(group="dataset", name=name, node={**COMMON_DEFAULTS, **_node(DATASETS, name)})


def model_spec(node: DictConfig) -> dict:
    """{"name", "kwargs"} of a teacher/student node (its keys minus name and ckpt)."""
    d = OmegaConf.to_container(node, resolve=True)
    return {"name": d.pop("name"), "kwargs": {k: v for k, v in d.items() if k != "ckpt"}}


def group_kwargs(node: DictConfig) -> dict:
    d = OmegaConf.to_container(node, resolve=True)
    d.pop("name", None)
    return d


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m:
        if not torch.cuda.is_available():
            raise KdError(f"device={spec}: no CUDA device is available on this machine. Use device=cpu or device=auto.")
        n = torch.cuda.device_count()
        if m.group(1) is not None and int(m.group(1)) >= n:
            raise KdError(f"device={spec}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}.")
        return torch.device(spec)
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise KdError("device=mps: Apple's MPS backend is not available here. Use device=cpu or device=auto.")
        return torch.device("mps")
    raise KdError(f"device={spec} is not a device. Choose one of: {DEVICE_CHOICES}.")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise KdError(message)


def _at_least(cfg, key: str, low: float, nullable: bool = False, strict: bool = False) -> None:
    """cfg.key must be a number >= low (> low if strict), or null if nullable."""
    value = OmegaConf.select(cfg, key)
    if value is None and nullable:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > low if strict else value >= low)
    bound = f"{'>' if strict else '>='} {low:g}" + (" or null" if nullable else "")
    _check(ok, f"{key} must be a number {bound} (got {value!r}).")


# augment= values: true/false are kept from earlier versions, where augment was a boolean.
AUGMENT = {"standard": True, "affine": True, "true": True, "none": False, "false": False}


def augmenting(cfg) -> bool:
    return AUGMENT[str(cfg.augment).lower()]


def validate(cfg: DictConfig, command: str) -> None:
    """Range and name checks that types alone cannot express. Raises KdError."""
    load_builtins()
    for key in ("runs_dir", "data_root"):  # empty, a path names the file system's root or the current directory
        _check(str(cfg[key]).strip() != "", f"{key} is empty: give {key}=PATH, or leave it out for the default.")
    _within(cfg, "seed", 0, 2**32 - 1)  # what NumPy's seed takes
    _check_paths(cfg, command)
    if command in ("train_teacher", "distill"):
        _at_least(cfg, "trainer.epochs", 1)
        _at_least(cfg, "trainer.batch_size", 1)
        _at_least(cfg, "trainer.eval_batch_size", 1)
        _at_least(cfg, "trainer.max_batches", 1, nullable=True)
        _at_least(cfg, "trainer.grad_clip", 0, nullable=True, strict=True)
        _at_least(cfg, "optimizer.lr", 0, strict=True)
        _at_least(cfg, "dataset.val_size", 0, strict=True)
        _at_least(cfg, "dataset.limit", 1, nullable=True)
        _at_least(cfg, "dataset.shift", 0)
        _at_least(cfg, "dataset.workers", 0, nullable=True)
        # as many loader processes as asked are started: dataset.workers=1000000 forks without end
        _within(cfg, "dataset.workers", 0, 4 * (os.cpu_count() or 1), nullable=True)
        side = cfg.dataset.get("image_size")  # a shift beyond the image's side moves it out of the frame
        side = side if isinstance(side, int) and not isinstance(side, bool) and side > 0 else 64
        _within(cfg, "dataset.shift", 0, side)
        val_size = cfg.dataset.val_size
        _check(
            isinstance(val_size, (int, float))
            and not isinstance(val_size, bool)
            and (0 < val_size < 1 or (val_size >= 1 and float(val_size).is_integer())),
            f"dataset.val_size must be a count >= 1 or a fraction in (0, 1) (got {val_size!r}).",
        )
        _within(cfg, "dataset.split_seed", 0, 2**32 - 1)  # what NumPy's seed takes
        classes = cfg.dataset.get("classes")
        _check(
            classes is None
            or (OmegaConf.is_list(classes) and all(isinstance(c, (int, str)) and c is not True for c in classes)),
            f"dataset.classes takes a list of class names or indices, e.g. dataset.classes=[0,1,2] (got {classes}).",
        )
        _within(cfg, "trainer.epochs", 1, 1e6)
        _within(cfg, "trainer.batch_size", 1, 1e7)
        storage = cfg.dataset.get("storage", "auto")
        _check(storage in ("auto", "memory", "stream"), f"dataset.storage={storage}: choose auto, memory or stream.")
        _check(
            str(cfg.augment).lower() in AUGMENT,
            f"augment={cfg.augment}: choose standard (the dataset's shifts/flips), affine (also random rotations "
            "of up to 15 degrees and scaling by up to 10 %) or none.",
        )
        _check(
            cfg.get("mix", "none") in MIXES,
            f"mix={cfg.get('mix')}: choose none, mixup (lam * x + (1 - lam) * x[perm]) or cutmix (a box of x[perm]).",
        )
        _at_least(cfg, "mix_alpha", 0, strict=True)
        _within(cfg, "mix_alpha", 0, 1e3)
        _at_least(cfg, "trainer.label_smoothing", 0)
        _at_least(cfg, "trainer.save_every_min", 0, nullable=True, strict=True)
        _check(
            cfg.trainer.nonfinite in ("stop", "skip"),
            f"trainer.nonfinite={cfg.trainer.nonfinite}: choose stop (end the run at a NaN/inf loss) or skip "
            "(skip that step).",
        )
        _check(
            cfg.trainer.get("selection", "last") in SELECTIONS,
            f"trainer.selection={cfg.trainer.get('selection')}: choose last (the end of the schedule), val_acc or "
            "val_nll (the best epoch on the validation split).",
        )
        for key in ("precision", "teacher_precision"):
            value = cfg.trainer.get(key, "fp32")
            *others, last = PRECISIONS
            _check(value in PRECISIONS, f"trainer.{key}={value}: choose {', '.join(others)} or {last}.")
        _check(
            cfg.trainer.label_smoothing < 1,
            f"trainer.label_smoothing must be in [0, 1) (got {cfg.trainer.label_smoothing}).",
        )
        optimizers = ", ".join(OPTIMIZERS)
        _check(cfg.optimizer.name in OPTIMIZERS, f"optimizer.name={cfg.optimizer.name}: choose one of {optimizers}.")
        schedulers = ", ".join(SCHEDULERS)
        _check(cfg.scheduler.name in SCHEDULERS, f"scheduler.name={cfg.scheduler.name}: choose one of {schedulers}.")
        _validate_optimizer(cfg)
        _check(cfg.dataset.name in DATASETS, f"dataset.name={cfg.dataset.name}: {_names(DATASETS)}")
        for role in ["teacher", "student"] if command == "distill" else ["teacher"]:
            _check(cfg[role].name in MODELS, f"{role}.name={cfg[role].name}: {_names(MODELS)}")
    if command in ("train_teacher", "distill"):
        _validate_objective(cfg, command)
    if command == "train_teacher":
        _check(
            cfg.teacher.ckpt is None,
            "teacher.ckpt is for kd distill (a trained teacher to distill from); train-teacher always trains anew.",
        )
    if command == "distill":
        _check(cfg.T > 0, f"T must be > 0 (got {cfg.T}); it divides the logits. Typical values: 1 to 20, default 4.")
        _check(
            0 <= cfg.alpha <= 1,
            f"alpha must be in [0, 1] (got {cfg.alpha}); it weights the hard-label loss, 1 - alpha the KD term.",
        )
        _check(cfg.loss.name in LOSSES, f"loss.name={cfg.loss.name}: {_names(LOSSES)}")
        scale = cfg.get("distill_lr_scale", "auto")
        _check(
            scale == "auto" or (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale <= 100),
            f"distill_lr_scale={scale}: choose auto (optimizer.lr / (alpha + (1 - alpha) * T) for the T^2-scaled "
            "losses kd, soft_ce, dkd, ls) or a factor in (0, 100] on optimizer.lr for distilled models (1: none).",
        )
        _validate_distill(cfg)
    if command == "evaluate":
        _check(cfg.split in ("train", "val", "test"), f"split={cfg.split}: choose one of train, val, test.")
        _at_least(cfg, "eval_batch_size", 1)
        _at_least(cfg, "limit", 1, nullable=True)
    if command == "quantize":
        bad = [m for m in cfg.modes if m not in ("dynamic", "static")]
        _check(not bad and len(cfg.modes) > 0, f"modes={list(cfg.modes)}: choose from dynamic, static.")
        _check(
            cfg.static_format in ("qdq", "qoperator"), f"static_format={cfg.static_format}: choose qdq or qoperator."
        )
        _at_least(cfg, "calibration", 1)
        _at_least(cfg, "limit", 1, nullable=True)
    if command in ("export", "quantize"):
        _check(not (cfg.checkpoint and cfg.run), "Give checkpoint=PATH or run=DIR (its student), not both.")
        _within(cfg, "opset", 18, onnx_opset())
    if command in ("evaluate", "quantize"):
        _at_least(cfg, "latency.batch_size", 1)
        _at_least(cfg, "latency.warmup", 0)
        _at_least(cfg, "latency.repeats", 0)
        _within(cfg, "latency.warmup", 0, 1e4)  # latency.repeats=1000000000 timed for days
        _within(cfg, "latency.repeats", 0, 1e4)
        _within(cfg, "latency.threads", 1, 4 * (os.cpu_count() or 1), nullable=True)  # more only oversubscribes
    if command == "export":
        bad = [f for f in cfg.formats if f not in EXPORT_FORMATS]
        _check(
            not bad and len(cfg.formats) > 0,
            f"formats={list(cfg.formats)}: choose from {', '.join(EXPORT_FORMATS)} (e.g. formats=[onnx,safetensors]).",
        )
        _at_least(cfg, "check_batches", 1)
        _at_least(cfg, "batch_size", 1)
        _at_least(cfg, "atol", 0)


# The keys that name files or folders to read, per command (checked by files.check_path).
PATH_KEYS = {
    "train_teacher": ["data_root", "imports", "dataset.root", "resume"],
    "distill": ["data_root", "imports", "dataset.root", "resume", "teacher.ckpt", "teachers"],
    "evaluate": ["data_root", "imports", "checkpoints", "run", "reference"],
    "export": ["data_root", "imports", "checkpoint", "run", "out_dir"],
    "quantize": ["data_root", "imports", "checkpoint", "run", "out_dir"],
}


def _check_paths(cfg, command: str) -> None:
    from kdcli.core.files import check_path

    for key in PATH_KEYS.get(command, []):
        value = OmegaConf.select(cfg, key)
        values = list(enumerate(value)) if OmegaConf.is_list(value) else [(None, value)]
        for i, v in values:
            if isinstance(v, str) and v and not (key == "resume" and v == "auto"):
                check_path(key if i is None else f"{key}[{i}]", v)


def _within(cfg, key: str, low: float, high: float, nullable: bool = False) -> None:
    """cfg.key must be a number in [low, high] (NaN is not), or null if nullable."""
    value = OmegaConf.select(cfg, key)
    if value is None and nullable:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    null = " or null" if nullable else ""
    _check(ok, f"{key} must be a number in [{low:g}, {high:g}]{null} (got {value!r}).")


def _validate_objective(cfg, command: str) -> None:
    objective = str(cfg.objective)
    search.check(objective)
    role = objective.split(".")[0]
    if command == "train_teacher":
        _check(
            role == "teacher",
            f"objective={objective}: kd train-teacher trains one model, the teacher: objective=teacher.val_acc.",
        )
        return
    _check(
        role != "teacher" or cfg.method.name == "joint",
        f"objective={objective}: kd distill does not train its teacher (but with method=joint), so the teacher "
        "has no validation accuracy here. Use objective=student.val_acc, or search the teacher's recipe with "
        "kd train-teacher.",
    )
    _check(
        role != "scratch" or cfg.baseline or cfg.method.name == "born_again",
        f"objective={objective}: baseline=false trains no scratch student. Use objective=student.val_acc, or "
        "baseline=true.",
    )


def _validate_optimizer(cfg) -> None:
    """The ranges of the optimizer and scheduler keys that torch accepts but that mean nothing
    (a momentum of 2 diverges, and the NaN it leads to would be blamed on lr or T)."""
    given = {f"{group}.{k}" for group in ("optimizer", "scheduler") for k in cfg[group].keys()}
    _check_optimizer_types(cfg.optimizer)
    for key, low, high in (
        ("optimizer.momentum", 0, 1),
        ("optimizer.dampening", 0, 1),
        ("optimizer.weight_decay", 0, 1e3),
        ("scheduler.pct_start", 0, 1),
        ("scheduler.min_lr", 0, 1e3),
        ("scheduler.warmup_epochs", 0, 1e6),
        ("scheduler.step_epochs", 1e-6, 1e6),
        ("scheduler.gamma", 1e-6, 1e3),
    ):
        if key in given:
            _within(cfg, key, low, high)


def _check_optimizer_types(opt: DictConfig) -> None:
    """Each keyword of the torch optimizer of the type its default has: torch's fused kernels
    fail with a traceback on optimizer.nesterov=sometimes."""
    import inspect

    params = inspect.signature(getattr(torch.optim, OPTIMIZERS[opt.name])).parameters
    for key in opt.keys():
        if key == "name" or key not in params:  # an unknown keyword is refused when the optimizer is built
            continue
        default, value = params[key].default, opt[key]
        if isinstance(default, bool) or key in ("foreach", "fused"):
            ok, want = isinstance(value, bool) or (value is None and default is None), "true or false"
        elif isinstance(default, (int, float)):
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif isinstance(default, tuple):
            ok = OmegaConf.is_list(value) and len(value) == len(default)
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            want = f"a list of {len(default)} numbers, e.g. {list(default)}"
        else:
            continue
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        _check(ok, f"optimizer.{key} must be {want} (got {shown!r}).")


def _validate_distill(cfg: DictConfig) -> None:
    sch = cfg.schedule
    for key in ("T", "alpha"):
        _check(sch[key] in SCHEDULES, f"schedule.{key}={sch[key]}: choose one of {', '.join(SCHEDULES)}.")
        _check(
            sch[key] == "constant" or sch[f"{key}_end"] is not None,
            f"schedule.{key}={sch[key]} moves {key} to schedule.{key}_end: set it (e.g. schedule.{key}_end="
            f"{'1' if key == 'T' else '0.5'}).",
        )
    for key in ("T", "alpha"):
        end = sch[f"{key}_end"]
        moving = "|".join(s for s in SCHEDULES if s != "constant")
        _check(
            sch[key] != "constant" or end is None,
            f"schedule.{key}_end={end} has no effect with schedule.{key}=constant; set schedule.{key}={moving} "
            f"(or leave schedule.{key}_end out).",
        )
    _at_least(cfg, "schedule.T_end", 0, nullable=True, strict=True)
    _check(
        sch.alpha_end is None or 0 <= sch.alpha_end <= 1, f"schedule.alpha_end must be in [0, 1] (got {sch.alpha_end})."
    )
    _check(0 <= sch.step_at <= 1, f"schedule.step_at is a fraction of the epochs, in [0, 1] (got {sch.step_at}).")
    _at_least(cfg, "schedule.warmup", 0)
    _at_least(cfg, "confidence_temperature", 0, strict=True)
    _check(
        cfg.teacher_cache in ("auto", "off"),
        f"teacher_cache={cfg.teacher_cache}: choose auto (computed once when the inputs are not augmented) or off.",
    )
    merges = ("auto", "probs", "logits", "conditional")
    _check(cfg.teacher_merge in merges, f"teacher_merge={cfg.teacher_merge}: choose one of {', '.join(merges)}.")
    if cfg.teacher_weights:
        _check(
            len(cfg.teacher_weights) == max(1, len(cfg.teachers)),
            f"teacher_weights has {len(cfg.teacher_weights)} values for {max(1, len(cfg.teachers))} teacher(s): "
            "give one weight per entry of teachers=[...].",
        )
        _check(
            all(w > 0 for w in cfg.teacher_weights), f"teacher_weights must be > 0 (got {list(cfg.teacher_weights)})."
        )
    _check(
        not (cfg.teachers and cfg.teacher.ckpt),
        "Give either teacher.ckpt=PATH (one teacher) or teachers=[PATH,...] (several), not both.",
    )
    _at_least(cfg, "transfer.freeze_epochs", 0, nullable=True)
    _check(
        cfg.transfer.freeze_epochs is None or len(cfg.transfer.freeze) > 0,
        "transfer.freeze_epochs applies to the modules in transfer.freeze=[...]; name them.",
    )
    for name in cfg.features or {}:
        _check(name in FEATURE_LOSSES, f"features.{name}: {_names(FEATURE_LOSSES)}")
    _validate_prune(cfg.prune)
    method = cfg.method
    _check(method.name in METHODS, f"method.name={method.name}: choose one of {', '.join(METHODS)}.")
    if method.name == "dml":
        _at_least(cfg, "method.peers", 2)
        _within(cfg, "method.peers", 2, 64)
    if method.name == "born_again":
        _at_least(cfg, "method.generations", 1)
        _within(cfg, "method.generations", 1, 100)
    if method.name == "ta":
        _check(
            OmegaConf.is_list(method.assistants) and len(method.assistants) > 0,
            f"method.assistants takes a list of model names, e.g. [lenet5] (got {method.assistants}).",
        )
        for name in method.assistants:
            _check(name in MODELS, f"method.assistants: '{name}' is an {_names(MODELS)}")


def _validate_prune(p: DictConfig) -> None:
    """The schedule's own ranges; whether end_step fits the run is checked once the steps are known."""
    _check(p.kind in PRUNE_KINDS, f"prune.kind={p.kind}: choose one of {', '.join(PRUNE_KINDS)}.")
    _check(
        0 <= p.initial <= p.final < 1,
        f"prune.initial={p.initial} and prune.final={p.final} must satisfy 0 <= initial <= final < 1 (shares of "
        "each layer's weights set to zero). Fix: e.g. prune.initial=0.5 prune.final=0.75.",
    )
    _check(p.start_step >= 0, f"prune.start_step={p.start_step} must be >= 0 (training steps before pruning starts).")
    _check(
        p.end_step is None or p.end_step > p.start_step,
        f"prune.end_step={p.end_step} must be after prune.start_step={p.start_step}. Fix: a larger prune.end_step, "
        "or null (75 % of the run).",
    )
    _check(p.every >= 1, f"prune.every={p.every} must be >= 1 (training steps between mask updates).")
    _check(p.power > 0, f"prune.power={p.power} must be > 0 (exponent of the schedule; the paper uses 3).")


def onnx_opset() -> int:
    """The newest ONNX opset the installed onnx package can write."""
    import onnx.defs

    return onnx.defs.onnx_opset_version()


def _names(registry) -> str:
    return f"unknown {registry.kind}. Available: {', '.join(registry.names())}."
