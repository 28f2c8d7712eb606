"""Widgets of chapter 2: a cache-size calculator for real models, and the two flat layouts.

Each is `live`: its states are computed when the cell runs and chosen in the browser, so it
moves in the HTML book too. Numbers come from `analysis` and from real `FlatKVCache`s.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import ipywidgets as W
import matplotlib.pyplot as plt

from kvlib import analysis
from kvlib.cache.flat import FlatKVCache
from kvlib.config import CacheConfig, Layout, ModelConfig
from kvlib.viz import layouts as lviz
from kvlib.viz import style
from kvlib.widgets.live import figure_html, live

CALCULATOR_DTYPES = ("fp32", "bf16", "fp8")
# Every preset but Llama 3's, whose tables Llama 3.1's repeat up to their 8,192 tokens.
CALCULATOR_MODELS = ("gpt2", "smollm2-135m", "mistral-7b-v0.2", "llama-3.1-8b",
                     "llama-3.1-70b", "qwen3-8b")


def format_bytes(n: float) -> str:
    """Binary units: 131072 -> '128.0 KiB'.

    >>> format_bytes(512), format_bytes(131072), format_bytes(80 * 2**30)
    ('512 B', '128.0 KiB', '80.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    raise AssertionError("unreachable")


def cache_size_table(cfg: ModelConfig, context_len: int, batch_size: int,
                     dtypes: Sequence[str] = CALCULATOR_DTYPES) -> str:
    """An HTML table: the cache of `batch_size` sequences of `context_len` tokens, one column
    per dtype: bytes per token (the formula), the cache, the weights, and their ratio."""
    cell = 'style="padding: 0.15em 0.9em; text-align: right"'  # inline: Jupyter has no book CSS
    heads = "".join(f"<th {cell}>{d}</th>" for d in dtypes)
    rows = {"bytes per token": [], "cache": [], "weights": [], "cache / weights": []}
    for d in dtypes:
        per_token = analysis.kv_bytes_per_token(cfg, d)
        total = analysis.kv_cache_bytes(cfg, context_len, batch_size, d)
        weights = analysis.weight_bytes(cfg, d)
        rows["bytes per token"].append(f"{per_token:,} B")
        rows["cache"].append(format_bytes(total))
        rows["weights"].append(format_bytes(weights))
        rows["cache / weights"].append(f"{total / weights:.2f}x")
    body = "".join(f"<tr><td><b>{k}</b></td>{''.join(f'<td {cell}>{v}</td>' for v in vs)}</tr>"
                   for k, vs in rows.items())
    formula = (f"bytes per token = 2 x {cfg.num_layers} layers x {cfg.num_kv_heads} KV heads x "
               f"{cfg.head_dim} dims x bytes per element; cache = bytes per token x "
               f"{context_len:,} tokens x {batch_size} sequences")
    note = ""
    if context_len > cfg.max_seq_len:
        note = (f"<p><i>{html.escape(cfg.name)} was trained for {cfg.max_seq_len:,} tokens of "
                f"context: longer is hypothetical for it.</i></p>")
    return (f"<p>{html.escape(formula)}</p>"
            f'<div style="overflow-x: auto; max-width: 100%">'  # scrolls sideways on a phone
            f'<table class="kv-calculator"><tr><th></th>{heads}</tr>{body}</table></div>{note}')


def cache_calculator(presets: dict | None = None,
                     context_lens: Sequence[int] = (1024, 8192, 32768, 131072),
                     batch_sizes: Sequence[int] = (1, 8, 64),
                     default: str = "llama-3.1-8b") -> W.VBox:
    """Model, context length and batch in; the cache in three dtypes (and weights) out.
    The models default to `CALCULATOR_MODELS`, so no two states show the same table."""
    presets = dict({n: analysis.PRESETS[n] for n in CALCULATOR_MODELS} if presets is None
                   else presets)

    def render(model: str, context: int, batch: int) -> str:
        return cache_size_table(presets[model], context, batch)

    defaults = {"model": default}
    if 8192 in context_lens:
        defaults["context"] = 8192
    return live(render, model=list(presets), context=list(context_lens),
                batch=list(batch_sizes), defaults=defaults)


PER_ROW = 16  # cells per row of the memory strip: 44 CSS px each, room for "K0 / t3"


def layout_state(layout: Layout, num_kv_heads: int, highlight_head: int = 0,
                 num_tokens: int = 4, max_kv_heads: int = 4) -> str:
    """HTML: one layer and slot of a real FlatKVCache's memory, and its key view's strides.

    The strip has room for `max_kv_heads` in every state (rows of `PER_ROW` cells), so the
    cells keep their size and the figure its height.
    """
    cache = FlatKVCache(CacheConfig(num_layers=1, num_kv_heads=num_kv_heads, head_dim=8,
                                    max_batch_size=1, max_seq_len=num_tokens, layout=layout))
    rows = -(-2 * max_kv_heads * num_tokens // PER_ROW)
    fig, ax = plt.subplots(figsize=(style.COLUMN_IN, 0.9 + 0.45 * rows))
    lviz.draw_layout(ax, layout, num_tokens=num_tokens, num_kv_heads=num_kv_heads,
                     highlight_head=highlight_head, per_row=PER_ROW, min_rows=rows)
    keys = cache.keys(0)  # (B, Hkv, S, D)
    text = (f"cache.data.shape = {tuple(cache.data.shape)}\n"
            f"keys(0): shape (B, Hkv, S, D) = {tuple(keys.shape)}, strides = {keys.stride()}, "
            f"contiguous: {keys.is_contiguous()}")
    return figure_html(fig) + f"<pre>{html.escape(text)}</pre>"


def layout_widget(kv_head_counts: Sequence[int] = (1, 2, 4)) -> W.VBox:
    """Switch layouts and KV heads: see memory order (head 0's keys outlined) and a real
    cache's strides. Every state differs from every other (6 states)."""
    widest = max(kv_head_counts)

    def render(layout: str, kv_heads: int) -> str:
        return layout_state(Layout(layout), kv_heads, max_kv_heads=widest)

    return live(render, layout=[x.value for x in Layout], kv_heads=list(kv_head_counts),
                kinds={"layout": "toggle"},
                defaults={"kv_heads": 2} if 2 in kv_head_counts else None)
