"""Drawings for chapter 6: tiles over the causal score matrix, and measured peak memory.

Each function draws on an Axes (or returns a Figure for a widget state) and computes nothing
the book relies on: the tile order is the one `kvlib.flash.chunked_attention` visits, the
row states come from `experiments.flash.online_softmax_trace`, the bytes from `peak_bytes`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from kvlib import flash
from kvlib.experiments.flash import PATHS, AttentionMemory, online_softmax_trace

COLORS = {"naive": "tab:red", "chunked": "tab:blue", "sdpa": "tab:green"}


def causal_tile_schedule(seq_len: int, q_tile: int,
                         kv_tile: int) -> list[tuple[int, int, int, int]]:
    """(q_start, q_end, k_start, k_end) of every tile causal attention over `seq_len` tokens
    computes, in order: query tiles outer, key tiles inner, none wholly above the diagonal.

    >>> causal_tile_schedule(5, 2, 2)  # 3 query tiles; the last query tile sees all keys
    [(0, 2, 0, 2), (2, 4, 0, 2), (2, 4, 2, 4), (4, 5, 0, 2), (4, 5, 2, 4), (4, 5, 4, 5)]
    """
    return [(q0, q1, k0, k1) for q0, q1 in flash.tiles(seq_len, q_tile)
            for k0, k1 in flash.tiles(q1, kv_tile)]


def draw_tiles(ax: Axes, scores: np.ndarray, q_tile: int, kv_tile: int, step: int) -> None:
    """The (T, T) causal score matrix with its tiles: done (blue), current (red, the
    `step`-th, 1-based), to do (grey outline); scores above the diagonal are never computed."""
    T = scores.shape[0]
    schedule = causal_tile_schedule(T, q_tile, kv_tile)
    causal = np.tril(np.ones((T, T), dtype=bool))
    ax.imshow(np.where(causal, 0.93, 1.0), cmap="gray", vmin=0, vmax=1,
              extent=(0, T, T, 0))
    for i in range(T):
        for j in range(i + 1):
            ax.text(j + 0.5, i + 0.5, f"{scores[i, j]:.0f}", ha="center", va="center",
                    fontsize=9.5)
    for n, (q0, q1, k0, k1) in enumerate(schedule, start=1):
        done, current = n < step, n == step
        color = "tab:red" if current else ("tab:blue" if done else "0.6")
        ax.add_patch(Rectangle((k0, q0), k1 - k0, q1 - q0, fill=done or current,
                               facecolor=color, alpha=0.25 if done or current else 1,
                               edgecolor=color, linewidth=2.5 if current else 1))
    ax.set_xlim(0, T)
    ax.set_ylim(T, 0)
    ax.set_xticks(np.arange(T) + 0.5, range(T))
    ax.set_yticks(np.arange(T) + 0.5, range(T))
    ax.set_xlabel("key (position)")
    ax.set_ylabel("query (position)")
    ax.tick_params(length=0)


def draw_tile_order(ax: Axes, seq_len: int, q_tile: int, kv_tile: int) -> None:
    """The whole causal pass in one picture: each tile `chunked_attention` computes, shaded
    and numbered in the order it is visited; the rest (wholly above the diagonal) hatched,
    never computed."""
    schedule = causal_tile_schedule(seq_len, q_tile, kv_tile)
    ax.imshow(np.ones((seq_len, seq_len)), cmap="gray", vmin=0, vmax=1,
              extent=(0, seq_len, seq_len, 0))
    for q0, q1 in flash.tiles(seq_len, q_tile):
        for k0, k1 in flash.tiles(seq_len, kv_tile):
            if k0 >= q1:  # every key of this tile is after every query of it
                ax.add_patch(Rectangle((k0, q0), k1 - k0, q1 - q0, fill=False, hatch="///",
                                       edgecolor="0.75", linewidth=0.8))
    for n, (q0, q1, k0, k1) in enumerate(schedule, start=1):
        ax.add_patch(Rectangle((k0, q0), k1 - k0, q1 - q0, facecolor="tab:blue", alpha=0.18,
                               edgecolor="tab:blue", linewidth=1.5))
        ax.text((k0 + k1) / 2, (q0 + q1) / 2, str(n), ha="center", va="center", fontsize=11,
                color="tab:blue", weight="bold")
    ax.set_xlim(0, seq_len)
    ax.set_ylim(seq_len, 0)
    ax.set_xticks(range(0, seq_len + 1, kv_tile))
    ax.set_yticks(range(0, seq_len + 1, q_tile))
    ax.set_xlabel("key (position)")
    ax.set_ylabel("query (position)")
    ax.set_title(f"{len(schedule)} tiles computed, in this order; hatched: never")


def tile_step_figure(scores: np.ndarray, q_tile: int, kv_tile: int, step: int) -> Figure:
    """Left: the tiles, the `step`-th current. Right: m_i and l_i of the current tile's query
    rows after that tile (from `online_softmax_trace` over each row's visible scores)."""
    T = scores.shape[0]
    schedule = causal_tile_schedule(T, q_tile, kv_tile)
    q0, q1, k0, k1 = schedule[step - 1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.0, 3.6),
                                      gridspec_kw={"width_ratios": [1, 1.05]})
    draw_tiles(left, scores, q_tile, kv_tile, step)
    left.set_title(f"tile {step} of {len(schedule)}:\nqueries {q0}-{q1 - 1}, keys {k0}-{k1 - 1}")
    rows = []
    for i in range(q0, q1):
        row = np.where(np.arange(k1) <= i, scores[i, :k1], -np.inf)  # this row's keys so far
        last = online_softmax_trace(row.tolist(), kv_tile)[-1]
        final = k1 >= i + 1  # every key this query sees has been read
        rows.append([str(i), f"{last.m_i:g}", f"{last.l_i:.3f}", f"{last.alpha:.3f}",
                     "done: acc / l_i" if final else "more keys"])
    right.axis("off")
    table = right.table(cellText=rows, colLabels=["query", "m_i", "l_i", "alpha", "row"],
                        colWidths=[0.14, 0.14, 0.17, 0.17, 0.38], loc="center",
                        cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9.5)
    table.scale(1, 1.5)
    right.set_title("its query rows after it")
    return fig


def plot_peak_memory(ax: Axes, memory: AttentionMemory, extend_to: int | None = None) -> None:
    """Measured peak bytes per path vs length (log-log), with the naive path's quadratic fit
    and the chunked path's linear fit dashed, drawn out to `extend_to` tokens if given."""
    T = np.array(memory.seq_lens, dtype=float)
    grid = np.geomspace(T[0], max(T[-1], extend_to or 0), 50)
    for path in PATHS:
        if path not in memory.peak_bytes:
            continue
        ax.plot(T, np.array(memory.peak_bytes[path]) / 2**20, "o-", color=COLORS[path],
                label=f"{path} (measured)")
    fits = {"naive": 2, "chunked": 1}
    for path, degree in fits.items():
        if path in memory.peak_bytes:
            *coef, _ = memory.fit(path, degree)
            ax.plot(grid, np.polyval(coef, grid) / 2**20, "--", color=COLORS[path], alpha=0.6,
                    label=f"{path}: {'quadratic' if degree == 2 else 'linear'} fit")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (tokens, causal self-attention)")
    ax.set_ylabel("peak memory allocated (MiB)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)


def toy_scores(seq_len: int, seed: int = 0) -> np.ndarray:
    """Small integer scores (T, T) in -3..5, seeded: easy to read in a drawing."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 6, (seq_len, seq_len), generator=gen).numpy().astype(float)


def num_tiles(seq_len: int, q_tile: int, kv_tile: int) -> int:
    """Tiles a causal pass over `seq_len` tokens computes (`causal_tile_schedule`'s length).

    >>> num_tiles(8, 2, 2), 4 * 5 // 2   # 4 query tiles see 1, 2, 3, 4 key tiles
    (10, 10)
    """
    return len(causal_tile_schedule(seq_len, q_tile, kv_tile))
