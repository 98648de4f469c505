"""A command's config composed as `kd <command> <overrides>` would compose it, from Python:
for kdcli.api, and for the teacher that `kd distill` trains with `kd train-teacher`'s recipe."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig

from kdcli.config import validate
from kdcli.errors import KdError


@contextlib.contextmanager
def hydra_set_aside() -> Iterator[None]:
    """Hydra may be initialised already (a notebook's own configs, or the running `kd` app): set
    that aside while kdcli composes another command's config, and put it back after."""
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    theirs = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        yield
    finally:
        GlobalHydra.instance().clear()
        if theirs is not None:
            GlobalHydra.instance().initialize(theirs)


def compose_command(
    command: str, overrides: list[str], smoke_filter: Callable[[str], bool] = lambda o: True
) -> DictConfig:
    """The command's config after the command line's own checks (unknown keys and group options
    are named with the ones that exist); `debug=smoke` adds its overrides that pass smoke_filter."""
    from hydra import compose, initialize_config_module

    from kdcli.cli import _prepare
    from kdcli.registry import import_user_modules

    with hydra_set_aside():
        smoke = [o for o in _prepare(command, overrides) if smoke_filter(o)]  # also registers the configs
        with initialize_config_module(config_module="kdcli.configs", version_base="1.3", job_name=command):
            try:
                cfg = compose(config_name=command, overrides=overrides + smoke)
            except Exception as e:  # a value of the wrong type: Hydra's message, as kd prints it
                raise KdError(str(e)) from None
    import_user_modules(cfg.imports)
    validate(cfg, command)
    return cfg


def fmt(value: Any) -> str:
    """A Python value as the value of a Hydra override (`key=<this>`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        raise KdError(f"{value!r}: a config value is a number, string, bool, None, list or dict.")
    parser = OverridesParser.create()
    for text in (value, "'" + value.replace("'", "\\'") + "'"):  # as is, else quoted
        try:
            if parser.parse_override(f"k={text}").value() == value:
                return text
        except Exception:  # not valid override syntax: try the next form
            continue
    raise KdError(f"{value!r} cannot be written as a config value.")


def as_overrides(key: str, value: Any) -> list[str]:
    """key=value as overrides; a dict sets its keys one by one, its "name" picking the group
    option (loss={"name": "dkd", "nckd": 4} -> loss=dkd loss.nckd=4)."""
    if not isinstance(value, Mapping):
        return [f"{key}={fmt(value)}"]
    out = [f"{key}={fmt(value['name'])}"] if "name" in value else []
    for k, v in value.items():
        if k != "name":
            out += as_overrides(f"{key}.{k}", v)
    return out
