"""Chapter 8's widget: real models' weights and caches on one GPU, over a small grid.

Built with `kvlib.widgets.live`, so every state is drawn when the cell runs and the controls
choose among them in the browser (the HTML book needs no kernel). All models are drawn in
every state, side by side; the controls set the workload and the hardware.
"""

from __future__ import annotations

from collections.abc import Mapping

import ipywidgets as W
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from kvlib import real_models
from kvlib.viz import models as mviz
from kvlib.widgets.live import live

# 2 x 2 x 2 x 2 x 2 = 32 states: enough to see windows, MLA, fp8 and sharding at work.
GRID = {"context": [4096, 32768], "batch": [1, 16], "dtype": ["bf16", "fp8"],
        "gpu_gb": [80, 141], "tp": [1, 8]}


def gpu_memory_figure(models: Mapping[str, mviz.Model], context: int, batch: int, dtype: str,
                      gpu_gb: int, tp: int) -> Figure:
    """One state: `mviz.plot_gpu_memory` in a small figure."""
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    mviz.plot_gpu_memory(ax, models, context, batch, dtype, gpu_gb, tp)
    fig.subplots_adjust(right=0.72)
    return fig


def gpu_memory_widget(models: Mapping[str, mviz.Model] | None = None,
                      grid: Mapping[str, list] | None = None) -> W.VBox:
    """Context, batch, cache dtype, GPU memory (GB) and tensor-parallel degree, all models."""
    models = real_models.REAL_MODELS if models is None else models
    grid = GRID if grid is None else grid

    def render(**values) -> Figure:
        return gpu_memory_figure(models, **values)

    return live(render, kinds={"dtype": "toggle", "gpu_gb": "toggle", "tp": "toggle"}, **grid)
