"""Chapter 5's live widgets: the error of a scheme on keys with outlier channels, and where a
quantized cache's bytes go. Every state is computed up front by `kvlib.widgets.live.live`."""

from __future__ import annotations

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np

from kvlib.analysis import PRESETS as MODELS
from kvlib.cache.quant_memory import KVQuantConfig, memory
from kvlib.cache.quantize import QuantScheme, fake_quantize
from kvlib.experiments.quantization import attention_error, outlier_keys, relative_error
from kvlib.viz import quantization as qviz
from kvlib.viz import style
from kvlib.widgets.live import live

GRANULARITIES = {"tensor": ("tensor", None), "token": ("token", None),
                 "token, groups of 32": ("token", 32), "channel, groups of 32": ("channel", 32)}


def scheme_from(fmt: str, granularity: str) -> QuantScheme:
    """A chapter-facing name ("token, groups of 32") -> QuantScheme (asymmetric integers)."""
    gran, group = GRANULARITIES[granularity]
    return QuantScheme(fmt, gran, group, symmetric=fmt.startswith("fp8"))


def granularity_widget(num_tokens: int = 256, head_dim: int = 128) -> W.VBox:
    """Format x granularity x outlier strength (36 states): per-channel error on keys with
    outlier channels and on values, and the attention output's error."""
    data = {s: outlier_keys(num_tokens, head_dim, 1, strength=float(s))
            for s in (1, 10, 100)}

    def render(format: str, granularity: str, outliers: int) -> plt.Figure:
        k, v, q = data[outliers]
        scheme = scheme_from(format, granularity)
        kq, vq = fake_quantize(k, scheme), fake_quantize(v, scheme)
        fig, ax = plt.subplots(figsize=style.size(0.45))
        outlier_channels = (k[0].abs().mean(0) > 3).nonzero().flatten().tolist()  # none at 1
        qviz.draw_channel_errors(ax, {
            "keys": ((kq - k)[0] ** 2).mean(0).sqrt(),
            "values": ((vq - v)[0] ** 2).mean(0).sqrt()}, outlier_channels)
        ax.set_ylim(1e-4, 1e2)
        ax.legend(loc="upper right", ncol=2, frameon=False)
        att = attention_error(k, v, q, scheme, scheme)
        ax.set_title(f"error: keys {relative_error(kq, k):.1%}, values "
                     f"{relative_error(vq, v):.1%}, attention output {att:.1%}")
        return fig

    return live(render, format=["int8", "int4", "fp8_e4m3"], granularity=list(GRANULARITIES),
                outliers=[1, 10, 100], kinds={"format": "toggle", "granularity": "dropdown"},
                defaults={"outliers": 10})


def memory_widget(model: str = "llama-3-8b", context: int = 2048) -> W.VBox:
    """Format x group size x full-precision residual (18 states): bytes per token by part, and
    the ratio against fp16 as the context grows."""
    cfg = MODELS[model]
    shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    contexts = 2 ** np.arange(7, 16)  # 128 .. 32,768 tokens

    def render(format: str, group: int, residual: int) -> plt.Figure:
        scheme = QuantScheme(format, "token", None if group >= cfg.head_dim else group)
        quant = KVQuantConfig(scheme, scheme, residual)
        m = memory(quant, *shape, context)
        fig, (a, b) = plt.subplots(2, 1, figsize=style.size(0.62), height_ratios=[1, 1.6])
        qviz.draw_bytes(a, {scheme.name: m}, m.fp16 / context)
        a.set_title(f"{model}, {context:,} tokens: bytes per token by part")
        ratios = [memory(quant, *shape, int(s)).ratio_vs_fp16 for s in contexts]
        b.plot(contexts, ratios, marker="o", label=f"{scheme.name}, residual {residual}")
        b.axhline(m.naive_ratio, color="#999999", ls=":", lw=1.2,
                  label=f"naive: {m.naive_ratio:g}x")
        b.set_xscale("log", base=2)
        b.set_ylim(0, 4.2)
        b.set_xlabel("context (tokens)")
        b.set_ylabel("smaller than fp16 (x)")
        b.legend(loc="lower right", frameon=False)
        return fig

    return live(render, format=["int8", "int4"], group=[32, 64, 128], residual=[0, 128, 512],
                kinds={"format": "toggle"}, defaults={"residual": 128})
