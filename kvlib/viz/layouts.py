"""Drawings of what a cache holds: sizes of real models' caches, and memory layouts.

Each function draws on a matplotlib Axes it is given (or returns text) and computes nothing
the book relies on: numbers come from `analysis` and from real `FlatKVCache`s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from kvlib import analysis
from kvlib.config import Layout, ModelConfig


def plot_cache_sizes(ax: Axes, presets: Mapping[str, ModelConfig], context_lens: Sequence[int],
                     dtype: str = "bf16", batch_size: int = 1) -> None:
    """Cache size in GiB against context length, one line per model."""
    for name, cfg in presets.items():
        gib = [analysis.kv_cache_bytes(cfg, s, batch_size, dtype) / 2**30 for s in context_lens]
        ax.plot(context_lens, gib, marker="o", ms=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache (GiB)")
    ax.set_title(f"KV cache size, {dtype}, batch {batch_size}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, not over
    ax.grid(True, which="both", alpha=0.3)


def plot_cache_vs_weights(ax: Axes, presets: Mapping[str, ModelConfig],
                          context_lens: Sequence[int], dtype: str = "bf16",
                          batch_size: int = 1) -> None:
    """`plot_cache_sizes`, plus each model's weights as a dashed line in the same colour.

    Where a model's solid line crosses its dashed one, its cache weighs as much as the model.
    """
    plot_cache_sizes(ax, presets, context_lens, dtype, batch_size)
    lines = ax.lines[-len(presets):]
    for i, (line, cfg) in enumerate(zip(lines, presets.values())):
        ax.axhline(analysis.weight_bytes(cfg, dtype) / 2**30, color=line.get_color(), ls="--",
                   lw=1)
        if any(np.array_equal(line.get_ydata(), later.get_ydata()) for later in lines[i + 1:]):
            line.set(lw=5, alpha=0.45)  # same KV shape as a later model: show it as a halo
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # shows the halos
    ax.set_ylabel("memory (GiB)")
    ax.set_title(f"KV cache (solid) vs weights (dashed), {dtype}, batch {batch_size}")


def cache_table(presets: Mapping[str, ModelConfig], dtype: str = "bf16") -> str:
    """A text table: per model, cache bytes per token, one sequence at the model's max context,
    the weights, and how many cached tokens (batch x context) weigh as much as the weights.

    >>> print(cache_table({"llama-3-8b": analysis.PRESETS["llama-3-8b"]}))
    model        KV/token  max ctx  cache @ max ctx  weights  cache = weights at
                      KiB   tokens              GiB      GiB   tokens  seqs @ max
    llama-3-8b      128.0    8,192             1.00    14.96  122,532        15.0
    """
    w = max(12, *map(len, presets))  # the model column fits the longest name
    header = (f"{'model':<{w}} {'KV/token':>8} {'max ctx':>8} {'cache @ max ctx':>16} "
              f"{'weights':>8}  cache = weights at")
    units = (f"{'':<{w}} {'KiB':>8} {'tokens':>8} {'GiB':>16} {'GiB':>8} {'tokens':>8} "
             f"{'seqs @ max':>11}")
    lines = [header, units]
    for name, cfg in presets.items():
        per_token = analysis.kv_bytes_per_token(cfg, dtype)
        full = analysis.kv_cache_bytes(cfg, cfg.max_seq_len, 1, dtype)
        weights = analysis.weight_bytes(cfg, dtype)
        lines.append(f"{name:<{w}} {per_token / 2**10:>8.1f} {cfg.max_seq_len:>8,} "
                     f"{full / 2**30:>16.2f} {weights / 2**30:>8.2f} "
                     f"{weights // per_token:>8,} {weights / full:>11.1f}")
    return "\n".join(lines)


def cache_table_markdown(presets: Mapping[str, ModelConfig], dtype: str = "bf16") -> str:
    """`cache_table` as a Markdown table (what a chapter shows), the same numbers."""
    lines = ["| model | KV/token (KiB) | max context (tokens) | cache at max (GiB) | "
             "weights (GiB) | cache = weights at (tokens) | or (sequences at max context) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in cache_table(presets, dtype).splitlines()[2:]:
        lines.append("| " + " | ".join(row.split()) + " |")
    return "\n".join(lines)


def layout_order(layout: Layout, num_tokens: int, num_kv_heads: int) -> list[tuple[str, int, int]]:
    """The (K or V, head, token) owner of each head_dim-sized run of memory, in address order.

    >>> layout_order(Layout.SEQ_MAJOR, num_tokens=2, num_kv_heads=2)[:4]
    [('K', 0, 0), ('K', 1, 0), ('V', 0, 0), ('V', 1, 0)]
    >>> layout_order(Layout.HEAD_MAJOR, num_tokens=2, num_kv_heads=2)[:4]
    [('K', 0, 0), ('K', 0, 1), ('K', 1, 0), ('K', 1, 1)]
    """
    if layout is Layout.SEQ_MAJOR:  # (S, 2, Hkv) for one layer and batch slot
        return [(kv, h, t) for t in range(num_tokens) for kv in "KV" for h in range(num_kv_heads)]
    return [(kv, h, t) for kv in "KV" for h in range(num_kv_heads) for t in range(num_tokens)]


def draw_layout(ax: Axes, layout: Layout, num_tokens: int = 4, num_kv_heads: int = 2,
                highlight_head: int = 0, per_row: int = 16, min_rows: int = 1) -> None:
    """One layer and batch slot of a flat cache as a strip of memory, left to right, wrapped
    every `per_row` cells (each row continues the one above it), so cells stay readable;
    `min_rows` reserves room for more rows (so strips of different lengths line up).

    Each cell is one head_dim-long vector. The keys a decode step reads for
    `highlight_head` are outlined: one contiguous run in HEAD_MAJOR, scattered in SEQ_MAJOR.
    """
    order = layout_order(layout, num_tokens, num_kv_heads)
    cmap = plt.get_cmap("tab10")
    rows = max(-(-len(order) // per_row), min_rows)
    for i, (kv, h, t) in enumerate(order):
        x, y = i % per_row, rows - 1 - i // per_row  # the first row on top
        shade = 0.9 if kv == "K" else 0.45
        ax.add_patch(Rectangle((x, y), 1, 1, facecolor=cmap(h), alpha=shade, edgecolor="white"))
        ax.text(x + 0.5, y + 0.5, f"{kv}{h}\nt{t}", ha="center", va="center",
                fontsize=9.5, linespacing=1.0)
        if kv == "K" and h == highlight_head:
            ax.add_patch(Rectangle((x + 0.05, y + 0.05), 0.9, 0.9, fill=False, lw=2,
                                   edgecolor="black"))
    ax.set_xlim(0, per_row if rows > 1 else len(order))
    ax.set_ylim(0, rows)
    ax.set_yticks([r + 0.5 for r in range(rows)], [f"+{per_row * (rows - 1 - r)}"
                                                   for r in range(rows)])
    ax.set_xticks(range(0, (per_row if rows > 1 else len(order)) + 1, 4))
    ax.set_xlabel("memory address (head_dim-long vectors from the row's start)")
    ax.set_ylabel("row starts at")
    ax.set_title(f"{layout.value}: keys of head {highlight_head} outlined")
    ax.set_aspect("equal")
