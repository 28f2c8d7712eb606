"""Public shapes of dense Llama-style models, and datasheet peaks of GPUs.

`PRESETS` holds models whose cache and FLOPs the formulas of `kvlib.analysis` describe
exactly: every layer attends to every earlier token, and the MLP is one dense SwiGLU. Models
with sliding windows, chunked attention, a latent cache or mixture-of-experts MLPs live in
`kvlib.real_models.REAL_MODELS`, which adds them to these. Each entry is copied from the
model's public `config.json` (the repository named in its comment); `tests/data/` keeps
those fields and `tests/test_presets.py` checks every preset against them.

`GPUS` holds vendor datasheet peaks: dense 16-bit tensor FLOP/s (no sparsity) and memory
bandwidth. Real kernels reach a fraction of both.

>>> PRESETS["llama-3.1-8b"].max_seq_len, PRESETS["llama-3-8b"].max_seq_len
(131072, 8192)
>>> round(GPUS["H100-SXM"].ridge_point)  # FLOP per byte
295
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlib.config import ModelConfig

# Read the mapping; never modify it.
PRESETS: dict[str, ModelConfig] = {
    # openai-community/gpt2. GPT-2 is not Llama-style: LayerNorm with biases, learned
    # positions, a 2-matrix GELU MLP, biases on every projection. Its KV figures are exact
    # (they depend only on layers, KV heads and head_dim); its param_count and FLOPs are those
    # of a Llama-style model of the same shape (151,862,784 parameters), not GPT-2's
    # published 124,439,808.
    "gpt2": ModelConfig(
        vocab_size=50257, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12,
        head_dim=64, ffn_dim=3072, max_seq_len=1024, tie_embeddings=True, name="gpt2"),
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": ModelConfig(
        vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, ffn_dim=1536, rope_theta=100_000.0, norm_eps=1e-5, max_seq_len=8192,
        tie_embeddings=True, name="smollm2-135m"),
    # meta-llama/Meta-Llama-3-8B: the book's running example.
    "llama-3-8b": ModelConfig(
        vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, ffn_dim=14336, rope_theta=500_000.0, norm_eps=1e-5, max_seq_len=8192,
        name="llama-3-8b"),
    # meta-llama/Meta-Llama-3-70B
    "llama-3-70b": ModelConfig(
        vocab_size=128256, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8,
        head_dim=128, ffn_dim=28672, rope_theta=500_000.0, norm_eps=1e-5, max_seq_len=8192,
        name="llama-3-70b"),
    # mistralai/Mistral-7B-Instruct-v0.2: rope_theta 1e6 and no sliding window, so a full
    # cache is what it keeps. v0.1 has the same shapes but a 4,096-token sliding window on
    # every layer, which caps its cache at 4,096 tokens: the formulas here ignore windows, so
    # v0.1 lives with the windowed models in `kvlib.real_models.REAL_MODELS`, not here.
    "mistral-7b-v0.2": ModelConfig(
        vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, ffn_dim=14336, rope_theta=1_000_000.0, norm_eps=1e-5,
        max_seq_len=32768, name="mistral-7b-v0.2"),
    # meta-llama/Llama-3.1-8B: Llama 3's shapes, RoPE rescaled ("rope_type": "llama3",
    # factor 8) to a 131,072-token context.
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, ffn_dim=14336, rope_theta=500_000.0, norm_eps=1e-5,
        max_seq_len=131072, name="llama-3.1-8b"),
    # meta-llama/Llama-3.1-70B; meta-llama/Llama-3.3-70B-Instruct has the same config.
    "llama-3.1-70b": ModelConfig(
        vocab_size=128256, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8,
        head_dim=128, ffn_dim=28672, rope_theta=500_000.0, norm_eps=1e-5,
        max_seq_len=131072, name="llama-3.1-70b"),
    # Qwen/Qwen3-8B: head_dim 128 with 32 heads of a 4,096 model, 8 KV heads; RMSNorm on
    # queries and keys (a few thousand weights, left out of param_count); no sliding window
    # ("use_sliding_window": false).
    "qwen3-8b": ModelConfig(
        vocab_size=151936, d_model=4096, num_layers=36, num_heads=32, num_kv_heads=8,
        head_dim=128, ffn_dim=12288, rope_theta=1_000_000.0, norm_eps=1e-6,
        max_seq_len=40960, name="qwen3-8b"),
}


@dataclass(frozen=True)
class Hardware:
    """A device's datasheet peaks: dense 16-bit tensor FLOP/s and memory bytes/s."""

    name: str
    peak_flops: float
    bandwidth: float

    @property
    def ridge_point(self) -> float:
        """FLOPs per byte above which a step is compute bound, below which memory bound."""
        return self.peak_flops / self.bandwidth


# Vendor datasheet figures: dense bf16 tensor FLOP/s (no sparsity) and memory bandwidth.
# Real kernels reach a fraction of them. All four hold Llama-3-8B in bf16 (15 GiB of
# weights) with room for a cache: the L4 has 24 GB, the A100 and H100 80 GB, the H200 141 GB
# (the H100's compute with faster, larger HBM3e).
GPUS: dict[str, Hardware] = {
    "L4": Hardware("NVIDIA L4", 121e12, 300e9),
    "A100-80GB": Hardware("NVIDIA A100 80GB SXM", 312e12, 2.039e12),
    "H100-SXM": Hardware("NVIDIA H100 SXM", 989e12, 3.35e12),
    "H200": Hardware("NVIDIA H200 SXM", 989e12, 4.8e12),
}
