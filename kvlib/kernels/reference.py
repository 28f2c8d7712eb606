"""The plain path every paged kernel is tested against: gather, mask, softmax, in fp32.

`paged_attention_ref` takes what the kernels take (see `kvlib.kernels.common`): packed
queries of B sequences, each a chunk of `query_lens[b]` tokens at the end of its sequence
(positions context_lens[b] - query_lens[b] .. context_lens[b] - 1; a decode is a chunk of
one), over block tables into a pool. For each sequence it gathers the keys and values its
queries may see, builds the mask of `visible_mask` (causal, window, sinks), and attends in
fp32 with a materialised score matrix: slow, short and obviously right.

Like the kernels, it never reads a table entry of a block no query of the row sees: those
hold a null block, or anything at all (the tests put a block of NaNs there).

>>> visible_mask(torch.tensor([5]), 7, window=2, sink_tokens=1).int().tolist()
[[1, 0, 0, 0, 1, 1, 0]]

Legend: B sequences, N packed query tokens, T one sequence's queries, H query heads,
Hkv KV heads, G = H / Hkv, D head dim, S keys, NB blocks, BS block size, M blocks per table.
"""

from __future__ import annotations

import math

import torch

from kvlib.kernels.common import check_decode, check_prefill


def visible_mask(positions: torch.Tensor, num_keys: int, window: int | None,
                 sink_tokens: int) -> torch.Tensor:
    """(T, S) bool: query t (at `positions[t]`) sees key j iff j <= p and (W is None or
    p - j < W or j < sink_tokens)."""
    keys = torch.arange(num_keys, device=positions.device)[None, :]  # (1, S)
    p = positions[:, None]  # (T, 1)
    seen = keys <= p  # (T, S)
    if window is not None:
        seen = seen & ((p - keys < window) | (keys < sink_tokens))
    return seen


def gather_blocks(pool: torch.Tensor, block_table: torch.Tensor, needed: torch.Tensor,
                  ) -> torch.Tensor:
    """One sequence's keys (or values) as (Hkv, S, D), S = len(needed): key j comes from block
    block_table[j // BS] at offset j % BS where `needed[j]`, and is 0 elsewhere -- the table
    entry of a key nobody needs is never used as an index.

    >>> pool = torch.arange(4.0).view(2, 1, 2, 1)            # 2 blocks of 2 tokens, D = 1
    >>> gather_blocks(pool, torch.tensor([1, -1]), torch.tensor([True, True, False])).flatten()
    tensor([2., 3., 0.])
    """
    BS = pool.shape[2]
    j = torch.arange(needed.shape[0], device=pool.device)  # (S,)
    blocks = torch.where(needed, block_table.to(pool.device).long()[j // BS], 0)  # (S,)
    rows = pool[blocks, :, j % BS]  # (S, Hkv, D); unneeded keys read block 0, then zeroed
    rows = torch.where(needed[:, None, None], rows, torch.zeros((), dtype=rows.dtype,
                                                                 device=rows.device))
    return rows.transpose(0, 1)  # (Hkv, S, D)


def paged_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor,
                        cu_query_lens: torch.Tensor, window: int | None = None,
                        sink_tokens: int = 0, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q K^T / sqrt(D) + mask) V for every packed query, in fp32 (fp64 for fp64 q).
    (N, H, D) in q's dtype.

    `k_scale`, `v_scale` (NB, Hkv, BS): the pools hold codes, key j of a block is
    scale[j] * codes[j] (`kvlib.kernels.quant`); they are dequantized as they are gathered.
    """
    check_prefill(q, k_pool, v_pool, block_tables, context_lens, cu_query_lens, window,
                  sink_tokens)
    N, H, D = q.shape
    Hkv = k_pool.shape[1]
    G = H // Hkv
    cu = cu_query_lens.tolist()
    lens = context_lens.tolist()
    work = torch.promote_types(q.dtype, torch.float32)  # never narrower than fp32
    out = torch.empty(N, H, D, dtype=work, device=q.device)  # (N, H, D)
    for b in range(len(lens)):
        S, T = lens[b], cu[b + 1] - cu[b]
        positions = torch.arange(S - T, S, device=q.device)  # (T,)
        mask = visible_mask(positions, S, window, sink_tokens)  # (T, S)
        needed = mask.any(0)  # (S,) keys some query of this chunk sees
        k = _gather(k_pool, k_scale, block_tables[b], needed, work)  # (Hkv, S, D)
        v = _gather(v_pool, v_scale, block_tables[b], needed, work)
        qb = q[cu[b]:cu[b + 1]].to(work).view(T, Hkv, G, D)  # (T, Hkv, G, D)
        scores = torch.einsum("thgd,hsd->hgts", qb, k) / math.sqrt(D)  # (Hkv, G, T, S)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # (Hkv, G, T, S)
        ob = torch.einsum("hgts,hsd->thgd", probs, v)  # (T, Hkv, G, D)
        out[cu[b]:cu[b + 1]] = ob.reshape(T, H, D)
    return out.to(q.dtype)


def _gather(pool: torch.Tensor, scale: torch.Tensor | None, block_table: torch.Tensor,
            needed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows = gather_blocks(pool, block_table, needed).to(dtype)  # (Hkv, S, D)
    if scale is None:
        return rows
    s = gather_blocks(scale[..., None], block_table, needed).to(dtype)  # (Hkv, S, 1)
    return rows * s


def paged_decode_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     window: int | None = None, sink_tokens: int = 0,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     ) -> torch.Tensor:
    """Decode: one query per sequence, the last position. q (B, H, D) -> (B, H, D)."""
    check_decode(q, k_pool, v_pool, block_tables, context_lens, window, sink_tokens)
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=context_lens.device)  # (B+1,)
    return paged_attention_ref(q, k_pool, v_pool, block_tables, context_lens, cu, window,
                               sink_tokens, k_scale, v_scale)
