"""Drawings for chapter 5 (quantization): keys with outlier channels, errors per channel,
where the bytes go, memory against error. Each draws on a given Axes; numbers come from
`kvlib.cache.quantize`, `kvlib.cache.quant_memory` and `kvlib.experiments.quantization`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes

from kvlib.cache.quant_memory import Memory

PARTS = ("payload", "scales", "zeros", "padding", "residual")
PART_COLORS = {"payload": "#1f77b4", "scales": "#ff7f0e", "zeros": "#2ca02c",
               "padding": "#bbbbbb", "residual": "#d62728"}


def draw_magnitudes(ax: Axes, x: torch.Tensor, title: str) -> None:
    """|x| of one head, tokens down, channels across: outlier channels are vertical stripes.
    x (S, D)."""
    ax.imshow(x.abs().numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("channel")
    ax.set_ylabel("token")
    ax.set_title(title, fontsize=10)


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
    ax.set_title(f"int{bits}, scale = amax / {top} = {scale:.3f}: {2 * top + 1} levels",
                 fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)


def draw_channel_errors(ax: Axes, errors: Mapping[str, torch.Tensor],
                        outliers: Sequence[int] = ()) -> None:
    """RMS round-trip error of each channel, one line per scheme (log scale); (D,) each."""
    for name, err in errors.items():
        ax.plot(err.numpy(), label=name, lw=1.2)
    for c in outliers:
        ax.axvline(c, color="#999999", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("channel (dotted: outlier channels)")
    ax.set_ylabel("RMS error")
    ax.legend(fontsize=8, frameon=False)


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
    ax.text(fp16_per_token, len(names) - 0.5, " fp16", va="center", fontsize=8)
    for i, n in enumerate(names):
        m = memories[n]
        ax.text(left[i], i, f" {m.ratio_vs_fp16:.2f}x (naive {m.naive_ratio:g}x)",
                va="center", fontsize=8)
    ax.set_xlabel("bytes per token (all layers, K and V)")
    ax.set_xlim(0, fp16_per_token * 1.45)
    ax.invert_yaxis()
    ax.legend(fontsize=8, frameon=False, loc="lower right")


def draw_memory_vs_error(ax: Axes, points: Mapping[str, tuple[float, float]],
                         ylabel: str, fp16_per_token: float) -> None:
    """One point per scheme: (bytes per token, error)."""
    for name, (mem, err) in points.items():
        ax.scatter(mem, err, s=30)
        ax.annotate(name, (mem, err), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(fp16_per_token, color="#333333", ls="--", lw=1)
    ax.set_xlabel("bytes per token (codes, scales, zero points, residual)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_xlim(0, fp16_per_token * 1.1)
