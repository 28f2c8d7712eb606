"""Paged decode attention over an INT8 pool, dequantized inside the kernel (Triton).

Each cached key (and value) row of one head is stored as D int8 numbers and one scale:
row ~= scale * int8_row, scale = max|row| / 127 ("per token, per head"). A decode step then
reads 1 byte per element plus one scale per row, about half the bytes of bf16 -- and decode
attention is bound by the bytes it reads, so it can run up to twice as fast.

The kernel is `kvlib.kernels.paged_decode`'s, with `QUANTIZED` set: it never builds a
dequantized tile. Scores use the int8 keys as they are (int8 -> bf16 is exact) and multiply
each token's column by its scale after the dot, q.(s k) = s (q.k); the value scales are folded
into the softmax weights before the second dot, sum_t p_t (s_t v_t) = sum_t (p_t s_t) v_t.

`quantize_int8` makes such pools from float ones (what `kvlib.cache.quantized` stores);
`paged_decode_attention_int8_ref` dequantizes the whole pool, then runs the float reference.

Legend: B sequences, H query heads, Hkv KV heads, D head dim, NB blocks, BS block size.
"""

from __future__ import annotations

import torch

from kvlib.kernels.paged_decode import NUM_WARPS, TILE_N, check_inputs, launch
from kvlib.kernels.paged_decode_cpu import paged_decode_attention_ref
from kvlib.kernels.store_kv import triton_runs_on

# Pipelining depth for the INT8 kernel: 2, not the float kernel's 3. In the H100 sweep of
# bench/gpu_decode.py (tile 64, 4 warps) 2 stages were faster in 14 of 18 (shape, split)
# cases, by up to 1.5x; the other launch defaults are the float kernel's.
INT8_NUM_STAGES = 2


def quantize_int8(pool: torch.Tensor, scale_dtype: torch.dtype = torch.float32,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(NB, Hkv, BS, D) float -> int8 of the same shape and scales (NB, Hkv, BS).

    Symmetric, one scale per token per head; an all-zero row gets scale 1 (not 0/0).

    >>> data, scale = quantize_int8(torch.tensor([[[[0.5, -1.0], [0.0, 0.0]]]]))
    >>> data.tolist(), scale.tolist()
    ([[[[64, -127], [0, 0]]]], [[[0.007874015718698502, 1.0]]])
    """
    absmax = pool.float().abs().amax(dim=-1)  # (NB, Hkv, BS)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))  # (NB, Hkv, BS)
    data = (pool.float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    return data, scale.to(scale_dtype)


def dequantize_int8(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                    ) -> torch.Tensor:
    """int8 (NB, Hkv, BS, D) and scales (NB, Hkv, BS) -> (NB, Hkv, BS, D) in `dtype`."""
    return (data.float() * scale.float()[..., None]).to(dtype)


def paged_decode_attention_int8_ref(q, k_pool, v_pool, k_scale, v_scale, block_tables,
                                    context_lens) -> torch.Tensor:
    """Dequantize both pools to fp32, then the float reference. (B, H, D) in q's dtype."""
    k = dequantize_int8(k_pool, k_scale, torch.float32)  # (NB, Hkv, BS, D)
    v = dequantize_int8(v_pool, v_scale, torch.float32)
    out = paged_decode_attention_ref(q.float(), k, v, block_tables, context_lens)  # (B, H, D)
    return out.to(q.dtype)


def paged_decode_attention_int8(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                k_scale: torch.Tensor, v_scale: torch.Tensor,
                                block_tables: torch.Tensor, context_lens: torch.Tensor,
                                num_splits: int | None = None, tile_n: int = TILE_N,
                                num_warps: int = NUM_WARPS, num_stages: int = INT8_NUM_STAGES,
                                ) -> torch.Tensor:
    """Decode attention reading int8 blocks in place.

    Args:
        q: (B, H, D) bf16, fp16 or fp32 queries.
        k_pool, v_pool: (NB, Hkv, BS, D) int8.
        k_scale, v_scale: (NB, Hkv, BS) fp32 or fp16: row r of a block is scale[r] * data[r].
        block_tables: (B, M) int32, padded with -1; context_lens: (B,) keys per sequence.
        num_splits, tile_n, num_warps, num_stages: as in
            `kvlib.kernels.paged_decode.paged_decode_attention`.

    Returns:
        (B, H, D) in q's dtype. Falls back to the reference where Triton cannot run.
    """
    if k_pool.dtype != torch.int8 or v_pool.dtype != torch.int8:
        raise ValueError(f"pools must be int8, got {k_pool.dtype} and {v_pool.dtype}")
    if k_scale.shape != k_pool.shape[:3] or v_scale.shape != v_pool.shape[:3]:
        raise ValueError(f"scales must be (NB, Hkv, BS) = {tuple(k_pool.shape[:3])}, got "
                         f"{tuple(k_scale.shape)} and {tuple(v_scale.shape)}")
    check_inputs(q, k_pool, v_pool, block_tables, context_lens)
    if not triton_runs_on(q):
        return paged_decode_attention_int8_ref(q, k_pool, v_pool, k_scale, v_scale,
                                               block_tables, context_lens)
    return launch(q, k_pool, v_pool, k_scale, v_scale, block_tables, context_lens,
                  num_splits, tile_n, num_warps, num_stages)
