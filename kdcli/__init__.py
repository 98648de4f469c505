"""kdcli: knowledge distillation for PyTorch, from the command line (`kd`) and from Python."""

__version__ = "0.1.0"

# The Python API (kdcli/api.py), imported on first use so that `import kdcli` (and `kd --help`) stays light.
_API = ("Result", "load_data", "build_model", "train_teacher", "distill", "KdError")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        from kdcli import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
