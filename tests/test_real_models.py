"""kvlib.real_models: KV bytes per token written out from each public config.json.

Each figure below is arithmetic on the numbers of the config named beside it, in bf16 (2
bytes): K and V (2) x layers x KV heads x head_dim x 2 bytes, or for MLA layers x
(kv_lora_rank + qk_rope_head_dim) x 2 bytes.
"""

from __future__ import annotations

import math

import pytest

from kvlib.analysis import PRESETS, kv_bytes_per_token
from kvlib.real_models import (
    REAL_MODELS,
    MLAConfig,
    cache_bytes,
    kv_heads_per_gpu,
    max_sequences,
    model_params,
    token_bytes,
    weight_bytes_per_gpu,
)

BY_HAND = {
    "gpt2": 2 * 12 * 12 * 64 * 2,  # n_layer 12, n_head 12, n_embd 768 / 12 = 64: 36,864
    "smollm2-135m": 2 * 30 * 3 * 64 * 2,  # 30 layers, 3 KV heads, 576 / 9 = 64: 23,040
    "llama-3-8b": 2 * 32 * 8 * 128 * 2,  # 32 layers, 8 KV heads, 4096 / 32: 131,072
    "llama-3-70b": 2 * 80 * 8 * 128 * 2,  # 80 layers, 8 KV heads, 8192 / 64: 327,680
    "mistral-7b-v0.1": 2 * 32 * 8 * 128 * 2,  # as Llama-3-8B: 131,072 (window: below)
    "mistral-7b-v0.2": 2 * 32 * 8 * 128 * 2,  # 131,072
    "qwen2.5-7b": 2 * 28 * 4 * 128 * 2,  # 28 layers, 4 KV heads, 3584 / 28: 57,344
    "gemma-2-9b": 2 * 42 * 8 * 256 * 2,  # 42 layers, 8 KV heads, head_dim 256: 344,064
    "deepseek-v3": 61 * (512 + 64) * 2,  # 61 layers, latent 512 + rope key 64: 70,272
    "llama-3.1-8b": 2 * 32 * 8 * 128 * 2,  # Llama 3's shapes: 131,072
    "llama-3.1-70b": 2 * 80 * 8 * 128 * 2,  # 327,680
    "qwen3-8b": 2 * 36 * 8 * 128 * 2,  # 36 layers, 8 KV heads of 128: 147,456
    "gemma-3-27b": 2 * 62 * 16 * 128 * 2,  # 62 layers, 16 KV heads of 128: 507,904
    "llama-4-scout": 2 * 48 * 8 * 128 * 2,  # 48 layers, 8 KV heads of 128: 196,608
    "gpt-oss-120b": 2 * 36 * 8 * 64 * 2,  # 36 layers, 8 KV heads of 64: 73,728
}


def test_the_models():
    assert list(REAL_MODELS) == list(BY_HAND)


@pytest.mark.parametrize("name", list(BY_HAND))
def test_kv_bytes_per_token_by_hand(name):
    assert token_bytes(REAL_MODELS[name], "bf16") == BY_HAND[name]
    assert token_bytes(REAL_MODELS[name], "fp8") == BY_HAND[name] // 2


def test_token_bytes_agrees_with_kv_bytes_per_token():
    for cfg in PRESETS.values():
        assert token_bytes(cfg, "fp16") == kv_bytes_per_token(cfg, "fp16")


def test_the_figures_people_get_wrong():
    # MHA formula for DeepSeek-V3 (128 heads, K 192 + V 128 dims each): 71x the latent.
    mha_guess = 61 * 128 * (192 + 128) * 2
    assert mha_guess == 4_997_120 and mha_guess // BY_HAND["deepseek-v3"] == 71
    # head_dim taken as d_model / heads for Gemma-2-9B: 3584 / 16 = 224, not 256.
    assert 2 * 42 * 8 * (3584 // 16) * 2 < BY_HAND["gemma-2-9b"]
    # Ignoring GQA for Llama-3-70B (64 query heads): 8x too much.
    assert 2 * 80 * 64 * 128 * 2 == 8 * BY_HAND["llama-3-70b"]


def test_sliding_windows_cap_the_cache():
    v01, v02 = REAL_MODELS["mistral-7b-v0.1"], REAL_MODELS["mistral-7b-v0.2"]
    assert cache_bytes(v01, 4096) == cache_bytes(v02, 4096) == 4096 * 131_072
    assert cache_bytes(v01, 32768) == 4096 * 131_072  # every layer keeps its last 4,096
    assert cache_bytes(v02, 32768) == 32768 * 131_072
    gemma = REAL_MODELS["gemma-2-9b"]
    per_layer = 2 * 8 * 256 * 2  # 8,192 bytes per token and layer
    # 21 global layers keep 8,192 tokens, 21 windowed layers keep 4,096.
    assert cache_bytes(gemma, 8192, batch_size=3) == 3 * per_layer * (21 * 8192 + 21 * 4096)
    assert cache_bytes(gemma, 1000) == 1000 * BY_HAND["gemma-2-9b"]  # window not reached
    # Gemma 3: 52 local layers keep 1,024 tokens, 10 global ones all of them.
    g3 = REAL_MODELS["gemma-3-27b"]
    assert cache_bytes(g3, 32768) == 2 * 16 * 128 * 2 * (52 * 1024 + 10 * 32768)
    # gpt-oss: 18 layers keep 128 tokens, 18 all; Llama 4's chunked layers at most 8,192.
    oss, scout = REAL_MODELS["gpt-oss-120b"], REAL_MODELS["llama-4-scout"]
    assert cache_bytes(oss, 131072) == 2 * 8 * 64 * 2 * (18 * 128 + 18 * 131072)
    assert cache_bytes(scout, 10**6) == 2 * 8 * 128 * 2 * (36 * 8192 + 12 * 10**6)


def test_tensor_parallel_share_per_gpu():
    llama70 = REAL_MODELS["llama-3-70b"]  # 64 heads, 8 KV heads
    full = cache_bytes(llama70, 1024)
    assert [cache_bytes(llama70, 1024, tp=tp) for tp in (1, 2, 4, 8)] == [
        full, full // 2, full // 4, full // 8]
    # 16 GPUs: 8 KV heads cannot be halved again; each GPU keeps one, replicated twice.
    assert kv_heads_per_gpu(llama70, 16) == 1 and cache_bytes(llama70, 1024, tp=16) == full // 8
    # Qwen2.5-7B: its 28 query heads do not split over 8 GPUs at all; over 4, each GPU
    # keeps one of the 4 KV heads.
    with pytest.raises(ValueError, match="28 query heads and 4 KV heads.*tp=8"):
        kv_heads_per_gpu(REAL_MODELS["qwen2.5-7b"], 8)
    assert cache_bytes(REAL_MODELS["qwen2.5-7b"], 100, tp=4) == 100 * BY_HAND["qwen2.5-7b"] // 4
    # MLA: the latent serves all heads, every GPU keeps all of it.
    ds = REAL_MODELS["deepseek-v3"]
    assert isinstance(ds, MLAConfig)
    assert cache_bytes(ds, 4096, tp=8) == cache_bytes(ds, 4096) == 4096 * 70_272


def test_max_sequences_after_the_weights():
    llama = REAL_MODELS["llama-3-8b"]
    weights = model_params(llama) * 2  # 16,060,522,496 bytes in bf16
    gib = 2**30  # one 8,192-token sequence in bf16
    assert max_sequences(llama, 8192, 80 * 10**9) == (80 * 10**9 - weights) // gib
    assert max_sequences(llama, 8192, 80 * 10**9, dtype="fp8") == (80 * 10**9 - weights) // (
        gib // 2)
    assert max_sequences(llama, 8192, 10 * 10**9) == 0  # the weights alone do not fit
    ds = REAL_MODELS["deepseek-v3"]  # 671 GB in fp8 over 8 GPUs: 83.9 GB each
    assert weight_bytes_per_gpu(ds, "fp8", tp=8) == 83_875_000_000
    assert max_sequences(ds, 4096, 80 * 10**9, weight_dtype="fp8", tp=8) == 0
    assert max_sequences(ds, 4096, 141 * 10**9, weight_dtype="fp8", tp=8) == (
        141 * 10**9 - 83_875_000_000) // (4096 * 70_272)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: cache_bytes(REAL_MODELS["gpt2"], -1), "context_len"),
    (lambda: cache_bytes(REAL_MODELS["gpt2"], 8, batch_size=0), "batch_size"),
    (lambda: kv_heads_per_gpu(REAL_MODELS["gpt2"], 0), "tp"),
    (lambda: kv_heads_per_gpu(REAL_MODELS["smollm2-135m"], 2), "9 query heads"),
    (lambda: max_sequences(REAL_MODELS["gpt2"], 8, 0), "gpu_bytes"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# Chapter 8's drawings and widget: what they show is what analysis computes
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def ax():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def test_comparison_table_rows_are_the_hand_values():
    from kvlib.viz import models as mviz

    rows = mviz.comparison_table(REAL_MODELS, [4096]).splitlines()[1:]
    assert [r.split()[0] for r in rows] == list(BY_HAND)
    for row, name in zip(rows, BY_HAND):
        cells = row.split()
        assert float(cells[-3]) == round(BY_HAND[name] / 1024, 1)  # KV/token KiB
    assert rows[0].split()[-1] == "-"  # GPT-2 stops at 1,024 tokens


def test_ring_buffer_drawing_holds_the_last_positions(ax):
    from kvlib.viz import models as mviz

    mviz.draw_ring_buffer(ax, num_tokens=10, window=4)
    last_row = sorted((t.get_position(), t.get_text()) for t in ax.texts
                      if t.get_position()[1] == 9)
    assert [int(text) for _, text in last_row] == [8, 9, 6, 7]  # slot s holds p, p mod 4 = s


def test_window_mask_drawing_counts_at_most_w_keys(ax):
    from kvlib.viz import models as mviz

    mviz.draw_window_mask(ax, 10, 4)
    mask = ax.images[0].get_array()
    assert mask.sum(axis=1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]


def test_gpu_memory_notes_say_what_analysis_says(ax):
    from kvlib.viz import models as mviz

    mviz.plot_gpu_memory(ax, REAL_MODELS, 4096, 16, "bf16", 80, tp=8)
    notes = dict(zip(REAL_MODELS, (t.get_text() for t in ax.texts)))
    assert notes["gpt2"] == "12 heads do not split over 8 GPUs"
    fit = max_sequences(REAL_MODELS["llama-3-70b"], 4096, 80 * 10**9, tp=8)
    assert notes["llama-3-70b"] == f"fits {fit:,} seqs"
    assert notes["deepseek-v3"] == "weights do not fit"  # 671 GB of FP8 over 8: 83.9 GB each
    labels = ax.get_legend_handles_labels()[1]
    assert sorted(labels) == ["80 GB GPU", "cache of 16 sequence(s)", "weights"]


def real_models_max(name: str) -> int:
    return REAL_MODELS[name].max_seq_len


def test_gpu_memory_html_rows_are_the_drawings():
    from kvlib.viz import models as mviz

    text = mviz.gpu_memory_html(REAL_MODELS, 4096, 16, "bf16", 80, tp=8)
    for row in mviz.gpu_memory_rows(REAL_MODELS, 4096, 16, "bf16", 80, 8):
        assert f"<td>{row.note}</td>" in text
    assert "overflow-x: auto" in text  # scrolls inside itself on a phone, not the page
    assert len(text) < 12_000  # a few kB per state


def test_gpu_memory_widget_states():
    from kvlib.widgets import models as mwidgets

    states = math.prod(len(v) for v in mwidgets.GRID.values())
    assert states <= 64 and set(mwidgets.GRID) == {"context", "batch", "dtype", "gpu_gb", "tp"}
    # Every model of the widget reaches the longest context it offers but two, and those say
    # so: no setting blanks most of the models.
    reach = [real_models_max(n) >= max(mwidgets.GRID["context"]) for n in mwidgets.WIDGET_MODELS]
    assert sum(reach) >= len(reach) - 2
    small = {"context": [4096], "batch": [1], "dtype": ["bf16"], "gpu_gb": [80, 141], "tp": [8]}
    box = mwidgets.gpu_memory_widget(grid=small)

    def labels(widget) -> list[str]:
        value = getattr(widget, "value", None)
        own = [value] if isinstance(value, str) and "kv-live-state" in value else []
        return own + [x for child in getattr(widget, "children", ()) for x in labels(child)]

    found = labels(box)
    assert len(found) == 2 and "gpu_gb = 80 " in found[0] and "gpu_gb = 141 " in found[1]


def test_comparison_markdown_shows_the_tables_numbers():
    from kvlib.viz import models as mviz

    text_rows = mviz.comparison_table(REAL_MODELS, [4096, 131072]).splitlines()[1:]
    md_rows = mviz.comparison_markdown(REAL_MODELS, [4096, 131072]).splitlines()[2:]
    assert len(md_rows) == len(text_rows) == len(REAL_MODELS)
    for text, md in zip(text_rows, md_rows):
        cells = [c.strip() for c in md.strip("|").split("|")]
        assert cells[0] == text.split()[0] and cells[-2:] == text.split()[-2:]
