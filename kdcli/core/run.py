"""A run as the code below the commands sees it: its folder, device and metrics.json (Context),
set up by kdcli/app.py for each command."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdcli.core.files import write_json


@dataclass
class Context:
    run_dir: Path
    device: torch.device
    multirun: bool
    resume: bool = False  # continuing an unfinished run: training loops pick up their saved states
    previous: dict = field(default_factory=dict)  # that run's metrics.json (what it recorded)
    metrics: dict = field(default_factory=dict)  # this run's metrics.json while it runs

    @property
    def show_progress(self) -> bool:
        return not self.multirun

    def note(self, key: str, value) -> None:
        """Record a fact in metrics.json at once (a resumed run reads it back from `previous`)."""
        self.metrics[key] = value
        write_json(self.run_dir / "metrics.json", self.metrics)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def plain(text: str) -> str:
    """`text` without terminal colour codes (some libraries colour their error messages)."""
    return _ANSI.sub("", text)
