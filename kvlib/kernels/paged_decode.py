"""Paged decode attention on a GPU (Triton): flash-decoding over block tables.

One new token per sequence attends to every key its sequence holds, reading K and V where
they lie in the block pool. Two kernels:

1. `_split_kernel`, one program per (sequence, KV head, split): the sequence's keys are cut
   into `num_splits` ranges of `split_len` tokens. A program loads the G = H / Hkv query heads
   of its KV group once, walks its range a tile of `TILE_N` tokens at a time (token t lives in
   block `block_tables[b, t // BS]` at offset `t % BS`), and keeps the online-softmax state of
   Triton's fused-attention tutorial per query head: `m_i` (running max of scores), `l_i`
   (running sum of exp(score - m_i)), `acc` (running sum of exp(score - m_i) * v). It writes
   that partial state, unnormalised.
2. `_merge_kernel`, one program per (sequence, query head): the partial states of the
   splits are merged with the log-sum-exp rule, m = max_s m_s, l = sum_s exp(m_s - m) l_s,
   out = sum_s exp(m_s - m) acc_s / l -- the same merge as `kvlib.flash`.

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

Legend: B sequences, H query heads, Hkv KV heads, G = H / Hkv, D head dim, NB blocks,
BS block size, M blocks per table, NS splits.
"""

from __future__ import annotations

import functools
import math

import torch

from kvlib.kernels.paged_decode_cpu import _check, _check_shapes, paged_decode_attention_ref
from kvlib.kernels.store_kv import INTERPRETED, triton_runs_on

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # kvlib imports without triton; the function falls back to the reference
    triton = None

# Launch defaults, chosen by the sweep of bench/gpu_decode.py on an H100 (36 configs x 6 shapes,
# bench/results/gpu_sweep_nvidia-h100-80gb-hbm3.json): the best geometric mean over
# the shapes, and within 5% of contiguous SDPA on each in that sweep.
TILE_N = 64  # tokens per loop iteration: several BS=16 blocks per tile keeps loads in flight
NUM_WARPS = 4  # warps per program (Triton's default; 8 lost at every shape, INT8 by 7-32%)
NUM_STAGES = 3  # software-pipelining depth Triton may use for the loop (its default)
PROGRAMS_PER_SM = 2  # the split plan aims at this many programs per multiprocessor
MIN_DOT = 16  # tl.dot needs every dimension >= 16: the query group is padded to this


def split_plan(max_len: int, num_programs: int, tile_n: int, target_programs: int,
               ) -> tuple[int, int]:
    """(num_splits, split_len): enough splits that num_programs * num_splits reaches
    target_programs, each split a whole number of tiles, none empty for the longest row."""
    wanted = max(1, min(-(-target_programs // num_programs), -(-max_len // tile_n)))
    split_len = -(-max_len // wanted)  # ceil
    split_len = -(-split_len // tile_n) * tile_n  # a whole number of tiles
    return -(-max_len // split_len), split_len


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The GPU's streaming multiprocessors (132 on an H100 SXM); 2 under the interpreter,
    so that the tests there still cut rows into a few splits and exercise the merge."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def check_inputs(q, k_pool, v_pool, block_tables, context_lens) -> None:
    """Shapes always; the values of `context_lens` only where reading them is free.

    NOTE: reading lengths that live on a GPU would synchronise with it at every step (tens
    of microseconds, as long as a whole decode kernel); there the caller vouches for them.
    """
    if context_lens.device.type == "cpu":
        _check(q, k_pool, v_pool, block_tables, context_lens)
    else:
        _check_shapes(q, k_pool, v_pool, block_tables, context_lens)


def supports_block_size(block_size: int) -> bool:
    """Whether the kernel takes blocks of this many tokens: a power of two up to 128."""
    return 0 < block_size <= 128 and block_size & (block_size - 1) == 0


def interpreter_runs_kernels() -> bool:
    """Whether this Triton's interpreter can run the kernels here: their loops have run-time
    bounds, which the interpreter handles from Triton 3.9 on (3.6's fails; 3.9 is pinned)."""
    if triton is None:
        return False
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 9)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           num_splits: int | None = None, tile_n: int = TILE_N,
                           num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES,
                           ) -> torch.Tensor:
    """softmax(q K^T / sqrt(D)) V per sequence, K and V read block by block in place.

    Args:
        q: (B, H, D) the new token's queries, bf16, fp16 or fp32.
        k_pool, v_pool: (NB, Hkv, BS, D) one layer's pool in q's dtype; BS a power of two.
        block_tables: (B, M) int32 block ids, padded with -1 past each sequence's blocks.
        context_lens: (B,) int keys per sequence (the new token's included), each >= 1.
        num_splits: ranges the KV length is cut into (None: enough for PROGRAMS_PER_SM
            programs on every multiprocessor).
        tile_n: tokens per loop iteration, a power of two >= 16.
        num_warps, num_stages: Triton's launch options for the split kernel
            (`bench/gpu_decode.py` sweeps them with tile_n and the split count).

    Returns:
        (B, H, D) in q's dtype; accumulation is in fp32. Falls back to
        `paged_decode_attention_ref` where Triton cannot run.
    """
    check_inputs(q, k_pool, v_pool, block_tables, context_lens)
    if not triton_runs_on(q):
        return paged_decode_attention_ref(q, k_pool, v_pool, block_tables, context_lens)
    return launch(q, k_pool, v_pool, None, None, block_tables, context_lens, num_splits, tile_n,
                  num_warps, num_stages)


def launch(q, k_pool, v_pool, k_scale, v_scale, block_tables, context_lens, num_splits,
           tile_n, num_warps, num_stages) -> torch.Tensor:
    """Run split + merge; `k_scale`, `v_scale` (NB, Hkv, BS) when the pools are INT8."""
    B, H, D = q.shape
    NB, Hkv, BS, _ = k_pool.shape
    G = H // Hkv
    if INTERPRETED and not interpreter_runs_kernels():
        raise RuntimeError(f"Triton {triton.__version__}'s interpreter cannot run this kernel "
                           f"(loops with run-time bounds); use Triton >= 3.9 or a GPU")
    if not supports_block_size(BS) or tile_n & (tile_n - 1) or tile_n < MIN_DOT:
        raise ValueError(f"block size {BS} must be a power of two <= 128 and tile_n {tile_n} "
                         f"a power of two >= {MIN_DOT}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q has dtype {q.dtype}; the kernel takes bf16, fp16 or fp32")
    tile_n = max(tile_n, BS)  # a tile never splits a block in two
    # NOTE: splits are planned for the tables' capacity, not the longest row, which would
    # need the lengths on the host; splits past a row's length are empty and weigh nothing.
    max_len = block_tables.shape[1] * BS
    if num_splits is None:
        num_splits, split_len = split_plan(max_len, B * Hkv, tile_n,
                                           PROGRAMS_PER_SM * multiprocessors(q.device))
    else:
        num_splits, split_len = split_plan(max_len, 1, tile_n, num_splits)
    # Partial results: fp32 whatever the inputs, so the merge loses nothing.
    m_part = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)  # (B, H, NS)
    l_part = torch.empty_like(m_part)  # (B, H, NS)
    acc_part = torch.empty(B, H, num_splits, D, device=q.device,
                           dtype=torch.float32)  # (B, H, NS, D)
    out = torch.empty_like(q)  # (B, H, D)
    tables = block_tables.to(torch.int32).contiguous()  # (B, M)
    lens = context_lens.to(device=q.device, dtype=torch.int32)  # (B,)
    quantized = k_scale is not None
    scales = (k_scale, v_scale) if quantized else (k_pool, v_pool)  # unused pointers if not
    scale_strides = (*k_scale.stride(), *v_scale.stride()) if quantized else (0,) * 6
    while True:
        try:
            _split_kernel[(B, Hkv, num_splits)](
                q, k_pool, v_pool, *scales, tables, lens, m_part, l_part, acc_part,
                *q.stride(), *k_pool.stride(), *v_pool.stride(), *scale_strides,
                tables.stride(0), *m_part.stride(), *acc_part.stride(),
                1.0 / math.sqrt(D), split_len,
                G=G, G_PAD=max(MIN_DOT, triton.next_power_of_2(G)), D=D,
                D_PAD=max(MIN_DOT, triton.next_power_of_2(D)), BS=BS, TILE_N=tile_n,
                QUANTIZED=quantized, DOT_DTYPE=_dot_dtype(q.dtype),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                num_warps=num_warps, num_stages=num_stages)
            break
        except OutOfResources:
            # NOTE: a GPU with little shared memory per SM (a T4 has 64 KB) cannot stage
            # large K and V tiles; halving the tile keeps split_len a whole number of tiles.
            if tile_n <= max(MIN_DOT, BS):
                raise
            tile_n //= 2
    _merge_kernel[(B, H)](
        m_part, l_part, acc_part, out, *m_part.stride(), *acc_part.stride(), *out.stride(),
        num_splits, NS_PAD=max(2, triton.next_power_of_2(num_splits)), D=D,
        D_PAD=triton.next_power_of_2(D))
    return out


def _dot_dtype(dtype: torch.dtype):
    """The dtype the kernel's `tl.dot`s take: q's, except bf16 under the interpreter.

    NOTE: Triton 3.9's interpreter computes `tl.dot` of bf16 tiles wrongly (numpy has no
    bf16); there the tiles are widened to fp32 first. On a GPU bf16 goes to the tensor cores.
    """
    if dtype == torch.bfloat16 and INTERPRETED:
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


if triton is not None:

    @triton.jit
    def _split_kernel(
        q_ptr, k_pool_ptr, v_pool_ptr, k_scale_ptr, v_scale_ptr, tables_ptr, lens_ptr,
        m_ptr, l_ptr, acc_ptr,
        sq_b, sq_h, sq_d,  # q (B, H, D)
        sk_b, sk_h, sk_t, sk_d,  # k_pool (NB, Hkv, BS, D)
        sv_b, sv_h, sv_t, sv_d,  # v_pool
        sks_b, sks_h, sks_t, svs_b, svs_h, svs_t,  # k_scale, v_scale (NB, Hkv, BS) if INT8
        st_b,  # block_tables (B, M), last stride 1
        sm_b, sm_h, sm_s,  # m_part, l_part (B, H, NS)
        sa_b, sa_h, sa_s, sa_d,  # acc_part (B, H, NS, D)
        sm_scale, split_len,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BS: tl.constexpr, TILE_N: tl.constexpr, QUANTIZED: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(lens_ptr + b)
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)

        # -- step 1: load the G query heads of this KV group once, scaled by 1/sqrt(D) --
        g = tl.arange(0, G_PAD)  # (G_PAD,) padded rows are masked to zero
        d = tl.arange(0, D_PAD)  # (D_PAD,)
        heads = kv_head * G + g  # (G_PAD,)
        q_mask = (g < G)[:, None] & (d < D)[None, :]  # (G_PAD, D_PAD)
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :] * sq_d,
                    mask=q_mask, other=0.0)  # (G_PAD, D_PAD)
        q = (q.to(tl.float32) * sm_scale).to(q_ptr.dtype.element_ty).to(DOT_DTYPE)

        m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)  # running max
        l_i = tl.zeros([G_PAD], dtype=tl.float32)  # running sum of exp(score - m_i)
        acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)  # running sum of exp(.) * v

        # -- step 2: walk this split's tokens a tile at a time --
        for tile_start in range(start, end, TILE_N):
            t = tile_start + tl.arange(0, TILE_N)  # (TILE_N,) token indices
            valid = t < end
            # token t is in block tables[b, t // BS], at offset t % BS
            block = tl.load(tables_ptr + b * st_b + t // BS, mask=valid, other=0).to(tl.int64)
            offset = t % BS
            kv_mask = valid[:, None] & (d < D)[None, :]  # (TILE_N, D_PAD)
            k = tl.load(k_pool_ptr + block[:, None] * sk_b + kv_head * sk_h
                        + offset[:, None] * sk_t + d[None, :] * sk_d,
                        mask=kv_mask, other=0.0)  # (TILE_N, D_PAD)
            v = tl.load(v_pool_ptr + block[:, None] * sv_b + kv_head * sv_h
                        + offset[:, None] * sv_t + d[None, :] * sv_d,
                        mask=kv_mask, other=0.0)  # (TILE_N, D_PAD)

            # -- step 3: scores of every head of the group against the tile --
            if QUANTIZED:  # int8 -> q's dtype is exact; the per-token scale comes after the dot
                k_scale = tl.load(k_scale_ptr + block * sks_b + kv_head * sks_h
                                  + offset * sks_t, mask=valid, other=0.0)  # (TILE_N,)
                qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION)
                qk = qk * k_scale.to(tl.float32)[None, :]  # (G_PAD, TILE_N)
            else:
                qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)),
                            input_precision=PRECISION)  # (G_PAD, TILE_N)
            qk = tl.where(valid[None, :], qk, float("-inf"))

            # -- step 4: online softmax: rescale what was summed under the old max --
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # (G_PAD,)
            alpha = tl.exp(m_i - m_new)  # (G_PAD,)
            p = tl.exp(qk - m_new[:, None])  # (G_PAD, TILE_N)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]

            # -- step 5: acc += p V --
            if QUANTIZED:  # fold the value scales into p, then a plain dot with int8 values
                v_scale = tl.load(v_scale_ptr + block * svs_b + kv_head * svs_h
                                  + offset * svs_t, mask=valid, other=0.0)  # (TILE_N,)
                p = p * v_scale.to(tl.float32)[None, :]
            # p is rounded to the dtype of the values for the tensor cores, as in the tutorial
            acc += tl.dot(p.to(q_ptr.dtype.element_ty).to(DOT_DTYPE), v.to(DOT_DTYPE),
                          input_precision=PRECISION)  # (G_PAD, D_PAD)
            m_i = m_new

        # -- step 6: write the unnormalised partial state of this split --
        # An empty split (start >= seq_len) writes m = -inf, l = 0: it weighs 0 in the merge.
        g_mask = g < G
        part = b * sm_b + heads * sm_h + split * sm_s  # (G_PAD,)
        tl.store(m_ptr + part, m_i, mask=g_mask)
        tl.store(l_ptr + part, l_i, mask=g_mask)
        tl.store(acc_ptr + b * sa_b + heads[:, None] * sa_h + split * sa_s + d[None, :] * sa_d,
                 acc, mask=q_mask)

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
        # -- step 1: the partial states of every split --
        m_s = tl.load(m_ptr + b * sm_b + h * sm_h + s * sm_s, mask=s_mask,
                      other=float("-inf"))  # (NS_PAD,)
        l_s = tl.load(l_ptr + b * sm_b + h * sm_h + s * sm_s, mask=s_mask, other=0.0)
        acc_s = tl.load(acc_ptr + b * sa_b + h * sa_h + s[:, None] * sa_s + d[None, :] * sa_d,
                        mask=s_mask[:, None] & (d < D)[None, :], other=0.0)  # (NS_PAD, D_PAD)
        # -- step 2: log-sum-exp merge; empty splits (m = -inf) get weight 0 --
        m = tl.max(m_s, 0)
        w = tl.where(m_s > float("-inf"), tl.exp(m_s - m), 0.0)  # (NS_PAD,)
        l = tl.sum(w * l_s, 0)
        acc = tl.sum(w[:, None] * acc_s, 0)  # (D_PAD,)
        tl.store(out_ptr + b * so_b + h * so_h + d * so_d,
                 (acc / l).to(out_ptr.dtype.element_ty), mask=d < D)
