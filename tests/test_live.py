"""kvlib.widgets.live: the grid of states, their labels, the nesting, the links, the errors.

What happens in the browser (moving a control shows the state it names) is checked on the
built book by tests/browser; here, the widget tree that the browser receives.
"""

from __future__ import annotations

import itertools

import ipywidgets as W
import matplotlib
import matplotlib.pyplot as plt
import pytest

from kvlib.viz import style
from kvlib.widgets import live as L

matplotlib.use("Agg")


def html_render(**values):
    return "<p>" + ",".join(f"{k}={v}" for k, v in values.items()) + "</p>"


def controls(widget):
    return list(widget.children[0].children)


def state(widget, **values):
    """The state widget the controls would show for `values`, found by walking the stacks."""
    node = widget.children[1]
    for control in controls(widget):
        index = [label for label, _ in control.options].index(L.format_value(
            values[control.description]))
        node = node.children[index]
    return node


def label_of(state_widget):
    label, _ = state_widget.children
    opening = f'<div class="{L.STATE_CLASS}"><b>'
    assert label.value.startswith(opening), label.value[:80]
    return label.value[len(opening):label.value.index("</b></div>")]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.mark.parametrize("sizes", [(1,), (5,), (2, 3), (3, 1, 2)])
def test_grid_sizes_and_nesting(sizes):
    grid = {f"c{i}": list(range(n)) for i, n in enumerate(sizes)}
    calls = []
    w = L.live(lambda **v: calls.append(v) or html_render(**v), **grid)
    assert len(calls) == len(list(itertools.product(*grid.values())))  # each point once
    node = w.children[1]
    for n in sizes:  # one level of stacks per control, as wide as its grid
        assert isinstance(node, W.Stack) and len(node.children) == n
        node = node.children[-1]
    assert not isinstance(node, W.Stack)
    assert L.WIDGET_CLASS in w._dom_classes


def test_every_state_is_labelled_with_the_values_that_made_it():
    w = L.live(html_render, context=[256, 4096], dtype=["bf16", "fp8"], scale=[0.5, 2.0])
    for context, dtype, scale in itertools.product([256, 4096], ["bf16", "fp8"], [0.5, 2.0]):
        s = state(w, context=context, dtype=dtype, scale=scale)
        assert label_of(s) == f"context = {context:,} · dtype = {dtype} · scale = {scale:g}"
        assert s.children[1].value == html_render(context=context, dtype=dtype, scale=scale)


def test_controls_kinds_options_and_defaults(monkeypatch):
    linked = set()  # (source model, its trait, target model, its trait) of every jslink
    jslink = W.jslink
    monkeypatch.setattr(W, "jslink", lambda a, b: linked.add(
        (a[0].model_id, a[1], b[0].model_id, b[1])) or jslink(a, b))
    w = L.live(html_render, n=[1, 2, 4], mode=["a", "b"], on=[False, True],
               kinds={"on": "toggle"}, defaults={"n": 4, "mode": "b"})
    n, mode, on = controls(w)
    assert isinstance(n, W.SelectionSlider) and isinstance(mode, W.Dropdown)
    assert isinstance(on, W.ToggleButtons)
    assert [label for label, _ in n.options] == ["1", "2", "4"]
    assert (n.index, mode.index, on.index) == (2, 1, 0)
    # Each stack starts on its control's index and is linked to it (in the browser: jslink).
    outer = w.children[1]
    assert outer.selected_index == 2
    assert all(inner.selected_index == 1 for inner in outer.children)
    expected = {(n.model_id, "index", outer.model_id, "selected_index")}
    for inner in outer.children:
        expected.add((mode.model_id, "index", inner.model_id, "selected_index"))
        for leaf_stack in inner.children:
            expected.add((on.model_id, "index", leaf_stack.model_id, "selected_index"))
    assert linked == expected  # 1 + 3 + 3 * 2 stacks, each linked to its control


def test_figures_become_small_pngs_and_are_closed():
    def render(n):
        fig, ax = plt.subplots(figsize=(2, 1))
        ax.plot(range(n))
        return fig

    w = L.live(render, n=[2, 3])
    image = state(w, n=3).children[1]
    assert isinstance(image, W.Image) and image.value[:4] == b"\x89PNG"
    assert label_of(state(w, n=3)) == "n = 3"
    assert plt.get_fignums() == []  # not shown a second time as cell outputs
    fig, _ = plt.subplots(figsize=(2, 1))
    png = L.figure_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(png[16:20], "big")  # pixels: 2 in x WIDGET_DPI
    assert width == 2 * L.DPI
    assert png[25] == 3  # colour type 3: a palette of at most 256 colours


def test_figures_are_shown_at_the_size_they_were_drawn():
    def render(n):
        return plt.figure(figsize=(4, 2))

    image = state(L.live(render, n=[1]), n=1).children[1]
    assert image.layout.width == f"{4 * style.DISPLAY_DPI}px"
    assert image.layout.max_width == L.FIT  # never wider than the page
    html = L.figure_html(plt.figure(figsize=(5, 2)))
    assert f"width: {5 * style.DISPLAY_DPI}px; max-width: {L.FIT}" in html


def test_states_are_drawn_in_the_book_style():
    sizes = []

    def render(n):
        sizes.append(plt.rcParams["xtick.labelsize"])
        return f"<p>{n}</p>"

    before = plt.rcParams["xtick.labelsize"]
    with matplotlib.rc_context({"xtick.labelsize": 4}):
        L.live(render, n=[1])
        assert plt.rcParams["xtick.labelsize"] == 4  # the notebook's own settings, restored
    assert sizes == [style.RC["xtick.labelsize"]] and plt.rcParams["xtick.labelsize"] == before


def test_without_stack_a_tab_stands_in(monkeypatch):
    # ipywidgets 7 (Colab's) has no Stack: a Tab with its bar hidden, linked the same way.
    monkeypatch.delattr(W, "Stack")
    linked = []
    jslink = W.jslink
    monkeypatch.setattr(W, "jslink", lambda a, b: linked.append((a, b)) or jslink(a, b))
    w = L.live(lambda n, m: f"<p>{n} {m}</p>", n=[1, 2], m=["a", "b"])
    outer = w.children[1]
    assert isinstance(outer, W.Tab) and L.STACK_CLASS in outer._dom_classes
    assert isinstance(outer.children[0], W.Tab)
    assert L.TAB_AS_STACK_CSS in w.children[2].value
    assert ((w.children[0].children[0], "index"), (outer, "selected_index")) in linked


def test_a_widget_result_goes_below_its_label():
    inner = W.IntText(3)
    w = L.live(lambda n: inner if n == 1 else W.Label(str(n)), n=[1, 2])
    s = state(w, n=1)
    assert s.children[1] is inner and label_of(s) == "n = 1"


def test_format_value_and_state_label():
    assert [L.format_value(v) for v in (4096, 0.5, "bf16", True, 1e-6)] == [
        "4,096", "0.5", "bf16", "True", "1e-06"]
    assert L.state_label({"S": 1024, "model": "gpt2"}) == "S = 1,024 · model = gpt2"


@pytest.mark.parametrize("kwargs, match", [
    ({}, "at least one control"),
    ({"n": []}, "non-empty sequence"),
    ({"n": "abc"}, "non-empty sequence"),
    ({"n": [1, 1]}, "repeated values"),
    ({"n": [1, 2], "kinds": {"m": "slider"}}, "'m' is not a control"),
    ({"n": [1, 2], "defaults": {"m": 1}}, "'m' is not a control"),
    ({"n": [1, 2], "defaults": {"n": 3}}, "default 3 of 'n'"),
    ({"n": [1, 2], "kinds": {"n": "knob"}}, "must be one of"),
    ({"a": list(range(20)), "b": list(range(20))}, "exceed MAX_STATES"),
])
def test_bad_grids_raise_before_rendering_anything(kwargs, match):
    calls = []
    with pytest.raises(ValueError, match=match):
        L.live(lambda **v: calls.append(v) or "", **kwargs)
    assert calls == []


def test_render_must_return_something_showable():
    with pytest.raises(TypeError, match="got int for n = 2"):
        L.live(lambda n: n if n == 2 else "ok", n=[1, 2])
