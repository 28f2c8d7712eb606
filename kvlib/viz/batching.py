"""Drawings for chapter 4: what an engine did, step by step.

Each function draws on an Axes it is given, from an engine's `EngineMetrics` (step records
with their events) -- nothing here computes what the book relies on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from kvlib.outputs import EngineMetrics

# 0 not arrived / done, 1 waiting, 2 prefill chunk, 3 decode, 4 preempted (back in the queue),
# 5 padding (static batching: finished, but still fed because the batch is a rectangle)
_STATES = ["#ffffff", "#e0e0e0", "#4c78a8", "#59a14f", "#e15759", "#f1ce63"]
STATE_NAMES = ["", "waiting", "prefill chunk", "decode", "preempted", "padding"]


def timeline_grid(metrics: EngineMetrics, arrivals: Sequence[int]) -> np.ndarray:
    """(R, S) int grid: the state of request r at step s (codes as in STATE_NAMES)."""
    R, S = len(arrivals), len(metrics.steps)
    grid = np.zeros((R, S), dtype=np.int64)
    finished = [S] * R
    for s, rec in enumerate(metrics.steps):
        for rid, kind, _ in rec.events:
            if kind == "finish":
                finished[rid] = s
    for r in range(R):
        grid[r, arrivals[r]:finished[r] + 1] = 1
    for s, rec in enumerate(metrics.steps):
        for rid, kind, _ in rec.events:
            if kind in ("prefill", "decode"):
                grid[rid, s] = 2 if kind == "prefill" else 3
            elif kind == "preempt":
                grid[rid, s] = 4
            elif kind == "pad":
                grid[rid, s] = 5
    return grid


def draw_timeline(ax: Axes, metrics: EngineMetrics, arrivals: Sequence[int],
                  title: str = "", legend: bool = True,
                  legend_states: Sequence[str] | None = None) -> None:
    """One row per request, one column per step: waiting, prefill chunks, decodes,
    preemptions, padding; a black dot where a request finishes. The legend lists the states
    drawn, or `legend_states` (names from STATE_NAMES) when given."""
    grid = timeline_grid(metrics, arrivals)
    ax.imshow(grid, cmap=ListedColormap(_STATES), vmin=0, vmax=5, aspect="auto",
              interpolation="nearest")
    for s, rec in enumerate(metrics.steps):
        for rid, kind, _ in rec.events:
            if kind == "finish":
                ax.plot(s, rid, "k.", markersize=3)
    ax.set_xlabel("engine step")
    ax.set_ylabel("request (index)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    if legend:
        shown = (sorted(set(np.unique(grid).tolist()) - {0}) if legend_states is None
                 else [STATE_NAMES.index(name) for name in legend_states])
        ax.legend(handles=[Patch(color=_STATES[i], label=STATE_NAMES[i]) for i in shown],
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def draw_block_use(ax: Axes, metrics: EngineMetrics, num_blocks: int, label: str = "",
                   color: str | None = None) -> None:
    """Blocks in use after each step, against the pool's size."""
    used = metrics.used_blocks_per_step
    ax.plot(range(len(used)), used, label=label or None, color=color, lw=1.2)
    ax.axhline(num_blocks, color="k", ls="--", lw=0.8)
    ax.set_xlabel("engine step")
    ax.set_ylabel("blocks in use (of the pool)")
    ax.set_ylim(0, num_blocks * 1.1)


def draw_tokens_per_step(ax: Axes, metrics: EngineMetrics, budget: int | None = None) -> None:
    """Stacked bars: decode tokens and prefill tokens each step, with the token budget."""
    dec = np.array([s.num_decode_tokens for s in metrics.steps])
    pre = np.array([s.num_prefill_tokens for s in metrics.steps])
    x = np.arange(len(dec))
    ax.bar(x, dec, width=1.0, color=_STATES[3], label="decode tokens")
    ax.bar(x, pre, width=1.0, bottom=dec, color=_STATES[2], label="prefill tokens")
    if budget is not None:
        ax.axhline(budget, color="k", ls="--", lw=0.8, label="token budget")
    ax.set_xlabel("engine step")
    ax.set_ylabel("tokens in the step")
    ax.legend(loc="upper right", frameon=False)
