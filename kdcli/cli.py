"""`kd`: a thin front that maps a subcommand to its Hydra app (or to `list`).

Everything after the subcommand goes to Hydra untouched, so overrides, -m sweeps, --cfg job,
--help and launcher plugins all work. Before handing over, the front imports the user's
modules (`imports=...`) so their models appear as teacher/student options, and checks that
each override names a key that exists, to answer a typo with the keys that do.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from kdcli.core.errors import KdError
from kdcli.overrides import _checked, _flags_first, _overrides, resumed_overrides
from kdcli.report import error

if TYPE_CHECKING:
    from omegaconf import DictConfig

COMMANDS = {
    "train-teacher": ("train_teacher", "train a teacher model on a dataset"),
    "distill": ("distill", "distill a teacher into a student (and train the student from scratch to compare)"),
    "evaluate": ("evaluate", "compare models side by side: accuracy, calibration, agreement, size, latency"),
    "export": ("export", "export a model (TorchScript, ONNX, torch.export, safetensors), each checked"),
    "quantize": ("quantize", "int8 quantization (dynamic, static) with the accuracy, size and latency change"),
    "list": ("list", "list the registered models, losses and datasets"),
    "report": ("report", "summarise an existing sweep directory (or one run directory) again"),
}

USAGE = "usage: kd <command> [key=value ...] [-m] [--cfg job] [--help]"


def _help() -> str:
    lines = [USAGE, "", "Knowledge distillation for PyTorch. Commands:"]
    lines += [f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items()]
    lines += [
        "",
        "`kd <command> --help` shows a command's config groups and keys.",
        "Quick start: kd distill   (teacher=convnet student=mlp on the embedded mnist5k)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"kdcli {version('kdcli')}")
        return 0
    name, args = argv[0], argv[1:]
    if name in ("--shell-completion", "-sc"):  # Hydra's flag, which belongs to a command's app
        print(f"kd: shell completion is per command: kd <command> --shell-completion install=bash\n\n{USAGE}")
        return 2
    if name not in COMMANDS:
        from kdcli.core.registry import did_you_mean

        print(f"kd: unknown command '{name}'.{did_you_mean(name, COMMANDS)}\n\n{_help()}", file=sys.stderr)
        return 2
    command = COMMANDS[name][0]
    try:
        if command == "list":
            from kdcli.commands import list_cmd

            return list_cmd.main(args)
        if command == "report":
            from kdcli.commands import report_cmd

            return report_cmd.main(args)
        if command in ("train_teacher", "distill"):
            args = resumed_overrides(args)
        if command == "distill":  # teacher_train starts empty: its keys are added (++: also when resume= gave them)
            args = [f"++{a}" if a.startswith("teacher_train.") else a for a in args]
            # experiment is in the defaults list (experiment=NAME); Hydra's docs write +experiment=NAME for it
            args = [a[1:] if a.startswith("+experiment=") else a for a in args]
        args = _flags_first(args)
        smoke, cfg = _checked(command, args)
        if smoke:  # right after debug=smoke, among the other overrides (argparse wants them together)
            at = args.index("debug=smoke") + 1
            args = args[:at] + smoke + args[at:]
        args = _with_sweeper_overrides(command, args, cfg)
    except KdError as e:
        from kdcli.app import full_error

        if full_error():
            raise
        error(str(e))
        return 1

    from kdcli.app import Outcome, check_before_start, hydra_app
    from kdcli.core import distributed
    from kdcli.report import SweepSummary

    try:
        if distributed.launched():
            args = _join_processes(name, command, args)
    except KdError as e:
        error(str(e))
        return 1
    module = importlib.import_module(f"kdcli.commands.{command}")
    sys.argv = [f"kd {name}", *args]
    try:
        check_before_start(command, args)
        hydra_app(command, module.run)()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if code == 1:  # not a signal's exit (128 + n), which says how to go on by itself
            SweepSummary.stopped()
        return code
    finally:
        distributed.close()
    return 1 if (Outcome.failed or SweepSummary.failed) else 0


def _with_sweeper_overrides(command: str, args: list[str], cfg: DictConfig) -> list[str]:
    """args with what an optimising sweeper needs (kdcli/config/search.py), right after its hydra/sweeper= choice."""
    from kdcli.config import search

    overrides = _overrides(args)
    given = search.override_value(overrides, "objective")
    objective = given if given is not None and "," not in given else str(cfg.get("objective", ""))
    added = search.sweeper_overrides(command, overrides, objective)
    if not added:
        return args
    at = max(i for i, a in enumerate(args) if "hydra/sweeper=" in a) + 1
    return args[:at] + added + args[at:]


def _join_processes(name: str, command: str, args: list[str]) -> list[str]:
    """Started by torchrun: join the process group, and make every rank's run one run: rank 0's
    time stamp names the run directory of all; the other ranks write no files and log only errors."""
    from datetime import datetime

    from kdcli.core import distributed
    from kdcli.report import console

    if command not in ("train_teacher", "distill"):
        raise KdError(
            f"kd {name} runs in one process; torchrun (several processes) is for kd train-teacher and kd distill."
        )
    if any(a in ("-m", "--multirun") for a in args):
        raise KdError(
            "A sweep (-m) does not run under torchrun: run each configuration with torchrun in turn, or sweep "
            "without torchrun (hydra/launcher=joblib runs jobs in parallel)."
        )
    distributed.init()
    stamp = distributed.same(datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f"))
    if not any(o.startswith("hydra.run.dir=") for o in _overrides(args)):
        args = [*args, f"hydra.run.dir=${{runs_dir}}/${{hydra.job.name}}/{stamp}"]
    if distributed.rank() > 0:
        console.quiet = True
        args = [
            *args,
            "hydra.output_subdir=null",
            "hydra.job_logging.root.handlers=[console]",
            "hydra.job_logging.root.level=ERROR",
        ]
    return args


def entry() -> None:
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C outside a run (start-up, a launcher, the summary): no traceback
        print("\nInterrupted.", file=sys.stderr)
        code = 130
    sys.exit(code)
