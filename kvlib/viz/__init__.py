"""Drawings for the book: attention work per step, cost curves, cache sizes, memory layouts.

One module per chapter topic (`viz.decoding`, `viz.layouts`, ...), each drawing on a
matplotlib Axes it is given (so a chapter can place several side by side) and computing
nothing the book relies on: numbers come from `analysis` and `bench`. The names of chapters
1 and 2 are re-exported here, so `from kvlib import viz; viz.draw_layout(...)` works.
"""

from kvlib.viz.common import COLORS, plot_timings
from kvlib.viz.decoding import (
    draw_attention_work,
    draw_cache_fill,
    plot_speedups,
    plot_step_costs,
)
from kvlib.viz.layouts import (
    cache_table,
    draw_layout,
    layout_order,
    plot_cache_sizes,
    plot_cache_vs_weights,
)

__all__ = [
    "COLORS", "cache_table", "draw_attention_work", "draw_cache_fill", "draw_layout",
    "layout_order", "plot_cache_sizes", "plot_cache_vs_weights", "plot_speedups",
    "plot_step_costs", "plot_timings",
]
