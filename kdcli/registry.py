"""The registries a plugin or an `imports=[my_models.py]` module fills (MODELS, LOSSES, FEATURE_LOSSES,
DATASETS): README's `from kdcli.registry import MODELS`. They live in kdcli/core/registry.py."""

from kdcli.core.registry import (  # noqa: F401
    DATASETS,
    FEATURE_LOSSES,
    LOSSES,
    MODELS,
    Registry,
    did_you_mean,
    import_user_modules,
    load_builtins,
    load_plugins,
)
