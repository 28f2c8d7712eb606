"""Live widgets without a kernel: every state computed when the cell runs, chosen in the browser.

A reader of the HTML book has no Python behind the page, so a widget that calls back into
Python on every move would be frozen there. Instead, `live` evaluates a function over a small
grid of control values up front, shows each result as one child of an ipywidgets `Stack`,
and links each control's `index` to the stack's `selected_index` with `jslink`, which runs in
the browser (in Jupyter, on Colab and in the saved HTML alike). Two or more controls nest:
the first control picks a child of the outer stack, which is itself a stack picked by the
second control, and so on.

    live(render, context=[256, 1024, 4096], dtype=["bf16", "fp8"])

runs `render(context=..., dtype=...)` 3 x 2 = 6 times. `render` returns a matplotlib Figure
(shown as a PNG), a string of HTML, or any ipywidget. Every state is labelled with the values
that made it ("context = 1,024 · dtype = fp8"), above its output, so a reader (and the book's
browser check) can tell which state is shown: each state is a VBox of that label (an `HTML`
widget) and the result (a figure as an `Image`, a string as `HTML`, a widget as itself).

In the browser a `Stack` draws only its selected child, so exactly one label per widget is
on the page at a time. The book's browser check (tests/browser) moves every control of every
widget and reads that label.

Grid sizes multiply: keep each control to a handful of values chosen to keep what the widget
teaches (powers of two for a context length, say), and drop values whose state shows nothing
another does not. `MAX_STATES` guards against a grid that would make the page heavy. Figures
are drawn in the book's style (`kvlib.viz.style`), stored as 256-colour PNGs at `WIDGET_DPI`
and shown at the size they were drawn, never wider than the page.

The controls choose a child of a `Stack` (ipywidgets 8). Colab still ships ipywidgets 7,
which has no `Stack`: there the same states sit in a `Tab` whose tab bar is hidden
(`kv-stack`, styled by the HTML the widget carries), and the same `jslink` picks its
`selected_index`, so `pip install kvlib` never needs a newer ipywidgets, nor a restart.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as W
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from PIL import Image

from kvlib.viz import style

MAX_STATES = 160
FIT = "calc(100% - 8px)"  # the widest an image may be: its box, less ipywidgets' margins
DPI = style.WIDGET_DPI  # each state is embedded in the notebook and the HTML page

# CSS classes: the whole widget, and a state's label. tests/browser reads them to check that
# moving a control shows the state it names.
WIDGET_CLASS = "kv-live"
STATE_CLASS = "kv-live-state"
KINDS = ("slider", "dropdown", "toggle")


def format_value(value: Any) -> str:
    """How a control value reads in a label: 4096 -> '4,096', 0.5 -> '0.5', 'bf16' -> 'bf16'."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def state_label(values: dict[str, Any]) -> str:
    """'context = 1,024 · dtype = fp8': the text that names one state."""
    return " · ".join(f"{name} = {format_value(v)}" for name, v in values.items())


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """A figure as a 256-colour PNG (a third of the bytes of a full-colour one, the same to
    the eye), then closed so that it is not also shown as a cell output."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    plt.close(fig)
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    small = io.BytesIO()
    image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        small, format="png")
    return small.getvalue()


def figure_html(fig: Figure, dpi: int = DPI) -> str:
    """A figure as an `<img>` with the PNG inline (a data URL), shown at the size it was
    drawn (`style.css_width`) and never wider than the page; then closed."""
    width = style.css_width(fig)
    data = base64.b64encode(figure_png(fig, dpi)).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" alt="figure" '
            f'style="width: {width}px; max-width: {FIT}; height: auto">')


def figure_image(fig: Figure, dpi: int = DPI) -> W.Image:
    """A figure as an `Image` widget, shown like `figure_html`; then closed."""
    layout = W.Layout(width=f"{style.css_width(fig)}px", max_width=FIT, height="auto")
    return W.Image(value=figure_png(fig, dpi), format="png", layout=layout)


def _as_widget(result: Any, values: dict[str, Any], dpi: int) -> W.Widget:
    if isinstance(result, Figure):
        return figure_image(result, dpi)
    if isinstance(result, str):
        return W.HTML(result)
    if isinstance(result, W.Widget):
        return result
    raise TypeError(f"render must return a matplotlib Figure, an HTML string or a widget, "
                    f"got {type(result).__name__} for {state_label(values)}")


def _state(values: dict[str, Any], result: Any, dpi: int) -> W.VBox:
    """One state: a VBox of its label (class STATE_CLASS) and `render`'s result as a widget."""
    label = W.HTML(f'<div class="{STATE_CLASS}"><b>{html.escape(state_label(values))}</b></div>')
    return W.VBox([label, _as_widget(result, values, dpi)])


def _control(name: str, options: Sequence[Any], kind: str, default: Any) -> W.Widget:
    labels = [(format_value(v), i) for i, v in enumerate(options)]
    index = list(options).index(default)
    desc = {"description_width": "initial"}
    fit = W.Layout(width="100%", max_width="460px")  # never wider than a phone's screen
    if kind == "slider":
        return W.SelectionSlider(options=labels, value=index, description=name, style=desc,
                                 continuous_update=True, layout=fit)
    if kind == "dropdown":
        return W.Dropdown(options=labels, value=index, description=name, style=desc,
                          layout=W.Layout(width="auto", max_width="100%"))
    if kind == "toggle":
        return W.ToggleButtons(options=labels, value=index, description=name,
                               style={**desc, "button_width": "auto"},
                               layout=W.Layout(max_width="100%"))
    raise AssertionError(f"unchecked control kind {kind!r}")  # live checks kinds first


def live(render: Callable[..., Any], *, kinds: dict[str, str] | None = None,
         defaults: dict[str, Any] | None = None, dpi: int = DPI,
         **grid: Sequence[Any]) -> W.VBox:
    """A widget whose controls choose among `render`'s results over `grid`, all precomputed.

    Args:
        render: called as `render(**values)` once per point of the grid; returns a matplotlib
            Figure, an HTML string or an ipywidget.
        kinds: per control, 'slider' (default for numbers), 'dropdown' (default for
            strings) or 'toggle'.
        defaults: per control, the value shown first (default: the first of its grid).
        dpi: resolution of figure states.
        **grid: control name -> the values it offers, in order (at least one each).

    Returns:
        A VBox (class `WIDGET_CLASS`): the controls, then the stack of states. Each state shows
        its label (class `STATE_CLASS`) above `render`'s output.

    Raises:
        ValueError: no controls, an empty or string grid, repeated values in a grid, a kind or
            default for a name that is not a control, an unknown kind, a default not in its
            grid, or more than MAX_STATES states. Nothing is rendered then.
        TypeError: `render` returned something that is not a Figure, a str or a widget.

    >>> w = live(lambda n, mode: f"<p>{n} {mode}</p>", n=[1, 2, 4], mode=["a", "b"])
    >>> [type(c).__name__ for c in w.children[0].children]  # numbers slide, strings drop down
    ['SelectionSlider', 'Dropdown']
    >>> outer = w.children[1]  # the first control picks an inner stack, the second a state
    >>> len(outer.children), len(outer.children[0].children)
    (3, 2)
    >>> label, result = outer.children[2].children[1].children
    >>> label.value, result.value
    ('<div class="kv-live-state"><b>n = 4 · mode = b</b></div>', '<p>4 b</p>')
    """
    if not grid:
        raise ValueError("live needs at least one control: pass name=[values, ...]")
    kinds, defaults = dict(kinds or {}), dict(defaults or {})
    for name, options in grid.items():
        if isinstance(options, str) or len(options) == 0:
            raise ValueError(f"control {name!r} needs a non-empty sequence of values, "
                             f"got {options!r}")
        labels = [format_value(v) for v in options]
        if len(set(labels)) != len(labels):  # a label must name one state
            raise ValueError(f"control {name!r} has repeated values: {list(options)}")
        if name in defaults and defaults[name] not in options:
            raise ValueError(f"default {defaults[name]!r} of {name!r} is not among its "
                             f"values {list(options)}")
    for name in (*kinds, *defaults):
        if name not in grid:
            raise ValueError(f"{name!r} is not a control; controls: {list(grid)}")
    for name, kind in kinds.items():
        if kind not in KINDS:
            raise ValueError(f"control kind for {name!r} must be one of {KINDS}, got {kind!r}")
    num_states = 1
    for options in grid.values():
        num_states *= len(options)
    if num_states > MAX_STATES:
        raise ValueError(f"{num_states} states (grid sizes {[len(o) for o in grid.values()]}) "
                         f"exceed MAX_STATES = {MAX_STATES}: choose fewer values per control")

    names = list(grid)
    controls = [
        _control(name, grid[name],
                 kinds.get(name, "dropdown" if isinstance(grid[name][0], str) else "slider"),
                 defaults.get(name, grid[name][0]))
        for name in names
    ]
    states = {}
    with style.context():  # the book's sizes and fonts, whatever the notebook's settings
        for point in itertools.product(*(range(len(grid[n])) for n in names)):
            values = {n: grid[n][i] for n, i in zip(names, point)}
            states[point] = _state(values, render(**values), dpi)

    def nest(prefix: tuple[int, ...]) -> W.Widget:
        depth = len(prefix)
        if depth == len(names):
            return states[prefix]
        control = controls[depth]
        stack = _stack([nest((*prefix, i)) for i in range(len(grid[names[depth]]))],
                       control.index)
        W.jslink((control, "index"), (stack, "selected_index"))
        return stack

    parts = [W.VBox(controls), nest(())]
    if not hasattr(W, "Stack"):  # ipywidgets 7: hide the tab bars of the stand-in Tabs
        parts.append(W.HTML(TAB_AS_STACK_CSS))
    widget = W.VBox(parts)
    widget.add_class(WIDGET_CLASS)
    return widget


# ipywidgets 7 (Colab's): a Tab stands in for a Stack; its tab bar is hidden, so the controls
# alone choose what is shown.
STACK_CLASS = "kv-stack"
TAB_AS_STACK_CSS = (f"<style>.{STACK_CLASS} > .p-TabBar, .{STACK_CLASS} > .lm-TabBar "
                    "{display: none !important}</style>")


def _stack(children: list[W.Widget], selected_index: int) -> W.Widget:
    """A Stack of `children` showing `selected_index`; a Tab without its bar on ipywidgets 7."""
    if hasattr(W, "Stack"):
        return W.Stack(children, selected_index=selected_index)
    tab = W.Tab(children, selected_index=selected_index)
    tab.add_class(STACK_CLASS)
    return tab
