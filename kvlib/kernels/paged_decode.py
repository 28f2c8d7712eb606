"""Paged decode attention on a GPU (Triton): flash-decoding over block tables.

One new token per sequence attends to every key it may see, reading K and V where they lie
in the block pool. Two kernels:

1. `_split_kernel`, one program per (sequence, KV head, split): the keys the sequence's new
   token sees are cut into `num_splits` ranges of `split_len` tokens. A program loads the
   G = H / Hkv query heads of its KV group once, walks its range a tile of `TILE_N` tokens at
   a time (token t lives in block `block_tables[b, t // BS]` at offset `t % BS`), and keeps
   the online-softmax state of Triton's fused-attention tutorial per query head: `m_i`
   (running max of scores), `l_i` (running sum of exp(score - m_i)), `acc` (running sum of
   exp(score - m_i) * v). It writes that partial state, unnormalised -- or, when there is one
   split, the finished output, and the merge is not launched.
2. `_merge_kernel`, one program per (sequence, query head): the partial states of the
   splits are merged with the log-sum-exp rule, m = max_s m_s, l = sum_s exp(m_s - m) l_s,
   out = sum_s exp(m_s - m) acc_s / l -- the same merge as `kvlib.flash`.

Scores are kept in base 2: q is scaled by log2(e) / sqrt(D) once, so each exponential is one
`exp2` (what `exp` costs anyway, minus a multiply per score).

Windows and sinks. With a sliding window W and k sink tokens the new token sees the keys
[0, sink_end) and [window_start, S) (`kvlib.kernels.common.visible_ranges`); the kernel
counts only those, the i-th visible key being `key_position(i)`, so splits and tiles cover
the visible keys alone, and a block outside both ranges is never read: its table entry may
hold a null block, or anything.

Why split: decode has only B x Hkv independent (sequence, KV head) pairs; at batch 1 and
8 KV heads that is 8 programs for a GPU with 132 multiprocessors. Splitting the KV length
gives every multiprocessor work, so the kernel can read the cache at the memory bandwidth.

Why one program per KV group: the G query heads that share a KV head read the same K and V
tiles; loading a tile once for all of them divides the bytes read by G. The group is padded
to at least 16 rows so the two products are `tl.dot`s on tensor cores.

Worked example of the split arithmetic: 1 sequence of 10,000 tokens, TILE_N 64, 16 splits
wanted: split_len = ceil(10000 / 16) rounded up to a multiple of 64 = 640, so 16 splits
(the last holds 10000 - 15 * 640 = 400 tokens).

>>> split_plan(max_len=10_000, num_programs=8, tile_n=64, target_programs=128)
(16, 640)

NOTE: splits are planned from shapes only (the tables' capacity, or the window plus the
sinks), never from the lengths, which live on the GPU: reading them would synchronise with
it and forbid CUDA graphs. Splits past a row's visible keys are empty and weigh nothing.

Legend: B sequences, H query heads, Hkv KV heads, G = H / Hkv, D head dim, NB blocks,
BS block size, M blocks per table, NS splits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from kvlib.kernels.common import (
    FLOAT_DTYPES,
    MIN_DOT,
    check_decode,
    check_same_device,
    dot_dtype,
    dot_precision,
    max_visible,
    multiprocessors,
    pow2_at_least,
    require_triton_can_run,
    supports_block_size,
    triton_runs_on,
    window_or_all,
)
from kvlib.kernels.reference import paged_decode_ref

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    from kvlib.kernels.common import key_position, visible_span
except ImportError:  # kvlib imports without triton; the function falls back to the reference
    triton = None

# Launch defaults, chosen by the sweep of bench/gpu_decode.py on an H100 (36 configs x 6 shapes,
# bench/results/gpu_sweep_nvidia-h100-80gb-hbm3.json): the best geometric mean over
# the shapes, and within 5% of contiguous SDPA on each in that sweep.
TILE_N = 64  # tokens per loop iteration: several BS=16 blocks per tile keeps loads in flight
NUM_WARPS = 4  # warps per program (Triton's default; 8 lost at every shape, INT8 by 7-32%)
NUM_STAGES = 3  # software-pipelining depth Triton may use for the loop (its default)
PROGRAMS_PER_SM = 2  # the split plan aims at this many programs per multiprocessor
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))


@dataclass(frozen=True)
class DecodeLaunch:
    """How a paged decode kernel is launched; none of it changes the result beyond rounding.

    tile_n: tokens per loop iteration, a power of two >= 16 (raised to the block size).
    num_warps, num_stages: Triton's launch options (warps per program, pipelining depth).
    programs_per_sm: the split plan aims at this many programs per multiprocessor.
    num_splits: ranges each row's keys are cut into; None plans it from programs_per_sm.
    variant: how the quantized kernel computes (`kvlib.kernels.paged_decode_int8.VARIANTS`);
        the float kernel has one way, "dot".
    """

    tile_n: int = TILE_N
    num_warps: int = NUM_WARPS
    num_stages: int = NUM_STAGES
    programs_per_sm: int = PROGRAMS_PER_SM
    num_splits: int | None = None
    variant: str = "dot"

    @property
    def key(self) -> str:
        """A short name: 'dot tile64 w4 s3 p2' (or '... n8' with a fixed split count)."""
        splits = f"p{self.programs_per_sm}" if self.num_splits is None else f"n{self.num_splits}"
        return (f"{self.variant} tile{self.tile_n} w{self.num_warps} s{self.num_stages} "
                f"{splits}")

    def with_(self, **changes) -> DecodeLaunch:
        return replace(self, **changes)


def split_plan(max_len: int, num_programs: int, tile_n: int, target_programs: int,
               ) -> tuple[int, int]:
    """(num_splits, split_len): enough splits that num_programs * num_splits reaches
    target_programs, each split a whole number of tiles, none empty for the longest row."""
    wanted = max(1, min(-(-target_programs // num_programs), -(-max_len // tile_n)))
    split_len = -(-max_len // wanted)  # ceil
    split_len = -(-split_len // tile_n) * tile_n  # a whole number of tiles
    return -(-max_len // split_len), split_len


def plan(launch: DecodeLaunch, num_programs: int, max_len: int, device: torch.device,
         ) -> tuple[int, int]:
    """(num_splits, split_len) for `launch` over rows of at most `max_len` visible keys."""
    if launch.num_splits is not None:
        return split_plan(max_len, 1, launch.tile_n, launch.num_splits)
    return split_plan(max_len, num_programs, launch.tile_n,
                      launch.programs_per_sm * multiprocessors(device))


def check_launch(launch: DecodeLaunch, block_size: int) -> DecodeLaunch:
    """`launch` with its tile raised to the block size (a tile never splits a block)."""
    t = launch.tile_n
    if not supports_block_size(block_size) or t & (t - 1) or t < MIN_DOT:
        raise ValueError(f"block size {block_size} must be a power of two <= 128 and tile_n "
                         f"{t} a power of two >= {MIN_DOT}")
    if launch.num_splits is not None and launch.num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 or None, got {launch.num_splits}")
    return launch.with_(tile_n=max(t, block_size))


def paged_decode_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                        window: int | None = None, sink_tokens: int = 0,
                        launch: DecodeLaunch | None = None) -> torch.Tensor:
    """softmax(q K^T / sqrt(D) + mask) V per sequence, K and V read block by block in place.

    Args:
        q: (B, H, D) the new token's queries (position context_lens[b] - 1), bf16, fp16 or
            fp32.
        k_pool, v_pool: (NB, Hkv, BS, D) one layer's pool in q's dtype; BS a power of two.
        block_tables: (B, M) int32 block ids; entries past a sequence's blocks, and of blocks
            no query sees (outside the window and the sinks), are never read.
        context_lens: (B,) int32 keys per sequence (the new token's included), each >= 1,
            on q's device.
        window: sliding window W, or None; sink_tokens: the first keys every query sees.
        launch: tile, warps, stages and splits (`DecodeLaunch`; None: the defaults).

    Returns:
        (B, H, D) in q's dtype; accumulation is in fp32. Falls back to
        `kvlib.kernels.reference.paged_decode_ref` where Triton cannot run.
    """
    check_decode(q, k_pool, v_pool, block_tables, context_lens, window, sink_tokens)
    if not triton_runs_on(q):
        return paged_decode_ref(q, k_pool, v_pool, block_tables, context_lens, window,
                                sink_tokens)
    launch = check_launch(launch or DecodeLaunch(), k_pool.shape[2])
    if launch.variant != "dot":
        raise ValueError(f"the float kernel has one variant, 'dot'; got {launch.variant!r}")
    if q.dtype not in FLOAT_DTYPES or k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(f"q and the pools must share one of {FLOAT_DTYPES}, got {q.dtype}, "
                         f"{k_pool.dtype}, {v_pool.dtype}")
    check_same_device(q, k_pool, v_pool, block_tables, context_lens)
    require_triton_can_run()
    B, H, D = q.shape
    NB, Hkv, BS, _ = k_pool.shape
    capacity = block_tables.shape[1] * BS
    if B == 0:
        return torch.empty_like(q)
    num_splits, split_len = plan(launch, B * Hkv, max_visible(window, sink_tokens, capacity),
                                 q.device)
    parts = Partials.empty(q, num_splits)
    tables = block_tables.to(torch.int32)  # (B, M), a no-op when already int32
    G = H // Hkv
    tile_n = launch.tile_n
    while True:
        try:
            _split_kernel[(B, Hkv, num_splits)](
                q, k_pool, v_pool, tables, context_lens, parts.m, parts.l, parts.acc,
                parts.out, *q.stride(), *k_pool.stride(), *v_pool.stride(), *tables.stride(),
                *parts.m.stride(), *parts.acc.stride(), *parts.out.stride(),
                LOG2E / math.sqrt(D), split_len, num_splits, window_or_all(window, capacity),
                sink_tokens,
                G=G, G_PAD=pow2_at_least(G, MIN_DOT), D=D, D_PAD=pow2_at_least(D, MIN_DOT),
                BS=BS, TILE_N=tile_n, DOT_DTYPE=dot_dtype(q.dtype),
                PRECISION=dot_precision(q.dtype),                 num_warps=launch.num_warps, num_stages=launch.num_stages)
            break
        except OutOfResources:
            # NOTE: a GPU with little shared memory per SM (a T4 has 64 KB) cannot stage
            # large K and V tiles; halving the tile keeps split_len a whole number of tiles.
            if tile_n <= max(MIN_DOT, BS):
                raise
            tile_n //= 2
    return parts.merge()


@dataclass(frozen=True)
class Partials:
    """Where the split kernels write: fp32 partial states, or `out` directly (one split)."""

    m: torch.Tensor  # (B, H, NS) running max, base 2
    l: torch.Tensor  # (B, H, NS) running sum
    acc: torch.Tensor  # (B, H, NS, D) running weighted sum of values
    out: torch.Tensor  # (B, H, D) in q's dtype

    @staticmethod
    def empty(q: torch.Tensor, num_splits: int) -> Partials:
        B, H, D = q.shape
        if num_splits == 1:  # the split kernel writes `out`; the partials are never touched
            m = torch.empty(1, 1, 1, device=q.device, dtype=torch.float32)  # (1, 1, NS=1)
            return Partials(m, m, m[..., None], torch.empty_like(q))
        m = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)  # (B, H, NS)
        acc = torch.empty(B, H, num_splits, D, device=q.device,
                          dtype=torch.float32)  # (B, H, NS, D)
        return Partials(m, torch.empty_like(m), acc, torch.empty_like(q))

    def merge(self) -> torch.Tensor:
        """The output, merging the splits' partial states if there are several. (B, H, D)"""
        B, H, D = self.out.shape
        num_splits = self.m.shape[2]
        if num_splits > 1:
            _merge_kernel[(B, H)](
                self.m, self.l, self.acc, self.out, *self.m.stride(), *self.acc.stride(),
                *self.out.stride(), num_splits, NS_PAD=pow2_at_least(num_splits, 2), D=D,
                D_PAD=pow2_at_least(D))
        return self.out


if triton is not None:

    # NOTE: the split count is a run-time value, not specialised on (Triton compiles an int
    # argument equal to 1 as a constant): one compiled kernel serves one split and many.
    @triton.jit(do_not_specialize=["num_splits"])
    def _split_kernel(
        q_ptr, k_pool_ptr, v_pool_ptr, tables_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
        sq_b, sq_h, sq_d,  # q (B, H, D)
        sk_b, sk_h, sk_t, sk_d,  # k_pool (NB, Hkv, BS, D)
        sv_b, sv_h, sv_t, sv_d,  # v_pool
        st_b, st_m,  # block_tables (B, M)
        sm_b, sm_h, sm_s,  # m_part, l_part (B, H, NS)
        sa_b, sa_h, sa_s, sa_d,  # acc_part (B, H, NS, D)
        so_b, so_h, so_d,  # out (B, H, D)
        qk_scale, split_len, num_splits, window, sink_tokens,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BS: tl.constexpr, TILE_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(lens_ptr + b)
        # the new token (position seq_len - 1) sees [0, sink_end) and [window_start, seq_len)
        sink_end, window_start, num_visible = visible_span(seq_len - 1, window, sink_tokens)
        start = split * split_len
        end = tl.minimum(start + split_len, num_visible)

        # -- step 1: load the G query heads of this KV group once, scaled for exp2 --
        g = tl.arange(0, G_PAD)  # (G_PAD,) padded rows are masked to zero
        d = tl.arange(0, D_PAD)  # (D_PAD,)
        heads = kv_head * G + g  # (G_PAD,)
        q_mask = (g < G)[:, None] & (d < D)[None, :]  # (G_PAD, D_PAD)
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :] * sq_d,
                    mask=q_mask, other=0.0)  # (G_PAD, D_PAD)
        q = (q.to(tl.float32) * qk_scale).to(q_ptr.dtype.element_ty).to(DOT_DTYPE)

        m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)  # running max
        l_i = tl.zeros([G_PAD], dtype=tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)  # running sum of exp2(.) * v

        # -- step 2: walk this split's visible keys a tile at a time --
        for tile_start in range(start, end, TILE_N):
            i = tile_start + tl.arange(0, TILE_N)  # (TILE_N,) visible-key indices
            valid = i < end
            t = key_position(i, sink_end, window_start)  # (TILE_N,) token positions
            # token t is in block tables[b, t // BS], at offset t % BS
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

            # -- step 3: scores of every head of the group against the tile (base 2) --
            qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)),
                        input_precision=PRECISION)  # (G_PAD, TILE_N)
            qk = tl.where(valid[None, :], qk, float("-inf"))

            # -- step 4: online softmax: rescale what was summed under the old max --
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # (G_PAD,)
            alpha = tl.exp2(m_i - m_new)  # (G_PAD,)
            p = tl.exp2(qk - m_new[:, None])  # (G_PAD, TILE_N)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]

            # -- step 5: acc += p V; p is rounded to the values' dtype for the tensor cores,
            # as in the tutorial --
            acc += tl.dot(p.to(q_ptr.dtype.element_ty).to(DOT_DTYPE), v.to(DOT_DTYPE),
                          input_precision=PRECISION)  # (G_PAD, D_PAD)
            m_i = m_new

        # -- step 6: the finished output (one split), or this split's partial state --
        # An empty split (start >= num_visible) writes m = -inf, l = 0: it weighs 0 in the merge.
        store_partial_state(m_i, l_i, acc, heads, g < G, d, D, b, split, m_ptr, l_ptr, acc_ptr,
                            out_ptr, sm_b, sm_h, sm_s, sa_b, sa_h, sa_s, sa_d, so_b, so_h,
                            so_d, num_splits)

    @triton.jit
    def store_partial_state(m_i, l_i, acc, heads, g_mask, d, D: tl.constexpr, b, split,
                            m_ptr, l_ptr, acc_ptr, out_ptr, sm_b, sm_h, sm_s, sa_b, sa_h,
                            sa_s, sa_d, so_b, so_h, so_d, num_splits):
        """Write a split's state; with one split, acc / l_i straight into out (no merge)."""
        mask = g_mask[:, None] & (d < D)[None, :]
        if num_splits == 1:
            out = acc / l_i[:, None]
            tl.store(out_ptr + b * so_b + heads[:, None] * so_h + d[None, :] * so_d,
                     out.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            part = b * sm_b + heads * sm_h + split * sm_s  # (G_PAD,)
            tl.store(m_ptr + part, m_i, mask=g_mask)
            tl.store(l_ptr + part, l_i, mask=g_mask)
            tl.store(acc_ptr + b * sa_b + heads[:, None] * sa_h + split * sa_s
                     + d[None, :] * sa_d, acc, mask=mask)

    @triton.jit
    def _merge_kernel(
        m_ptr, l_ptr, acc_ptr, out_ptr,
        sm_b, sm_h, sm_s,  # m_part, l_part (B, H, NS)
        sa_b, sa_h, sa_s, sa_d,  # acc_part (B, H, NS, D)
        so_b, so_h, so_d,  # out (B, H, D)
        num_splits, NS_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, NS_PAD)  # (NS_PAD,)
        d = tl.arange(0, D_PAD)  # (D_PAD,)
        s_mask = s < num_splits
        # -- step 1: the partial states of every split (m in base 2) --
        m_s = tl.load(m_ptr + b * sm_b + h * sm_h + s * sm_s, mask=s_mask,
                      other=float("-inf"))  # (NS_PAD,)
        l_s = tl.load(l_ptr + b * sm_b + h * sm_h + s * sm_s, mask=s_mask, other=0.0)
        acc_s = tl.load(acc_ptr + b * sa_b + h * sa_h + s[:, None] * sa_s + d[None, :] * sa_d,
                        mask=s_mask[:, None] & (d < D)[None, :], other=0.0)  # (NS_PAD, D_PAD)
        # -- step 2: log-sum-exp merge; empty splits (m = -inf) get weight 0 --
        m = tl.max(m_s, 0)
        w = tl.where(m_s > float("-inf"), tl.exp2(m_s - m), 0.0)  # (NS_PAD,)
        l = tl.sum(w * l_s, 0)
        acc = tl.sum(w[:, None] * acc_s, 0)  # (D_PAD,)
        tl.store(out_ptr + b * so_b + h * so_h + d * so_d,
                 (acc / l).to(out_ptr.dtype.element_ty), mask=d < D)
