"""Name -> builder registries for models, losses (logit and feature) and datasets.

A builder is registered with a decorator and built by name; an unknown name raises an error
that lists what exists. User code joins a registry by importing kdcli and decorating its own
function, in a module named on the command line (`imports=[my_models]` or a .py path) or
exposed through the `kdcli.plugins` entry-point group.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import importlib
import importlib.util
import inspect
import sys
import types
import typing
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Iterable

from kdcli.core.errors import KdError


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


# Annotations of builder parameters that are checked (bool is not accepted as a number).
_TYPES = {int: int, float: (int, float), bool: bool, str: str, list: (list, tuple)}


def _expected(annotation: Any) -> tuple | None:
    """The classes a value of a parameter so annotated may take; None when it is not checked.
    A union (`bool | str`) takes any of its members'."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    if not all(m in _TYPES for m in members):
        return None
    return tuple(t for m in members for t in (_TYPES[m] if isinstance(_TYPES[m], tuple) else (_TYPES[m],)))


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}
        # prefix -> (builder taking the rest of the name first, lister of those rests, describer of one)
        self._families: dict[str, tuple[Callable[..., Any], Callable[[], Iterable[str]], Callable | None]] = {}

    def register(self, name: str | None = None) -> Callable:
        def deco(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._builders and self._builders[key] is not fn:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._builders[key] = fn
            return fn

        return deco

    def register_family(
        self, prefix: str, lister: Callable[[], Iterable[str]], describe: Callable[[str], str] | None = None
    ) -> Callable:
        """Register `fn(member, *args, **kwargs)` under every name `prefix + member`, for the
        members that `lister()` returns. The lister runs only when a name of the family is looked
        up or the names are listed, so a family that is costly to enumerate (torchvision's
        models: importing torchvision takes seconds) costs nothing at import. `describe(member)`
        gives a member's summary line (default: the first line of fn's docstring)."""

        def deco(fn: Callable) -> Callable:
            if prefix in self._families and self._families[prefix][0] is not fn:
                raise ValueError(f"{self.kind} family '{prefix}*' is registered twice")
            self._families[prefix] = (fn, lister, describe)
            return fn

        return deco

    def families(self) -> dict[str, Callable[..., Any]]:
        """prefix -> the family's builder (its docstring and keyword parameters describe every member)."""
        return {prefix: fn for prefix, (fn, _, _) in self._families.items()}

    def family_entries(self, prefixes: Iterable[str] | None = None) -> list[str]:
        """One entry per family (of `prefixes`, default all) for lists of names in messages."""
        return [f"{p}<name> (kd list {self.kind}s '{p}*')" for p in (self._families if prefixes is None else prefixes)]

    def _members(self, prefix: str) -> list[str]:
        return [prefix + m for m in self._families[prefix][1]()]

    def _family_of(self, name: str) -> str | None:
        prefix = next((p for p in self._families if name.startswith(p)), None)
        return prefix if prefix is not None and name in self._members(prefix) else None

    def __contains__(self, name: str) -> bool:
        return name in self._builders or self._family_of(name) is not None

    def names(self, pattern: str = "*", families: bool = True) -> list[str]:
        """Registered names matching the glob `pattern`; with families=False, without the
        members of the families (which enumerates none of them)."""
        names = list(self._builders)
        for prefix in self._families if families else ():
            names += self._members(prefix)
        return sorted(n for n in names if fnmatch.fnmatch(n, pattern))

    def get(self, name: str) -> Callable[..., Any]:
        if name in self._builders:
            return self._builders[name]
        prefix = self._family_of(name)
        if prefix is None:
            available = self.names(families=False) + self.family_entries()
            raise KdError(
                f"Unknown {self.kind} '{name}'.{did_you_mean(name, self.names())} "
                f"Available: {', '.join(available)}. "
                f"Your own {self.kind}s join with imports=[your_module] (see `kd list`)."
            )
        return _member(self._families[prefix][0], name[len(prefix) :])

    def params(self, name: str) -> dict[str, Any]:
        """Keyword parameters of a builder with their defaults ('???' when required)."""
        out = {}
        for p in inspect.signature(self.get(name)).parameters.values():
            if p.kind != p.KEYWORD_ONLY:
                continue
            out[p.name] = "???" if p.default is p.empty else p.default
        return out

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Build `name` with keyword arguments checked against the builder's signature: unknown
        names, required ones left unset, and values of the wrong type are KdErrors."""
        fn = self.get(name)
        params = inspect.signature(fn, eval_str=True).parameters
        unknown = set(kwargs) - set(self.params(name))
        if unknown:
            raise KdError(
                f"{self.kind} '{name}' has no parameter {', '.join(sorted(unknown))}. "
                f"Its parameters: {', '.join(self.params(name)) or '(none)'}."
            )
        for key, value in kwargs.items():
            if value == "???":
                raise KdError(f"{self.kind} '{name}' needs a value for '{key}' (it has no default).")
            annotation = params[key].annotation
            expected = _expected(annotation)
            if expected and value is not None and not isinstance(value, expected):
                kind = getattr(annotation, "__name__", None) if isinstance(annotation, type) else str(annotation)
                raise KdError(f"{self.kind} '{name}': '{key}' takes {kind} values; got {value!r}.")
        try:
            return fn(*args, **kwargs)
        except (TypeError, ValueError) as e:
            raise KdError(f"Cannot build {self.kind} '{name}' with {kwargs}: {e}") from None

    def summary(self, name: str) -> str:
        prefix = None if name in self._builders else self._family_of(name)
        if prefix is not None and self._families[prefix][2] is not None:
            return self._families[prefix][2](name[len(prefix) :])
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""


def _member(fn: Callable[..., Any], member: str) -> Callable[..., Any]:
    """The builder of one member of a family: `fn` with the member's name bound, with fn's
    signature (less that first parameter) and docstring, so params(), build() and summary()
    treat it as any other builder."""

    def build(*args: Any, **kwargs: Any) -> Any:
        return fn(member, *args, **kwargs)

    signature = inspect.signature(fn, eval_str=True)
    build.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    build.__doc__ = fn.__doc__
    return build


MODELS = Registry("model")
LOSSES = Registry("loss")
FEATURE_LOSSES = Registry("feature loss")
DATASETS = Registry("dataset")


def import_user_modules(modules: Iterable[str]) -> None:
    """Import user modules (dotted names or paths to .py files) so they can register."""
    for spec in modules:
        try:
            if spec.endswith(".py") or "/" in spec:
                path = Path(spec).expanduser().resolve()
                if not path.is_file():
                    raise FileNotFoundError(path)
                # Named after the whole path: two files called models.py are two modules.
                name = f"kdcli_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
                if name in sys.modules:
                    continue
                mod_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[name] = module
                mod_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except KdError:
            raise
        except Exception as e:  # the user's module failed: say which one and why
            raise KdError(
                f"imports: could not import '{spec}': {type(e).__name__}: {e}. "
                "Give a module importable from the current Python path or a path to a .py file."
            ) from e


def load_builtins() -> None:
    """Import the packages whose modules register kdcli's own models, losses and datasets."""
    for package in ("kdcli.models", "kdcli.losses", "kdcli.data"):
        importlib.import_module(package)


def load_plugins() -> None:
    """Import every module exposed in the `kdcli.plugins` entry-point group."""
    for ep in entry_points(group="kdcli.plugins"):
        try:
            ep.load()
        except Exception as e:
            raise KdError(f"plugin '{ep.name}' ({ep.value}) failed to import: {e}") from e
