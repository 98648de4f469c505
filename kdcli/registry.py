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
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Iterable

from kdcli.errors import KdError


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


# Annotations of builder parameters that are checked (bool is not accepted as a number).
_TYPES = {int: int, float: (int, float), bool: bool, str: str, list: (list, tuple)}


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable:
        def deco(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._builders and self._builders[key] is not fn:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._builders[key] = fn
            return fn

        return deco

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._builders if fnmatch.fnmatch(n, pattern))

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            raise KdError(
                f"Unknown {self.kind} '{name}'.{did_you_mean(name, self._builders)} "
                f"Available: {', '.join(self.names())}. "
                f"Your own {self.kind}s join with imports=[your_module] (see `kd list`)."
            )
        return self._builders[name]

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
            expected = _TYPES.get(params[key].annotation)
            if expected and value is not None and not isinstance(value, expected):
                raise KdError(
                    f"{self.kind} '{name}': '{key}' takes {params[key].annotation.__name__} values; got {value!r}."
                )
        try:
            return fn(*args, **kwargs)
        except (TypeError, ValueError) as e:
            raise KdError(f"Cannot build {self.kind} '{name}' with {kwargs}: {e}") from None

    def summary(self, name: str) -> str:
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""


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
