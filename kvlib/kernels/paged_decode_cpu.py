"""Paged decode attention on the CPU, reading each sequence's blocks where they lie.

One new token per sequence attends to every key the sequence holds. The reference gathers
the blocks into contiguous (B, Hkv, S, D) tensors first (`PagedKV.dense`), which copies the
whole cache every step; this kernel walks the block table instead, with an online softmax
(`m_i` running max, `l_i` running sum, `acc` the running weighted sum of values), so it reads
each key and value once and copies nothing. The G = H / Hkv query heads of one KV head are
served together, so each block tile is loaded once per group, not once per query head.

Compiled with numba (parallel over sequences x KV heads); float32 and float64 only. Where
numba is missing or the dtype or device does not fit, `paged_decode_attention` falls back to
the reference, so callers never need to check.

Legend: B sequences, H query heads, Hkv KV heads, G = H / Hkv, D head dim, NB blocks,
BS block size, M blocks per table.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kvlib.attention import decode_attention
from kvlib.cache.contract import PagedKV

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps kvlib importable
    numba = None


def paged_decode_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               ) -> torch.Tensor:
    """Gather every sequence's blocks, then the reference decode attention. (B, H, D)."""
    dense = PagedKV(k_pool, v_pool, block_tables, context_lens).dense()  # (B, Hkv, S, D)
    return decode_attention(q, dense.k, dense.v, dense.context_lens)


def _check(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
           block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
    if q.dim() != 3 or k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(f"expected q (B, H, D) and pools (NB, Hkv, BS, D), got q "
                         f"{tuple(q.shape)}, k_pool {tuple(k_pool.shape)}, v_pool "
                         f"{tuple(v_pool.shape)}")
    B, H, D = q.shape
    NB, Hkv, BS, Dk = k_pool.shape
    if D != Dk or H % Hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit pools {tuple(k_pool.shape)}: head "
                         f"dims must match and H a multiple of Hkv")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"expected block_tables (B={B}, M) and context_lens (B,), got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    lens = context_lens.cpu()
    if bool((lens < 1).any()) or bool((lens > block_tables.shape[1] * BS).any()):
        raise ValueError(f"context_lens {lens.tolist()} must be in [1, "
                         f"{block_tables.shape[1] * BS}] for tables of {block_tables.shape[1]} "
                         f"blocks of {BS}")


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           ) -> torch.Tensor:
    """softmax(q K^T / sqrt(D)) V per sequence, K and V read block by block in place.

    Args:
        q: (B, H, D) the new token's queries.
        k_pool, v_pool: (NB, Hkv, BS, D) one layer's block pool.
        block_tables: (B, M) int32 block ids, padded with -1 past each sequence's blocks.
        context_lens: (B,) keys per sequence (the new token's included).

    Returns:
        (B, H, D) in q's dtype.
    """
    _check(q, k_pool, v_pool, block_tables, context_lens)
    fits = (numba is not None and q.device.type == "cpu" and q.dtype in _NUMPY
            and k_pool.dtype == q.dtype and k_pool.is_contiguous() and v_pool.is_contiguous())
    if not fits:
        return paged_decode_attention_ref(q, k_pool, v_pool, block_tables, context_lens)
    out = torch.empty_like(q)  # (B, H, D)
    q_scaled = (q * (1.0 / math.sqrt(q.shape[-1]))).contiguous()  # (B, H, D)
    _kernel(q_scaled.numpy(), k_pool.numpy(), v_pool.numpy(),
            block_tables.to(torch.int32).contiguous().numpy(),
            context_lens.to(torch.int64).contiguous().numpy(), out.numpy())
    return out


_NUMPY = {torch.float32, torch.float64}


def _decode_kernel(q, k_pool, v_pool, block_tables, context_lens, out):
    # q arrives scaled by 1/sqrt(D). Every accumulator starts from `zero`, a value of the
    # inputs' dtype: a Python 0.0 would be float64 and stop float32 loops from vectorising.
    B, H, D = q.shape
    Hkv, BS = k_pool.shape[1], k_pool.shape[2]
    G = H // Hkv
    zero = q[0, 0, 0] * 0
    for job in numba.prange(B * Hkv):  # one (sequence, KV head) per job
        b, h = job // Hkv, job % Hkv
        S = context_lens[b]
        qg = np.empty((G, D), dtype=q.dtype)  # (G, D) the query heads of this KV group,
        qg[:] = q[b, h * G:(h + 1) * G]  # copied: a contiguous local array vectorises
        m_i = np.full(G, -np.inf, dtype=q.dtype)  # running max of scores
        l_i = np.zeros(G, dtype=q.dtype)  # running sum of exp(score - m_i)
        acc = np.zeros((G, D), dtype=q.dtype)  # running sum of exp(score - m_i) * v
        scores = np.empty((G, BS), dtype=q.dtype)
        for j in range((S + BS - 1) // BS):
            block = block_tables[b, j]
            n = min(BS, S - j * BS)  # tokens used in this block (the last may be partial)
            k_tile = k_pool[block, h]  # (BS, D) contiguous: one head's keys of one block
            v_tile = v_pool[block, h]
            for t in range(n):  # scores of this block, every head of the group
                for g in range(G):
                    s = zero
                    for d in range(D):
                        s += qg[g, d] * k_tile[t, d]
                    scores[g, t] = s
            for g in range(G):
                m_new = m_i[g]
                for t in range(n):
                    m_new = max(m_new, scores[g, t])
                alpha = np.exp(m_i[g] - m_new)  # rescales what was summed under the old max
                l_i[g] *= alpha
                for d in range(D):
                    acc[g, d] *= alpha
                m_i[g] = m_new
                for t in range(n):
                    scores[g, t] = np.exp(scores[g, t] - m_new)
                    l_i[g] += scores[g, t]
            for t in range(n):  # acc += p V, reading each value row once for the group
                for g in range(G):
                    p = scores[g, t]
                    for d in range(D):
                        acc[g, d] += p * v_tile[t, d]
        for g in range(G):
            for d in range(D):
                out[b, h * G + g, d] = acc[g, d] / l_i[g]


if numba is not None:
    _kernel = numba.njit(parallel=True, fastmath=True, cache=True)(_decode_kernel)
