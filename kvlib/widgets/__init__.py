"""Widget builders for the chapters: each returns an ipywidgets object ready to display.

Every widget is made with `live` (kvlib.widgets.live): its states are computed when the cell
runs and the controls choose among them in the browser, so it moves in the HTML book with no
kernel behind it. One module per chapter topic (`widgets.decoding`, `widgets.layouts`, ...);
beside each widget a chapter shows a static figure of the whole sweep. The numbers behind
every widget come from `analysis`, a real `FlatKVCache` or a real generation, never from the
widget itself. The names of chapters 0-2 are re-exported here (`widgets.cache_calculator()`);
`widgets.live` is the module of the mechanism (`from kvlib.widgets.live import live`).
"""

from kvlib.widgets.decoding import attention_work_widget, cache_fill_widget, step_cost_widget
from kvlib.widgets.layouts import cache_calculator, cache_size_table, layout_widget

__all__ = [
    "attention_work_widget", "cache_calculator", "cache_fill_widget", "cache_size_table",
    "layout_widget", "step_cost_widget",
]
