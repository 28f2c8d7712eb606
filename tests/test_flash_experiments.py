"""Chapter 6's helpers: measured peak bytes, the tile schedule drawn, the widget, the plots."""

from __future__ import annotations

import doctest

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch

import kvlib.experiments.flash
import kvlib.viz.flash
from kvlib import flash
from kvlib.attention import attention, decode_attention
from kvlib.experiments import flash as fx
from kvlib.viz import flash as fviz
from kvlib.widgets import flash as fwidgets

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.mark.parametrize("module", [kvlib.experiments.flash, kvlib.viz.flash])
def test_doctests(module):
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


def test_peak_bytes_sees_temporaries_and_frees():
    def two_then_one():
        a = torch.empty(1000)  # 4,000 B
        b = torch.empty(2000)  # 8,000 B: 12,000 held
        del a
        c = torch.empty(500)  # 2,000 B: 10,000 held
        return b, c

    assert fx.peak_bytes(two_then_one) == 12_000
    assert fx.peak_bytes(lambda: None) == 0


def test_naive_memory_is_quadratic_and_chunked_linear():
    lens = [64, 128, 256, 512]
    mem = fx.measure_attention_memory(lens, q_tile=32, kv_tile=32, show_progress=False,
                                      num_heads=2, num_kv_heads=1, head_dim=16)
    for T, naive, score in zip(lens, mem.peak_bytes["naive"], mem.score_bytes):
        assert score == 2 * T * T * 4 and naive >= score
    # Chunked: the output (2 heads x 16 dims x 4 B = 128 B per token) plus a few tiles.
    per_token, *_, err = mem.fit("chunked", 1)
    assert per_token == pytest.approx(128, rel=0.05) and err < 0.02
    assert mem.fit("naive", 2)[-1] < 0.05 and mem.slope("naive") == pytest.approx(2, abs=0.1)
    assert all(r > 1 for r in mem.ratio("naive", "chunked")[1:])


def test_attention_calls_agree_and_unknown_paths_raise():
    q, k, v = fx.prefill_inputs(50, num_heads=4, num_kv_heads=2, head_dim=8)
    outs = {p: fx.attention_call(p, q, k, v, q_tile=16, kv_tile=16)() for p in fx.PATHS}
    torch.testing.assert_close(outs["chunked"], outs["naive"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["sdpa"], outs["naive"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="path must be one of"):
        fx.attention_call("fused", q, k, v)


def test_time_attention_times_every_path_and_length():
    times = fx.time_attention([16, 32], repeats=1, show_progress=False, num_heads=2,
                              num_kv_heads=1, head_dim=8)
    assert set(times) == set(fx.PATHS) and all(set(t) == {16, 32} for t in times.values())


def test_paged_copy_holds_the_same_keys():
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 45, 8, generator=gen), torch.randn(2, 2, 45, 8, generator=gen)
    q, lens = torch.randn(2, 4, 8, generator=gen), torch.tensor([45, 13])
    kv = fx.paged_copy(k, v, lens, block_size=16)
    assert kv.block_tables.tolist()[1][1:] == [-1, -1]  # 13 tokens: one block
    assert sorted(kv.block_tables[kv.block_tables >= 0].tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(flash.paged_split_kv_decode(q, kv, kv_chunk=20),
                               decode_attention(q, k, v, lens), atol=1e-5, rtol=1e-5)


def test_tile_schedule_is_the_order_chunked_attention_reads():
    T, tq, tk = 11, 3, 4
    q, k, v = fx.prefill_inputs(T, num_heads=2, num_kv_heads=1, head_dim=4)
    reads = []

    def load(start, end):
        reads.append((start, end))
        return k[:, :, start:end], v[:, :, start:end]

    out = flash._chunked(q, load, 1, T, torch.arange(T)[None], torch.tensor([T]), tq, tk)
    torch.testing.assert_close(out, attention(q, k, v, torch.arange(T)[None], torch.tensor([T])))
    assert reads == [(k0, k1) for _, _, k0, k1 in fviz.causal_tile_schedule(T, tq, tk)]


def test_online_softmax_trace_ends_at_the_softmax_normaliser():
    scores = [2.0, 1.0, 4.0, 3.0, float("-inf"), 0.5]
    last = fx.online_softmax_trace(scores, kv_tile=4)[-1]
    expected = torch.tensor(scores).logsumexp(0)
    assert last.m_i == 4.0
    assert last.m_i + torch.tensor(last.l_i).log() == pytest.approx(float(expected))


def test_tile_figure_marks_the_current_tile():
    scores = fviz.toy_scores(8)
    fig = fviz.tile_step_figure(scores, 2, 2, 6)
    assert "tile 6 of 10:\nqueries 4-5, keys 4-5" in fig.axes[0].get_title()
    red = [p for p in fig.axes[0].patches if p.get_edgecolor()[:3] == (0.8392156862745098,
                                                                        0.15294117647058825,
                                                                        0.1568627450980392)]
    assert len(red) == 1 and red[0].get_xy() == (4, 4)


def test_tile_widget_has_a_state_per_tile_and_no_repeats():
    widget = fwidgets.tile_widget(seq_len=4, tile=2)
    (step_control,) = widget.children[0].children
    assert [o[0] for o in step_control.options] == ["1", "2", "3"]  # 3 tiles of 2 over 4 tokens
    images = [state.children[1].value for state in widget.children[1].children]
    assert len(images) == 3 and len(set(images)) == 3  # every state shows something new


def test_plot_peak_memory_draws_measured_and_fitted_lines():
    mem = fx.AttentionMemory((256, 512, 1024), {"naive": (10, 40, 160), "chunked": (5, 6, 8),
                                                "sdpa": (1, 2, 4)}, (8, 32, 128))
    ax = plt.subplots()[1]
    fviz.plot_peak_memory(ax, mem)
    labels = [line.get_label() for line in ax.lines]
    assert labels == ["naive (measured)", "chunked (measured)", "sdpa (measured)",
                      "naive: quadratic fit", "chunked: linear fit"]


def test_tile_order_numbers_every_computed_tile_in_order():
    ax = plt.subplots()[1]
    fviz.draw_tile_order(ax, 8, 2, 2)
    numbers = [int(t.get_text()) for t in ax.texts]
    assert numbers == list(range(1, 11))  # 10 of the 16 tiles, the others hatched
    assert sum(1 for p in ax.patches if p.get_hatch()) == 6
