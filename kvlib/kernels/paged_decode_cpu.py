"""Paged decode attention on the CPU, reading each sequence's blocks where they lie (numba).

One new token per sequence attends to every key it may see. The reference
(`kvlib.kernels.reference.paged_decode_ref`) gathers the blocks into contiguous tensors
first, a copy of the whole cache every step; this kernel walks the block table instead, with
an online softmax (`m_i` running max, `l_i` running sum, `acc` the running weighted sum of
values), so it reads each key and value once and copies nothing. The G = H / Hkv query heads
of one KV head are served together, so each block tile is loaded once per group.

With a sliding window W and k sink tokens, the new token at position p = S - 1 sees the keys
[0, sink_end) and [window_start, S) (`kvlib.kernels.common.visible_ranges`): the kernel
walks those two ranges and never touches a block outside them (a windowed sequence's table
holds a null block there, or anything).

Compiled with numba (parallel over sequences x KV heads, the loops over the head dim in SIMD
code); float32 and float64 only. Where numba is missing, or the dtype or device does not fit,
`paged_decode_numba` falls back to the reference, so callers never need to check.

Two things the compiled kernel must not change behind its caller's back:
- Threads. numba's OpenMP threading layer starts its pool on first use with
  `omp_set_num_threads(cores)`, and torch (built on the same OpenMP runtime) reads its own
  thread count from that setting: the first call used to raise `torch.get_num_threads()` to
  the core count, undoing a user's `torch.set_num_threads`. The wrapper runs the kernel on
  torch's thread count and puts torch's setting back if numba moved it.
- The source tree. The compiled kernel is cached (a first compile takes about 10 s per
  dtype) under the user's cache directory (`$NUMBA_CACHE_DIR` if set, else
  `$XDG_CACHE_HOME/kvlib/numba` or `~/.cache/kvlib/numba`), never in kvlib's `__pycache__`;
  where that is not writable, it is not cached at all.

Legend: B sequences, H query heads, Hkv KV heads, G = H / Hkv, D head dim, NB blocks,
BS block size, M blocks per table.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import torch

from kvlib.kernels.common import check_decode, window_or_all
from kvlib.kernels.reference import paged_decode_ref

try:
    import numba
except ImportError:  # pragma: no cover - a dependency; this keeps kvlib importable
    numba = None

_NUMPY = {torch.float32, torch.float64}


def paged_decode_numba(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                       block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                       window: int | None = None, sink_tokens: int = 0) -> torch.Tensor:
    """softmax(q K^T / sqrt(D) + mask) V per sequence, K and V read block by block in place.

    Args:
        q: (B, H, D) the new token's queries (the token at position context_lens[b] - 1).
        k_pool, v_pool: (NB, Hkv, BS, D) one layer's block pool.
        block_tables: (B, M) int block ids; entries past a sequence's blocks, and of blocks
            no query sees (outside the window and the sinks), are never read.
        context_lens: (B,) keys per sequence (the new token's included), each >= 1.
        window: sliding window W, or None; sink_tokens: the first keys every query sees.

    Returns:
        (B, H, D) in q's dtype.
    """
    check_decode(q, k_pool, v_pool, block_tables, context_lens, window, sink_tokens)
    fits = (numba is not None and q.device.type == "cpu" and q.dtype in _NUMPY
            and k_pool.dtype == q.dtype and v_pool.dtype == q.dtype
            and k_pool.is_contiguous() and v_pool.is_contiguous())
    if not fits:
        return paged_decode_ref(q, k_pool, v_pool, block_tables, context_lens, window,
                                sink_tokens)
    out = torch.empty_like(q)  # (B, H, D)
    q_scaled = (q * (1.0 / math.sqrt(q.shape[-1]))).contiguous()  # (B, H, D)
    args = (q_scaled.numpy(), k_pool.numpy(), v_pool.numpy(),
            block_tables.to(torch.int64).contiguous().numpy(),
            context_lens.to(torch.int64).contiguous().numpy(),
            window_or_all(window, block_tables.shape[1] * k_pool.shape[2]), sink_tokens,
            out.numpy())
    _run_on_torch_threads(_kernel(), args)
    return out


def _run_on_torch_threads(kernel, args) -> None:
    """Run `kernel(*args)` on as many threads as torch uses, and leave torch's count as it was.

    NOTE: the first use of numba's threads calls omp_set_num_threads(cores) (numba's
    `launch_threads`), which is also torch's setting when both use one OpenMP runtime; so the
    count is read before and put back after, here, where numba may start its pool.
    """
    threads = torch.get_num_threads()
    try:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        kernel(*args)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def cache_dir() -> Path:
    """Where the compiled kernel is cached: $NUMBA_CACHE_DIR, else the user's cache dir."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvlib" / "numba"


def _decode_kernel(q, k_pool, v_pool, block_tables, context_lens, window, sink_tokens, out):
    # q arrives scaled by 1/sqrt(D). Plain loops over tokens and d: numba compiles the d loops
    # to SIMD code (fastmath), and a block's (G, D) x (D, n) products are too small for BLAS
    # to pay for its call (handing them to np.dot was 1.6-2.5x slower, measured at 32 and 128
    # head dims).
    B, H, D = q.shape
    Hkv, BS = k_pool.shape[1], k_pool.shape[2]
    G = H // Hkv
    for job in numba.prange(B * Hkv):  # one (sequence, KV head) per job
        b, h = job // Hkv, job % Hkv
        S = context_lens[b]
        # the new token (position S - 1) sees [0, sink_end) and [window_start, S)
        window_start = max(0, S - window)
        sink_end = min(sink_tokens, window_start)
        m_i = np.full(G, -np.inf, dtype=q.dtype)  # running max of scores
        l_i = np.zeros(G, dtype=q.dtype)  # running sum of exp(score - m_i)
        acc = np.zeros((G, D), dtype=q.dtype)  # running sum of exp(score - m_i) * v
        scores = np.empty(BS, dtype=q.dtype)  # one block's scores for one query head
        for lo, hi in ((0, sink_end), (window_start, S)):
            for j in range(lo // BS, (hi + BS - 1) // BS):  # the blocks this range touches
                block = block_tables[b, j]
                t0, t1 = max(lo, j * BS) - j * BS, min(hi, (j + 1) * BS) - j * BS  # in block
                for g in range(G):
                    qh = q[b, h * G + g]  # (D,)
                    block_max = -np.inf
                    for t in range(t0, t1):  # keys read in place
                        k = k_pool[block, h, t]  # (D,)
                        x = 0.0
                        for d in range(D):
                            x += qh[d] * k[d]
                        scores[t] = x
                        block_max = max(block_max, x)
                    m_new = max(m_i[g], block_max)
                    alpha = np.exp(m_i[g] - m_new)  # rescales what was summed under the old max
                    l_sum = l_i[g] * alpha
                    for d in range(D):
                        acc[g, d] *= alpha
                    for t in range(t0, t1):
                        p = np.exp(scores[t] - m_new)  # unnormalised weight
                        l_sum += p
                        v = v_pool[block, h, t]  # (D,)
                        for d in range(D):
                            acc[g, d] += p * v[d]
                    l_i[g] = l_sum
                    m_i[g] = m_new
        for g in range(G):
            for d in range(D):
                out[b, h * G + g, d] = acc[g, d] / l_i[g]


@functools.cache
def _kernel():
    """The numba dispatcher of `_decode_kernel`, made on first use and caching its compiled
    code in `cache_dir()` (see the module's docstring)."""
    kernel = numba.njit(parallel=True, fastmath=True)(_decode_kernel)
    _enable_user_cache(kernel, cache_dir())
    return kernel


def _enable_user_cache(kernel, folder: Path) -> None:
    """Cache `kernel`'s compiled code in `folder`, or nowhere if it is not writable.

    NOTE: numba picks a cache location when caching is enabled, from `numba.config.CACHE_DIR`
    first and then the source's own `__pycache__`; setting the config for that one call (and
    putting it back) points it at `folder` without changing the environment of anything else.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        return
    saved = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = str(folder)
    try:
        kernel.enable_caching()
    finally:
        numba.config.CACHE_DIR = saved
