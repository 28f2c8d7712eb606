"""kvlib.viz and kvlib.widgets: every drawing draws what its numbers say, every widget runs.

Drawings are checked through their artists (lines, patches, texts, titles) against numbers
computed here from `analysis` or from a real FlatKVCache, never against the drawing's own
arithmetic. Widgets are driven by setting their controls, as a reader would.
"""

from __future__ import annotations

import doctest
import re

import ipywidgets as W
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle

from kvlib import analysis, viz, widgets
from kvlib.cache.flat import FlatKVCache
from kvlib.config import CacheConfig, Layout, ModelConfig
from kvlib.experiments import demo_model
from kvlib.viz import decoding as dviz
from kvlib.widgets import decoding as dwidgets
from kvlib.widgets import layouts as lwidgets
from kvlib.widgets.live import STATE_CLASS

matplotlib.use("Agg")

LAYOUTS = list(Layout)
LLAMA = analysis.PRESETS["llama-3-8b"]
TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   ffn_dim=64, max_seq_len=64, name="tiny")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def ax():
    return plt.subplots()[1]


def test_doctests():
    result = doctest.testmod(viz.layouts)
    assert result.attempted >= 3 and result.failed == 0


# -- viz ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cached", [False, True])
def test_draw_attention_work_counts_the_computed_scores(ax, cached):
    viz.draw_attention_work(ax, 5, cached=cached)
    n = 6  # 5 cached tokens + the new one
    expected = n if cached else n * (n + 1) // 2
    assert f"{expected} scores" in ax.get_title()
    image = ax.get_images()[0].get_array()
    assert image.shape == (n, n) and int((np.asarray(image) == 2).sum()) == expected


def test_plot_step_costs_draws_totals_and_parts(ax):
    lens = [16, 256, 4096]
    viz.plot_step_costs(ax, LLAMA, lens)
    assert len(ax.lines) == 2 * 5  # without/with cache x (total + 4 parts)
    totals = {line.get_label(): line.get_ydata() for line in ax.lines}
    expected = [analysis.decode_step_cost(LLAMA, s, cached=True).total_flops for s in lens]
    assert list(totals["with cache: total"]) == expected
    assert ax.get_xscale() == ax.get_yscale() == "log"


def test_plot_speedups_plots_measured_beside_the_flop_ratio(ax):
    measured = {1024: 30.0, 256: 10.0}
    viz.plot_speedups(ax, LLAMA, measured)
    assert len(ax.lines) == 3
    by_label = {line.get_label(): line for line in ax.lines}
    assert list(by_label["measured time ratio"].get_ydata()) == [10.0, 30.0]  # sorted by length
    flop = by_label["FLOP ratio (whole model)"].get_ydata()
    assert flop[1] == pytest.approx(analysis.flop_speedup(LLAMA, 1024))


def test_plot_cache_sizes_one_line_per_model_in_gib(ax):
    presets = {k: analysis.PRESETS[k] for k in ("gpt2", "llama-3-70b")}
    viz.plot_cache_sizes(ax, presets, [512, 8192], dtype="bf16", batch_size=2)
    assert [line.get_label() for line in ax.lines] == ["gpt2", "llama-3-70b"]
    # llama-3-70b: 2 * 80 * 8 * 128 * 2 B = 320 KiB per token; x 8192 tokens x 2 = 5 GiB
    assert ax.lines[1].get_ydata()[1] == pytest.approx(5.0)
    assert "batch 2" in ax.get_title() and "bf16" in ax.get_title()


def test_plot_cache_vs_weights_adds_weights_and_marks_identical_caches(ax):
    presets = {k: analysis.PRESETS[k] for k in ("llama-3-8b", "llama-3-70b", "mistral-7b-v0.2")}
    viz.plot_cache_vs_weights(ax, presets, [512, 4096])
    caches, weights = ax.lines[:3], ax.lines[3:]
    assert len(weights) == 3
    for line, cfg, cache_line in zip(weights, presets.values(), caches):
        assert line.get_ydata()[0] == pytest.approx(analysis.weight_bytes(cfg) / 2**30)
        assert line.get_color() == cache_line.get_color()
    # llama-3-8b and mistral-7b-v0.2 have the same KV shape: the first is drawn as a wide halo.
    assert [line.get_linewidth() for line in caches] == [5, caches[1].get_linewidth(),
                                                         caches[2].get_linewidth()]
    assert caches[1].get_linewidth() < 5 and caches[2].get_linewidth() < 5
    assert "weights" in ax.get_title()


def test_cache_table_rows_match_analysis():
    table = viz.cache_table(analysis.PRESETS, dtype="bf16")
    rows = table.splitlines()[2:]
    assert [r.split()[0] for r in rows] == list(analysis.PRESETS)
    for row, cfg in zip(rows, analysis.PRESETS.values()):
        cols = row.split()
        per_token = analysis.kv_bytes_per_token(cfg, "bf16")
        assert float(cols[1]) == pytest.approx(per_token / 1024, abs=0.05)
        assert int(cols[2].replace(",", "")) == cfg.max_seq_len
        assert int(cols[5].replace(",", "")) == analysis.weight_bytes(cfg) // per_token


def _addresses(layout, num_tokens, num_kv_heads, slot=1, layer=1):
    """(K/V, head, token) -> address of its first element in a real FlatKVCache."""
    cache = FlatKVCache(CacheConfig(num_layers=2, num_kv_heads=num_kv_heads, head_dim=3,
                                    max_batch_size=2, max_seq_len=num_tokens, layout=layout))
    views = {"K": cache.keys(layer), "V": cache.values(layer)}
    return {(kv, h, t): views[kv][slot, h, t].storage_offset()
            for kv in "KV" for h in range(num_kv_heads) for t in range(num_tokens)}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.value)
@pytest.mark.parametrize("num_tokens,num_kv_heads", [(1, 1), (3, 2), (5, 4)])
def test_layout_order_is_the_real_caches_address_order(layout, num_tokens, num_kv_heads):
    addresses = _addresses(layout, num_tokens, num_kv_heads)
    assert viz.layout_order(layout, num_tokens, num_kv_heads) == sorted(addresses,
                                                                        key=addresses.get)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.value)
def test_draw_layout_outlines_the_highlighted_heads_keys(ax, layout):
    viz.draw_layout(ax, layout, num_tokens=3, num_kv_heads=2, highlight_head=1)
    cells = [p for p in ax.patches if p.get_fill()]
    outlines = [p for p in ax.patches if not p.get_fill()]
    assert len(cells) == 3 * 2 * 2 and len(ax.texts) == len(cells)
    order = viz.layout_order(layout, 3, 2)
    expected = [i for i, (kv, h, _) in enumerate(order) if kv == "K" and h == 1]
    assert sorted(round(p.get_x()) for p in outlines) == expected  # one row: 12 < 16 cells
    assert isinstance(outlines[0], Rectangle)
    assert layout.value in ax.get_title() and "head 1" in ax.get_title()
    contiguous = expected == list(range(expected[0], expected[0] + len(expected)))
    assert contiguous == (layout is Layout.HEAD_MAJOR)


def test_draw_cache_fill_bars(ax):
    viz.draw_cache_fill(ax, prompt_len=8, cached_len=20, max_seq_len=64, label="slot 0")
    bars = [(p.get_x(), p.get_width()) for p in ax.patches]
    assert bars == [(0, 64), (0, 8), (8, 12)]  # reserved, prompt, generated
    assert "20 of 64 in use: 31%" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["slot 0"]


def test_plot_timings_one_line_per_series(ax):
    viz.plot_timings(ax, [1, 2, 4], {"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 1.0]},
                     xlabel="tokens", ylabel="ms")
    assert [line.get_label() for line in ax.lines] == ["a", "b"]
    assert list(ax.lines[1].get_ydata()) == [3.0, 2.0, 1.0]
    assert ax.get_xlabel() == "tokens" and ax.get_ylabel() == "ms"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]


def test_draw_step_cost_bars_legend_below_the_bars_and_shared_limits(ax):
    presets = {k: analysis.PRESETS[k] for k in ("gpt2", "llama-3-70b")}
    xlim = dviz.step_cost_range(presets, [16, 4096])
    dviz.draw_step_cost_bars(ax, analysis.PRESETS["gpt2"], 1024, xlim=xlim)
    cfg = analysis.PRESETS["gpt2"]
    ratio = (analysis.decode_step_cost(cfg, 1024, cached=False).total_flops
             / analysis.decode_step_cost(cfg, 1024, cached=True).total_flops)
    assert f"{ratio:,.0f}x fewer FLOPs" in ax.get_title() and "S = 1,024" in ax.get_title()
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths[-1] == analysis.decode_step_cost(cfg, 1024, cached=False).total_flops
    assert ax.get_xlim() == (xlim[0] / 2, xlim[1] * 2)
    assert xlim[0] <= widths[0] and widths[-1] <= xlim[1]
    ax.figure.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    axes_box = ax.get_window_extent()
    assert legend.y1 < axes_box.y0  # wholly below the axes: never over a bar


# -- widgets --------------------------------------------------------------------------------------

def _controls(widget):
    return {c.description: c for c in widget.children[0].children}


def _options(control):
    return [label for label, _ in control.options]


def _state_html(widget, **values):
    """The HTML of the state the controls show for `values` (walking the nested stacks)."""
    node = widget.children[1]
    for name, control in _controls(widget).items():
        node = node.children[_options(control).index(values[name])]
    label, result = node.children
    assert label.value.startswith(f'<div class="{STATE_CLASS}">')
    return label.value + (result.value if isinstance(result, W.HTML) else repr(result))


def test_attention_work_widget_grid():
    w = widgets.attention_work_widget()
    (slider,) = _controls(w).values()
    assert isinstance(slider, W.SelectionSlider)
    assert _options(slider) == ["1", "2", "4", "8", "16", "32"] and slider.index == 3
    assert "<b>S = 16</b>" in _state_html(w, S="16") and "Image(" in _state_html(w, S="16")


def test_step_cost_widget_grid():
    w = widgets.step_cost_widget(context_lens=(16, 4096))
    controls = _controls(w)
    assert isinstance(controls["model"], W.Dropdown)
    models = list(dwidgets.STEP_COST_MODELS)
    assert _options(controls["model"]) == models and set(models) <= set(analysis.PRESETS)
    assert controls["model"].index == models.index("llama-3-8b")
    assert _options(controls["S"]) == ["16", "4,096"] and controls["S"].index == 1
    assert "<b>model = gpt2 · S = 16</b>" in _state_html(w, model="gpt2", S="16")


def test_cache_size_table_shows_the_formula():
    text = lwidgets.cache_size_table(analysis.PRESETS["llama-3-70b"], 8192, 32)
    assert "2 x 80 layers x 8 KV heads x 128 dims" in text
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", text)
    assert cells[:3] == ["655,360 B", "327,680 B", "163,840 B"]  # fp32 bf16 fp8
    assert cells[4] == "80.0 GiB"  # 320 KiB x 8,192 x 32 in bf16
    assert "hypothetical" not in text
    assert "hypothetical" in lwidgets.cache_size_table(analysis.PRESETS["llama-3-8b"],
                                                       131072, 1)


def test_cache_calculator_grid():
    w = widgets.cache_calculator()
    controls = _controls(w)
    assert set(controls) == {"model", "context", "batch"}
    assert isinstance(controls["model"], W.Dropdown)
    html = _state_html(w, model="llama-3.1-70b", context="8,192", batch="64")
    assert "model = llama-3.1-70b · context = 8,192 · batch = 64" in html
    assert re.findall(r"<td[^>]*>([^<]*)</td>", html)[4] == "160.0 GiB"  # bf16
    # HTML states of about 1.5 kB each: a hundred weigh less than one figure.
    assert len(_options(controls["model"])) * len(_options(controls["context"])) * len(
        _options(controls["batch"])) <= 100


def test_layout_state_prints_a_real_caches_strides():
    # seq-major (B, Hkv, S, D) = (1, 3, 4, 8): strides (4*2*3*8, 8, 2*3*8, 1)
    text = lwidgets.layout_state(Layout.SEQ_MAJOR, 3, 0)
    assert "strides = (192, 8, 48, 1), contiguous: False" in text
    text = lwidgets.layout_state(Layout.HEAD_MAJOR, 3, 0)
    assert "strides = (96, 32, 8, 1), contiguous: True" in text


def test_draw_layout_wraps_long_strips_into_rows(ax):
    viz.draw_layout(ax, Layout.HEAD_MAJOR, num_tokens=4, num_kv_heads=4, per_row=16)
    cells = [p for p in ax.patches if p.get_fill()]
    assert len(cells) == 32 and {round(p.get_y()) for p in cells} == {0, 1}
    first = [p for p in cells if round(p.get_x()) == 0]  # address 0 on top, 16 below it
    assert sorted(round(p.get_y()) for p in first) == [0, 1]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["+16", "+0"]


def test_layout_states_keep_their_size(monkeypatch):
    sizes = []
    monkeypatch.setattr(lwidgets, "figure_html", lambda fig: sizes.append(
        (tuple(fig.get_size_inches()), fig.axes[0].get_xlim(), fig.axes[0].get_ylim())) or "")
    for kv_heads in (1, 2, 4):
        lwidgets.layout_state(Layout.HEAD_MAJOR, kv_heads)
    assert len(set(sizes)) == 1


def test_layout_widget_grid():
    w = widgets.layout_widget()
    controls = _controls(w)
    assert isinstance(controls["layout"], W.ToggleButtons)
    assert _options(controls["layout"]) == [x.value for x in Layout]
    assert _options(controls["kv_heads"]) == ["1", "2", "4"] and controls["kv_heads"].index == 1
    assert set(controls) == {"layout", "kv_heads"}  # a head that does not exist: no state
    html = _state_html(w, layout="head_major", kv_heads="4")
    assert "layout = head_major · kv_heads = 4" in html
    assert "strides = (128, 32, 8, 1)" in html


def test_cache_fill_widget_counts_a_real_generations_cache(monkeypatch):
    drawn = []
    monkeypatch.setattr(dwidgets.dviz, "draw_cache_fill",
                        lambda ax, prompt_len, used, room: drawn.append((prompt_len, used, room)))
    model = demo_model(TINY)
    prompt = torch.zeros(1, 6, dtype=torch.int64)  # (1, P)
    w = widgets.cache_fill_widget(model, prompt, max_seq_len=32, new_tokens=(1, 5, 27))
    # The prompt and all but the last new token went through the model.
    assert drawn == [(6, 6, 32), (6, 10, 32), (6, 32, 32)]
    assert "<b>generated = 5</b>" in _state_html(w, generated="5")
    with pytest.raises(ValueError, match="do not fit"):
        widgets.cache_fill_widget(model, prompt, max_seq_len=32, new_tokens=(28,))


def test_cache_table_markdown_shows_the_text_tables_numbers():
    text = viz.cache_table(analysis.PRESETS).splitlines()[2:]
    from kvlib.viz import layouts as lviz

    md = lviz.cache_table_markdown(analysis.PRESETS).splitlines()[2:]
    assert [r.strip("| ").split(" | ") for r in md] == [r.split() for r in text]
