"""Primitives every layer may use: errors, registries, safe file writes, processes, signals, the numbers of metrics."""
