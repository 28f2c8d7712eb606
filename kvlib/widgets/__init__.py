"""Widget builders for the chapters: each returns an ipywidgets object ready to display.

Widgets are for live use; every chapter also shows a static figure of the whole sweep beside
each one, so the HTML book teaches without a kernel. The numbers behind every widget come
from `analysis` (formulas), a real `FlatKVCache` or a real generation, never from the
widget itself.
"""

from __future__ import annotations

import html

import ipywidgets as W
import matplotlib.pyplot as plt
import torch
from IPython.display import HTML, display

from kvlib import analysis, viz
from kvlib.cache.flat import FlatKVCache
from kvlib.config import CacheConfig, Layout
from kvlib.model import TransformerLM


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    raise AssertionError("unreachable")


def attention_work_widget(max_context: int = 24) -> W.interactive:
    """Slide the context length; see which attention scores a decode step computes."""

    def show(context_len: int) -> None:
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
        viz.draw_attention_work(axes[0], context_len, cached=False)
        viz.draw_attention_work(axes[1], context_len, cached=True)
        plt.show()

    return W.interactive(show, context_len=W.IntSlider(value=8, min=1, max=max_context,
                                                       description="context S"))


def step_cost_widget(default: str = "llama-3-8b") -> W.interactive:
    """Pick a model and a context length; compare one decode step's FLOPs by part."""
    parts = ("projection", "attention", "mlp", "lm_head")

    def show(model: str, log2_context: int) -> None:
        cfg, S = analysis.PRESETS[model], 2**log2_context
        costs = {c: analysis.decode_step_cost(cfg, S, cached=c) for c in (False, True)}
        rows = [*parts, "total"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for offset, cached in ((-0.2, False), (0.2, True)):
            flops = [getattr(costs[cached], f"{p}_flops") for p in parts]
            flops.append(costs[cached].total_flops)
            ax.barh([i + offset for i in range(len(rows))], flops, height=0.4,
                    color=viz.COLORS["cached" if cached else "uncached"],
                    label="with cache" if cached else "without cache")
        ax.set_yticks(range(len(rows)), rows)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("FLOPs for one new token (log scale)")
        ratio = costs[False].total_flops / costs[True].total_flops
        ax.set_title(f"{model} at S = {S:,}: {ratio:,.0f}x fewer FLOPs with a cache "
                     f"(the score-count claim says {S:,}x)", fontsize=9)
        ax.legend(fontsize=8, loc="best")
        plt.show()

    return W.interactive(
        show,
        model=W.Dropdown(options=list(analysis.PRESETS), value=default, description="model"),
        log2_context=W.IntSlider(value=12, min=4, max=15, description="log2 S"),
    )


def cache_calculator(default: str = "llama-3-8b") -> W.interactive:
    """Model, context length, batch and dtype in; cache size (and weights, for scale) out."""

    def show(model: str, context_len: int, batch_size: int, dtype: str) -> None:
        cfg = analysis.PRESETS[model]
        per_token = analysis.kv_bytes_per_token(cfg, dtype)
        total = analysis.kv_cache_bytes(cfg, context_len, batch_size, dtype)
        weights = analysis.weight_bytes(cfg, dtype)
        rows = [
            ("bytes per token", f"2 x {cfg.num_layers} layers x {cfg.num_kv_heads} KV heads x "
                                f"{cfg.head_dim} dims x {analysis.dtype_bytes(dtype)} B = "
                                f"{per_token:,} B ({_fmt_bytes(per_token)})"),
            ("cache", f"{per_token:,} B x {context_len:,} tokens x {batch_size} seqs = "
                      f"{_fmt_bytes(total)}"),
            ("weights, for scale", f"{_fmt_bytes(weights)} ({total / weights:.2f}x of them "
                                   f"is the cache)"),
        ]
        body = "".join(f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>"
                       for k, v in rows)
        display(HTML(f"<table>{body}</table>"))

    return W.interactive(
        show,
        model=W.Dropdown(options=list(analysis.PRESETS), value=default, description="model"),
        context_len=W.IntSlider(value=8192, min=256, max=131072, step=256,
                                description="context"),
        batch_size=W.IntSlider(value=1, min=1, max=64, description="batch"),
        dtype=W.Dropdown(options=["fp32", "bf16", "fp16", "fp8"], value="bf16",
                         description="dtype"),
    )


def layout_widget() -> W.interactive:
    """Switch layouts; see memory order and the strides of a real FlatKVCache's key view."""

    def show(layout: str, num_kv_heads: int, highlight_head: int) -> None:
        lay = Layout(layout)
        cache = FlatKVCache(CacheConfig(num_layers=1, num_kv_heads=num_kv_heads, head_dim=8,
                                        max_batch_size=1, max_seq_len=4, layout=lay))
        fig, ax = plt.subplots(figsize=(9, 1.6))
        viz.draw_layout(ax, lay, num_tokens=4, num_kv_heads=num_kv_heads,
                        highlight_head=min(highlight_head, num_kv_heads - 1))
        plt.show()
        keys = cache.keys(0)
        print(f"cache.data.shape = {tuple(cache.data.shape)}")
        print(f"keys(0): shape (B, Hkv, S, D) = {tuple(keys.shape)}, strides = {keys.stride()},"
              f" contiguous: {keys.is_contiguous()}")

    return W.interactive(
        show,
        layout=W.ToggleButtons(options=[x.value for x in Layout], description="layout"),
        num_kv_heads=W.IntSlider(value=2, min=1, max=4, description="KV heads"),
        highlight_head=W.IntSlider(value=0, min=0, max=3, description="head"),
    )


def cache_fill_widget(model: TransformerLM, prompt: torch.Tensor,
                      max_seq_len: int = 64) -> W.interactive:
    """Generate n tokens into a fresh flat cache; draw how much of it is in use."""

    def show(new_tokens: int) -> None:
        cache = model.new_cache(prompt.shape[0], max_seq_len)
        model.generate(prompt, new_tokens, cache=cache)
        fig, ax = plt.subplots(figsize=(8, 1.4))
        viz.draw_cache_fill(ax, prompt.shape[1], int(cache.lengths([0])), max_seq_len)
        plt.show()

    return W.interactive(show, new_tokens=W.IntSlider(
        value=8, min=1, max=max_seq_len - prompt.shape[1] + 1, description="generated"))
