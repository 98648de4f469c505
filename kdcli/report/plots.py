"""Figures (PNG, matplotlib's Agg backend, written atomically): evaluate's confusion matrices,
reliability diagram and accuracy-vs-cost trade-off."""

from __future__ import annotations

import contextlib
from pathlib import Path

from kdcli.core.files import atomic_write


@contextlib.contextmanager
def figure(path: Path, ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6, 4), bottom: float = 0.0):
    """Yields (fig, axes as a flat list); saves the figure to path as PNG on exit. `bottom`: the
    share of the height kept free below the axes (for a legend across the figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    try:
        yield fig, [ax for row in axes for ax in row]
        fig.tight_layout(rect=(0, bottom, 1, 1))
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def confusion_matrices(path: Path, names: list[str], matrices: list[list[list[int]]], classes: list[str]) -> None:
    """One panel per model: rows are true classes, columns predictions, shaded by the share of
    the row (so classes of different sizes compare); counts written in when they fit."""
    import numpy as np

    n = len(classes)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    side = 4.2 if n <= 20 else 6.0
    with figure(path, cols, rows, (side, side)) as (_, axes):
        for ax, name, counts in zip(axes, names, matrices):
            m = np.asarray(counts, dtype=float)
            share = m / np.maximum(m.sum(1, keepdims=True), 1)
            ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            if n <= 20:
                ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
                ax.set_yticks(range(n), classes, fontsize=7)
            if n <= 12:
                for i in range(n):
                    for j in range(n):
                        if m[i, j]:
                            color = "white" if share[i, j] > 0.5 else "black"
                            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6, color=color)
        for ax in axes[len(names) :]:
            ax.axis("off")


def reliability_diagram(path: Path, names: list[str], bins: list[dict], eces: list[float]) -> None:
    """Accuracy against confidence per bin (bins with images only); the diagonal is perfect
    calibration, points below it are over-confident."""
    with figure(path, size=(5.5, 5)) as (_, (ax,)):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
        for name, b, ece in zip(names, bins, eces):
            pts = [(c, a) for c, a, k in zip(b["confidence"], b["accuracy"], b["count"]) if k]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=f"{name} (ECE {ece:.3f})")
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")


def tradeoff(path: Path, names: list[str], acc: list[float], costs: dict[str, list[float | None]]) -> None:
    """Test accuracy against each cost (latency, size...), one panel per cost; a marker and
    colour per model, named in the legend (exports of one model sit on top of each other)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    markers = "osD^v<>ph*X"
    legend_rows = -(-len(names) // 4)
    with figure(path, ncols=len(costs), size=(5, 4 + 0.25 * legend_rows), bottom=0.06 * legend_rows + 0.02) as (
        fig,
        axes,
    ):
        for ax, (what, values) in zip(axes, costs.items()):
            for i, (name, a, v) in enumerate(zip(names, acc, values)):
                if v is not None:
                    ax.scatter(v, 100 * a, marker=markers[i % len(markers)], color=f"C{i % 10}", label=name, alpha=0.8)
            if all(v is None for v in values):  # e.g. every timing was noise
                ax.text(0.5, 0.5, "no figures to trust", ha="center", va="center", transform=ax.transAxes)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())  # log-scale minor labels crowd the axis
            ax.set_xlabel(what)
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3, which="both")
        legend = {}  # every model once, from whichever panel shows it
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        if legend:
            fig.legend(
                list(legend.values()),
                list(legend),
                loc="lower center",
                ncol=min(4, len(legend)),
                fontsize=7,
                frameon=False,
            )


def lines(path: Path, x_label: str, y_label: str, series: dict[str, list[tuple[float, float]]]) -> None:
    """y against x, one line per series (the sweep summary's accuracy against the swept value)."""
    with figure(path) as (_, (ax,)):
        for name, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend()
