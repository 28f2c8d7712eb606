"""Real models' caches: sliding windows, multi-head latent attention, tensor-parallel shards.

`analysis` holds the formulas for one Llama-style shape; this module sizes the caches of the
models readers run, where the usual formula (2 x layers x d_model x bytes) goes wrong:
grouped-query attention, head_dim not d_model / heads, sliding-window layers that keep only
W tokens, DeepSeek's latent (MLA) instead of K and V per head, and how each splits over
tensor-parallel GPUs. `REAL_MODELS` holds each model's public shape: the dense presets of
`kvlib.presets`, and the models whose caches need more than one formula (windows, chunked
attention, a latent, mixture-of-experts weights). `tests/data/` keeps the fields of each
public `config.json`, and `tests/test_presets.py` checks every entry against them.

>>> token_bytes(REAL_MODELS["llama-3-8b"])          # 2 x 32 layers x 8 heads x 128 x 2 B
131072
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlib.analysis import PRESETS, dtype_bytes, param_count
from kvlib.checks import require_int
from kvlib.config import ModelConfig


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): what its cache holds per token and layer.

    Instead of K and V per head, each layer caches one compressed latent of `kv_lora_rank`
    numbers plus one RoPE key of `qk_rope_head_dim` shared by all heads; every head's K and V
    are re-expanded from the latent (or the expansion is folded into the queries). The latent
    serves all heads, so tensor parallelism cannot split it: every GPU keeps all of it.
    `num_params` is the published total (the model is not Llama-style; `param_count` does
    not apply).
    """

    name: str
    num_layers: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    num_params: int
    max_seq_len: int


# Each entry from the model's public config.json (the repository named in its comment).
REAL_MODELS: dict[str, ModelConfig | MLAConfig] = {
    "gpt2": PRESETS["gpt2"],  # openai-community/gpt2: n_layer 12, n_head 12, n_embd 768
    "smollm2-135m": PRESETS["smollm2-135m"],  # HuggingFaceTB/SmolLM2-135M
    "llama-3-8b": PRESETS["llama-3-8b"],  # meta-llama/Meta-Llama-3-8B
    "llama-3-70b": PRESETS["llama-3-70b"],  # meta-llama/Meta-Llama-3-70B
    # mistralai/Mistral-7B-v0.1: "sliding_window": 4096 on every layer, rope_theta 10000.
    "mistral-7b-v0.1": ModelConfig(
        vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, ffn_dim=14336, rope_theta=10_000.0, norm_eps=1e-5, max_seq_len=32768,
        sliding_window=4096, name="mistral-7b-v0.1"),
    # mistralai/Mistral-7B-Instruct-v0.2: "sliding_window": null, rope_theta 1e6.
    "mistral-7b-v0.2": PRESETS["mistral-7b-v0.2"],
    # Qwen/Qwen2.5-7B: 28 heads, 4 KV heads, q/k/v biases; "use_sliding_window": false.
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064, d_model=3584, num_layers=28, num_heads=28, num_kv_heads=4,
        head_dim=128, ffn_dim=18944, rope_theta=1_000_000.0, norm_eps=1e-6,
        max_seq_len=131072, qkv_bias=True, name="qwen2.5-7b"),
    # google/gemma-2-9b: head_dim 256 (not 3584 / 16), "sliding_window": 4096 on layers
    # 0, 2, 4, ... (transformers' Gemma2: is_sliding = not layer_idx % 2), global on the odd
    # ones. Gemma-2 also has soft-capping and extra norms, which this shape leaves out.
    "gemma-2-9b": ModelConfig(
        vocab_size=256000, d_model=3584, num_layers=42, num_heads=16, num_kv_heads=8,
        head_dim=256, ffn_dim=14336, rope_theta=10_000.0, norm_eps=1e-6, max_seq_len=8192,
        tie_embeddings=True, sliding_window=4096, sliding_layers=tuple(range(0, 42, 2)),
        name="gemma-2-9b"),
    # deepseek-ai/DeepSeek-V3: 61 layers, kv_lora_rank 512, qk_rope_head_dim 64,
    # max_position_embeddings 163840; 671B parameters (the hub's 685B adds the MTP module).
    "deepseek-v3": MLAConfig(
        name="deepseek-v3", num_layers=61, kv_lora_rank=512, qk_rope_head_dim=64,
        num_params=671_000_000_000, max_seq_len=163840),
    "llama-3.1-8b": PRESETS["llama-3.1-8b"],  # meta-llama/Llama-3.1-8B: 131,072 tokens
    "llama-3.1-70b": PRESETS["llama-3.1-70b"],  # meta-llama/Llama-3.1-70B, also Llama-3.3-70B
    "qwen3-8b": PRESETS["qwen3-8b"],  # Qwen/Qwen3-8B
    # google/gemma-3-27b-it (text_config): 62 layers, 16 KV heads of 128; "sliding_window":
    # 1024 and "sliding_window_pattern": 6, so five local layers, then one global (layer i is
    # global when (i + 1) % 6 == 0: 10 of 62). Tied embeddings, vocab 262,208.
    "gemma-3-27b": ModelConfig(
        vocab_size=262208, d_model=5376, num_layers=62, num_heads=32, num_kv_heads=16,
        head_dim=128, ffn_dim=21504, rope_theta=1_000_000.0, norm_eps=1e-6,
        max_seq_len=131072, tie_embeddings=True, sliding_window=1024,
        sliding_layers=tuple(i for i in range(62) if (i + 1) % 6), name="gemma-3-27b"),
    # meta-llama/Llama-4-Scout-17B-16E (text_config): 48 layers, 8 KV heads of 128,
    # "attention_chunk_size": 8192 on three layers of four (the fourth uses no RoPE and attends
    # globally: layer i is global when (i + 1) % 4 == 0). Chunked attention lets a token see
    # only the earlier tokens of its own 8,192-token chunk, so such a layer never holds more
    # than 8,192 keys: for sizing, a window of 8,192. 16 experts per MoE layer.
    "llama-4-scout": ModelConfig(
        vocab_size=202048, d_model=5120, num_layers=48, num_heads=40, num_kv_heads=8,
        head_dim=128, ffn_dim=16384, rope_theta=500_000.0, norm_eps=1e-5,
        max_seq_len=10_485_760, sliding_window=8192,
        sliding_layers=tuple(i for i in range(48) if (i + 1) % 4), name="llama-4-scout"),
    # openai/gpt-oss-120b: 36 layers, 64 heads of 64, 8 KV heads; "layer_types" alternate
    # "sliding_attention" (window 128, even layers) and "full_attention". Each head also
    # learns an attention sink, a logit every query attends to, which adds no cache.
    # 128 experts per layer, their weights in MXFP4.
    "gpt-oss-120b": ModelConfig(
        vocab_size=201088, d_model=2880, num_layers=36, num_heads=64, num_kv_heads=8,
        head_dim=64, ffn_dim=2880, rope_theta=150_000.0, norm_eps=1e-5, max_seq_len=131072,
        sliding_window=128, sliding_layers=tuple(range(0, 36, 2)), name="gpt-oss-120b"),
}

# Totals as published, where kvlib's Llama-style count does not apply: mixture-of-experts
# MLPs (`param_count` counts one dense MLP per layer).
PUBLISHED_PARAMS: dict[str, int] = {
    "llama-4-scout": 109_000_000_000,  # 17B active per token, 16 experts
    "gpt-oss-120b": 116_800_000_000,  # 5.1B active per token, 128 experts
}

# Weights as published, in bytes, where no single dtype describes them. gpt-oss-120b keeps
# its 114.7B expert weights in MXFP4 (4 bits and an 8-bit scale per 32: 4.25 bits) and the
# other 2.1B (attention, embeddings, router) in bf16: 60.9 + 4.3 = 65.2 GB.
PUBLISHED_WEIGHT_BYTES: dict[str, int] = {
    "gpt-oss-120b": 65_200_000_000,
}
AS_PUBLISHED = "as published"  # the weight dtype that reads PUBLISHED_WEIGHT_BYTES


def layer_token_bytes(model: ModelConfig | MLAConfig,
                      dtype: torch.dtype | str = "bf16") -> list[int]:
    """Cache bytes one token adds to each layer: K and V per KV head, or MLA's latent.

    >>> layer_token_bytes(REAL_MODELS["deepseek-v3"])[0]  # (512 + 64) x 2 bytes
    1152
    """
    if isinstance(model, MLAConfig):
        per_layer = (model.kv_lora_rank + model.qk_rope_head_dim) * dtype_bytes(dtype)
    else:
        per_layer = 2 * model.num_kv_heads * model.head_dim * dtype_bytes(dtype)
    return [per_layer] * model.num_layers


def token_bytes(model: ModelConfig | MLAConfig, dtype: torch.dtype | str = "bf16") -> int:
    """Cache bytes of one token over all layers (`kv_bytes_per_token`, MLA included).

    >>> token_bytes(REAL_MODELS["deepseek-v3"])  # 61 x (512 + 64) x 2
    70272
    """
    return sum(layer_token_bytes(model, dtype))


def model_params(model: ModelConfig | MLAConfig) -> int:
    """Parameters: the published total for MLA and mixture-of-experts models, `param_count`
    for a dense Llama-style shape.

    >>> model_params(REAL_MODELS["gpt-oss-120b"]) / 1e9
    116.8
    """
    if isinstance(model, MLAConfig):
        return model.num_params
    return PUBLISHED_PARAMS.get(model.name) or param_count(model)


def kv_heads_per_gpu(model: ModelConfig | MLAConfig, tp: int) -> int:
    """KV heads (or MLA latents) each of `tp` tensor-parallel GPUs keeps.

    Query heads split evenly over GPUs, so `tp` must divide num_heads. KV heads split too
    while there are enough (Hkv / tp each); with more GPUs than KV heads each GPU keeps one
    KV head, replicated tp / Hkv times. MLA's latent serves every head: each GPU keeps it all.

    >>> llama70 = REAL_MODELS["llama-3-70b"]  # 8 KV heads
    >>> [kv_heads_per_gpu(llama70, tp) for tp in (1, 2, 8, 16)]
    [8, 4, 1, 1]
    """
    require_int("tp", tp, minimum=1)
    if isinstance(model, MLAConfig):
        return 1
    H, Hkv = model.num_heads, model.num_kv_heads
    if H % tp or (Hkv % tp and tp % Hkv):
        raise ValueError(f"{model.name}: {H} query heads and {Hkv} KV heads cannot be split "
                         f"evenly over tp={tp} GPUs")
    return max(Hkv // tp, 1)


def _cached_tokens(window: int | None, context_len: int) -> int:
    """Tokens a layer keeps: all of them, or the last W under a sliding window."""
    return context_len if window is None else min(context_len, window)


def cache_bytes(model: ModelConfig | MLAConfig, context_len: int, batch_size: int = 1,
                dtype: torch.dtype | str = "bf16", tp: int = 1) -> int:
    """Cache bytes ON EACH GPU for `batch_size` sequences of `context_len` tokens.

    A sliding-window layer keeps only its last W tokens; under tensor parallelism each GPU
    keeps `kv_heads_per_gpu` of the KV heads (all of MLA's latent).

    Mistral-7B v0.1 at 32,768 tokens keeps 4,096 per layer: 4,096 x 128 KiB = 512 MiB.

    >>> cache_bytes(REAL_MODELS["mistral-7b-v0.1"], 32768) / 2**20
    512.0
    >>> cache_bytes(REAL_MODELS["llama-3-70b"], 8192, tp=8) / 2**20  # 8192 x 320 KiB / 8
    320.0
    """
    require_int("context_len", context_len, minimum=0)
    require_int("batch_size", batch_size, minimum=1)
    per_layer = layer_token_bytes(model, dtype)
    windows = ([None] * model.num_layers if isinstance(model, MLAConfig)
               else model.layer_windows)
    heads = kv_heads_per_gpu(model, tp)
    total = heads if isinstance(model, MLAConfig) else model.num_kv_heads
    tokens = sum(b * _cached_tokens(w, context_len) for b, w in zip(per_layer, windows))
    return batch_size * tokens * heads // total


def weight_bytes_per_gpu(model: ModelConfig | MLAConfig, dtype: torch.dtype | str = "bf16",
                         tp: int = 1) -> int:
    """Weights each GPU holds when `tp` GPUs split them evenly (norms are tiny; ignored).

    `dtype` AS_PUBLISHED reads the model's `PUBLISHED_WEIGHT_BYTES` (mixed formats).

    >>> weight_bytes_per_gpu(REAL_MODELS["gpt-oss-120b"], AS_PUBLISHED) / 1e9
    65.2
    """
    kv_heads_per_gpu(model, tp)  # the same divisibility rule as the heads
    if dtype == AS_PUBLISHED:
        if model.name not in PUBLISHED_WEIGHT_BYTES:
            raise ValueError(f"{model.name}: no published weight size; give a dtype instead")
        return -(-PUBLISHED_WEIGHT_BYTES[model.name] // tp)
    return -(-model_params(model) * dtype_bytes(dtype) // tp)


def max_sequences(model: ModelConfig | MLAConfig, context_len: int, gpu_bytes: int, *,
                  dtype: torch.dtype | str = "bf16", weight_dtype: torch.dtype | str = "bf16",
                  tp: int = 1) -> int:
    """How many sequences of `context_len` tokens fit beside the weights on each GPU.

    Memory left = `gpu_bytes` - weights per GPU; each sequence needs `cache_bytes` per GPU.
    Activations and the runtime's own memory (a few GB) are not counted, so this is an upper
    bound; 0 when the weights alone do not fit.

    >>> max_sequences(REAL_MODELS["llama-3-8b"], 8192, 80 * 10**9)  # (80 - 16.06) GB / 1 GiB
    59
    """
    require_int("gpu_bytes", gpu_bytes, minimum=1)
    require_int("context_len", context_len, minimum=1)
    free = gpu_bytes - weight_bytes_per_gpu(model, weight_dtype, tp)
    return max(free, 0) // cache_bytes(model, context_len, 1, dtype, tp)
