"""Widgets for chapter 6: step through the tiles of chunked attention (precomputed, `live`)."""

from __future__ import annotations

import ipywidgets as W

from kvlib.viz import flash as fviz
from kvlib.widgets.live import live


def tile_widget(seq_len: int = 8, tile: int = 2, seed: int = 0) -> W.VBox:
    """Move `step` through the tiles of a causal pass over `seq_len` toy scores in square
    tiles of `tile`: one state per tile computed, each different from the others."""
    scores = fviz.toy_scores(seq_len, seed)
    steps = list(range(1, fviz.num_tiles(seq_len, tile, tile) + 1))
    return live(lambda step: fviz.tile_step_figure(scores, tile, tile, step), step=steps)
