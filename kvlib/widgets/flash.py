"""Widgets for chapter 6: step through the tiles of chunked attention (precomputed, `live`)."""

from __future__ import annotations

import ipywidgets as W

from kvlib.viz import flash as fviz
from kvlib.widgets.live import figure_png, live


def tile_widget(seq_len: int = 8, tile_sizes: tuple[int, ...] = (2, 4),
                seed: int = 0) -> W.VBox:
    """Move `step` through the tiles of a causal pass over `seq_len` toy scores; `tile`
    picks square tiles of each size. Steps past the last tile show the last one."""
    scores = fviz.toy_scores(seq_len, seed)
    counts = {t: fviz.num_tiles(seq_len, t, t) for t in tile_sizes}
    pngs = {(t, s): figure_png(fviz.tile_step_figure(scores, t, t, s))
            for t in tile_sizes for s in range(1, counts[t] + 1)}  # each drawn once

    def render(tile: int, step: int) -> W.Image:
        return W.Image(value=pngs[tile, min(step, counts[tile])], format="png")

    return live(render, kinds={"tile": "toggle"}, tile=list(tile_sizes),
                step=list(range(1, max(counts.values()) + 1)))
