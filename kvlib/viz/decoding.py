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
    ax.set_title(f"{'with' if cached else 'without'} cache:\n{computed} scores")
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
    ax.set_xlabel("S, tokens already cached (tokens)")
    ax.set_ylabel("work per new token (FLOPs)")
    ax.set_title(f"cost of one decode step ({cfg.name})")
    ax.legend(ncol=2, loc="upper left", bbox_to_anchor=(0.0, -0.16), frameon=False)  # below
    ax.grid(True, which="major", alpha=0.3)


def plot_speedups(ax: Axes, cfg: ModelConfig, measured: Mapping[int, float]) -> None:
    """Measured per-token speedup beside the FLOP ratio and the widely quoted claim (S)."""
    lens = sorted(measured)
    ax.plot(lens, lens, color=COLORS["claim"], ls="--", marker="o",
            label="claim: S^2 / S score entries = S")
    ax.plot(lens, [analysis.flop_speedup(cfg, s) for s in lens], color=COLORS["uncached"],
            marker="s", label="FLOP ratio (whole model)")
    ax.plot(lens, [measured[s] for s in lens], color=COLORS["measured"], marker="^", lw=2.5,
            label="measured time ratio")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length S (tokens)")
    ax.set_ylabel("uncached / cached per token (x)")
    ax.legend()
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
    ax.set_xlabel(f"token slots ({cached_len} of {max_seq_len} in use: "
                  f"{cached_len / max_seq_len:.0%})")
    if legend:
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, frameon=False)


STEP_PARTS = ("projection", "attention", "mlp", "lm_head")


def step_cost_range(presets: Mapping[str, ModelConfig],
                    context_lens: Sequence[int]) -> tuple[float, float]:
    """The smallest and largest FLOPs `draw_step_cost_bars` draws over these models and
    contexts: shared x limits, so every state of a widget compares like with like."""
    values = [
        value
        for cfg in presets.values() for s in context_lens for cached in (False, True)
        for cost in [analysis.decode_step_cost(cfg, s, cached=cached)]
        for value in (*(getattr(cost, f"{p}_flops") for p in STEP_PARTS), cost.total_flops)
    ]
    return min(values), max(values)


def draw_step_cost_bars(ax: Axes, cfg: ModelConfig, context_len: int,
                        xlim: tuple[float, float] | None = None) -> None:
    """One decode step's FLOPs by part, without and with a cache, as grouped bars on a log
    axis (stacking on a log axis would mislead). S = `context_len` tokens are cached.

    The legend sits below the axes, clear of the bars; `xlim` fixes the axis (see
    `step_cost_range`).
    """
    costs = {c: analysis.decode_step_cost(cfg, context_len, cached=c) for c in (False, True)}
    rows = [*STEP_PARTS, "total"]
    for offset, cached in ((-0.2, False), (0.2, True)):
        flops = [getattr(costs[cached], f"{p}_flops") for p in STEP_PARTS]
        flops.append(costs[cached].total_flops)
        ax.barh([i + offset for i in range(len(rows))], flops, height=0.4,
                color=COLORS["cached" if cached else "uncached"],
                label="with cache" if cached else "without cache")
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xscale("log")
    if xlim is not None:
        ax.set_xlim(xlim[0] / 2, xlim[1] * 2)
    ax.set_xlabel("work per new token (FLOPs, log scale)")
    ratio = costs[False].total_flops / costs[True].total_flops
    ax.set_title(f"{cfg.name}, S = {context_len:,} cached: {ratio:,.0f}x fewer FLOPs with a "
                 f"cache\n(the score-count claim says {context_len + 1:,}x)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2,
              frameon=False)  # below the x label, never over a bar
    ax.grid(True, axis="x", which="major", alpha=0.3)
