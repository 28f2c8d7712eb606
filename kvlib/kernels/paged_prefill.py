"""Paged attention for mixed steps (Triton): query chunks of any length over block tables.

A serving step packs the new tokens of B sequences into q (N, H, D): sequence b contributes
the chunk of query_lens[b] tokens at positions context_lens[b] - query_lens[b] ..
context_lens[b] - 1 (its keys and values are already stored, the chunk's own included), and
`cu_query_lens` (B+1,) says where each chunk starts. A decode is a chunk of one token; a
prompt is a chunk from position 0; a chunked prefill is anything between. Each query is
causal from its own position and honours the window and the sinks
(`kvlib.kernels.common.visible_ranges`).

One program serves BLOCK_Q consecutive queries of one chunk and all G = H / Hkv query heads of
one KV head: its BLOCK_M = BLOCK_Q x G_PAD rows (query token r // G_PAD, head r % G_PAD) share
every K and V tile it loads, the GQA packing of the decode kernel, and make one tensor-core
product per tile. It walks the keys the chunk's queries see -- the sinks, then from the
earliest query's window start to the latest query -- a tile at a time, masks per row, and
keeps the online softmax of Triton's fused-attention tutorial per row. Blocks outside those
keys are never read; tiles of keys every row of the program sees skip the mask.

Which program serves what, with no host read of the lengths (the vLLM unified kernel's
numbering): sequence b's query tiles are numbered from cu[b] // BLOCK_Q + b, which leaves
room for its ceil(query_lens[b] / BLOCK_Q) tiles before the next sequence's first, so
N // BLOCK_Q + B programs cover every step; a program finds its sequence by binary search
over cu_query_lens and exits if its tile is past the chunk's end.

>>> first_tiles([0, 1, 2, 35, 36], block_q=16)  # decode, decode, a 33-token chunk, decode
[0, 1, 2, 5]

One launch for the whole step, decodes included: a mixed step's time is the chunk's, and its
tiles fill the GPU; a decode row costs one tile (of BLOCK_Q rows, one used) read once per KV
head, without the split of the decode kernel, which is what a pure-decode step (every row
one token, most steps) uses instead (`kvlib.kernels.paged_decode`). NOTE: a decode row much
longer than the step's chunk becomes the step's longest program; a step of decodes should go
to the split kernel.

With `k_scale` and `v_scale` the pools hold codes (`kvlib.kernels.quant`), widened in the
kernel with each token's scale applied to its score column and folded into p, as in
`kvlib.kernels.paged_decode_int8`'s `dot` variant.

Legend: B sequences, N packed query tokens, H query heads, Hkv KV heads, G = H / Hkv,
D head dim, NB blocks, BS block size, M blocks per table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvlib.kernels.common import (
    FLOAT_DTYPES,
    MIN_DOT,
    check_prefill,
    check_same_device,
    dot_dtype,
    dot_precision,
    pow2_at_least,
    require_triton_can_run,
    supports_block_size,
    triton_runs_on,
    window_or_all,
)
from kvlib.kernels.paged_decode import LOG2E
from kvlib.kernels.quant import check_codes
from kvlib.kernels.reference import paged_attention_ref

try:
    import triton
    import triton.language as tl

    from kvlib.kernels.common import key_position, visible_span
except ImportError:  # kvlib imports without triton; the function falls back to the reference
    triton = None


@dataclass(frozen=True)
class PrefillLaunch:
    """How the prefill kernel is launched; none of it changes the result beyond rounding.

    block_m: rows per program (query tokens x the group's heads), a power of two >= 16
        (raised to the group size padded to a power of two).
    tile_n: keys per loop iteration, a power of two >= 16 (raised to the block size).
    num_warps, num_stages: Triton's launch options.
    """

    block_m: int = 64
    tile_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    @property
    def key(self) -> str:
        return f"m{self.block_m} tile{self.tile_n} w{self.num_warps} s{self.num_stages}"


def first_tiles(cu_query_lens: list[int], block_q: int) -> list[int]:
    """The number of each sequence's first query tile: cu[b] // block_q + b."""
    return [cu // block_q + b for b, cu in enumerate(cu_query_lens[:-1])]


def paged_prefill_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                         block_tables: torch.Tensor, context_lens: torch.Tensor,
                         cu_query_lens: torch.Tensor, *, window: int | None = None,
                         sink_tokens: int = 0, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None,
                         launch: PrefillLaunch | None = None) -> torch.Tensor:
    """Causal attention of packed query chunks over their sequences' blocks, read in place.

    Args:
        q: (N, H, D) the step's queries, packed by sequence; bf16, fp16 or fp32.
        k_pool, v_pool: (NB, Hkv, BS, D) one layer's pool, this step's keys already stored;
            q's dtype, or int8 / float8_e4m3fn codes with `k_scale`, `v_scale`.
        block_tables: (B, M) int32 block ids; entries of blocks no query sees are never read.
        context_lens: (B,) int32 keys per sequence after this step, on q's device.
        cu_query_lens: (B+1,) int32 offsets of the chunks in q (cu[0] = 0, cu[B] = N); each
            chunk holds 1 .. context_lens[b] queries, the sequence's last ones.
        window: sliding window W, or None; sink_tokens: the first keys every query sees.
        k_scale, v_scale: (NB, Hkv, BS) float32 row scales when the pools hold codes.
        launch: rows per program, tile, warps, stages (`PrefillLaunch`; None: defaults).

    Returns:
        (N, H, D) in q's dtype; accumulation in fp32. Falls back to
        `kvlib.kernels.reference.paged_attention_ref` where Triton cannot run.
    """
    check_prefill(q, k_pool, v_pool, block_tables, context_lens, cu_query_lens, window,
                  sink_tokens)
    quantized = k_scale is not None or v_scale is not None
    if quantized:
        check_codes(k_pool, k_scale, "k_pool")
        check_codes(v_pool, v_scale, "v_pool")
    if not triton_runs_on(q):
        return paged_attention_ref(q, k_pool, v_pool, block_tables, context_lens,
                                   cu_query_lens, window, sink_tokens, k_scale, v_scale)
    launch = launch or PrefillLaunch()
    N, H, D = q.shape
    NB, Hkv, BS, _ = k_pool.shape
    G = H // Hkv
    G_PAD = pow2_at_least(G)
    tile_n = max(launch.tile_n, BS)  # a tile never splits a block
    block_m = max(launch.block_m, G_PAD)  # at least one query token's group per program
    if (not supports_block_size(BS) or tile_n & (tile_n - 1) or tile_n < MIN_DOT
            or block_m & (block_m - 1) or block_m < MIN_DOT):
        raise ValueError(f"block size {BS} must be a power of two <= 128, tile_n {tile_n} and "
                         f"block_m {block_m} powers of two >= {MIN_DOT}")
    if q.dtype not in FLOAT_DTYPES or (not quantized and (k_pool.dtype, v_pool.dtype)
                                       != (q.dtype, q.dtype)):
        raise ValueError(f"q must be bf16, fp16 or fp32 and float pools in its dtype, got "
                         f"{q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    scales = (k_scale, v_scale) if quantized else (k_pool, v_pool)  # unused pointers if float
    check_same_device(q, k_pool, v_pool, *scales, block_tables, context_lens, cu_query_lens)
    require_triton_can_run()
    B = cu_query_lens.shape[0] - 1
    block_q = block_m // G_PAD
    out = torch.empty_like(q)  # (N, H, D)
    if N == 0:
        return out
    tables = block_tables.to(torch.int32)  # (B, M), a no-op when already int32
    scale_strides = (*k_scale.stride(), *v_scale.stride()) if quantized else (0,) * 6
    _prefill_kernel[(N // block_q + B, Hkv)](
        q, k_pool, v_pool, *scales, tables, context_lens, cu_query_lens, out,
        *q.stride(), *k_pool.stride(), *v_pool.stride(), *scale_strides, *tables.stride(),
        *out.stride(), LOG2E / math.sqrt(D),
        window_or_all(window, block_tables.shape[1] * BS), sink_tokens, B,
        G=G, G_PAD=G_PAD, BLOCK_Q=block_q, D=D, D_PAD=pow2_at_least(D, MIN_DOT), BS=BS,
        TILE_N=tile_n, QUANTIZED=quantized, DOT_DTYPE=dot_dtype(q.dtype),
        PRECISION=dot_precision(q.dtype), num_warps=launch.num_warps,
        num_stages=launch.num_stages)
    return out


if triton is not None:

    @triton.jit
    def _find_sequence(cu_ptr, q_tile, num_seqs, BLOCK_Q: tl.constexpr):
        """The last b with cu[b] // BLOCK_Q + b <= q_tile (see `first_tiles`)."""
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], 0, tl.int32) + num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            if tl.load(cu_ptr + mid) // BLOCK_Q + mid <= q_tile:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_pool_ptr, v_pool_ptr, k_scale_ptr, v_scale_ptr, tables_ptr, lens_ptr, cu_ptr,
        out_ptr,
        sq_n, sq_h, sq_d,  # q (N, H, D)
        sk_b, sk_h, sk_t, sk_d,  # k_pool (NB, Hkv, BS, D)
        sv_b, sv_h, sv_t, sv_d,  # v_pool
        sks_b, sks_h, sks_t, svs_b, svs_h, svs_t,  # k_scale, v_scale (NB, Hkv, BS) if codes
        st_b, st_m,  # block_tables (B, M)
        so_n, so_h, so_d,  # out (N, H, D)
        qk_scale, window, sink_tokens, num_seqs,
        G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, D: tl.constexpr,
        D_PAD: tl.constexpr, BS: tl.constexpr, TILE_N: tl.constexpr, QUANTIZED: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        q_tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        # -- step 1: which sequence, and which of its query tiles, this program serves --
        b = _find_sequence(cu_ptr, q_tile, num_seqs, BLOCK_Q)
        q_start = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q_start
        j = q_tile - (q_start // BLOCK_Q + b)  # this program's tile of the chunk
        if j * BLOCK_Q >= q_len:
            return
        seq_len = tl.load(lens_ptr + b)
        first = seq_len - q_len + j * BLOCK_Q  # position of the tile's first query
        last = tl.minimum(first + BLOCK_Q, seq_len) - 1  # ... and of its last

        # -- step 2: the tile's rows: BLOCK_Q query tokens x the group's G_PAD heads --
        r = tl.arange(0, BLOCK_Q * G_PAD)  # (BLOCK_M,)
        g = r % G_PAD
        position = first + r // G_PAD  # (BLOCK_M,) each row's query position
        row_valid = (g < G) & (position <= last)
        d = tl.arange(0, D_PAD)  # (D_PAD,)
        row = q_start + j * BLOCK_Q + r // G_PAD  # (BLOCK_M,) packed index of each row
        heads = kv_head * G + g
        q_mask = row_valid[:, None] & (d < D)[None, :]  # (BLOCK_M, D_PAD)
        q = tl.load(q_ptr + row[:, None] * sq_n + heads[:, None] * sq_h + d[None, :] * sq_d,
                    mask=q_mask, other=0.0)  # (BLOCK_M, D_PAD)
        q = (q.to(tl.float32) * qk_scale).to(q_ptr.dtype.element_ty).to(DOT_DTYPE)

        m_i = tl.full([BLOCK_Q * G_PAD], float("-inf"), dtype=tl.float32)  # running max
        l_i = tl.zeros([BLOCK_Q * G_PAD], dtype=tl.float32)  # running sum of exp2(s - m_i)
        acc = tl.zeros([BLOCK_Q * G_PAD, D_PAD], dtype=tl.float32)  # running sum of exp2(.) v

        # -- step 3: the keys some row sees: the sinks, then the first query's window on --
        sink_end, window_start, num_keys = visible_span(first, window, sink_tokens)
        num_keys += last - first  # the window runs on to the last query
        # Keys every row sees need no mask: visible-key indices [A, B), from the last row's
        # window start (or 0, if it reaches as far back as the first row's) to the first
        # query. Whole tiles inside it go unmasked; the tiles before and after are masked.
        edge = last - window + 1 - window_start  # > 0: the last row's window starts later
        A = tl.where(edge > 0, sink_end + edge, 0)
        B = sink_end + first + 1 - window_start
        a_tile = tl.minimum(tl.cdiv(A, TILE_N) * TILE_N, num_keys)
        b_tile = tl.maximum(a_tile, (B // TILE_N) * TILE_N)
        for phase in tl.static_range(3):  # masked, unmasked, masked
            if phase == 0:
                lo, hi = a_tile * 0, a_tile
            elif phase == 1:
                lo, hi = a_tile, b_tile
            else:
                lo, hi = b_tile, num_keys
            for tile_start in range(lo, hi, TILE_N):
                i = tile_start + tl.arange(0, TILE_N)  # (TILE_N,) visible-key indices
                valid = i < hi
                t = key_position(i, sink_end, window_start)  # (TILE_N,) key positions
                block = tl.load(tables_ptr + b * st_b + (t // BS) * st_m, mask=valid,
                                other=0).to(tl.int64)
                offset = t % BS
                kv_mask = valid[:, None] & (d < D)[None, :]  # (TILE_N, D_PAD)
                k = tl.load(k_pool_ptr + block[:, None] * sk_b + kv_head * sk_h
                            + offset[:, None] * sk_t + d[None, :] * sk_d,
                            mask=kv_mask, other=0.0)  # (TILE_N, D_PAD)
                v = tl.load(v_pool_ptr + block[:, None] * sv_b + kv_head * sv_h
                            + offset[:, None] * sv_t + d[None, :] * sv_d,
                            mask=kv_mask, other=0.0)  # (TILE_N, D_PAD)

                # -- step 4: scores, masked per row (causal, window, sinks) at the edges --
                qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)),
                            input_precision=PRECISION)  # (BLOCK_M, TILE_N)
                if QUANTIZED:  # each token's column times its key scale
                    k_s = tl.load(k_scale_ptr + block * sks_b + kv_head * sks_h
                                  + offset * sks_t, mask=valid, other=0.0)  # (TILE_N,)
                    qk = qk * k_s[None, :]
                if phase != 1:
                    p_row = position[:, None]  # (BLOCK_M, 1)
                    seen = valid[None, :] & (t[None, :] <= p_row) & (
                        (p_row - t[None, :] < window) | (t[None, :] < sink_tokens))
                    qk = tl.where(seen, qk, float("-inf"))  # (BLOCK_M, TILE_N)

                # -- step 5: online softmax; a row that sees nothing yet keeps m = -inf --
                m_new = tl.maximum(m_i, tl.max(qk, 1))  # (BLOCK_M,)
                m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
                alpha = tl.exp2(m_i - m_safe)  # (BLOCK_M,)
                p = tl.exp2(qk - m_safe[:, None])  # (BLOCK_M, TILE_N)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None]

                # -- step 6: acc += p V (value scales folded into p) --
                if QUANTIZED:
                    v_s = tl.load(v_scale_ptr + block * svs_b + kv_head * svs_h
                                  + offset * svs_t, mask=valid, other=0.0)  # (TILE_N,)
                    p = p * v_s[None, :]
                acc += tl.dot(p.to(q_ptr.dtype.element_ty).to(DOT_DTYPE), v.to(DOT_DTYPE),
                              input_precision=PRECISION)  # (BLOCK_M, D_PAD)
                m_i = m_new

        # -- step 7: normalise and store the valid rows --
        l_i = tl.where(row_valid, l_i, 1.0)
        tl.store(out_ptr + row[:, None] * so_n + heads[:, None] * so_h + d[None, :] * so_d,
                 (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
