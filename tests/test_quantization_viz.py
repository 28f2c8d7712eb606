"""Chapter 5's drawings and widgets: what they draw is what `quant_memory` counts; every
widget state is there and labelled."""

from __future__ import annotations

import ipywidgets as W
import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch

from kvlib.analysis import PRESETS as MODELS
from kvlib.cache.quant_memory import PRESETS, memory
from kvlib.viz import quantization as qviz
from kvlib.widgets import quantization as qw
from kvlib.widgets.live import STATE_CLASS

matplotlib.use("Agg")
LLAMA = MODELS["llama-3-8b"]
SHAPE = (LLAMA.num_layers, LLAMA.num_kv_heads, LLAMA.head_dim)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_bytes_bars_stack_to_the_counted_total():
    mems = {n: memory(PRESETS[n], *SHAPE, 2048) for n in ("llama.cpp-q4_0", "kivi-int4")}
    fig, ax = plt.subplots()
    qviz.draw_bytes(ax, mems, mems["kivi-int4"].fp16 / 2048)
    for i, name in enumerate(mems):
        right = max(p.get_x() + p.get_width() for p in ax.patches if abs(p.get_y() + p.get_height()
                                                                         / 2 - i) < 1e-6)
        assert right == pytest.approx(mems[name].bytes_per_token)
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "3.56x (naive 4x)" in texts


def test_channel_errors_and_levels_draw_their_numbers():
    fig, ax = plt.subplots()
    err = torch.rand(16) + 0.1
    qviz.draw_channel_errors(ax, {"keys": err}, outliers=[3])
    assert list(ax.lines[0].get_ydata()) == pytest.approx(err.tolist())
    fig, ax = plt.subplots()
    qviz.draw_levels(ax, torch.tensor([0.5, -1.0]), torch.tensor([0.4, -1.0]), 0.2, bits=4)
    assert "15 levels" in ax.get_title()


def test_scheme_names_map_to_schemes():
    s = qw.scheme_from("int4", "channel, groups of 32")
    assert (s.granularity, s.group_size, s.symmetric) == ("channel", 32, False)
    assert qw.scheme_from("fp8_e4m3", "tensor").symmetric


def _labels(widget: W.Widget) -> list[str]:
    if isinstance(widget, W.HTML) and STATE_CLASS in widget.value:
        return [widget.value]
    return [t for child in getattr(widget, "children", ()) for t in _labels(child)]


def test_memory_widget_has_every_state():
    widget = qw.memory_widget(context=1024)
    labels = _labels(widget)
    assert len(labels) == 2 * 3 * 3
    assert any("format = int4 · group = 32 · residual = 128" in t for t in labels)
