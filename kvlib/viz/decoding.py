"""Drawings of incremental decoding: attention work per step, step costs, speedups, cache fill.

Each function draws on a matplotlib Axes it is given and computes nothing the book relies on:
numbers come from `analysis` and `bench`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap

from kvlib import analysis
from kvlib.config import ModelConfig
from kvlib.viz.common import COLORS

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
