"""The book's figure style, held by every drawing in kvlib.viz and every widget figure.

Each drawing is made in the book's style (`viz.style.context()`, as widgets and chapters draw
them) and rendered; then no visible text may be smaller than `style.MIN_FONT_PT` (13 CSS px
at the size the book shows figures), no figure may be wider than the text column, and every
axis that shows numbers must say what they are (a label, with its unit).
"""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from kvlib import analysis, real_models  # noqa: E402
from kvlib.cache.quant_memory import PRESETS as QUANT  # noqa: E402
from kvlib.cache.quant_memory import memory  # noqa: E402
from kvlib.config import Layout, ModelConfig  # noqa: E402
from kvlib.experiments import batching as bx  # noqa: E402
from kvlib.experiments import beyond as byx  # noqa: E402
from kvlib.experiments import cluster as cl  # noqa: E402
from kvlib.experiments import flash as fx  # noqa: E402
from kvlib.experiments import fragmentation as fr  # noqa: E402
from kvlib.links import LINKS  # noqa: E402
from kvlib.mla import decode_cost  # noqa: E402
from kvlib.viz import batching as bviz  # noqa: E402
from kvlib.viz import beyond as byviz  # noqa: E402
from kvlib.viz import decoding as dviz  # noqa: E402
from kvlib.viz import flash as fviz  # noqa: E402
from kvlib.viz import gpu as gviz  # noqa: E402
from kvlib.viz import layouts as lviz  # noqa: E402
from kvlib.viz import models as mviz  # noqa: E402
from kvlib.viz import paging as pviz  # noqa: E402
from kvlib.viz import quantization as qviz  # noqa: E402
from kvlib.viz import shrink as sviz  # noqa: E402
from kvlib.viz import style  # noqa: E402
from kvlib.viz import training as tviz  # noqa: E402
from kvlib.widgets import batching as bw  # noqa: E402
from kvlib.widgets import beyond as byw  # noqa: E402
from kvlib.widgets import paging as pw  # noqa: E402

LLAMA = analysis.PRESETS["llama-3-8b"]
COPYING_RUN = {  # the shape of a copying fine-tune's record, made-up numbers
    "hyperparameters": {"ids_steps": 50},
    "curve": {"step": list(range(10, 101, 10)), "lm_loss": [3.0] * 10,
              "copy_loss": [8.3] * 4 + [4.0, 1.0, 0.5, 0.4, 0.3, 0.3]},
    "evals": {"step": [0, 50, 100], "induction_max": [0.01, 0.8, 0.9],
              "reread_second": [0.35, 0.4, 0.6], "name_token_accuracy_full": [0.0, 0.1, 0.5]}}
GPU_RESULT = {"device": "test GPU", "copy_TBps": 3.0,
              "rows": [{"B": b, "S": 4096, "kv_GB": 0.1 * b, "paged_ms": 0.05 * b,
                        "sdpa_ms": 0.04 * b, "gather_ms": 0.3 * b, "int8_ms": 0.03 * b}
                       for b in (1, 8, 32)]}
TRAINING_RUN = {  # the shape of kvlib.book_model.training_run(), made-up numbers
    "training": {"phases": [{"steps": 100, "seq_len": 512}, {"steps": 20, "seq_len": 2048}],
                 "curve": {"step": list(range(10, 121, 10)),
                           "train_loss": [8.0 / (1 + 0.1 * i) for i in range(12)]},
                 "val_curve": {"step": [50, 100, 120], "loss": [5.0, 4.0, 3.8]}},
    "metrics": {"bits_per_byte": 1.4, "heldout_files": 73, "heldout_bytes": 939_863,
                "compressors_bits_per_byte": {"gzip -9": {"per_file": 2.1, "concatenated": 2.0},
                                              "xz -9": {"per_file": 1.9, "concatenated": 1.5}}},
}
_TRACE = {}


def _trace():
    if not _TRACE:
        reqs = bx.chapter_requests("long tail", 6)
        _TRACE["t"] = bx.run_trace(bx.tiny_model(), reqs, [0] * 6, num_blocks=40, block_size=8)
    return _TRACE["t"]


def _disagg_states():
    if "disagg" not in _TRACE:
        _TRACE["disagg"] = byw.disagg_states(links=("400 Gb/s network",), prompts=(128, 256),
                                             loads=(0.5,), num_requests=4, max_new_tokens=3,
                                             num_blocks=128)
    return _TRACE["disagg"]


def _routing_states():
    if "routing" not in _TRACE:
        _TRACE["routing"] = byw.routing_states(
            cl.LinearStepCosts(1e-3, 1e-5, 1e-4), replicas=(2, 4), shares=(0.5,),
            num_requests=16, prompt_len=64, num_prefixes=4, num_blocks=16)
    return _TRACE["routing"]


def _panels(draw, n):
    def make():
        fig, axes = style.panels(n)
        draw(axes)
        return fig
    return make


_SWAPS = [byx.SwapVsRecompute(n, 1e-5 * n, 1e-3 * n, 1000 * n) for n in (64, 256, 1024)]


_MLA = ModelConfig(vocab_size=8, d_model=64, num_layers=1, num_heads=8, num_kv_heads=8,
                   kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
_BUDGET_RECORDS = [{"policy": p, "regime": "decode", "fraction": f, "bpb": 1.5 + (1 - f) * i}
                   for i, p in enumerate(sviz.POLICY_STYLE) for f in (0.05, 0.2, 0.5, 1.0)]


def _one(draw):
    def make():
        fig, ax = plt.subplots()
        draw(ax)
        return fig
    return make


def _quant_memories():
    shape = (LLAMA.num_layers, LLAMA.num_kv_heads, LLAMA.head_dim)
    return {n: memory(q, *shape, 2048) for n, q in QUANT.items()}


def _memory_vs_error():
    mems = _quant_memories()
    fig, ax = plt.subplots()
    fp16 = next(iter(mems.values())).fp16 / 2048
    qviz.draw_memory_vs_error(ax, {n: (m.bytes_per_token, 0.01 * (i + 1))
                                   for i, (n, m) in enumerate(mems.items())}, "error (%)", fp16)
    return fig


def _fragmentation_sweep():
    reqs = fr.sample_requests("sharegpt", 500, 2048, seed=0)
    fig, ax = plt.subplots()
    pviz.plot_block_size_sweep(ax, fr.sweep_block_sizes(reqs, [4, 16], max_len=2048, budget=0),
                               label="sharegpt")
    return fig


DRAWINGS = {
    "attention_work": _one(lambda ax: dviz.draw_attention_work(ax, 7, cached=True)),
    "step_costs": _one(lambda ax: dviz.plot_step_costs(ax, LLAMA, [16, 256, 4096])),
    "speedups": _one(lambda ax: dviz.plot_speedups(ax, LLAMA, {128: 2.0, 1024: 20.0})),
    "cache_fill": _one(lambda ax: dviz.draw_cache_fill(ax, 8, 20, 64, label="slot")),
    "step_cost_bars": _one(lambda ax: dviz.draw_step_cost_bars(ax, LLAMA, 1024)),
    "cache_vs_weights": _one(lambda ax: lviz.plot_cache_vs_weights(
        ax, analysis.PRESETS, [512, 8192, 131072])),
    "layout": _one(lambda ax: lviz.draw_layout(ax, Layout.SEQ_MAJOR, 4, 2)),
    "pool": lambda: pviz.pool_figure(pw.paged_scenario()[0][5]),
    "scheme_bars": _one(lambda ax: pviz.plot_scheme_bars(ax, fr.simulate(
        fr.sample_requests("alpaca", 300, 512, seed=0), max_len=512, block_size=16,
        budget=0))),
    "block_size_sweep": _fragmentation_sweep,
    "group_tables": _one(lambda ax: pviz.draw_group_tables(
        ax, {"windowed": [15, 15, 3, 4], "global": [0, 1, 2, 5]}, {"windowed": 15, "global": 15},
        block_size=8)),
    "timeline": _one(lambda ax: bviz.draw_timeline(ax, _trace().metrics, [0] * 6, "t")),
    "block_use": _one(lambda ax: bviz.draw_block_use(ax, _trace().metrics, 40)),
    "tokens_per_step": _one(lambda ax: bviz.draw_tokens_per_step(ax, _trace().metrics, 64)),
    "schedule": lambda: bw.schedule_figure(_trace()),
    "magnitudes": _one(lambda ax: qviz.draw_magnitudes(ax, torch.randn(16, 32), "keys")),
    "levels": _one(lambda ax: qviz.draw_levels(ax, torch.tensor([0.1, -0.5, 0.9]),
                                               torch.tensor([0.0, -0.43, 0.86]), 0.14, 4)),
    "channel_errors": _one(lambda ax: qviz.draw_channel_errors(
        ax, {"keys": torch.rand(32) + 0.01}, [3])),
    "bytes": _one(lambda ax: qviz.draw_bytes(ax, _quant_memories(), 2 * 32 * 8 * 128 * 2)),
    "memory_vs_error": _memory_vs_error,
    "tiles": lambda: fviz.tile_step_figure(fviz.toy_scores(8), 2, 2, 4),
    "peak_memory": _one(lambda ax: fviz.plot_peak_memory(ax, fx.AttentionMemory(
        (256, 512, 1024), {"naive": (10, 40, 160), "chunked": (5, 6, 8), "sdpa": (1, 2, 4)},
        (8, 32, 128)))),
    "memory_hierarchy": _one(lambda ax: gviz.draw_memory_hierarchy(ax, 17.2)),
    "roofline": _one(lambda ax: gviz.draw_roofline(ax, list(analysis.GPUS.values()),
                                                   {"bf16, G=4": 4.0})),
    "bandwidths": _one(lambda ax: gviz.draw_bandwidths(ax, GPU_RESULT)),
    "quoted_ranges": _one(lambda ax: gviz.draw_quoted_ranges(
        ax, {"copy": (4.2, 4.3), "sdpa": (2.7, 2.7)}, "quoted")),
    "window_mask": _one(lambda ax: mviz.draw_window_mask(ax, 10, 4)),
    "ring_buffer": _one(lambda ax: mviz.draw_ring_buffer(ax, 10, 4)),
    "cache_vs_context": _one(lambda ax: mviz.plot_cache_vs_context(
        ax, {n: real_models.REAL_MODELS[n] for n in ("llama-3.1-8b", "gemma-3-27b")},
        [1024, 8192, 65536])),
    "loss_curves": _one(lambda ax: tviz.plot_loss_curves(ax, TRAINING_RUN)),
    "bits_per_byte": _one(lambda ax: tviz.plot_bits_per_byte(ax, TRAINING_RUN["metrics"])),
    "copying_run": _panels(lambda axes: tviz.plot_copying_run(axes, COPYING_RUN), 2),
    "gpu_memory": _one(lambda ax: mviz.plot_gpu_memory(ax, real_models.REAL_MODELS, 4096, 16,
                                                       "bf16", 80, 8)),
    "move_over_compute": _one(lambda ax: byviz.draw_move_over_compute(
        ax, {n: analysis.PRESETS[n] for n in ("llama-3-8b", "gpt2")},
        analysis.GPUS["H100-SXM"], list(LINKS))),
    "swap_vs_recompute": _one(lambda ax: byviz.draw_swap_vs_recompute(
        ax, _SWAPS, [(r.swap_s, r.recompute_s) for r in _SWAPS], "cpu")),
    "disagg_sweep": _panels(lambda axes: byviz.draw_disagg_sweep(
        axes, _disagg_states(), "400 Gb/s network"), 2),
    "tp_cache": _one(lambda ax: byviz.draw_tp_cache(
        ax, ["llama-3-70b", "qwen2.5-7b"], [1, 2, 4, 8, 16])),
    "routing": _panels(lambda axes: byviz.draw_routing(axes, _routing_states(), 0.5), 2),
    "mla_costs": _panels(lambda axes: sviz.plot_mla_costs(
        axes, {c: decode_cost(_MLA, 1024, c) for c in ("expanded", "naive", "absorbed")},
        1024), 2),
    "first_token_attention": _one(lambda ax: sviz.plot_first_token_attention(
        ax, torch.rand(4, 4) * 0.01, 0.007)),
    "copying_heads": _panels(lambda axes: sviz.plot_copying_heads(
        axes, {"base": _heads(0.01), "fine-tuned": _heads(0.9)}), 2),
    "budget_curves": _one(lambda ax: sviz.plot_budget_curves(ax, _BUDGET_RECORDS, "bpb",
                                                             "decode")),
    "kept": _one(lambda ax: sviz.draw_kept(ax, torch.rand(4, 2, 128) < 0.3, 16, "SnapKV")),
}


def _heads(top: float):
    from kvlib.experiments.shrink import CopyingHeads

    return CopyingHeads(torch.rand(4, 4) * 0.6, torch.rand(4, 4) * top)


NUMBER = re.compile(r"^[-−+]?[\d.,]+(e[-+]?\d+)?\s*[%x]?$")


def _is_number(text: str) -> bool:
    """'1,024', '50%', '10^{3}' (mathtext), '+16': tick labels that are numbers."""
    plain = re.sub(r"[${}\\]|mathdefault|\^", "", text).strip()
    return bool(plain) and bool(NUMBER.match(plain))


def _visible_texts(fig) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()
            and t.get_alpha() != 0]


@pytest.mark.parametrize("name", list(DRAWINGS))
def test_drawing_follows_the_book_style(name):
    with style.context():
        fig = DRAWINGS[name]()
        fig.canvas.draw()  # ticks and layout exist once drawn
        small = {(t.get_text()[:30], t.get_fontsize()) for t in _visible_texts(fig)
                 if t.get_fontsize() < style.MIN_FONT_PT - 1e-9}
        assert not small, f"{name}: text below {style.MIN_FONT_PT} pt: {sorted(small)[:6]}"
        assert fig.get_figwidth() <= style.COLUMN_IN + 1e-9, f"{name}: wider than the column"
        for ax in fig.axes:
            if not (ax.get_visible() and ax.axison):
                continue
            for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
                ticks = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
                if axis.get_visible() and ticks and all(map(_is_number, ticks)):
                    assert label.strip(), f"{name}: an axis of numbers without a label"
        plt.close(fig)


def test_panels_stack_when_they_would_be_too_narrow():
    with style.context():
        fig, axes = style.panels(4)
        assert len(axes) == 4 and fig.get_figwidth() == style.COLUMN_IN
        rows = {round(ax.get_subplotspec().rowspan.start) for ax in axes}
        assert rows == {0, 1}  # 2 x 2: four panels of 1.75 in would be too narrow
        plt.close(fig)
        fig, axes = style.panels(3)
        assert {ax.get_subplotspec().rowspan.start for ax in axes} == {0}
        plt.close(fig)


def test_min_font_is_the_bodys_small_print():
    css_px = style.MIN_FONT_PT / 72 * style.DISPLAY_DPI
    assert css_px >= 13  # the body's small print (code, captions) in the built book
    assert style.COLUMN_IN * style.DISPLAY_DPI <= 720  # fits the text column at 1,280 px
    assert np.isclose(style.SAVE_DPI / style.DISPLAY_DPI, 2)  # sharp on high-DPI screens
