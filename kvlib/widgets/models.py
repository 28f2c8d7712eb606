"""Chapter 8's widget: real models' weights and caches on one GPU, over a small grid.

Built with `kvlib.widgets.live`, so every state is drawn when the cell runs and the controls
choose among them in the browser (the HTML book needs no kernel). Every state is an HTML table
of bars, one row per model; the controls set the workload and the hardware.
"""

from __future__ import annotations

from collections.abc import Mapping

import ipywidgets as W

from kvlib import real_models
from kvlib.viz import models as mviz
from kvlib.widgets.live import live

# The models readers serve today, one of each kind of cache: full attention (Llama 3.1,
# Qwen3), a window on every layer (Mistral v0.1), windows on most layers (Gemma 3, gpt-oss),
# chunked attention (Llama 4), a latent (DeepSeek-V3).
WIDGET_MODELS = ("llama-3.1-8b", "llama-3.1-70b", "qwen3-8b", "mistral-7b-v0.1", "gemma-3-27b",
                 "llama-4-scout", "gpt-oss-120b", "deepseek-v3")
# 3 x 2 x 2 x 2 x 2 = 48 states of a few kB each (HTML, not PNG).
GRID = {"context": [4096, 32768, 131072], "batch": [1, 16], "dtype": ["bf16", "fp8"],
        "gpu_gb": [80, 141], "tp": [1, 8]}


def gpu_memory_widget(models: Mapping[str, mviz.Model] | None = None,
                      grid: Mapping[str, list] | None = None) -> W.VBox:
    """Context, batch, cache dtype, GPU memory (GB) and tensor-parallel degree: every model's
    weights and cache on one GPU (`mviz.gpu_memory_html`)."""
    models = ({n: real_models.REAL_MODELS[n] for n in WIDGET_MODELS} if models is None
              else models)
    grid = GRID if grid is None else grid

    def render(**values) -> str:
        return mviz.gpu_memory_html(models, values["context"], values["batch"],
                                    values["dtype"], values["gpu_gb"], values["tp"])

    return live(render, kinds={"batch": "toggle", "dtype": "toggle", "gpu_gb": "toggle",
                               "tp": "toggle"}, **grid)
