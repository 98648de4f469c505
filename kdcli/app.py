"""Turns a command's `run(cfg, ctx) -> dict` into a Hydra app.

The wrapper does what every command needs: import the user's modules, validate the config,
resolve the device, seed, write the resolved config, and always leave a metrics.json with a
`status` (completed, failed or interrupted) in the run directory, so a sweep can be summarised
whatever happened.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import signal
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from kdcli.config import resolve_device, search, validate
from kdcli.core import distributed, interrupt
from kdcli.core.errors import KdError
from kdcli.core.files import check_makeable, shown, write_json, write_text
from kdcli.core.registry import import_user_modules
from kdcli.core.run import Context, plain  # noqa: F401  (Context: the run each command gets)
from kdcli.report import console, error
from kdcli.training import resume

log = logging.getLogger("kdcli")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this to be deterministic (read when its first handle is made): set it unless the user did
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


def full_error() -> bool:
    """HYDRA_FULL_ERROR=1 asks for tracebacks, ours included."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


class Outcome:
    """Set by the task; read by the command line after Hydra returns (single runs)."""

    failed = False


class ForeignRun(KdError):
    """The run directory holds another configuration's run: refused, and left as it is."""


def _check_same_config(cfg: DictConfig, run_dir: Path) -> None:
    """Results or a state are reused in place only for the configuration that made them."""
    f = run_dir / "config.yaml"
    if not f.is_file():
        return
    diff = resume.config_diff(OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(OmegaConf.load(f)))
    if diff:
        raise ForeignRun(
            f"resume: {run_dir} holds a run of another configuration ({'; '.join(diff[:5])}), which is not "
            "continued or reused. Give the sweep or run a new directory, or the overrides it was run with."
        )


def _resume_source(cfg: DictConfig, command: str, run_dir: Path) -> Path | None:
    """The unfinished run that resume= continues (run_dir itself when it holds a training
    state, as when a sweep is re-run in its own directory), or None to start afresh."""
    value = OmegaConf.select(cfg, "resume")
    if value is None:
        return None
    if resume.has_state(run_dir):  # its configuration was checked on arrival
        return run_dir
    current = OmegaConf.to_container(cfg, resolve=True)
    if value == "auto":
        source = resume.find_unfinished(cfg.runs_dir, command, current, run_dir.resolve())
        if source is None:
            log.info(
                f"resume   no unfinished {command} run of this configuration under {cfg.runs_dir}: starting afresh"
            )
        return source
    source = resume.run_dir_of(value)
    metrics = resume.read_metrics(source)
    if metrics.get("status") == "completed":
        raise KdError(f"resume={value}: that run completed; there is nothing to continue. Its results: {source}.")
    if metrics.get("status") == "resumed":
        raise KdError(
            f"resume={value}: that run was already continued in {metrics.get('resumed_in')}; "
            "resume that one (or use resume=auto)."
        )
    if resume.alive(metrics):
        raise KdError(f"resume={value}: that run is not continued: {resume.still_running(metrics, source)}")
    diff = resume.config_diff(current, OmegaConf.to_container(OmegaConf.load(source / "config.yaml")))
    if diff:
        raise KdError(
            f"resume={value}: this run's configuration differs from that run's ({'; '.join(diff[:5])}). "
            "A run continues with its own configuration: drop the overrides that change it."
        )
    return source


RESUMABLE = ("train_teacher", "distill")  # the commands that take resume=


def _stop_hint(command: str, run_dir: Path, multirun: bool) -> str:
    name = command.replace("_", "-")
    if command not in RESUMABLE:  # nothing to continue: the command starts again from its inputs
        again = "the sweep" if multirun else f"the same kd {name} command"
        return f"To finish: run {again} again (kd {name} starts over; it has no resume=)."
    if multirun:
        return (
            f"To continue: re-run the sweep with hydra.sweep.dir={run_dir.parent} resume=auto "
            "(finished jobs are kept, unfinished ones continue)."
        )
    if distributed.active():  # any number of processes continues it: the batches are split, not changed
        return f"To continue: torchrun --nproc_per_node={distributed.world()} -m kdcli {name} resume={run_dir}"
    return f"To continue: kd {name} resume={run_dir}"


def run_record(command: str, overrides: list[str], **extra) -> dict:
    """The metrics.json of a run as it starts (kd commands and kdcli.api alike); pid, its start
    time and host tell whether it still runs (resume.alive)."""
    return {
        "command": command,
        **extra,
        "status": "running",
        "overrides": overrides,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "pid_started": resume.process_start(os.getpid()),  # with the pid, names this process (pids are reused)
        "host": socket.gethostname(),
    }


def finisher(run_dir: Path, metrics: dict) -> Callable[..., dict]:
    """finish(status, **figures): the run's outcome and time into metrics.json. A failed write
    (a full disk) is a warning: it must not replace the run's own outcome or error."""
    t0 = time.perf_counter()

    def finish(status: str, **extra) -> dict:
        extra = {k: plain(v) if isinstance(v, str) else v for k, v in extra.items()}
        metrics.update(extra, status=status, elapsed_s=round(time.perf_counter() - t0, 3))
        try:
            write_json(run_dir / "metrics.json", metrics)
        except (KdError, OSError) as e:
            log.warning(f"warning  could not write {run_dir / 'metrics.json'}: {e}")
        return metrics

    return finish


def run_task(command: str, run: Callable[[DictConfig, Context], dict], cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    logging.raiseExceptions = False  # a full disk must not turn every log line into a traceback
    previous = distributed.decided_by_main(lambda: resume.read_metrics(run_dir))  # read before rank 0 writes there
    metrics = run_record(command, list(hc.overrides.task))
    finish = finisher(run_dir, metrics)

    with interrupt.handled():
        try:
            import_user_modules(cfg.imports)
            validate(cfg, command)
            completed = previous.get("status") == "completed"
            if OmegaConf.select(cfg, "resume") is not None and (completed or resume.has_state(run_dir)):
                _check_same_config(cfg, run_dir)  # reused in place (a sweep re-run in its own directory)
                if completed:
                    console.print(f"Already completed: {run_dir} (resume=auto keeps it)")
                    return previous
            write_json(run_dir / "metrics.json", metrics)  # a run killed outright still says "running"
            device = distributed.device_for(resolve_device(cfg.device))
            ctx = Context(run_dir, device, multirun, metrics=metrics)
            if distributed.active():
                metrics["processes"] = distributed.world()
            with interrupt.training():  # a signal while taking over a run takes effect once it is taken over
                source = distributed.decided_by_main(lambda: _resume_source(cfg, command, run_dir))
                if source is None:
                    resume.clear_states(run_dir)  # an earlier run's states in this directory are not continued
                else:
                    ctx.resume, ctx.previous = True, resume.read_metrics(source) if source != run_dir else previous
                    if source != run_dir:
                        resume.adopt(source, run_dir)
                        metrics["resumed_from"] = str(source)
                        log.info(f"resume   continuing {source} in {run_dir}")
                    for key in ("teacher_run", "teacher_checkpoints", "storage"):
                        if key in ctx.previous:
                            metrics[key] = ctx.previous[key]
                    write_json(run_dir / "metrics.json", metrics)
            distributed.barrier()  # several processes: rank 0 has taken the run over (its states are in place)
            interrupt.check()
            write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            seed_everything(int(cfg.seed), bool(OmegaConf.select(cfg, "trainer.deterministic", default=False)))
            result = run(cfg, ctx)
            if command in search.COMMANDS:
                result["objective"] = _objective(str(cfg.objective), {**metrics, **result})
            finish("completed", **result)
            console.print(f"Run directory: {run_dir}")
            return metrics
        except KdError as e:
            if interrupt.raised() is not None:  # a library wrapped the signal's interrupt in its own error
                _interrupted(interrupt.raised(), command, run_dir, multirun, finish)
            error(str(e))
            if not isinstance(e, ForeignRun):  # that directory's own record stays as it is
                finish("failed", error=str(e))
            Outcome.failed = True
            if multirun:
                return metrics
            if full_error():
                raise
            raise SystemExit(1) from None
        except KeyboardInterrupt as e:
            signum = e.signum if isinstance(e, interrupt.Interrupted) else signal.SIGINT
            _interrupted(signum, command, run_dir, multirun, finish)
        except Exception as e:
            if interrupt.raised() is not None:
                _interrupted(interrupt.raised(), command, run_dir, multirun, finish)
            finish("failed", error=f"{type(e).__name__}: {e}")
            Outcome.failed = True
            if multirun:
                log.exception("job failed")
                return metrics
            raise


def _objective(key: str, metrics: dict) -> dict:
    """The objective's record in metrics.json (the sweep summary names the best job by it)."""
    found = search.value(metrics, key)
    if found is None:
        log.warning(
            f"warning  objective={key}: this run recorded no such figure, so a sweeper gets none (a failed trial). "
            f"Figures it recorded: {', '.join(search.recorded(metrics)) or 'none'}."
        )
    return {"key": key, "value": found, "direction": search.direction(key)}


# Hydra flags that print and exit: no run directory is made.
_PRINT_ONLY = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}


def check_before_start(command: str, args: list[str]) -> None:
    """What Hydra would trip over before any of kdcli's code runs, as one error: an interpolation
    that does not resolve (a traceback), and a run directory that cannot be made (Hydra makes it
    first, so runs_dir= would write at the file system's root and a file or a read-only folder
    would end in a traceback). Reported like a failed run: one error, exit 1 (SystemExit)."""
    try:
        _check_start(command, args, print_only=bool(_PRINT_ONLY & set(args)))
    except KdError as e:
        if full_error():
            raise
        error(str(e))
        raise SystemExit(1) from None


# Hydra's ways to run a command: one at a time (it raises a ValueError for two).
_MODES = {"-m": "-m", "--multirun": "-m", "-r": "--run", "--run": "--run", "-c": "--cfg", "--cfg": "--cfg"}
_MODES |= {"-i": "--info", "--info": "--info", "-sc": "--shell-completion", "--shell-completion": "--shell-completion"}


def _check_start(command: str, args: list[str], print_only: bool = False) -> None:
    modes = sorted({_MODES[a] for a in args if a in _MODES})
    if len(modes) > 1:
        raise KdError(f"{' and '.join(modes)} do not go together: give one of -m, --cfg, --info, --shell-completion.")
    multirun = bool({"-m", "--multirun"} & set(args))
    cfg = _composed(command, args, multirun)
    if print_only:  # --cfg job, --help: nothing is written
        return
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    _resolved(cfg, "runs_dir")  # named first: the run directory's own value is made of it
    run_dir = _resolved(cfg, key)
    with open_dict(cfg):
        cfg.pop("hydra")
    _resolved(cfg, None)
    for name in ("runs_dir", "data_root"):
        if not str(cfg[name]).strip():
            raise KdError(
                f"{name} is empty: it is the folder {'runs are written' if name == 'runs_dir' else 'datasets are'} "
                f"under. Give {name}=PATH, or leave it out for the default."
            )
    given = any(a.startswith(f"{key}=") for a in args)
    if not str(run_dir).strip():
        raise KdError(f"{key} is empty: it is the run's own folder. Leave it out (runs go under runs_dir) or give one.")
    check_makeable(Path(run_dir).expanduser(), key if given else "runs_dir")


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def _composed(command: str, args: list[str], multirun: bool) -> DictConfig:
    """The config this command line composes (sweeps left out), Hydra's keys included; with -m,
    each value of each sweep is composed too. What Hydra would refuse with a traceback (or with
    its message and no `error:`) is a KdError: a value of the wrong type, a sweep without -m, a
    sweep that the basic sweeper cannot run."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdcli.overrides import _overrides, search_path

    parsed = OverridesParser.create().parse_overrides(_overrides(args))  # the front parsed them already
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        key = sweeps[0].key_or_group
        raise KdError(
            f"'{shown(sweeps[0].input_line)}' is a sweep: add -m to run one job per value. For one value that is "
            f"a list, give {key}=[a,b]; for a string with commas, quote it: {key}='a,b'."
        )
    for o in parsed:  # "???" marks a value that must be given: Hydra's own keys would crash on it at the start
        if not o.is_sweep_override() and o.get_value_element_as_str() == "???":
            raise KdError(
                f"'{shown(o.input_line)}': ??? is OmegaConf's mark of a missing value; give {o.key_or_group} a value."
            )
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    fixed = [o for o in fixed if not o.startswith("hydra.searchpath=")] + search_path(args, parsed)
    with initialize_config_module(config_module="kdcli.configs", version_base="1.3", job_name=command):
        cfg = _compose_or_explain(command, fixed)
        for o in sweeps:
            o.config_loader = GlobalHydra.instance().config_loader()  # a glob sweep lists a group's options
            if o.is_interval_sweep():
                if OmegaConf.select(cfg, "hydra.sweeper._target_") == BASIC_SWEEPER:
                    raise KdError(
                        f"'{o.input_line}': Hydra's basic sweeper runs listed values and cannot sample an interval. "
                        f"List the values instead: -m {o.key_or_group}=0.5,1,2 (or {o.key_or_group}=range(1,5))."
                    )
                continue
            for value in itertools.islice(o.sweep_string_iterator(), 100):  # each job's value composes too
                _compose_or_explain(command, [*fixed, f"{o.get_key_element()}={value}"])
    size = OmegaConf.select(cfg, "hydra.sweeper.max_batch_size", default=None)
    if multirun and size is not None and not (isinstance(size, int) and size >= 1):
        raise KdError(
            f"hydra.sweeper.max_batch_size={size}: give the number of jobs launched at a time (>= 1), or null for "
            "all of them at once."
        )
    return cfg


def _compose_or_explain(command: str, overrides: list[str]) -> DictConfig:
    from hydra import compose

    try:
        return compose(config_name=command, overrides=overrides, return_hydra_config=True)
    except Exception as e:  # Hydra's message, and OmegaConf's first line under it: the key and the type
        what = " ".join(str(e).split()) or type(e).__name__
        what = what.removeprefix("Error merging override ")
        cause = str(e.__cause__).splitlines()[0].strip(" .") if e.__cause__ is not None and str(e.__cause__) else ""
        raise KdError(
            f"{shown(what, 200)}{f': {cause}' if cause else ''}. Give each key a value of its type "
            f"(kd {command.replace('_', '-')} --cfg job shows them)."
        ) from None


def _resolved(cfg: DictConfig, key: str | None):
    """cfg's value at `key` (all of cfg if None), resolved; an interpolation that fails is a KdError naming its key."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.select(cfg, key) if key else OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        where = getattr(e, "full_key", None) or key
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "HydraConfig" in str(e):
            return None  # ${hydra:...} resolves only once Hydra runs the job: not ours to judge here
        raise KdError(
            f"{where}: its value does not resolve ({cause}). Give a plain value, or an interpolation that resolves "
            "(e.g. ${oc.env:NAME,default} for an environment variable that may be unset)."
        ) from None


def _interrupted(signum: int, command: str, run_dir: Path, multirun: bool, finish) -> None:
    """End the run on a signal: metrics.json says interrupted and how to go on; exit 128 + signum."""
    interrupt.stopping()
    hint = _stop_hint(command, run_dir, multirun)
    name = signal.Signals(signum).name
    finish("interrupted", signal=name, resume=hint)
    console.print(f"[yellow]Interrupted ({name}).[/yellow] {hint}", highlight=False, soft_wrap=True)
    raise SystemExit(128 + signum) from None


def hydra_app(command: str, run: Callable[[DictConfig, Context], dict]) -> Callable[[], None]:
    """The Hydra main function for `command`, whose primary config is configs/<command>.yaml."""

    @hydra.main(version_base="1.3", config_path="pkg://kdcli.configs", config_name=command)
    def main(cfg: DictConfig) -> float | search.NoValue | None:
        metrics = run_task(command, run, cfg)
        # What an optimising sweeper reads (Optuna: the trial's value)
        return search.for_sweeper(metrics, str(cfg.objective)) if command in search.COMMANDS else None

    return main
