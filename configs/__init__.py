# Installed as the package `kdcli.configs` (see pyproject.toml) so that Hydra can find these
# YAML files as pkg://kdcli.configs from any install.
