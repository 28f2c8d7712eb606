"""Paged decode attention on the CPU, reading each sequence's blocks where they lie.

One new token per sequence attends to every key the sequence holds. The reference gathers
the blocks into contiguous (B, Hkv, S, D) tensors first (`PagedKV.dense`), which copies the
whole cache every step; this kernel walks the block table instead, with an online softmax
(`m_i` running max, `l_i` running sum, `acc` the running weighted sum of values), so it reads
each key and value once and copies nothing. The G = H / Hkv query heads of one KV head are
served together, so each block tile is loaded once per group, not once per query head.

Compiled with numba (parallel over sequences x KV heads; its matrix products call SciPy's
BLAS); float32 and float64 only. Where numba or SciPy is missing, or the dtype or device does
not fit, `paged_decode_attention` falls back to the reference, so callers never need to
check.

Legend: B sequences, H query heads, Hkv KV heads, G = H / Hkv, D head dim, NB blocks,
BS block size, M blocks per table.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kvlib.attention import decode_attention
from kvlib.contract import PagedKV

try:
    import numba
    import scipy  # noqa: F401  (numba's np.dot calls SciPy's BLAS)
except ImportError:  # pragma: no cover - both are dependencies; this keeps kvlib importable
    numba = None


def paged_decode_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               ) -> torch.Tensor:
    """Gather every sequence's blocks, then the reference decode attention. (B, H, D)."""
    dense = PagedKV(k_pool, v_pool, block_tables, context_lens).dense()  # (B, Hkv, S, D)
    return decode_attention(q, dense.k, dense.v, dense.context_lens)


def _check(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
           block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
    _check_shapes(q, k_pool, v_pool, block_tables, context_lens)
    BS = k_pool.shape[2]
    lens = context_lens.cpu()
    if bool((lens < 1).any()) or bool((lens > block_tables.shape[1] * BS).any()):
        raise ValueError(f"context_lens {lens.tolist()} must be in [1, "
                         f"{block_tables.shape[1] * BS}] for tables of {block_tables.shape[1]} "
                         f"blocks of {BS}")


def _check_shapes(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
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
    # q arrives scaled by 1/sqrt(D). One block is one (BS, D) tile per head: the group's
    # scores are one small matrix product (G, D) x (D, n) and its values another
    # (G, n) x (n, D); numba hands both to BLAS, which vectorises them far better than
    # loops over d would be.
    B, H, D = q.shape
    Hkv, BS = k_pool.shape[1], k_pool.shape[2]
    G = H // Hkv
    for job in numba.prange(B * Hkv):  # one (sequence, KV head) per job
        b, h = job // Hkv, job % Hkv
        S = context_lens[b]
        qg = np.ascontiguousarray(q[b, h * G:(h + 1) * G])  # (G, D) this KV group's queries
        m_i = np.full(G, -np.inf, dtype=q.dtype)  # running max of scores
        l_i = np.zeros(G, dtype=q.dtype)  # running sum of exp(score - m_i)
        acc = np.zeros((G, D), dtype=q.dtype)  # running sum of exp(score - m_i) * v
        for j in range((S + BS - 1) // BS):
            block = block_tables[b, j]
            n = min(BS, S - j * BS)  # tokens used in this block (the last may be partial)
            scores = np.dot(qg, k_pool[block, h, :n].T)  # (G, n), read in place
            for g in range(G):
                m_new = max(m_i[g], scores[g].max())
                alpha = np.exp(m_i[g] - m_new)  # rescales what was summed under the old max
                l_i[g] *= alpha
                acc[g] *= alpha
                m_i[g] = m_new
                for t in range(n):
                    scores[g, t] = np.exp(scores[g, t] - m_new)  # p, unnormalised
                l_i[g] += scores[g].sum()
            acc += np.dot(scores, v_pool[block, h, :n])  # (G, D) += (G, n) x (n, D)
        for g in range(G):
            out[b, h * G + g] = acc[g] / l_i[g]


if numba is not None:
    _kernel = numba.njit(parallel=True, fastmath=True, cache=True)(_decode_kernel)
