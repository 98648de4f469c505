"""A command's config composed as `kd <command> <overrides>` would compose it, from Python:
for kdcli.api, and for the teacher that `kd distill` trains with `kd train-teacher`'s recipe."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from omegaconf import DictConfig

from kdcli.config import validate
from kdcli.core.errors import KdError
from kdcli.overrides import _prepare


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

    from kdcli.core.registry import import_user_modules

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
