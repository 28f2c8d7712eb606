"""Multi-head latent attention (MLA, DeepSeek-V2/V3): a cache of one latent row per token.

Grouped-query attention shrinks the cache by sharing K and V among query heads. MLA shrinks
it another way: each token's hidden state x is compressed to one latent c of R numbers
(`kv_lora_rank`), and every head's key and value are linear images of it,

    c = norm(x W_DKV)                  (R,)     the only thing cached, with k_rope
    k_h = [c W_UK_h , k_rope]          (Dn + P) per head h: a content part and a rotary part
    v_h = c W_UV_h                     (Dv)     per head h

where k_rope = rope(x W_KR) is one rotary key of P numbers shared by all heads (a rotation
depends on the position, so it cannot be folded into a fixed matrix: it is "decoupled" and
cached beside the latent). A cached token costs R + P numbers per layer, whatever the number
of heads: DeepSeek-V3's 512 + 64 against 2 x 128 heads x 128 for the same model with MHA.

Two ways to compute the same attention, tested equal (tests/test_mla.py):

- naive: read the latents, up-project every cached token's keys and values each step
  (k_h, v_h above), then ordinary attention. What transformers' DeepseekV3 does.
- absorbed: q_h . k_h = (q_h W_UK_h^T) . c + q_rope_h . k_rope, so the key up-projection is
  folded into the query, once per new token; and sum_j p_j v_h,j = (sum_j p_j c_j) W_UV_h^T,
  so the value up-projection is applied once to the weighted latent. Attention then runs
  over the cached rows [c, k_rope] themselves: multi-query attention with one KV "head" of
  R + P for keys and R for values (what FlashMLA and vLLM's MLA decode do).

`decode_cost` gives each one's bytes read and FLOPs per decode step; the chapter checks the
FLOPs with torch's counter.

The cache stores the row [c, k_rope] (R + P numbers) once per token and layer: a
`CacheConfig` with `latent_dim = R` (`kvlib.config`), paged like any other cache.

Legend: N packed tokens, B sequences, S keys, H heads, R kv_lora_rank, P qk_rope_head_dim,
Dn qk_nope_head_dim, Dv v_head_dim, d model width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kvlib.backends import attend
from kvlib.config import ModelConfig
from kvlib.contract import DenseKV, KVCache, KVView, StepBatch
from kvlib.model import RMSNorm, _dense_from_packed, apply_rotary, rotary_cos_sin


class MultiHeadLatentAttention(nn.Module):
    """MLA with the weights of transformers' `DeepseekV3Attention` (names shortened:
    `kv_a_proj` is its `kv_a_proj_with_mqa`, the norms `q_a_norm`, `kv_a_norm`).

    `computation` is "absorbed" (the default, what decode engines run) or "naive"; both
    read the same cache and give the same output.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        if not config.is_latent:
            raise ValueError("MultiHeadLatentAttention needs a config with kv_lora_rank > 0")
        self.config, self.layer_idx = config, layer_idx
        d, H, R, P = config.d_model, config.num_heads, config.kv_lora_rank, config.qk_rope_head_dim
        Dn, Dv = config.qk_nope_head_dim, config.v_head_dim
        if config.q_lora_rank:  # queries through a bottleneck: d -> Rq -> H (Dn + P)
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(config.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * (Dn + P), bias=False)
        else:
            self.q_proj = nn.Linear(d, H * (Dn + P), bias=False)
        self.kv_a_proj = nn.Linear(d, R + P, bias=False)  # W_DKV and W_KR side by side
        self.kv_a_norm = RMSNorm(R, 1e-6)
        self.kv_b_proj = nn.Linear(R, H * (Dn + Dv), bias=False)  # W_UK and W_UV, per head
        self.o_proj = nn.Linear(H * Dv, d, bias=False)
        self.computation = "absorbed"

    def queries(self, x: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, d) -> each head's content query (N, H, Dn) and rotated query (N, H, P)."""
        cfg = self.config
        N, H, Dn, P = x.shape[0], cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))  # (N, H * (Dn + P))
        else:
            q = self.q_proj(x)
        q_nope, q_rope = q.view(N, H, Dn + P).split([Dn, P], dim=-1)  # (N, H, Dn), (N, H, P)
        cos, sin = rotary_cos_sin(batch.positions, P, cfg.rope_theta, q.dtype)  # (N, P)
        return q_nope, apply_rotary(q_rope, cos[:, None], sin[:, None])

    def latent_rows(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """x (N, d) -> the rows a cache keeps, (N, 1, R + P): normed latent, rotated key."""
        cfg = self.config
        R, P = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        c, k_rope = self.kv_a_proj(x).split([R, P], dim=-1)  # (N, R), (N, P)
        cos, sin = rotary_cos_sin(batch.positions, P, cfg.rope_theta, x.dtype)  # (N, P)
        row = torch.cat([self.kv_a_norm(c), apply_rotary(k_rope, cos, sin)], dim=-1)  # (N, R+P)
        return row[:, None]  # (N, 1, R + P)

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: KVCache | None,
                backend: str) -> torch.Tensor:
        """x (N, d) packed tokens of `batch` -> (N, d); the new latent rows go to `cache`."""
        cfg = self.config
        N, H, R = x.shape[0], cfg.num_heads, cfg.kv_lora_rank
        q_nope, q_rope = self.queries(x, batch)
        row = self.latent_rows(x, batch)  # (N, 1, R + P)
        if cache is None:  # the new tokens' rows are all there is: (B, 1, T, R + P)
            kv = _dense_from_packed(row, row[..., :R], batch, cfg.window(self.layer_idx),
                                    cfg.sink_tokens)
        else:
            cache.write(self.layer_idx, batch, row, None)  # one row per token: no separate v
            kv = cache.read(self.layer_idx, batch)  # rows as keys, their latents as values
        out = COMPUTATIONS[self.computation](self, q_nope, q_rope, kv, batch, backend)
        return self.o_proj(out.reshape(N, H * cfg.v_head_dim))  # (N, d)

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, Dn, R) and W_UV (H, Dv, R): kv_b_proj's rows, head by head."""
        cfg = self.config
        W = self.kv_b_proj.weight.view(cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim,
                                       cfg.kv_lora_rank)  # (H, Dn + Dv, R)
        return W[:, :cfg.qk_nope_head_dim], W[:, cfg.qk_nope_head_dim:]


def naive(attn: MultiHeadLatentAttention, q_nope: torch.Tensor, q_rope: torch.Tensor,
          kv: KVView, batch: StepBatch, backend: str) -> torch.Tensor:
    """Up-project every cached latent to per-head keys and values, then attend: (N, H, Dv)."""
    cfg = attn.config
    H, R, Dn = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim
    dense = kv.dense()
    B, _, S, _ = dense.k.shape  # (B, 1, S, R + P)
    c, k_rope = dense.k[:, 0, :, :R], dense.k[:, 0, :, R:]  # (B, S, R), (B, S, P)
    up = attn.kv_b_proj(c).view(B, S, H, -1).transpose(1, 2)  # (B, H, S, Dn + Dv)
    k_nope, v = up[..., :Dn], up[..., Dn:]  # (B, H, S, Dn), (B, H, S, Dv)
    k = torch.cat([k_nope, k_rope[:, None].expand(B, H, S, -1)], dim=-1)  # (B, H, S, Dn + P)
    heads = DenseKV(k, v, dense.context_lens, kv.window, kv.sink_tokens, dense.key_start)
    q = torch.cat([q_nope, q_rope], dim=-1)  # (N, H, Dn + P)
    return attend(q, heads, batch, backend)  # (N, H, Dv)


def absorbed(attn: MultiHeadLatentAttention, q_nope: torch.Tensor, q_rope: torch.Tensor,
             kv: KVView, batch: StepBatch, backend: str) -> torch.Tensor:
    """Fold W_UK into the queries and W_UV after attention; attend over the cached rows
    themselves (one KV head of R + P, values its first R): (N, H, Dv)."""
    cfg = attn.config
    R, P, Dn = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
    W_uk, W_uv = attn.up_weights()  # (H, Dn, R), (H, Dv, R)
    q_latent = torch.einsum("nhd,hdr->nhr", q_nope, W_uk)  # (N, H, R)
    # NOTE: attention divides scores by sqrt(R + P), the row's width; MLA's scores are
    # q . k / sqrt(Dn + P), a head's query width. Scaling q once makes them equal.
    scale = math.sqrt((R + P) / (Dn + P))
    q = torch.cat([q_latent, q_rope], dim=-1) * scale  # (N, H, R + P)
    weighted = attend(q, kv, batch, backend)  # (N, H, R): each head's weighted latent
    return torch.einsum("nhr,hvr->nhv", weighted, W_uv)  # (N, H, Dv)


Computation = Callable[[MultiHeadLatentAttention, torch.Tensor, torch.Tensor, KVView,
                        StepBatch, str], torch.Tensor]
COMPUTATIONS: dict[str, Computation] = {"naive": naive, "absorbed": absorbed}


@dataclass(frozen=True)
class DecodeCost:
    """What one decode step of one layer reads and computes for one sequence."""

    cache_bytes: int  # the cache rows read
    weight_bytes: int  # up-projection weights read (the same for every context length)
    flops: int  # multiply-adds x 2, attention and up-projections (not q, kv_a or o_proj)

    @property
    def bytes(self) -> int:
        return self.cache_bytes + self.weight_bytes

    @property
    def flops_per_cache_byte(self) -> float:
        """FLOPs per byte of cache read: the weights are read once for a whole batch, the
        cache once per sequence, so this is the intensity a large batch sees."""
        return self.flops / self.cache_bytes


def decode_cost(config: ModelConfig, context_len: int, computation: str,
                itemsize: int = 2) -> DecodeCost:
    """Bytes and FLOPs of one layer's attention for one new token over `context_len` keys.

    - "expanded": a cache of full per-head keys and values (what MLA avoids): reads
      S H (Dn + P + Dv) numbers; scores 2 S H (Dn + P), values 2 S H Dv.
    - "naive": reads the S latent rows (R + P), then up-projects each: 2 S R H (Dn + Dv).
    - "absorbed": reads the S rows; q W_UK (2 H Dn R), scores 2 S H (R + P), weighted
      latents 2 S H R, then W_UV (2 H R Dv).

    DeepSeek-V3's shape (H 128, R 512, P 64, Dn = Dv = 128) at S = 4096 in bf16:

    >>> cfg = ModelConfig(vocab_size=8, d_model=7168, num_layers=1, num_heads=128,
    ...                   num_kv_heads=128, kv_lora_rank=512, qk_rope_head_dim=64,
    ...                   qk_nope_head_dim=128, v_head_dim=128, q_lora_rank=1536)
    >>> [decode_cost(cfg, 4096, c).cache_bytes // 4096 for c in ("expanded", "absorbed")]
    [81920, 1152]
    >>> round(decode_cost(cfg, 4096, "naive").flops / decode_cost(cfg, 4096, "absorbed").flops)
    117
    """
    if not config.is_latent:
        raise ValueError("decode_cost is for latent attention (kv_lora_rank > 0)")
    if computation not in ("expanded", "naive", "absorbed"):
        raise ValueError(f"computation must be 'expanded', 'naive' or 'absorbed', got "
                         f"{computation!r}")
    S, H, R = context_len, config.num_heads, config.kv_lora_rank
    P, Dn, Dv = config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim
    up_weights = R * H * (Dn + Dv) * itemsize
    if computation == "expanded":
        return DecodeCost(S * H * (Dn + P + Dv) * itemsize, 0, 2 * S * H * (Dn + P + Dv))
    rows = S * (R + P) * itemsize
    if computation == "naive":
        return DecodeCost(rows, up_weights, 2 * S * R * H * (Dn + Dv) + 2 * S * H * (Dn + P + Dv))
    return DecodeCost(rows, up_weights, 2 * H * Dn * R + 2 * S * H * (R + P) + 2 * S * H * R
                      + 2 * H * R * Dv)
