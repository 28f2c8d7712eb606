"""Widgets of incremental decoding: the preface's cache fill and chapter 1's step costs.

Each is `live`: its states are computed when the cell runs and chosen in the browser, so it
moves in the HTML book too. Numbers come from `analysis` or from a real generation.
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as W
import matplotlib.pyplot as plt
import torch

from kvlib import analysis
from kvlib.model import TransformerLM
from kvlib.viz import decoding as dviz
from kvlib.viz import style
from kvlib.widgets.live import live


def attention_work_widget(context_lens: Sequence[int] = (1, 2, 4, 8, 16, 32)) -> W.VBox:
    """Slide S, the tokens already cached; see which scores the next decode step computes."""

    def render(S: int):
        fig, axes = plt.subplots(1, 2, figsize=style.size(0.48, width=5.6))
        dviz.draw_attention_work(axes[0], S, cached=False)
        dviz.draw_attention_work(axes[1], S, cached=True)
        return fig

    return live(render, S=list(context_lens), defaults={"S": 8} if 8 in context_lens else None)


STEP_COST_MODELS = ("gpt2", "smollm2-135m", "llama-3-8b", "llama-3-70b", "qwen3-8b")


def step_cost_widget(presets: dict | None = None,
                     context_lens: Sequence[int] = (16, 64, 256, 1024, 4096, 16384),
                     default: str = "llama-3-8b") -> W.VBox:
    """Pick a model and S; compare one decode step's FLOPs by part, with and without a cache.

    Every state shares one x axis, so moving a control compares like with like. The models
    default to `STEP_COST_MODELS` (presets of different sizes; presets that differ only in
    their longest context would repeat each other's states).
    """
    presets = dict({n: analysis.PRESETS[n] for n in STEP_COST_MODELS} if presets is None
                   else presets)
    xlim = dviz.step_cost_range(presets, context_lens)

    def render(model: str, S: int):
        fig, ax = plt.subplots(figsize=style.size(0.55))
        dviz.draw_step_cost_bars(ax, presets[model], S, xlim=xlim)
        return fig

    defaults = {"model": default, "S": 4096} if 4096 in context_lens else {"model": default}
    return live(render, model=list(presets), S=list(context_lens), defaults=defaults)


def cache_fill_widget(model: TransformerLM, prompt: torch.Tensor, max_seq_len: int = 64,
                      new_tokens: Sequence[int] = (1, 8, 16, 24, 32, 40, 48, 57)) -> W.VBox:
    """Generate n tokens into a fresh flat cache; draw how much of its room is in use."""
    prompt_len = prompt.shape[1]
    too_many = [n for n in new_tokens if prompt_len + n - 1 > max_seq_len]
    if too_many:
        raise ValueError(f"new_tokens {too_many} do not fit: a prompt of {prompt_len} and n new "
                         f"tokens need {prompt_len} + n - 1 <= max_seq_len = {max_seq_len} slots")

    def render(generated: int):
        cache = model.new_cache(prompt.shape[0], max_seq_len)
        model.generate(prompt, generated, cache=cache)
        fig, ax = plt.subplots(figsize=style.size(0.2))
        dviz.draw_cache_fill(ax, prompt_len, int(cache.lengths([0])), max_seq_len)
        return fig

    return live(render, generated=list(new_tokens),
                defaults={"generated": 8} if 8 in new_tokens else None)
