"""Drawings for chapter 5 (quantization): keys with outlier channels, errors per channel,
where the bytes go, memory against error. Each draws on a given Axes; numbers come from
`kvlib.cache.quantize`, `kvlib.cache.quant_memory` and `kvlib.experiments.quantization`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, MultipleLocator

from kvlib.cache.quant_memory import Memory

PARTS = ("payload", "scales", "zeros", "padding", "residual")
PART_COLORS = {"payload": "#1f77b4", "scales": "#ff7f0e", "zeros": "#2ca02c",
               "padding": "#bbbbbb", "residual": "#d62728"}
# One marker and colour per quantization preset, the same in every scatter.
MARKERS = "osD^vP*Xh<>p"


def scheme_style(index: int) -> dict:
    """Marker and colour of the `index`-th scheme in a scatter (tab10, then markers cycle)."""
    return {"marker": MARKERS[index % len(MARKERS)], "color": plt.get_cmap("tab10")(index % 10)}


def kib_axis(axis, max_bytes: float) -> None:
    """Ticks of a bytes axis in KiB, at a round step giving at most six of them (so the
    labels never run into each other)."""
    step = next(s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
                if max_bytes / 1024 / s <= 6)
    axis.set_major_locator(MultipleLocator(step * 1024))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1024:g}"))


def draw_magnitudes(ax: Axes, x: torch.Tensor, title: str) -> None:
    """|x| of one head, tokens down, channels across: outlier channels are vertical stripes.
    x (S, D)."""
    ax.imshow(x.abs().numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("channel (index)")
    ax.set_ylabel("token (position)")
    ax.set_title(title)


def draw_levels(ax: Axes, x: torch.Tensor, approx: torch.Tensor, scale: float,
                bits: int) -> None:
    """Values and their round trip on a line, with the grid of representable values.
    x, approx (n,)."""
    top = 2 ** (bits - 1) - 1
    levels = np.arange(-top, top + 1) * scale
    ax.vlines(levels, -0.3, 0.3, color="#cccccc", lw=0.8)
    ax.scatter(x.numpy(), np.zeros(len(x)), color="#1f77b4", zorder=3, label="value")
    ax.scatter(approx.numpy(), np.zeros(len(x)), marker="|", s=400, color="#d62728",
               zorder=4, label="round trip")
    ax.set_yticks([])
    ax.set_xlabel("value")
    ax.set_title(f"int{bits}, scale = amax / {top} = {scale:.3f}: {2 * top + 1} levels")
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.15), ncol=2, frameon=False)


def draw_channel_errors(ax: Axes, errors: Mapping[str, torch.Tensor],
                        outliers: Sequence[int] = ()) -> None:
    """RMS round-trip error of each channel, one line per scheme (log scale); (D,) each."""
    for name, err in errors.items():
        ax.plot(err.numpy(), label=name, lw=1.2)
    for c in outliers:
        ax.axvline(c, color="#999999", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("channel (index)" + ("; dotted: the outlier channels" if outliers else ""))
    ax.set_ylabel("RMS round-trip error")
    ax.legend(frameon=False)


def draw_bytes(ax: Axes, memories: Mapping[str, Memory], fp16_per_token: float) -> None:
    """Stacked bars: bytes per token by part, per scheme, beside fp16's."""
    names = list(memories)
    left = np.zeros(len(names))
    for part in PARTS:
        widths = np.array([getattr(memories[n], part) / memories[n].num_tokens for n in names])
        if widths.any():
            ax.barh(names, widths, left=left, color=PART_COLORS[part], label=part)
            left += widths
    ax.axvline(fp16_per_token, color="#333333", ls="--", lw=1)
    ax.text(fp16_per_token, -0.6, "fp16", ha="center", va="bottom")
    for i, n in enumerate(names):
        m = memories[n]
        ax.text(left[i], i, f" {m.ratio_vs_fp16:.2f}x (naive {m.naive_ratio:g}x)",
                va="center")
    ax.set_xlabel("cache per token (KiB, all layers, K and V)")
    ax.set_xlim(0, fp16_per_token * 1.6)
    kib_axis(ax.xaxis, fp16_per_token * 1.6)
    ax.set_ylim(len(names) - 0.5, -1.0)  # top to bottom, room above for the fp16 label
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def draw_memory_vs_error(ax: Axes, points: Mapping[str, tuple[float, float]],
                         ylabel: str, fp16_per_token: float) -> None:
    """One point per scheme: (bytes per token, error), each with its own marker and colour
    (`scheme_style`, in the order of `points`) and named in the legend, not beside the
    point, where names of schemes of equal size would overlap. Draw the legend once per
    figure: `fig.legend(*ax.get_legend_handles_labels())`."""
    for i, (name, (mem, err)) in enumerate(points.items()):
        ax.scatter(mem, err, s=45, label=name, zorder=3, **scheme_style(i))
    ax.axvline(fp16_per_token, color="#333333", ls="--", lw=1)
    ax.text(fp16_per_token, 1.0, " fp16", transform=ax.get_xaxis_transform(), va="top")
    ax.set_xlabel("cache per token (KiB, all of it)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_xlim(0, fp16_per_token * 1.15)
    kib_axis(ax.xaxis, fp16_per_token * 1.15)
    ax.grid(True, which="major", alpha=0.3)
