"""One module per subcommand, each with `run(cfg, ctx) -> dict` (the figures for metrics.json)."""
