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
teaches (powers of two for a context length, say), and render figures small. `MAX_STATES`
guards against a grid that would make the page heavy.
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

MAX_STATES = 160
DPI = 72  # small PNGs: each state is embedded in the notebook and the HTML page

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
    """A figure as PNG bytes, then closed so that it is not also shown as a cell output."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def figure_html(fig: Figure, dpi: int = DPI) -> str:
    """A figure as an `<img>` with the PNG inline (a data URL), then closed."""
    data = base64.b64encode(figure_png(fig, dpi)).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="figure" style="max-width: 100%">'


def _as_widget(result: Any, values: dict[str, Any], dpi: int) -> W.Widget:
    if isinstance(result, Figure):
        return W.Image(value=figure_png(result, dpi), format="png")
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
    style = {"description_width": "initial"}
    if kind == "slider":
        return W.SelectionSlider(options=labels, value=index, description=name, style=style,
                                 continuous_update=True, layout=W.Layout(width="420px"))
    if kind == "dropdown":
        return W.Dropdown(options=labels, value=index, description=name, style=style)
    if kind == "toggle":
        return W.ToggleButtons(options=labels, value=index, description=name, style=style)
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
    for point in itertools.product(*(range(len(grid[n])) for n in names)):
        values = {n: grid[n][i] for n, i in zip(names, point)}
        states[point] = _state(values, render(**values), dpi)

    def nest(prefix: tuple[int, ...]) -> W.Widget:
        depth = len(prefix)
        if depth == len(names):
            return states[prefix]
        control = controls[depth]
        stack = W.Stack([nest((*prefix, i)) for i in range(len(grid[names[depth]]))],
                        selected_index=control.index)
        W.jslink((control, "index"), (stack, "selected_index"))
        return stack

    widget = W.VBox([W.VBox(controls), nest(())])
    widget.add_class(WIDGET_CLASS)
    return widget
