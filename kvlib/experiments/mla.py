"""Chapter 9's measurements of latent attention: FLOPs counted against `mla.decode_cost`, and
a DeepSeek-V3 checkpoint made by transformers.

Legend: S cached tokens, H heads, R kv_lora_rank, P qk_rope_head_dim.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from kvlib.cache.paged import PagedKVCache
from kvlib.config import ModelConfig
from kvlib.mla import COMPUTATIONS
from kvlib.model import TransformerLM

# A mid-sized latent model: 16 heads, a latent of 256 + 32 (DeepSeek-V3 has 128 heads and
# 512 + 64), one layer (a decode step's attention is per layer).
COUNTING_CONFIG = ModelConfig(vocab_size=256, d_model=512, num_layers=1, num_heads=16,
                            num_kv_heads=16, kv_lora_rank=256, qk_rope_head_dim=32,
                            qk_nope_head_dim=64, v_head_dim=64, max_seq_len=8192,
                            name="mla-counting")


def filled_cache(model: TransformerLM, context_len: int, block_size: int = 16) -> PagedKVCache:
    """A paged latent cache holding `context_len - 1` random rows (N(0, 1)) in every layer
    of one sequence: what a decode step reads, without an O(S^2) prefill to make it."""
    cache = PagedKVCache(model.cache_config(1, context_len, block_size=block_size),
                         num_blocks=-(-context_len // block_size) + 1)
    cfg, n = cache.config, context_len - 1
    gen = torch.Generator().manual_seed(0)
    batch = cache.begin([0], [n])
    for layer in range(cfg.num_layers):
        rows = torch.randn(n, 1, cfg.head_dim, generator=gen).to(cfg.dtype)  # (n, 1, R + P)
        cache.write(layer, batch, rows, None)
    cache.commit(batch)
    return cache


@torch.no_grad()
def _decode_attention(model: TransformerLM, cache: PagedKVCache, computation: str,
                      backend: str):
    """A closure running one decode step's attention of layer 0 (after its rows are written)
    over `cache`, by `computation`; the step is left open for the caller to abort."""
    attn = model.layers[0].attn
    x = torch.randn(1, model.config.d_model, dtype=model.embed.weight.dtype)  # (1, d)
    batch = cache.begin([0], [1])
    q_nope, q_rope = attn.queries(x, batch)
    for layer in range(model.config.num_layers):
        cache.write(layer, batch, attn.latent_rows(x, batch), None)
    kv = cache.read(0, batch)
    fn = COMPUTATIONS[computation]
    return batch, lambda: fn(attn, q_nope, q_rope, kv, batch, backend)


def counted_flops(model: TransformerLM, context_len: int, computation: str) -> int:
    """FLOPs torch's counter sees in one decode step's attention over `context_len` keys
    (the reference backend: plain matmuls), to set beside `mla.decode_cost`. The reference
    gathers whole blocks, so a length that is not a multiple of 16 counts the padding too."""
    cache = filled_cache(model, context_len)
    batch, step = _decode_attention(model, cache, computation, "reference")
    with FlopCounterMode(display=False) as counter:
        step()
    cache.abort(batch)
    return counter.get_total_flops()


def tiny_deepseek_v3(folder: Path | str | None = None, seed: int = 0, **overrides):
    """A small random `DeepseekV3ForCausalLM` (dense layers) saved by transformers with
    `save_pretrained`; returns (the transformers model, the folder). Needs transformers."""
    import transformers

    config = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, first_k_dense_replace=2,
                  intermediate_size=96, num_attention_heads=4, kv_lora_rank=32,
                  q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                  max_position_embeddings=128, n_routed_experts=4, num_experts_per_tok=2,
                  n_group=1, topk_group=1, moe_intermediate_size=16, **overrides)
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**config)).eval()
    with torch.no_grad():  # unit-scale weights: logits that differ by whole units
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight")
                    else torch.randn_like(p) * (0.6 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1))
    folder = Path(tempfile.mkdtemp(prefix="deepseek-v3-")) if folder is None else Path(folder)
    model.save_pretrained(folder)
    return model, folder
