"""Drawings for the book: attention work per step, cost curves, cache sizes, memory layouts.

Every function draws on a matplotlib Axes it is given (so a chapter can place several side by
side) and computes nothing the book relies on: numbers come from `analysis` and `bench`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.patches import Rectangle

from kvlib import analysis
from kvlib.config import Layout, ModelConfig

COLORS = {"cached": "#1f77b4", "uncached": "#d62728", "claim": "#7f7f7f", "measured": "#2ca02c"}
_WORK = ListedColormap(["#f4f4f4", "#c6dbef", "#d62728"])  # not computed, reused, computed


def draw_attention_work(ax: Axes, context_len: int, cached: bool) -> None:
    """The causal score matrix after `context_len` tokens, for the step that adds one more.

    Rows are queries, columns keys. Red: entries this step computes. Light blue: entries an
    earlier step computed and a cache lets us skip. Without a cache the step recomputes the
    whole lower triangle; with one it computes only the last row.
    """
    n = context_len + 1
    work = np.tril(np.ones((n, n)))  # (n, n) 1 = masked-in entry
    if cached:
        work[-1, :] *= 2  # only the new query's row is computed
    else:
        work *= 2
    ax.imshow(work, cmap=_WORK, vmin=0, vmax=2)
    computed = int((work == 2).sum())
    ax.set_title(f"{'with' if cached else 'without'} cache: {computed} scores computed",
                 fontsize=10)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_step_costs(ax: Axes, cfg: ModelConfig, context_lens: Sequence[int]) -> None:
    """FLOPs of one decode step against context length, with and without a cache, by part."""
    parts = ("projection_flops", "attention_flops", "mlp_flops", "lm_head_flops")
    styles = {"projection_flops": ":", "attention_flops": "--", "mlp_flops": "-.",
              "lm_head_flops": (0, (1, 3))}
    for cached in (False, True):
        costs = [analysis.decode_step_cost(cfg, s, cached=cached) for s in context_lens]
        color = COLORS["cached" if cached else "uncached"]
        label = "with cache" if cached else "without cache"
        ax.plot(context_lens, [c.total_flops for c in costs], color=color, lw=2.5,
                label=f"{label}: total")
        for part in parts:
            ax.plot(context_lens, [getattr(c, part) for c in costs], color=color, lw=1,
                    ls=styles[part], label=f"{label}: {part.removesuffix('_flops')}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length S (tokens already in the sequence)")
    ax.set_ylabel("FLOPs for one new token")
    ax.set_title(f"cost of one decode step ({cfg.name})", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(0.0, -0.14))  # below
    ax.grid(True, which="major", alpha=0.3)


def plot_speedups(ax: Axes, cfg: ModelConfig, measured: Mapping[int, float]) -> None:
    """Measured per-token speedup beside the FLOP ratio and the original design's claim."""
    lens = sorted(measured)
    ax.plot(lens, lens, color=COLORS["claim"], ls="--", marker="o",
            label="claim: S^2 / S score entries = S")
    ax.plot(lens, [analysis.flop_speedup(cfg, s) for s in lens], color=COLORS["uncached"],
            marker="s", label="FLOP ratio (whole model)")
    ax.plot(lens, [measured[s] for s in lens], color=COLORS["measured"], marker="^", lw=2.5,
            label="measured time ratio")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length S")
    ax.set_ylabel("uncached / cached, per new token")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


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
    ax.set_title(f"KV cache size, {dtype}, batch {batch_size}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


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
                highlight_head: int = 0) -> None:
    """One layer and batch slot of a flat cache as a strip of memory, left to right.

    Each cell is one head_dim-long vector. The keys a decode step reads for
    `highlight_head` are outlined: one contiguous run in HEAD_MAJOR, scattered in SEQ_MAJOR.
    """
    order = layout_order(layout, num_tokens, num_kv_heads)
    cmap = plt.get_cmap("tab10")
    for i, (kv, h, t) in enumerate(order):
        shade = 0.9 if kv == "K" else 0.45
        ax.add_patch(Rectangle((i, 0), 1, 1, facecolor=cmap(h), alpha=shade, edgecolor="white"))
        ax.text(i + 0.5, 0.5, f"{kv}{h}\nt{t}", ha="center", va="center", fontsize=7)
        if kv == "K" and h == highlight_head:
            ax.add_patch(Rectangle((i + 0.04, 0.04), 0.92, 0.92, fill=False, lw=2,
                                   edgecolor="black"))
    ax.set_xlim(0, len(order))
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("memory address (in units of head_dim elements)")
    ax.set_title(f"{layout.value}: keys of head {highlight_head} outlined", fontsize=10)
    ax.set_aspect("equal")


def draw_cache_fill(ax: Axes, prompt_len: int, cached_len: int, max_seq_len: int,
                    label: str = "", legend: bool = True) -> None:
    """One flat-cache slot as a bar: prompt tokens, generated tokens, and reserved room.

    The legend, if drawn, sits above the axes, clear of the bar.
    """
    ax.barh(0, max_seq_len, color="#eeeeee", edgecolor="black", label="reserved, empty")
    ax.barh(0, prompt_len, color=COLORS["claim"], label="prompt")
    ax.barh(0, cached_len - prompt_len, left=prompt_len, color=COLORS["cached"],
            label="generated")
    ax.set_xlim(0, max_seq_len)
    ax.set_yticks([0], [label] if label else [""])
    ax.set_xlabel(f"{cached_len} of {max_seq_len} token slots in use "
                  f"({cached_len / max_seq_len:.0%})")
    if legend:
        ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3,
                  frameon=False)


def plot_timings(ax: Axes, xs: Sequence[int], series: Mapping[str, Sequence[float]],
                 xlabel: str, ylabel: str = "time (ms)") -> None:
    """Measured times, one line per label, on log-log axes."""
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
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
    ax.legend(fontsize=8)  # again, so the legend shows the halos
    ax.set_ylabel("GiB")
    ax.set_title(f"KV cache (solid) vs weights (dashed), {dtype}, batch {batch_size}",
                 fontsize=10)


def cache_table(presets: Mapping[str, ModelConfig], dtype: str = "bf16") -> str:
    """A text table: per model, cache bytes per token, one sequence at the model's max context,
    the weights, and how many cached tokens (batch x context) weigh as much as the weights.

    >>> print(cache_table({"llama-3-8b": analysis.PRESETS["llama-3-8b"]}))
    model        KV/token  max ctx  cache @ max ctx  weights  cache = weights at
                      KiB   tokens              GiB      GiB   tokens  seqs @ max
    llama-3-8b      128.0    8,192             1.00    14.96  122,532        15.0
    """
    header = (f"{'model':<12} {'KV/token':>8} {'max ctx':>8} {'cache @ max ctx':>16} "
              f"{'weights':>8}  cache = weights at")
    units = (f"{'':<12} {'KiB':>8} {'tokens':>8} {'GiB':>16} {'GiB':>8} {'tokens':>8} "
             f"{'seqs @ max':>11}")
    lines = [header, units]
    for name, cfg in presets.items():
        per_token = analysis.kv_bytes_per_token(cfg, dtype)
        full = analysis.kv_cache_bytes(cfg, cfg.max_seq_len, 1, dtype)
        weights = analysis.weight_bytes(cfg, dtype)
        lines.append(f"{name:<12} {per_token / 2**10:>8.1f} {cfg.max_seq_len:>8,} "
                     f"{full / 2**30:>16.2f} {weights / 2**30:>8.2f} "
                     f"{weights // per_token:>8,} {weights / full:>11.1f}")
    return "\n".join(lines)
