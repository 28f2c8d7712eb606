"""Chapter 8's drawings: sliding-window masks and ring buffers, real models' caches side by side.

Every number drawn comes from `kvlib.real_models` (`REAL_MODELS`, `cache_bytes`,
`weight_bytes_per_gpu`, `max_sequences`); nothing is computed here that a test does not check
there.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from kvlib import analysis, real_models
from kvlib.config import ModelConfig
from kvlib.real_models import MLAConfig

Model = ModelConfig | MLAConfig

# The dtype each model's weights are published in: bf16, except DeepSeek-V3's FP8 release
# and gpt-oss's MXFP4 experts (`real_models.PUBLISHED_WEIGHT_BYTES`).
WEIGHT_DTYPE = {"deepseek-v3": "fp8", "gpt-oss-120b": real_models.AS_PUBLISHED}


@dataclass(frozen=True)
class GpuRow:
    """One model on one GPU: GB of weights and of the batch's cache (None: not drawn), and
    the note beside them (how many sequences fit, or why none do)."""

    name: str
    weights_gb: float | None
    cache_gb: float | None
    note: str


def gpu_memory_rows(models: Mapping[str, Model], context_len: int, batch_size: int,
                    dtype: str, gpu_gb: int, tp: int) -> list[GpuRow]:
    """What `plot_gpu_memory` and `gpu_memory_html` draw, from `kvlib.real_models`.

    >>> row, = gpu_memory_rows({"llama-3-8b": real_models.REAL_MODELS["llama-3-8b"]},
    ...                        8192, 1, "bf16", 80, 1)
    >>> round(row.weights_gb, 2), round(row.cache_gb, 2), row.note
    (16.06, 1.07, 'fits 59 seqs')
    """
    gpu = gpu_gb * 10**9
    rows = []
    for name, m in models.items():
        wdt = WEIGHT_DTYPE.get(name, "bf16")
        try:
            weights = real_models.weight_bytes_per_gpu(m, wdt, tp) / 1e9
        except ValueError:
            rows.append(GpuRow(name, None, None,
                               f"{m.num_heads} heads do not split over {tp} GPUs"))
            continue
        if context_len > m.max_seq_len:  # no cache drawn: the model cannot read that far
            rows.append(GpuRow(name, weights, None, f"context > its max {m.max_seq_len:,}"))
            continue
        cache = real_models.cache_bytes(m, context_len, batch_size, dtype, tp) / 1e9
        fit = real_models.max_sequences(m, context_len, gpu, dtype=dtype, weight_dtype=wdt,
                                        tp=tp)
        note = "weights do not fit" if weights * 1e9 >= gpu else f"fits {fit:,} seqs"
        rows.append(GpuRow(name, weights, cache, note))
    return rows


def attention_kind(model: Model) -> str:
    """'MHA', 'GQA', 'MQA' or 'MLA'.

    >>> attention_kind(real_models.REAL_MODELS["llama-3-8b"]), attention_kind(
    ...     real_models.REAL_MODELS["deepseek-v3"])
    ('GQA', 'MLA')
    """
    if isinstance(model, MLAConfig):
        return "MLA"
    if model.num_kv_heads == model.num_heads:
        return "MHA"
    return "MQA" if model.num_kv_heads == 1 else "GQA"


def window_text(model: Model) -> str:
    """'-', '4,096 (all)' or '4,096 (21 of 42)': the sliding window and the layers it covers."""
    if isinstance(model, MLAConfig) or model.sliding_window is None:
        return "-"
    used = sum(w is not None for w in model.layer_windows)
    span = "all" if used == model.num_layers else f"{used} of {model.num_layers}"
    return f"{model.sliding_window:,} ({span})"


def naive_token_bytes(model: Model, dtype: str = "bf16") -> int:
    """The popular formula 2 x layers x d_model x bytes, which assumes every head is cached
    with head_dim = d_model / heads: right for MHA, wrong for GQA, MQA, MLA and Gemma-2."""
    d_model = 7168 if isinstance(model, MLAConfig) else model.d_model  # DeepSeek-V3's hidden
    return 2 * model.num_layers * d_model * analysis.dtype_bytes(dtype)


def comparison_table(models: Mapping[str, Model], context_lens: Sequence[int],
                     dtype: str = "bf16") -> str:
    """A text table: per model, its attention, window, KV bytes per token (right and by the
    naive formula) and the cache of one sequence at each context, '-' past its max context.

    >>> print(comparison_table({"mistral-7b-v0.1": real_models.REAL_MODELS["mistral-7b-v0.1"]},
    ...                        [4096, 32768]))
    model            attn  KV heads x dim  window            KV/token KiB  naive KiB    4,096 GiB   32,768 GiB
    mistral-7b-v0.1  GQA          8 x 128  4,096 (all)              128.0      512.0         0.50         0.50
    """
    ctx_cols = "".join(f"  {f'{c:,} GiB':>11}" for c in context_lens)
    lines = [f"{'model':<15}  {'attn':<4}  {'KV heads x dim':>14}  {'window':<16}  "
             f"{'KV/token KiB':>12}  {'naive KiB':>9}{ctx_cols}"]
    for name, m in models.items():
        shape = (f"latent {m.kv_lora_rank}+{m.qk_rope_head_dim}" if isinstance(m, MLAConfig)
                 else f"{m.num_kv_heads} x {m.head_dim}")
        cells = "".join(
            f"  {real_models.cache_bytes(m, c, 1, dtype) / 2**30:>11.2f}" if c <= m.max_seq_len
            else f"  {'-':>11}" for c in context_lens)
        lines.append(f"{name:<15}  {attention_kind(m):<4}  {shape:>14}  {window_text(m):<16}  "
                     f"{real_models.token_bytes(m, dtype) / 2**10:>12.1f}  "
                     f"{naive_token_bytes(m, dtype) / 2**10:>9.1f}{cells}")
    return "\n".join(lines)


def comparison_markdown(models: Mapping[str, Model], context_lens: Sequence[int],
                        dtype: str = "bf16") -> str:
    """`comparison_table` as a Markdown table (what a chapter shows: it fits the page and
    scrolls inside itself on a phone), the same numbers, the same '-'."""
    head = ["model", "attn", "KV heads x dim", "window (layers)", "KiB per token",
            "naive", *(f"{c // 1024}K (GiB)" for c in context_lens)]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|---|" + "---:|" * (len(head) - 4)]
    for name, m in models.items():
        shape = (f"latent {m.kv_lora_rank}+{m.qk_rope_head_dim}" if isinstance(m, MLAConfig)
                 else f"{m.num_kv_heads} x {m.head_dim}")
        cells = [f"{real_models.cache_bytes(m, c, 1, dtype) / 2**30:.2f}"
                 if c <= m.max_seq_len else "-" for c in context_lens]
        lines.append("| " + " | ".join([
            name, attention_kind(m), shape, window_text(m),
            f"{real_models.token_bytes(m, dtype) / 2**10:.1f}",
            f"{naive_token_bytes(m, dtype) / 2**10:.1f}", *cells]) + " |")
    return "\n".join(lines)


def draw_window_mask(ax: Axes, num_tokens: int, window: int | None) -> None:
    """Which keys (columns) each query (rows) attends to: causal, or causal within W."""
    q = np.arange(num_tokens)[:, None]
    k = np.arange(num_tokens)[None, :]
    allowed = (k <= q) & ((k > q - window) if window is not None else True)
    ax.imshow(allowed, cmap="Blues", vmin=0, vmax=1.4)
    ax.set_xticks(range(0, num_tokens, 2))
    ax.set_yticks(range(0, num_tokens, 2))
    ax.set_xlabel("key (position)")
    ax.set_ylabel("query (position)")
    ax.set_title("causal" if window is None else f"sliding window W = {window}")


def draw_ring_buffer(ax: Axes, num_tokens: int, window: int) -> None:
    """A W-slot ring: after each token (rows), which position each slot (columns) holds.

    Position p goes to slot p mod W, overwriting position p - W, the first key the window
    hides; the newest token's slot is outlined.
    """
    grid = np.full((num_tokens, window), -1)
    for t in range(num_tokens):
        for p in range(t + 1):
            grid[t, p % window] = p
    ax.imshow(grid >= 0, cmap="Greens", vmin=0, vmax=2.5, aspect="auto")
    for t in range(num_tokens):
        for s in range(window):
            if grid[t, s] >= 0:
                ax.text(s, t, str(grid[t, s]), ha="center", va="center", fontsize=9.5)
        ax.add_patch(Rectangle((t % window - 0.5, t - 0.5), 1, 1, fill=False, lw=1.5,
                               ec="tab:red"))
    ax.set_xticks(range(window))
    ax.set_yticks(range(0, num_tokens, 2))
    ax.set_xlabel("ring slot (position mod W)")
    ax.set_ylabel("after token (position)")
    ax.set_title(f"ring buffer, W = {window}")


def plot_cache_vs_context(ax: Axes, models: Mapping[str, Model], context_lens: Sequence[int],
                          dtype: str = "bf16", tp: int = 1) -> None:
    """GiB of one sequence's cache on each GPU against context, up to each model's maximum."""
    for name, m in models.items():
        try:
            real_models.kv_heads_per_gpu(m, tp)
        except ValueError:
            continue  # this model cannot be split over tp GPUs
        xs = [c for c in context_lens if c <= m.max_seq_len]
        ys = [real_models.cache_bytes(m, c, 1, dtype, tp) / 2**30 for c in xs]
        ax.plot(xs, ys, marker=".", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("cache per GPU (GiB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"one sequence's cache, {dtype}, tp = {tp}")


def plot_gpu_memory(ax: Axes, models: Mapping[str, Model], context_len: int, batch_size: int,
                    dtype: str, gpu_gb: int, tp: int) -> None:
    """Per model, one GPU's memory: weights + cache of the batch, against the GPU's size.

    The note after each bar: how many sequences of this context fit beside the weights, or why
    none do (the weights alone, heads that do not split over tp, a context past the model's).
    """
    names = list(models)
    labels = {"weights": "weights", "cache": f"cache of {batch_size:,} sequence(s)"}
    for i, row in enumerate(gpu_memory_rows(models, context_len, batch_size, dtype, gpu_gb,
                                            tp)):
        if row.weights_gb is not None:
            ax.barh(i, row.weights_gb, color="tab:gray", label=labels.pop("weights", None))
        if row.cache_gb is not None:
            ax.barh(i, row.cache_gb, left=row.weights_gb, color="tab:blue",
                    label=labels.pop("cache", None))
        ax.text(1.02, i, row.note, transform=ax.get_yaxis_transform(), va="center",
                color="gray" if row.weights_gb is None else "black")
    ax.axvline(gpu_gb, color="tab:red", lw=1.5, label=f"{gpu_gb} GB GPU")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 2 * gpu_gb)
    ax.set_xlabel("memory per GPU (GB; bars past the axis are cut)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)


def gpu_memory_html(models: Mapping[str, Model], context_len: int, batch_size: int,
                    dtype: str, gpu_gb: int, tp: int) -> str:
    """`plot_gpu_memory` as an HTML table of bars (a few kB, where a PNG weighs tens): per
    model one GPU's weights (grey) and the batch's cache (blue) on a scale of twice the GPU's
    memory, its size a red line, and the note. It scrolls sideways on a narrow screen."""
    width = 260  # CSS px for 2 x gpu_gb
    scale = width / (2 * gpu_gb)

    def bar(gb: float | None, color: str) -> str:
        if not gb:
            return ""
        return (f'<span style="display: inline-block; height: 14px; width: '
                f'{min(gb * scale, width):.0f}px; background: {color}"></span>')

    body = []
    for row in gpu_memory_rows(models, context_len, batch_size, dtype, gpu_gb, tp):
        total = (row.weights_gb or 0) + (row.cache_gb or 0)
        size = f"{total:,.0f} GB" if row.weights_gb is not None else ""
        body.append(
            f"<tr><td><b>{html.escape(row.name)}</b></td>"
            f'<td style="position: relative; width: {width}px; white-space: nowrap">'
            f"{bar(row.weights_gb, '#8c8c8c')}{bar(row.cache_gb, '#1f77b4')}"
            f'<span style="position: absolute; left: {gpu_gb * scale:.0f}px; top: 0; '
            f'bottom: 0; border-left: 2px solid #d62728"></span></td>'
            f'<td style="text-align: right">{size}</td>'
            f"<td>{html.escape(row.note)}</td></tr>")
    head = (f"<caption>one GPU of {gpu_gb} GB (red line), tensor parallel over {tp}: weights "
            f"(grey) and the cache of {batch_size:,} sequence(s) of {context_len:,} tokens in "
            f"{dtype} (blue)</caption>")
    return (f'<div style="overflow-x: auto; max-width: 100%"><table style="font-size: 13px">'
            f"{head}{''.join(body)}</table></div>")
