"""What every drawing shares: the book's colours and a plot of measured times.

Sizes and fonts are the book's style (`kvlib.viz.style`), not set here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes

COLORS = {"cached": "#1f77b4", "uncached": "#d62728", "claim": "#7f7f7f", "measured": "#2ca02c"}


def plot_timings(ax: Axes, xs: Sequence[int], series: Mapping[str, Sequence[float]],
                 xlabel: str, ylabel: str = "time (ms)") -> None:
    """Measured times, one line per label, on log-log axes."""
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
