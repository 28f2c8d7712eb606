"""The book's one figure style: sizes for its text column, text readable on any screen.

The built book's text column is about 720 CSS pixels wide at a 1,280-pixel window. Every
figure is drawn for it: `COLUMN_IN` inches wide (or less), shown at `DISPLAY_DPI` CSS pixels
per inch, so a figure is shown at the size it was drawn and its text keeps the size set here
(at least `MIN_FONT_PT` points, 13 CSS pixels: the body's small print). Its PNG holds
`SAVE_DPI` pixels per inch (two per CSS pixel, for high-DPI screens); widget states, stored
once per state, hold `WIDGET_DPI`.

How a chapter uses it:

- once, where it first imports matplotlib: `viz.style.use()` (the book's sizes and fonts,
  constrained layout so labels never overlap, high-DPI inline figures);
- for several panels, `fig, axes = viz.style.panels(3)`: side by side while each keeps
  `MIN_PANEL_IN` inches, stacked otherwise; for one, `plt.subplots(figsize=style.size(0.5))`;
- an axis names its unit in its label: "context (tokens)", "time (ms)", "cache (GiB)".

`kvlib.widgets.live` draws every widget state inside `context()`, so widgets follow the same
style whether or not a chapter called `use()`.

>>> panels_per_row(3), panels_per_row(4), panels_per_row(3, width=4.0), panels_per_row(5)
(3, 2, 1, 3)
>>> size(0.5)
(7.0, 3.5)
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import matplotlib as mpl
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

COLUMN_IN = 7.0  # the text column: about 720 CSS px at a 1,280 px window, 100 px per inch
DISPLAY_DPI = 100  # CSS pixels per inch of a figure on the page
SAVE_DPI = 200  # PNG pixels per inch of a static figure (2 per CSS pixel)
WIDGET_DPI = 150  # PNG pixels per inch of a widget state (stored once per state)
MIN_FONT_PT = 9.5  # 13 CSS px at DISPLAY_DPI: the smallest text any figure shows
MIN_PANEL_IN = 2.3  # a panel narrower than this is stacked below its neighbour instead
PANEL_HEIGHT_IN = 2.8  # the default height of one row of panels

RC = {
    "figure.figsize": (COLUMN_IN, 3.5),
    "figure.dpi": DISPLAY_DPI,
    "savefig.dpi": SAVE_DPI,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "figure.constrained_layout.use": True,  # titles, labels and legends never overlap
    "font.size": 10.5,
    "axes.titlesize": 11,
    "axes.labelsize": 10.5,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": MIN_FONT_PT + 0.5,
    "legend.title_fontsize": 10,
    "figure.titlesize": 12,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.8,
    "lines.markersize": 5,
    "image.interpolation": "nearest",
}


def context() -> AbstractContextManager:
    """The book's style for the figures made inside a `with` block (nothing outside)."""
    return mpl.rc_context(RC)


def use() -> None:
    """The book's style for every figure a notebook makes from here on, shown at high DPI.

    Call it once per chapter; it changes matplotlib's settings for this kernel only.
    """
    mpl.rcParams.update(RC)
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # not in a notebook: nothing to show inline
        return
    if get_ipython() is not None:
        set_matplotlib_formats("retina")  # 2x pixels, shown at the figure's size


def size(aspect: float, width: float = COLUMN_IN) -> tuple[float, float]:
    """(width, height) in inches for a figure `aspect` times as tall as it is wide."""
    return (width, round(width * aspect, 2))


def panels_per_row(n: int, width: float = COLUMN_IN, min_width: float = MIN_PANEL_IN) -> int:
    """How many of `n` panels go in one row of `width` inches, each at least `min_width`
    wide, with the rows as even as they can be (4 panels that cannot share one row: 2 x 2)."""
    if n < 1:
        raise ValueError(f"panels need n >= 1, got {n}")
    fit = max(1, math.floor(width / min_width))
    rows = math.ceil(n / fit)
    return math.ceil(n / rows)


def panels(n: int, *, width: float = COLUMN_IN, height: float = PANEL_HEIGHT_IN,
           min_width: float = MIN_PANEL_IN, **subplots) -> tuple[Figure, list[Axes]]:
    """A figure of `n` panels, side by side while each is at least `min_width` inches wide,
    otherwise in rows; `height` is one row's. Returns the figure and the n axes in reading
    order (unused grid cells are removed). `subplots` go to `plt.subplots` (sharex, ...).
    """
    cols = panels_per_row(n, width, min_width)
    rows = math.ceil(n / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(width, height * rows), squeeze=False,
                             **subplots)
    axes = [ax for row in grid for ax in row]
    for extra in axes[n:]:
        extra.remove()
    return fig, axes[:n]


def css_width(fig: Figure) -> int:
    """The width in CSS pixels the book shows `fig` at."""
    return round(fig.get_figwidth() * DISPLAY_DPI)
