"""Drawings for chapter 7 (GPU mapping): the memory hierarchy, the roofline, bandwidths.

Each function draws on a matplotlib Axes it is given and computes nothing the book relies
on: numbers come from `kvlib.analysis` and `kvlib.experiments.gpu`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import FancyArrowPatch, Rectangle

from kvlib.analysis import Hardware

PATH_COLORS = {"copy": "#7f7f7f", "paged": "#1f77b4", "sdpa": "#2ca02c", "gather": "#d62728",
               "int8": "#9467bd"}

# An H100 SXM's memory levels: (name, capacity, bandwidth to the level below). Capacities
# and the HBM bandwidth are datasheet figures; the ~ bandwidths (shared memory, L2) are
# estimates: NVIDIA publishes no figure for them.
H100_LEVELS = (
    ("registers", "256 KB per SM, 33 MB in all", ""),
    ("shared memory / L1", "228 KB per SM, 30 MB in all", "~30 TB/s in all"),
    ("L2 cache", "50 MB", "~10 TB/s"),
    ("HBM3", "80 GB: the KV cache lives here", "3.35 TB/s"),
)


def draw_memory_hierarchy(ax: Axes, cache_gb: float) -> None:
    """Boxes from HBM (bottom) to registers (top), with a decode step's path through them.

    `cache_gb`: the KV cache one step reads, written beside HBM for scale.
    """
    widths = (0.6, 0.7, 0.8, 0.9)
    for i, ((name, size, bw), w) in enumerate(zip(H100_LEVELS, widths)):
        y = 3 - i
        ax.add_patch(Rectangle((0.5 - w / 2, y + 0.1), w, 0.75, facecolor="#c6dbef" if i < 3
                               else "#fdd0a2", edgecolor="black"))
        ax.text(0.5, y + 0.62, name, ha="center", va="center", fontsize=10.5, weight="bold")
        ax.text(0.5, y + 0.32, size, ha="center", va="center", fontsize=10)
        if i > 0:
            ax.add_patch(FancyArrowPatch((1.0, y + 0.75), (1.0, y + 1.15),
                                         arrowstyle="-|>", mutation_scale=12, color="#1f77b4"))
            ax.text(1.04, y + 0.95, bw, fontsize=10, va="center", color="#1f77b4")
    ax.text(0.5, -0.25, f"one decode step streams {cache_gb:.2f} GB of K and V upward, once",
            ha="center", fontsize=10, color="#d62728")
    ax.set_xlim(-0.02, 1.42)
    ax.set_ylim(-0.45, 4)
    ax.axis("off")


def draw_roofline(ax: Axes, gpus: Sequence[Hardware],
                  points: Mapping[str, float]) -> None:
    """Attainable FLOP/s against arithmetic intensity (log-log), one roof per GPU, and
    vertical lines at the intensities in `points` (label -> FLOP/byte)."""
    x = np.logspace(-1, 3.5, 200)  # FLOP per byte
    for hw, style in zip(gpus, ("-", "--", ":", "-.")):
        ax.loglog(x, np.minimum(hw.peak_flops, x * hw.bandwidth) / 1e12, style, color="black",
                  lw=1.2, label=f"{hw.name} (ridge {hw.ridge_point:.0f} FLOP/B)")
    for (label, intensity), color in zip(points.items(), ("#1f77b4", "#9467bd", "#2ca02c")):
        ax.axvline(intensity, color=color, lw=1.5)
        ax.text(intensity * 1.1, 0.004, label, rotation=90, color=color, fontsize=10,
                va="bottom")
    ax.set_ylim(bottom=0.003)
    ax.set_xlabel("arithmetic intensity (FLOP per byte read)")
    ax.set_ylabel("attainable compute (TFLOP/s)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    ax.grid(True, which="major", alpha=0.3)


def draw_bandwidths(ax: Axes, result: Mapping) -> None:
    """TB/s of bf16 K and V per path and row of a `bench/gpu_decode.py` result, with the
    copy bandwidth as a dashed line."""
    rows = result["rows"]
    paths = [p for p in ("paged", "sdpa", "gather", "int8") if f"{p}_ms" in rows[0]]
    x = np.arange(len(rows))
    width = 0.8 / len(paths)
    for i, path in enumerate(paths):
        tbps = [r["kv_GB"] / 1e3 / (r[f"{path}_ms"] * 1e-3) for r in rows]
        ax.bar(x + (i - (len(paths) - 1) / 2) * width, tbps, width, label=path,
               color=PATH_COLORS[path])
    ax.axhline(result["copy_TBps"], ls="--", color=PATH_COLORS["copy"], label="copy")
    ax.set_xticks(x, [f"{r['B']}x{r['S']}\n{r['kv_GB']:.2f} GB" for r in rows])
    ax.set_xlabel("batch x tokens per sequence, and GB of K and V read")
    ax.set_ylabel("K and V read (TB/s, bf16)")
    ax.set_title(result["device"])
    ax.legend(ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.08), frameon=False)


def draw_quoted_ranges(ax: Axes, ranges: Mapping[str, tuple[float, float]], title: str,
                       ) -> None:
    """Horizontal bars for quoted (low, high) TB/s ranges: figures someone else measured."""
    names = list(ranges)
    for i, name in enumerate(names):
        lo, hi = ranges[name]
        key = name.split(",")[0].split(" ")[0]
        color = PATH_COLORS.get(key, "#7f7f7f")
        ax.barh(i, hi, color=color, alpha=0.35 if hi > lo else 0.8)
        ax.barh(i, lo, color=color, alpha=0.8)
        ax.text(hi + 0.05, i, f"{lo:.3g}" + (f"-{hi:.3g}" if hi > lo else "") + " TB/s",
                va="center")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, max(hi for _, hi in ranges.values()) * 1.35)
    ax.set_xlabel("K and V read per step (TB/s, bf16)")
    ax.set_title(title)


def roofline_svg(hw: Hardware, points: Sequence[tuple[str, float, str]],
                 width: int = 640, height: int = 290) -> str:
    """A roofline as inline SVG (a few kB, sharp at any size; what a widget state shows):
    log-log axes from 0.3 to 10^4 FLOP per byte, the GPU's roof, its ridge point dotted, and
    one dot per (label, FLOP per byte, colour) in `points`. Text is 13 CSS px at `width`.

    >>> svg = roofline_svg(Hardware("toy", 100e12, 1e12), [("attention", 4.0, "#1f77b4")])
    >>> svg.count("<circle"), "ridge 100 FLOP/B" in svg
    (1, True)
    """
    left, right, top, bottom = 62, 30, 12, 44  # margins for tick labels and axis titles
    x0, x1 = np.log10(0.3), 4.0
    y1 = np.log10(hw.peak_flops / 1e12 * 3)
    y0 = y1 - np.log10(3 * 3000)

    def px(intensity: float) -> float:
        return left + (np.log10(intensity) - x0) / (x1 - x0) * (width - left - right)

    def py(tflops: float) -> float:
        return top + (y1 - np.log10(tflops)) / (y1 - y0) * (height - top - bottom)

    def attained(intensity: float) -> float:
        return min(hw.peak_flops, intensity * hw.bandwidth) / 1e12

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
             f'style="width: {width}px; max-width: 100%; height: auto; font: 13px sans-serif">']
    for e in range(0, 5):  # x decades
        x = px(10.0**e)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - bottom}" '
                     f'stroke="#e4e4e4"/><text x="{x:.1f}" y="{height - bottom + 16}" '
                     f'text-anchor="middle">{10**e:,}</text>')
    for e in range(int(np.ceil(y0)), int(np.floor(y1)) + 1):  # y decades
        y = py(10.0**e)
        label = f"{10.0**e:,.0f}" if e >= 0 else f"{10.0**e:g}"
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" '
                     f'stroke="#e4e4e4"/><text x="{left - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{label}</text>')
    xs = np.logspace(x0, x1, 60)
    roof = " ".join(f"{px(x):.1f},{py(attained(x)):.1f}" for x in xs)
    ridge = px(hw.ridge_point)
    parts += [
        f'<polyline points="{roof}" fill="none" stroke="black" stroke-width="2"/>',
        f'<line x1="{ridge:.1f}" y1="{top}" x2="{ridge:.1f}" y2="{height - bottom}" '
        f'stroke="#888" stroke-dasharray="3 3"/>',
        f'<text x="{ridge + 5:.1f}" y="{py(hw.peak_flops / 1e12) + 18:.1f}">'
        f"ridge {hw.ridge_point:.0f} FLOP/B</text>",
        f'<text x="{(left + width - right) / 2:.1f}" y="{height - 6}" text-anchor="middle">'
        f"arithmetic intensity (FLOP per byte)</text>",
        f'<text transform="translate(14 {(top + height - bottom) / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">attainable (TFLOP/s)</text>',
    ]
    for label, intensity, color in points:
        parts.append(f'<circle cx="{px(intensity):.1f}" cy="{py(attained(intensity)):.1f}" '
                     f'r="7" fill="{color}"><title>{label}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)
