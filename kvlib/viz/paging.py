"""Drawings for chapter 3: the block pool and block tables, and the fragmentation sweeps.

A `PoolSnapshot` is what a drawing needs from a paged cache at one moment: per block its
reference count, how many of its slots are written, and whether it is free but still holds a
cached full block; per sequence its block table and length. `snapshot` builds one from block
tables and lengths; chapter 3 fills it from a real `PagedKVCache`. Drawings compute nothing
the book relies on: the numbers come from the cache and from `experiments.fragmentation`.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import FancyArrowPatch, Rectangle

from kvlib.experiments.fragmentation import SCHEMES, SchemeResult

SHARED = "#f2b701"       # a block more than one sequence references
CACHED = "#d9d9d9"       # free, but holds a full block a later prompt may reuse
COPIED = "#d62728"       # outline of a block just written by copy-on-write
SCHEME_COLORS = {"max": "#7f7f7f", "pow2": "#9467bd", "oracle": "#2ca02c", "paged": "#1f77b4"}


def seq_color(seq_id: int) -> tuple[float, float, float, float]:
    """A sequence's colour, the same in every drawing (tab10 by id; no orange or red, which
    would read as the shared yellow or the copy-on-write outline)."""
    palette = [0, 2, 4, 5, 6, 9, 7]  # blue, green, purple, brown, pink, cyan, grey
    return plt.get_cmap("tab10")(palette[seq_id % len(palette)])


@dataclass(frozen=True)
class PoolSnapshot:
    """One moment of a paged cache, as drawn. NB blocks of BS slots."""

    block_size: int
    ref_counts: tuple[int, ...]                 # (NB,) references to each block
    fill: tuple[int, ...]                       # (NB,) slots written in each block, 0 .. BS
    cached: tuple[bool, ...]                    # (NB,) free, holding a reusable full block
    block_tables: dict[int, tuple[int, ...]]    # seq_id -> physical block ids, in order
    lengths: dict[int, int]                     # seq_id -> tokens stored
    caption: str = ""
    copied: frozenset[int] = field(default_factory=frozenset)  # blocks copied on write

    @property
    def num_blocks(self) -> int:
        return len(self.ref_counts)

    @property
    def num_free(self) -> int:
        return sum(r == 0 for r in self.ref_counts)


def snapshot(num_blocks: int, block_size: int, block_tables: Mapping[int, Sequence[int]],
             lengths: Mapping[int, int], *, ref_counts: Sequence[int] | None = None,
             cached: Sequence[int] = (), caption: str = "",
             copied: Sequence[int] = ()) -> PoolSnapshot:
    """A snapshot from block tables and lengths; fills follow from the lengths.

    Block j of a sequence of n tokens holds min(BS, n - j * BS) of them: 45 tokens in blocks
    of 16 fill 16, 16 and 13. Reference counts default to how many tables name each block.

    >>> s = snapshot(4, 16, {0: [2, 0, 3]}, {0: 45})
    >>> s.fill, s.ref_counts
    ((16, 0, 16, 13), (1, 0, 1, 1))
    """
    tables = {s: tuple(int(b) for b in t) for s, t in block_tables.items()}
    if set(tables) != set(lengths):
        raise ValueError(f"block_tables name sequences {sorted(tables)}, lengths "
                         f"{sorted(lengths)}")
    fill = [0] * num_blocks
    counts = [0] * num_blocks
    for s, table in tables.items():
        if len(table) * block_size < lengths[s]:
            raise ValueError(f"sequence {s}: {len(table)} blocks of {block_size} cannot hold "
                             f"{lengths[s]} tokens")
        for j, b in enumerate(table):
            if not 0 <= b < num_blocks:
                raise ValueError(f"sequence {s} names block {b}, pool has {num_blocks}")
            fill[b] = max(fill[b], min(block_size, lengths[s] - j * block_size))  # >= 0
            counts[b] += 1
    for b in cached:
        fill[b] = block_size  # only full blocks are cached
    refs = tuple(counts if ref_counts is None else (int(r) for r in ref_counts))
    if len(refs) != num_blocks:
        raise ValueError(f"{len(refs)} reference counts for {num_blocks} blocks")
    is_cached = tuple(b in set(cached) for b in range(num_blocks))
    return PoolSnapshot(block_size, refs, tuple(fill), is_cached, tables, dict(lengths),
                        caption, frozenset(copied))


def _block_color(snap: PoolSnapshot, b: int, owners: Mapping[int, list[int]]):
    if snap.ref_counts[b] > 1:
        return SHARED
    if snap.ref_counts[b] == 1 and owners.get(b):
        return seq_color(owners[b][0])
    return CACHED if snap.cached[b] else "white"


def draw_pool(ax: Axes, snap: PoolSnapshot) -> None:
    """The pool as a row of blocks (slots filled, reference counts), block tables below.

    Each block is drawn as BS slots; written slots are coloured by the sequence that owns the
    block, or yellow when several share it. Under each block: its reference count, or
    'cached' for a free block whose full contents a later prompt may reuse. Each sequence's
    row shows its block table, logical block j pointing at a physical block; a red outline
    marks a block just copied on write.
    """
    bs, gap = snap.block_size, 0.6
    width = bs + gap
    pool_y, table_y, row_h = 0.0, -2.4, 1.4  # pool row, first table row, row pitch
    owners: dict[int, list[int]] = {}
    for s, table in snap.block_tables.items():
        for b in table:
            owners.setdefault(b, []).append(s)
    for b in range(snap.num_blocks):
        x = b * width
        color = _block_color(snap, b, owners)
        for j in range(bs):
            filled = j < snap.fill[b] and (snap.ref_counts[b] > 0 or snap.cached[b])
            ax.add_patch(Rectangle((x + j, pool_y), 1, 1, facecolor=color if filled else "white",
                                   edgecolor="#bbbbbb", lw=0.5))
        edge = COPIED if b in snap.copied else "black"
        ax.add_patch(Rectangle((x, pool_y), bs, 1, fill=False, edgecolor=edge,
                               lw=3 if b in snap.copied else 1))
        ax.text(x + bs / 2, pool_y + 1.1, f"#{b}", ha="center", va="bottom", fontsize=10)
        ref = snap.ref_counts[b]
        note = f"ref {ref}" if ref else ("cached" if snap.cached[b] else "free")
        ax.text(x + bs / 2, pool_y - 0.1, note, ha="center", va="top", fontsize=9.5,
                color="black" if ref else "#777777", weight="bold" if ref > 1 else "normal")
    for row, (s, table) in enumerate(sorted(snap.block_tables.items())):
        y = table_y - row_h * row
        ax.text(-0.5, y + 0.45, f"seq {s}\n{snap.lengths[s]} tokens", ha="right",
                va="center", fontsize=10, color=seq_color(s), linespacing=1.0)
        for j, b in enumerate(table):
            x = j * width
            n = max(0, min(bs, snap.lengths[s] - j * bs))
            ax.add_patch(Rectangle((x, y), n, 0.9, facecolor=seq_color(s), alpha=0.35, lw=0))
            ax.add_patch(Rectangle((x, y), bs, 0.9, fill=False, edgecolor=seq_color(s), lw=1.2))
            ax.text(x + bs / 2, y + 0.45, f"{j}→#{b}", ha="center", va="center", fontsize=9.5)
            ax.add_patch(FancyArrowPatch((x + bs / 2, y + 0.9), (b * width + bs / 2, pool_y - 0.6),
                                         arrowstyle="-|>", mutation_scale=7, lw=0.7,
                                         color=seq_color(s), alpha=0.45))
    rows = len(snap.block_tables)
    ax.set_xlim(-0.5, snap.num_blocks * width)
    ax.set_ylim(table_y - row_h * (rows - 1) - 0.3 if rows else pool_y - 0.8, pool_y + 1.7)
    ax.axis("off")
    used = snap.num_blocks - snap.num_free
    title = f"pool: {used} of {snap.num_blocks} blocks in use, block size {bs}"
    ax.set_title(f"{snap.caption}\n{title}" if snap.caption else title, loc="left")


def pool_figure(snap: PoolSnapshot, width: float = 7.0, max_rows: int = 0) -> plt.Figure:
    """A figure holding `draw_pool(snap)`; its height fits the sequences, or `max_rows` of
    them if larger (so that every step of a scenario draws at one size)."""
    rows = max(len(snap.block_tables), max_rows)
    fig, ax = plt.subplots(figsize=(width, 1.9 + (0.6 * (rows + 1) if rows else 0)))
    draw_pool(ax, snap)
    if rows > len(snap.block_tables):  # keep the pool where the tallest step has it
        top = ax.get_ylim()[1]
        ax.set_ylim(top - 2.0 - 1.4 * rows - 0.3, top)
    return fig


# -- the fragmentation simulator -------------------------------------------------------------

def plot_scheme_bars(ax: Axes, results: Mapping[str, SchemeResult], *,
                     in_flight: bool = True) -> None:
    """Share of reserved slots holding tokens, per scheme: at completion (solid bars) and,
    if asked, averaged over decode steps (hatched), each labelled with its percentage."""
    names = [s for s in SCHEMES if s in results]
    xs = range(len(names))
    w = 0.38 if in_flight else 0.6
    for i, name in enumerate(names):
        r = results[name]
        color = SCHEME_COLORS[name]
        bars = [(i - w / 2 if in_flight else i, r.utilization, None)]
        if in_flight:
            bars.append((i + w / 2, r.utilization_in_flight, "///"))
        for x, u, hatch in bars:
            ax.bar(x, u, width=w, color=color, hatch=hatch, edgecolor="white" if hatch else color)
            ax.text(x, u + 0.02, f"{u:.0%}", ha="center", va="bottom", fontsize=9.5)
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1.15)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set_ylabel("reserved slots holding tokens (%)")
    if in_flight:
        ax.bar(0, 0, color="#555555", label="at completion")
        ax.bar(0, 0, color="#555555", hatch="///", edgecolor="white", label="in flight")
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, ncol=2)


def plot_fits(ax: Axes, results: Mapping[str, SchemeResult], budget: int) -> None:
    """How many requests fit in `budget` token slots, per scheme."""
    names = [s for s in SCHEMES if s in results]
    counts = [results[s].fits for s in names]
    ax.bar(names, counts, color=[SCHEME_COLORS[s] for s in names])
    for i, c in enumerate(counts):
        ax.text(i, c, f"{c:,}", ha="center", va="bottom", fontsize=9.5)
    ax.set_ylim(0, max(counts) * 1.15 + 1)
    ax.set_ylabel(f"requests in {budget:,} slots")


def plot_block_size_sweep(ax: Axes, sweep: Mapping[int, Mapping[str, SchemeResult]],
                          label: str = "", *, in_flight: bool = False, **style) -> None:
    """Paged waste (share of reserved slots unused) against block size, one line.

    `sweep` maps block size -> scheme -> result (`fragmentation.sweep_block_sizes`).
    """
    sizes = sorted(sweep)
    waste = [sweep[b]["paged"].waste_in_flight if in_flight else sweep[b]["paged"].waste
             for b in sizes]
    ax.plot(sizes, [100 * w for w in waste], marker="o", ms=3, label=label, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{b:,}" for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("paged: reserved slots unused (%)")
    ax.grid(True, which="major", alpha=0.3)


def plot_max_len_sweep(ax: Axes, by_max_len: Mapping[int, Mapping[str, SchemeResult]], *,
                       in_flight: bool = True) -> None:
    """Share of reserved slots holding tokens against max_len, one line per scheme.

    `by_max_len` maps max_len -> scheme -> result (`fragmentation.simulate` at each).
    """
    lens = sorted(by_max_len)
    for s in SCHEMES:
        if s not in by_max_len[lens[0]]:
            continue
        ys = [by_max_len[m][s].utilization_in_flight if in_flight else by_max_len[m][s].utilization
              for m in lens]
        ax.plot(lens, [100 * y for y in ys], marker="o", ms=3, color=SCHEME_COLORS[s], label=s)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lens, [f"{m:,}" for m in lens])
    ax.minorticks_off()
    ax.set_ylim(0, 105)
    ax.set_xlabel("max_len (tokens)")
    ax.set_ylabel("slots holding tokens (%)" + (", in flight" if in_flight else ""))
    ax.grid(True, which="major", alpha=0.3)


def plot_length_histogram(ax: Axes, lens: Sequence[int] | np.ndarray, label: str = "",
                          bins: int = 40, max_len: int | None = None) -> None:
    """Histogram of request lengths on a log axis (counts per bin, outline only)."""
    lens = np.asarray(lens)
    edges = np.geomspace(1, max_len or lens.max(), bins + 1)
    ax.hist(lens, bins=edges, histtype="step", lw=1.5, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("tokens per request (prompt + output)")
    ax.set_ylabel("requests")


def _bar(share: float, color: str, hatch: bool = False) -> str:
    stripes = (f"background: repeating-linear-gradient(45deg, {color}, {color} 3px, "
               f"#ffffff 3px, #ffffff 5px)" if hatch else f"background: {color}")
    return (f'<div style="width: 110px; background: #f0f0f0; display: inline-block; '
            f'vertical-align: middle"><div style="width: {100 * share:.1f}%; height: 12px; '
            f'{stripes}"></div></div>')


def scheme_table_html(results: Mapping[str, SchemeResult], budget: int, title: str = "") -> str:
    """The simulator's numbers as an HTML table with bars: per scheme, the share of reserved
    slots holding tokens at completion and in flight (hatched), and requests fitting in
    `budget` slots. A few kB per state, where a PNG of the same would be tens."""
    names = [s for s in SCHEMES if s in results]
    most = max(results[s].fits for s in names) or 1
    rows = []
    for s in names:
        r, color = results[s], SCHEME_COLORS[s]
        rows.append(
            f"<tr><td><b>{html.escape(s)}</b></td>"
            f"<td>{_bar(r.utilization, color)} {r.utilization:.1%}</td>"
            f"<td>{_bar(r.utilization_in_flight, color, hatch=True)} "
            f"{r.utilization_in_flight:.1%}</td>"
            f"<td>{_bar(r.fits / most, color)} {r.fits:,}</td></tr>")
    head = ("<tr><th>scheme</th><th>slots holding tokens, at completion</th>"
            f"<th>in flight</th><th>requests in {budget:,} slots</th></tr>")
    caption = f"<caption>{html.escape(title)}</caption>" if title else ""
    return (f'<div style="overflow-x: auto; max-width: 100%"><table style="font-size: 13px">'
            f'{caption}{head}{"".join(rows)}</table></div>')  # scrolls sideways on a phone



def draw_group_tables(ax: Axes, tables: Mapping[str, Sequence[int]], null_blocks: Mapping[str, int],
                      block_size: int) -> None:
    """One sequence's block table in each cache group, one row per group: a block it holds
    is a filled square with its id, an entry whose block the window freed is the null block
    (hatched). The x axis is the table entry, i.e. positions entry * block_size on."""
    for row, (name, table) in enumerate(tables.items()):
        y = -row * 1.3
        null = null_blocks[name]
        for j, b in enumerate(table):
            held = b != null
            ax.add_patch(Rectangle((j, y), 0.92, 0.9, facecolor=SCHEME_COLORS["paged"]
                                   if held else "white", hatch=None if held else "///",
                                   edgecolor="#555555", lw=0.6, alpha=0.85 if held else 1))
            if len(table) <= 40:
                ax.text(j + 0.46, y + 0.45, str(b) if held else "∅", ha="center",
                        va="center", fontsize=9.5, color="white" if held else "#555555")
        live = sum(b != null for b in table)
        ax.text(-0.4, y + 0.45, f"{name}\n{live} of {len(table)} held", ha="right",
                va="center", fontsize=10)
    width = max(len(t) for t in tables.values())
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(-1.3 * (len(tables) - 1) - 0.3, 1.2)
    ax.set_yticks([])
    ax.set_xlabel(f"block table entry (positions entry x {block_size} on)")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
