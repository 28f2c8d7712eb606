"""Chapter 7's widget: where a decode step sits on a GPU's roofline.

Pick a GPU, the cache's element type, the grouped-query ratio G = H / Hkv and the batch; the
state places a decode step's two kinds of work on that GPU's roofline
(`analysis.decode_step_operations`, Llama-3-8B's shape with H / G KV heads, 4,096 cached
tokens per sequence): the weight matmuls, whose intensity grows with the batch, and decode
attention, whose intensity 2 G / bytes no batch changes. Beside it, the time each takes per
step at that roof. Built with `kvlib.widgets.live`: every state is computed when the cell
runs (an SVG drawing and a table, a few kB each), so the controls move in the HTML book with
no kernel.
"""

from __future__ import annotations

import dataclasses
import html

import ipywidgets as W

from kvlib import analysis
from kvlib.presets import Hardware
from kvlib.viz import gpu as gviz
from kvlib.widgets.live import live

CONTEXT = 4096  # cached tokens per sequence in every state
BASE = "llama-3-8b"  # the shape whose KV heads G changes: 32 query heads
# 4 x 2 x 3 x 4 = 96 states of about 4 kB.
GRID = {"gpu": list(analysis.GPUS), "kv_dtype": ["bf16", "fp8"], "G": [1, 4, 8],
        "batch": [1, 16, 128, 1024]}
COLORS = {"weight matmuls": "#ff7f0e", "attention": "#1f77b4"}


def step_operations(G: int, batch: int, kv_dtype: str) -> tuple[analysis.Operation, ...]:
    """The matmuls (weights in bf16) and attention (cache in `kv_dtype`) of one decode step
    of Llama-3-8B's shape with 32 / G KV heads, `batch` sequences of CONTEXT tokens.

    >>> matmuls, attention = step_operations(4, 1, "bf16")
    >>> attention.arithmetic_intensity  # 2 G / 2 bytes
    4.0
    >>> step_operations(4, 1, "fp8")[1].arithmetic_intensity  # one byte per element
    8.0
    >>> round(step_operations(4, 128, "bf16")[0].arithmetic_intensity)  # about the batch
    128
    """
    base = analysis.PRESETS[BASE]
    if not isinstance(G, int) or G < 1 or base.num_heads % G:
        raise ValueError(f"G must be a positive int dividing {base.num_heads}, got {G!r}")
    cfg = dataclasses.replace(base, num_kv_heads=base.num_heads // G)
    matmuls, _ = analysis.decode_step_operations(cfg, CONTEXT, batch, dtype="bf16")
    _, attention = analysis.decode_step_operations(cfg, CONTEXT, batch, dtype=kv_dtype)
    return matmuls, attention


def roofline_state(hw: Hardware, kv_dtype: str, G: int, batch: int) -> str:
    """One state as HTML: the roofline with the step's two operations, and their times."""
    ops = step_operations(G, batch, kv_dtype)
    svg = gviz.roofline_svg(hw, [(op.name, op.arithmetic_intensity, COLORS[op.name])
                                 for op in ops])
    times = [op.seconds(hw) * 1e3 for op in ops]
    rows = []
    for op, ms in zip(ops, times):
        bound = "compute" if op.compute_bound(hw) else "memory"
        bar = (f'<span style="display: inline-block; height: 12px; width: '
               f'{120 * ms / max(times):.0f}px; background: {COLORS[op.name]}"></span>')
        rows.append(f'<tr><td><span style="color: {COLORS[op.name]}">&#9679;</span> '
                    f"{html.escape(op.name)}</td><td>{op.arithmetic_intensity:,.0f} FLOP/B</td>"
                    f"<td>{bound} bound</td><td>{bar} {ms:.2f} ms</td></tr>")
    caption = (f"{html.escape(hw.name)}: {batch:,} sequence(s) of {CONTEXT:,} tokens, "
               f"G = {G} ({32 // G} KV heads), {kv_dtype} cache; weights in bf16. "
               f"Time per decode step at the roof:")
    table = (f'<div style="overflow-x: auto; max-width: 100%"><table style="font-size: 13px">'
             f"<caption>{caption}</caption>{''.join(rows)}</table></div>")
    return f"{svg}{table}"


def roofline_widget(grid: dict | None = None) -> W.VBox:
    """GPU x cache dtype x grouped-query ratio x batch: the step on the GPU's roofline."""
    grid = dict(GRID if grid is None else grid)

    def render(gpu: str, kv_dtype: str, G: int, batch: int) -> str:
        return roofline_state(analysis.GPUS[gpu], kv_dtype, G, batch)

    defaults = {"gpu": "H100-SXM" if "H100-SXM" in grid["gpu"] else grid["gpu"][0]}
    if 4 in grid["G"]:
        defaults["G"] = 4
    return live(render, kinds={"gpu": "dropdown", "kv_dtype": "toggle", "G": "toggle",
                               "batch": "toggle"}, defaults=defaults, **grid)
