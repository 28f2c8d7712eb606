"""Paged decode attention over a quantized pool, widened inside the kernel (Triton).

The pool holds the encoding of `kvlib.kernels.quant`: codes (int8, or float8_e4m3fn where
the GPU has FP8) in the float pool's (NB, Hkv, BS, D) layout, and one fp32 scale per
(token, KV head) in (NB, Hkv, BS) tensors beside it. A decode step reads 1 byte per element
plus 4 per row of D, about half the bytes of bf16 -- and decode attention is bound by the
bytes it reads, so it can run up to twice as fast, if the kernel's work per byte keeps up.

The structure is `kvlib.kernels.paged_decode`'s (splits, online softmax in base 2, the same
merge, windows and sinks). No kernel builds a dequantized tile: scores use the codes as they
are and multiply each token's column by its scale after the product, q.(s k) = s (q.k); the
value scales are folded into the softmax weights, sum_t p_t (s_t v_t) = sum_t (p_t s_t) v_t.
How the two products are computed is the launch option `variant` (`VARIANTS`):

    dot     codes converted to q's dtype, both products on tensor cores with the query
            group padded to 16 rows (the first kernel: 1.27x bf16 SDPA on an H100)
    dot16   the same products in fp16, with the codes widened by integer arithmetic instead
            of conversion instructions (int8: the bits of 1152 + c, minus 1152, exact; fp8:
            e4m3 -> fp16 is one hardware conversion per pair); q is scaled by a power of two
            into fp16's range, and the value scales enter p divided by the tile's largest, so
            p stays in [0, 1]
    fma     CUDA cores, fp32: each product a sum of broadcast products over exactly the
            group's rows (no padding to 16, no shared-memory staging for tensor cores); int8
            codes widened to fp32 by integer arithmetic (2^23 + 128 + c, minus 2^23 + 128).
            Registers hold (rows, tile_n, D) products: use small tiles (16-32 tokens)
    i8dot   (int8 only) scores on int8 tensor cores, so keys are never widened: q is
            written in two int8 digits per head (hi + lo / 256, about 16 bits, finer than
            bf16) and each tile takes two integer products, exact in int32; values as in
            dot16

Why several: chapter 7 traces the first kernel's shortfall to its work per byte (padded
rows, conversions, staging through shared memory), which only a GPU run can weigh;
`bench/gpu_decode.py` times every variant and the fastest becomes `INT8_LAUNCH`'s.

`paged_decode_quantized_ref` dequantizes what each sequence sees, then attends in fp32.

Legend: B sequences, H query heads, Hkv KV heads, G = H / Hkv, D head dim, NB blocks,
BS block size, M blocks per table, NS splits.
"""

from __future__ import annotations

import math

import torch

from kvlib.kernels.common import (
    FLOAT_DTYPES,
    MIN_DOT,
    check_decode,
    check_same_device,
    dot_dtype,
    dot_precision,
    max_visible,
    pow2_at_least,
    require_triton_can_run,
    triton_runs_on,
    window_or_all,
)
from kvlib.kernels.paged_decode import LOG2E, DecodeLaunch, Partials, check_launch, plan
from kvlib.kernels.quant import check_codes
from kvlib.kernels.reference import paged_decode_ref

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    from kvlib.kernels.common import key_position, visible_span
    from kvlib.kernels.paged_decode import store_partial_state
except ImportError:  # kvlib imports without triton; the function falls back to the reference
    triton = None

VARIANTS = ("dot", "dot16", "fma", "i8dot")
# Default launch: the first kernel's form; 2 pipelining stages, not the float kernel's 3 (in
# the H100 sweep of bench/gpu_decode.py, 2 were faster in 14 of 18 (shape, split) cases).
INT8_LAUNCH = DecodeLaunch(num_stages=2, variant="dot")


def paged_decode_quantized_ref(q, k_pool, v_pool, k_scale, v_scale, block_tables, context_lens,
                               window=None, sink_tokens=0) -> torch.Tensor:
    """Dequantize the keys each sequence sees, then the fp32 reference. (B, H, D), q's dtype."""
    return paged_decode_ref(q, k_pool, v_pool, block_tables, context_lens, window, sink_tokens,
                            k_scale, v_scale)


def paged_decode_quantized(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           k_scale: torch.Tensor, v_scale: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                           window: int | None = None, sink_tokens: int = 0,
                           launch: DecodeLaunch | None = None) -> torch.Tensor:
    """Decode attention reading int8 or fp8 blocks and their scales in place.

    Args:
        q: (B, H, D) bf16, fp16 or fp32 queries (position context_lens[b] - 1).
        k_pool, v_pool: (NB, Hkv, BS, D) int8 or float8_e4m3fn codes (`kvlib.kernels.quant`).
        k_scale, v_scale: (NB, Hkv, BS) float32: row r of a block is scale[r] * codes[r].
        block_tables: (B, M) int32 block ids; entries of blocks no query sees are never read.
        context_lens: (B,) int32 keys per sequence, each >= 1, on q's device.
        window: sliding window W, or None; sink_tokens: the first keys every query sees.
        launch: tile, warps, stages, splits and `variant` (None: `INT8_LAUNCH`).

    Returns:
        (B, H, D) in q's dtype. Falls back to `paged_decode_quantized_ref` where Triton
        cannot run.
    """
    check_decode(q, k_pool, v_pool, block_tables, context_lens, window, sink_tokens)
    check_codes(k_pool, k_scale, "k_pool")
    check_codes(v_pool, v_scale, "v_pool")
    if k_pool.dtype != v_pool.dtype:
        raise ValueError(f"k_pool and v_pool hold different codes: {k_pool.dtype}, "
                         f"{v_pool.dtype}")
    if not triton_runs_on(q):
        return paged_decode_quantized_ref(q, k_pool, v_pool, k_scale, v_scale, block_tables,
                                          context_lens, window, sink_tokens)
    launch = check_launch(launch or INT8_LAUNCH, k_pool.shape[2])
    int_codes = k_pool.dtype == torch.int8
    if launch.variant not in VARIANTS or (launch.variant == "i8dot" and not int_codes):
        raise ValueError(f"variant {launch.variant!r} is not one of {VARIANTS} for "
                         f"{k_pool.dtype} codes (i8dot needs int8)")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; the kernel takes bf16, fp16 or fp32")
    check_same_device(q, k_pool, v_pool, k_scale, v_scale, block_tables, context_lens)
    require_triton_can_run()
    B, H, D = q.shape
    NB, Hkv, BS, _ = k_pool.shape
    G = H // Hkv
    capacity = block_tables.shape[1] * BS
    if B == 0:
        return torch.empty_like(q)
    num_splits, split_len = plan(launch, B * Hkv, max_visible(window, sink_tokens, capacity),
                                 q.device)
    parts = Partials.empty(q, num_splits)
    tables = block_tables.to(torch.int32)  # (B, M), a no-op when already int32
    rows = pow2_at_least(G) if launch.variant == "fma" else pow2_at_least(G, MIN_DOT)
    tile_n = launch.tile_n
    while True:
        try:
            _quantized_split_kernel[(B, Hkv, num_splits)](
                q, k_pool, v_pool, k_scale, v_scale, tables, context_lens, parts.m, parts.l,
                parts.acc, parts.out, *q.stride(), *k_pool.stride(), *v_pool.stride(),
                *k_scale.stride(), *v_scale.stride(), *tables.stride(), *parts.m.stride(),
                *parts.acc.stride(), *parts.out.stride(),
                LOG2E / math.sqrt(D), split_len, num_splits, window_or_all(window, capacity),
                sink_tokens,
                G=G, ROWS=rows, D=D, D_PAD=pow2_at_least(D, MIN_DOT), BS=BS, TILE_N=tile_n,
                VARIANT=launch.variant, INT_CODES=int_codes, DOT_DTYPE=dot_dtype(q.dtype),
                PRECISION=dot_precision(q.dtype),                 num_warps=launch.num_warps, num_stages=launch.num_stages)
            break
        except OutOfResources:  # as in paged_decode: a smaller tile fits a smaller GPU
            if tile_n <= max(MIN_DOT, BS):
                raise
            tile_n //= 2
    return parts.merge()


if triton is not None:

    @triton.jit
    def _widen16(codes, INT_CODES: tl.constexpr):
        """Codes -> fp16, exactly. int8 c: the fp16 with bits 0x6400 + 128 + c is 1152 + c
        (1024 has a step of 1), so one integer add and one fp16 subtract replace a
        conversion instruction; e4m3 fits fp16 (hardware converts pairs)."""
        if INT_CODES:
            return (codes.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
        return codes.to(tl.float16)

    @triton.jit
    def _widen32(codes, INT_CODES: tl.constexpr):
        """Codes -> fp32, exactly: int8 c as the fp32 with bits 0x4B000080 + c, which is
        2^23 + 128 + c (2^23 has a step of 1), minus 2^23 + 128."""
        if INT_CODES:
            return (codes.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        return codes.to(tl.float32)

    @triton.jit(do_not_specialize=["num_splits"])  # as paged_decode's _split_kernel
    def _quantized_split_kernel(
        q_ptr, k_pool_ptr, v_pool_ptr, k_scale_ptr, v_scale_ptr, tables_ptr, lens_ptr,
        m_ptr, l_ptr, acc_ptr, out_ptr,
        sq_b, sq_h, sq_d,  # q (B, H, D)
        sk_b, sk_h, sk_t, sk_d,  # k_pool (NB, Hkv, BS, D) codes
        sv_b, sv_h, sv_t, sv_d,  # v_pool
        sks_b, sks_h, sks_t, svs_b, svs_h, svs_t,  # k_scale, v_scale (NB, Hkv, BS)
        st_b, st_m,  # block_tables (B, M)
        sm_b, sm_h, sm_s,  # m_part, l_part (B, H, NS)
        sa_b, sa_h, sa_s, sa_d,  # acc_part (B, H, NS, D)
        so_b, so_h, so_d,  # out (B, H, D)
        qk_scale, split_len, num_splits, window, sink_tokens,
        G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BS: tl.constexpr, TILE_N: tl.constexpr, VARIANT: tl.constexpr,
        INT_CODES: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
            ):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(lens_ptr + b)
        sink_end, window_start, num_visible = visible_span(seq_len - 1, window, sink_tokens)
        start = split * split_len
        end = tl.minimum(start + split_len, num_visible)

        # -- step 1: the group's queries, scaled for exp2, in the form the variant multiplies --
        g = tl.arange(0, ROWS)  # (ROWS,) rows past G are masked to zero
        d = tl.arange(0, D_PAD)  # (D_PAD,)
        heads = kv_head * G + g  # (ROWS,)
        q_mask = (g < G)[:, None] & (d < D)[None, :]  # (ROWS, D_PAD)
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :] * sq_d,
                    mask=q_mask, other=0.0).to(tl.float32) * qk_scale  # (ROWS, D_PAD)
        # q_mult (ROWS,): what the product of the stored q with a code row is multiplied by
        if VARIANT == "dot":
            q_dot = q.to(q_ptr.dtype.element_ty).to(DOT_DTYPE)
            q_mult = tl.full([ROWS], 1.0, tl.float32)
        elif VARIANT == "dot16":
            # a power of two brings the group's largest |q| to 1: exact, and inside fp16
            q_max = tl.max(tl.max(tl.abs(q), 1), 0)
            e = tl.where(q_max > 0, tl.exp2(tl.ceil(tl.log2(q_max))), 1.0)
            q_dot = (q / e).to(tl.float16)
            q_mult = tl.full([ROWS], 1.0, tl.float32) * e
        elif VARIANT == "i8dot":
            # q in two int8 digits per head: x = q / q_s in [-127, 127] is hi + lo / 256 with
            # hi = round(x) and lo = round(256 (x - hi)) (ties to even, as in store_kv), about
            # 16 bits of q; the scores are 256 hi.k + lo.k, exact in int32 (|.| < 2^30)
            q_s = tl.max(tl.abs(q), 1) / 127.0  # (ROWS,)
            q_s = tl.where(q_s > 0, q_s, 1.0)
            x = q / q_s[:, None]
            hi = (x + 12582912.0) - 12582912.0
            lo = ((x - hi) * 256.0 + 12582912.0) - 12582912.0
            q_dot = hi.to(tl.int8)
            q_lo = tl.clamp(lo, -127.0, 127.0).to(tl.int8)
            q_mult = q_s / 256.0
        else:  # fma
            q_dot = q
            q_mult = tl.full([ROWS], 1.0, tl.float32)

        m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)  # running max (base 2)
        l_i = tl.zeros([ROWS], dtype=tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([ROWS, D_PAD], dtype=tl.float32)  # running sum of exp2(.) * v

        # -- step 2: walk this split's visible keys a tile at a time --
        for tile_start in range(start, end, TILE_N):
            i = tile_start + tl.arange(0, TILE_N)  # (TILE_N,) visible-key indices
            valid = i < end
            t = key_position(i, sink_end, window_start)  # (TILE_N,) token positions
            block = tl.load(tables_ptr + b * st_b + (t // BS) * st_m, mask=valid,
                            other=0).to(tl.int64)
            offset = t % BS
            kv_mask = valid[:, None] & (d < D)[None, :]  # (TILE_N, D_PAD)
            k = tl.load(k_pool_ptr + block[:, None] * sk_b + kv_head * sk_h
                        + offset[:, None] * sk_t + d[None, :] * sk_d,
                        mask=kv_mask, other=0.0)  # (TILE_N, D_PAD) codes
            v = tl.load(v_pool_ptr + block[:, None] * sv_b + kv_head * sv_h
                        + offset[:, None] * sv_t + d[None, :] * sv_d,
                        mask=kv_mask, other=0.0)  # (TILE_N, D_PAD) codes
            k_s = tl.load(k_scale_ptr + block * sks_b + kv_head * sks_h + offset * sks_t,
                          mask=valid, other=0.0)  # (TILE_N,)
            v_s = tl.load(v_scale_ptr + block * svs_b + kv_head * svs_h + offset * svs_t,
                          mask=valid, other=0.0)  # (TILE_N,)

            # -- step 3: scores of the codes, then each token's column times its scale --
            if VARIANT == "dot":
                qk = tl.dot(q_dot, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION)
            elif VARIANT == "dot16":
                qk = tl.dot(q_dot, tl.trans(_widen16(k, INT_CODES)))
            elif VARIANT == "i8dot":
                k_t = tl.trans(k)
                qk = (tl.dot(q_dot, k_t, out_dtype=tl.int32) * 256
                      + tl.dot(q_lo, k_t, out_dtype=tl.int32)).to(tl.float32)
            else:  # fma: (ROWS, 1, D) x (1, TILE_N, D), summed over D
                qk = tl.sum(q_dot[:, None, :] * _widen32(k, INT_CODES)[None, :, :], 2)
            qk = qk * q_mult[:, None] * k_s[None, :]  # (ROWS, TILE_N)
            qk = tl.where(valid[None, :], qk, float("-inf"))

            # -- step 4: online softmax: rescale what was summed under the old max --
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # (ROWS,)
            alpha = tl.exp2(m_i - m_new)  # (ROWS,)
            p = tl.exp2(qk - m_new[:, None])  # (ROWS, TILE_N)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]

            # -- step 5: acc += (p * value scales) V --
            if VARIANT == "dot":
                pv = (p * v_s[None, :]).to(q_ptr.dtype.element_ty).to(DOT_DTYPE)
                acc += tl.dot(pv, v.to(DOT_DTYPE), input_precision=PRECISION)
            elif VARIANT == "fma":  # (ROWS, TILE_N, 1) x (1, TILE_N, D), summed over tokens
                pv = p * v_s[None, :]
                acc += tl.sum(pv[:, :, None] * _widen32(v, INT_CODES)[None, :, :], 1)
            else:  # dot16, i8dot: scales over the tile's largest keep p * scale in [0, 1]
                v_max = tl.max(v_s, 0)
                pv = (p * (v_s / v_max)[None, :]).to(tl.float16)
                acc += tl.dot(pv, _widen16(v, INT_CODES)) * v_max
            m_i = m_new

        # -- step 6: the finished output (one split), or this split's partial state --
        store_partial_state(m_i, l_i, acc, heads, g < G, d, D, b, split, m_ptr, l_ptr, acc_ptr,
                            out_ptr, sm_b, sm_h, sm_s, sa_b, sa_h, sa_s, sa_d, so_b, so_h,
                            so_d, num_splits)
