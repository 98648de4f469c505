"""The command line checked against the composed config before Hydra starts: each override must name
a key or a group option that exists (a typo is answered with the ones that do), `imports=` and the
plugins are loaded, resume= and --config-dir are read. Used by the `kd` front (kdcli/cli.py) and by
kdcli/compose.py (a command's config from Python)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.core.errors import KdError
from kdcli.core.files import shown

if TYPE_CHECKING:
    from omegaconf import DictConfig

# Hydra flags that take a value in the next argument (--info only optionally).
_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
}
_INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def _is_override(args: list[str]) -> list[bool]:
    """Which of Hydra's command-line arguments are overrides (not flags, not a flag's value)."""
    out, previous = [], ""
    for a in args:
        takes_value = previous in _FLAGS_WITH_VALUE or (previous in ("--info", "-i") and a in _INFO_VALUES)
        out.append(not takes_value and not a.startswith("-"))
        previous = a
    return out


def _config_dir(args: list[str]) -> str | None:
    """The value of -cd/--config-dir DIR (or --config-dir=DIR); the last one counts, as in argparse."""
    found, previous = None, ""
    for a in args:
        if previous in ("-cd", "--config-dir"):
            found = a
        elif a.startswith("--config-dir="):
            found = a.split("=", 1)[1]
        previous = a
    return found


def search_path(args: list[str], parsed: list) -> list[str]:
    """The search path that Hydra adds to the packaged configs for this command line, as an
    override for the compose API: -cd DIR first (Hydra puts it before the hydra.searchpath
    entries), then hydra.searchpath=[...]. [] for none."""
    import os

    entries = []
    folder = _config_dir(args)
    if folder is not None:
        if not os.path.isdir(folder):
            raise KdError(
                f"--config-dir {folder}: no such directory. It adds a folder of your configs to the packaged ones "
                "(DIR/student/NAME.yaml is student=NAME, DIR/experiment/NAME.yaml is experiment=NAME)."
            )
        entries.append(f"file://{os.path.abspath(folder)}")
    given = [o for o in parsed if o.key_or_group == "hydra.searchpath" and not o.is_sweep_override()]
    if given:  # Hydra reads the first one
        value = given[0].value()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise KdError(
                f"'{given[0].input_line}': hydra.searchpath takes a list of config folders, e.g. "
                "hydra.searchpath=[file:///path/to/configs] (or -cd /path/to/configs)."
            )
        entries += value
    if not entries:
        return []
    return [f"hydra.searchpath={fmt(entries)}"]


def _overrides(args: list[str]) -> list[str]:
    """The override arguments among Hydra's command-line arguments."""
    return [a for a, o in zip(args, _is_override(args)) if o]


def _flags_first(args: list[str]) -> list[str]:
    """The flags (with their values), then the overrides in their order: Hydra's argparse takes the
    overrides as one run of arguments, so `kd distill T=1 -m alpha=0.5` would be a usage error."""
    marks = _is_override(args)
    return [a for a, o in zip(args, marks) if not o] + [a for a, o in zip(args, marks) if o]


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise KdError(f"{e} (overrides look like key=value, group=option or key=[a,b]).") from None


def _prepare(command: str, args: list[str]) -> list[str]:
    """Import user modules and register configs, then check every override against the
    composed config, so a typo is answered with the keys or options that exist. Returns the
    overrides that `debug=smoke` stands for (see SMOKE in kdcli/config/__init__.py)."""
    return _checked(command, args)[0]


def _checked(command: str, args: list[str]) -> tuple[list[str], DictConfig]:
    """_prepare's work; also returns the config composed from the command line's group choices."""
    from kdcli.config import register_configs
    from kdcli.core.registry import import_user_modules, load_builtins, load_plugins

    parsed = _parse(_overrides(args))
    extra = search_path(args, parsed)
    if command in ("train_teacher", "distill"):
        _check_resume(command, parsed)
    for o in parsed:
        if o.key_or_group == "imports" and not o.is_sweep_override():
            if not isinstance(o.value(), list):
                raise KdError(f"imports takes a list: imports=[{o.get_value_element_as_str()}].")
            import_user_modules(o.value())
    load_builtins()
    load_plugins()
    register_configs()
    return _check_overrides(command, parsed, extra)


def resumed_overrides(args: list[str]) -> list[str]:
    """With resume=RUN_DIR, that run's own overrides come first, so `kd distill resume=DIR`
    continues the run as it was configured; the ones given now follow (and must agree)."""
    given = [a for a in _overrides(args) if a.startswith("resume=")]
    value = given[-1].split("=", 1)[1] if given else None
    if value in (None, "auto", "null") or "," in value:
        return args
    import yaml

    from kdcli.training.resume import run_dir_of

    f = run_dir_of(value) / ".hydra" / "overrides.yaml"
    before = [o for o in (yaml.safe_load(f.read_text()) or []) if not o.startswith("resume=")] if f.is_file() else []
    return before + args


def _check_resume(command: str, parsed: list) -> None:
    for o in parsed:
        if o.key_or_group == "resume" and o.is_sweep_override():
            raise KdError(
                "resume= takes one run directory or auto, not a sweep. To finish a sweep, re-run it with "
                "hydra.sweep.dir=<its directory> resume=auto."
            )


def _values(o) -> list[str]:
    return list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]


def _collapse_families(options: list[str]) -> list[str]:
    """Group options: a family of models (tv_*) shows as one entry."""
    from kdcli.core.registry import MODELS

    prefixes = MODELS.families()
    kept = [o for o in options if not any(o.startswith(p) for p in prefixes)]
    return kept + MODELS.family_entries(p for p in prefixes if any(o.startswith(p) for o in options))


def _check_overrides(command: str, parsed: list, extra: list[str] = ()) -> tuple[list[str], DictConfig]:
    """extra: the search path override (search_path), so that the user's config folders are
    composed with the packaged configs as Hydra composes them."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.types import OverrideType
    from omegaconf import DictConfig, OmegaConf

    from kdcli.config import SMOKE
    from kdcli.core.registry import did_you_mean

    name = f"kd {command.replace('_', '-')}"
    ours = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    extra = list(extra)
    with initialize_config_module(config_module="kdcli.configs", version_base="1.3", job_name=command):
        loader = GlobalHydra.instance().config_loader()
        for o in parsed:  # a glob sweep (student=glob(res*)) lists the group's options through it
            o.config_loader = loader
        try:
            cfg = compose(config_name=command, overrides=extra, return_hydra_config=True)
        except Exception as e:  # a user's config folder whose YAML does not compose
            raise KdError(f"{name}: the config does not compose: {e}") from None
        groups = {g for g in cfg.hydra.runtime.choices if not g.startswith("hydra")}
        known = {k for k in cfg if k != "hydra"} | groups
        group_options = {g: loader.get_group_options(g) for g in groups}
        selections = []
        for o in ours:
            top = o.key_or_group.split(".")[0]
            # +group=option adds a group that the defaults do not list: one of the user's config folders
            added = o.type == OverrideType.ADD and bool(
                loader.get_group_options(o.key_or_group, config_name=command, overrides=extra)
            )
            if top not in known and not added:
                raise KdError(
                    f"Unknown key '{top}' in '{o.input_line}'.{did_you_mean(top, known)} "
                    f"Keys of {name}: {', '.join(sorted(known))}."
                )
            if o.type == OverrideType.DEL:
                raise KdError(f"'{o.input_line}': {name} needs {o.key_or_group}; set another value instead.")
            if o.key_or_group in groups or added:
                options = loader.get_group_options(o.key_or_group, config_name=command, overrides=extra)
                if not _values(o):  # a glob that matches no option
                    raise KdError(
                        f"'{o.input_line}' matches no {top} option. Options for {top}: "
                        f"{', '.join(_collapse_families(options))}."
                    )
                for value in _values(o):
                    # A group may take several options at once: features=[at,rkd].
                    for v in value.strip("[]").split(",") if value.startswith("[") else [value]:
                        if (v == "null" and top in ("debug", "features")) or v == "":
                            continue
                        if v not in options:
                            raise KdError(
                                f"Unknown {top} '{v}'.{did_you_mean(v, options)} "
                                f"Options for {top}: {', '.join(_collapse_families(options))}."
                            )
                selections.append(f"{'+' if o.type == OverrideType.ADD else ''}{o.key_or_group}={_values(o)[0]}")
        try:
            cfg = compose(config_name=command, overrides=selections + extra)
        except Exception as e:  # e.g. a user's YAML that does not compose
            raise KdError(f"{name}: the config does not compose: {e}") from None
    for o in ours:
        # teacher_train.* are kd train-teacher's keys, checked when the teacher's recipe is composed
        if "." not in o.key_or_group or o.key_or_group.startswith("teacher_train."):
            continue
        _check_nesting(cfg, o.key_or_group, group_options, add=o.type == OverrideType.ADD)
        parent, leaf = o.key_or_group.rsplit(".", 1)
        node = OmegaConf.select(cfg, parent)
        if not isinstance(node, DictConfig) or leaf in node.keys():  # `in node` is False for ??? values
            continue
        # `+` may add a keyword that the torch optimizer takes (checked when it is built); any
        # other unknown key would be ignored, so it is refused like a typo.
        if o.type == OverrideType.ADD and parent == "optimizer":
            continue
        keys = list(node.keys())
        hint = did_you_mean(leaf, keys).replace("'", f"'{parent}.", 1)
        raise KdError(f"Unknown key '{o.key_or_group}'.{hint} Keys of {parent}: {', '.join(keys) or '(none)'}.")
    _check_bools(cfg, [o for o in ours if o.key_or_group not in groups])
    if command == "distill":
        _check_one_teacher_source(ours)
    if not any(o.key_or_group == "debug" and _values(o) == ["smoke"] for o in ours):
        return [], cfg
    given = {o.key_or_group for o in ours}
    smoke = [
        f"{k}={v}" for k, v in SMOKE.items() if k not in given and OmegaConf.select(cfg, k, default="<no>") != "<no>"
    ]
    return smoke, cfg


def _check_nesting(cfg, key: str, options: dict, add: bool) -> None:
    """a.b.c=... where a or a.b is a list or a value, which has no keys (formats.sub=x, T.x=1), or
    where a.b does not exist (features.at.weight=1 before features=at is chosen)."""
    from omegaconf import DictConfig, OmegaConf

    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix, part = ".".join(parts[:i]), parts[i]
        node = OmegaConf.select(cfg, prefix, default=None, throw_on_resolution_failure=False)
        above = cfg if i == 1 else OmegaConf.select(cfg, ".".join(parts[: i - 1]), throw_on_resolution_failure=False)
        if node is None and not add and isinstance(above, DictConfig) and parts[i - 1] not in above.keys():
            where, keys = ".".join(parts[: i - 1]), ", ".join(above.keys()) or "(none)"
            select = (
                f" Choose the option first: {parts[0]}={parts[1]}."
                if i == 2 and parts[1] in options.get(parts[0], [])
                else ""
            )
            raise KdError(f"Unknown key '{key}': {where} has no key '{parts[i - 1]}' (keys: {keys}).{select}")
        if OmegaConf.is_list(node):
            if part.isdigit() and int(part) < len(node):
                continue
            raise KdError(
                f"Unknown key '{key}': {prefix} is a list ({len(node)} entries), not a group of keys. "
                f"Give the whole list: {prefix}=[a,b]."
            )
        if node is not None and not OmegaConf.is_config(node):
            raise KdError(f"Unknown key '{key}': {prefix} is a value, not a group of keys. Give {prefix}=VALUE.")


def _given(o) -> list:
    """The values an override gives (each of a sweep's; none for an interval, which is sampled)."""
    from itertools import islice

    if not o.is_sweep_override():
        return [o.value()]
    return list(islice(o.sweep_iterator(), 1000)) if o.is_discrete_sweep() else []


def _check_bools(cfg, overrides: list) -> None:
    """A key whose default is true or false takes true or false: OmegaConf would turn baseline=2
    or baseline=yes into True, and a key without a schema would keep 'sometimes' as a string."""
    from omegaconf import OmegaConf

    for o in overrides:
        default = OmegaConf.select(cfg, o.key_or_group, default=None, throw_on_resolution_failure=False)
        if not isinstance(default, bool):
            continue
        for v in _given(o):
            if not isinstance(v, bool) and not (isinstance(v, str) and "${" in v):  # an interpolation resolves later
                raise KdError(
                    f"{o.key_or_group}={shown('null' if v is None else v)}: {o.key_or_group} takes true or false."
                )


def _check_one_teacher_source(overrides: list) -> None:
    """teachers=[...] takes each teacher from its checkpoint: teacher=... or teacher.KEY=... beside
    it would be ignored without a word, so the two are refused together."""
    several = next((o for o in overrides if o.key_or_group == "teachers" and any(_given(o))), None)
    one = next((o for o in overrides if o.key_or_group.split(".")[0] == "teacher"), None)
    if several is not None and one is not None:
        given = shown(one.input_line)
        raise KdError(
            f"'{given}' and teachers=[...] both given: with teachers=[...] each teacher's architecture and weights "
            f"come from its checkpoint, so '{given}' would be ignored. Drop '{given}', or give one teacher as "
            "teacher.ckpt=PATH without teachers=[...]."
        )


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
