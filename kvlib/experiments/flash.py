"""Measured memory and time of attention: the reference (naive), chunked, and torch's SDPA.

Memory is measured, not computed: `peak_bytes` runs a function and reports the most bytes
its tensors held at once, from the allocator's own records (torch.profiler's allocation
events on the CPU, `torch.cuda.max_memory_allocated` on a GPU). The formulas
(`score_bytes`, `score_reduction`) say what to expect; the chapter and bench/flash.py put
the two side by side.

Legend: B batch, H query heads, Hkv KV heads, T queries, S keys, D head dim.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from kvlib import flash
from kvlib.attention import causal_attention
from kvlib.bench import Timing, measure, progress
from kvlib.contract import PagedKV

PATHS = ("naive", "chunked", "sdpa")
# What bench/flash.py and the chapter measure: one sequence, GQA 4:1, modest heads so that
# the naive path's (4 x 8192 x 8192) fp32 scores (1 GiB) fit and run in seconds on 2 cores.
SHAPE = {"num_heads": 4, "num_kv_heads": 1, "head_dim": 64}
TILES = {"q_tile": 256, "kv_tile": 256}


@contextmanager
def intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block on `num_threads` intra-op threads (None: leave as is), then restore.

    NOTE: on a shared 2-core machine, a two-thread op over a small tile waits for a thread
    another process holds, and the chunked path runs hundreds of small ops: one thread
    times the work, two time the contention. The measurements here default to one.
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block.

    NOTE: the profiler's C++ side prints timestamped "profiler_start/stop" lines straight to
    fd 2 (no setting turns them off); in a notebook they would land in the cell's output and
    change on every run.
    """
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Most bytes held at once by tensors allocated while `fn()` runs (its result included),
    above what was held before the call.

    CPU: torch.profiler records every allocation and free with its size; the peak is the
    largest running sum. CUDA: the caching allocator's peak statistic.

    >>> peak_bytes(lambda: torch.empty(1000, dtype=torch.float32))
    4000
    >>> peak_bytes(lambda: torch.ones(250).sum())  # a 1,000-byte temporary, a 4-byte result
    1004
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - before
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                  profile_memory=True) as prof:
        fn()
    sizes = []  # (time, +bytes allocated / -bytes freed)
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == torch._C._profiler._EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    held = peak = 0
    for _, size in sorted(sizes, key=lambda item: item[0]):
        held += size
        peak = max(peak, held)
    return peak


def score_bytes(num_heads: int, num_queries: int, num_keys: int, dtype_bytes: int = 4) -> int:
    """Bytes of one (T, S) score matrix per query head, all heads: what the reference holds.

    >>> score_bytes(4, 8192, 8192) / 2**30   # 4 heads, 8,192 tokens, fp32: 1 GiB
    1.0
    """
    return num_heads * num_queries * num_keys * dtype_bytes


def score_reduction(seq_len: int, q_tile: int, kv_tile: int) -> float:
    """How many times fewer scores a tile holds than the whole matrix: T S / (tq tk), with
    T = S = seq_len (tiles never larger than the matrix).

    >>> score_reduction(4096, 256, 256), score_reduction(2048, 128, 128)
    (256.0, 256.0)
    >>> score_reduction(4096, 64, 64), score_reduction(8192, 256, 256)
    (4096.0, 1024.0)
    """
    tq, tk = min(q_tile, seq_len), min(kv_tile, seq_len)
    return seq_len * seq_len / (tq * tk)


def prefill_inputs(seq_len: int, *, num_heads: int = SHAPE["num_heads"],
                   num_kv_heads: int = SHAPE["num_kv_heads"], head_dim: int = SHAPE["head_dim"],
                   dtype: torch.dtype = torch.float32, device: str = "cpu",
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded q (1, H, T, D) and k, v (1, Hkv, T, D) for causal self-attention over T tokens."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, num_heads, seq_len, head_dim, generator=gen)  # (1, H, T, D)
    k = torch.randn(1, num_kv_heads, seq_len, head_dim, generator=gen)  # (1, Hkv, T, D)
    v = torch.randn(1, num_kv_heads, seq_len, head_dim, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))  # type: ignore[return-value]


def attention_call(path: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   q_tile: int = TILES["q_tile"], kv_tile: int = TILES["kv_tile"],
                   ) -> Callable[[], torch.Tensor]:
    """Causal self-attention over q (1, H, T, D), k, v (1, Hkv, T, D) by one path:
    'naive' (the reference: whole score matrix), 'chunked' (tiles) or 'sdpa' (torch)."""
    if path == "naive":
        return lambda: causal_attention(q, k, v)
    if path == "chunked":
        T = q.shape[2]
        positions = torch.arange(T, device=q.device)[None]  # (1, T)
        lens = torch.tensor([T], device=q.device)  # (1,)
        return lambda: flash.chunked_attention(q, k, v, positions, lens, q_tile=q_tile,
                                               kv_tile=kv_tile)
    if path == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


@dataclass(frozen=True)
class AttentionMemory:
    """Measured peak bytes of each path at each sequence length, and the formula's scores."""

    seq_lens: tuple[int, ...]
    peak_bytes: dict[str, tuple[int, ...]]  # path -> one value per length
    score_bytes: tuple[int, ...]  # the naive path's (T, T) scores per length, all heads

    def ratio(self, a: str, b: str) -> tuple[float, ...]:
        """Peak of path a / peak of path b, per length."""
        return tuple(x / y for x, y in zip(self.peak_bytes[a], self.peak_bytes[b]))

    def fit(self, path: str, degree: int) -> tuple[float, ...]:
        """Least-squares polynomial coefficients of peak bytes in the length, highest first,
        and the fit's largest relative error: (c_degree, ..., c_0, max_rel_err)."""
        x = torch.tensor(self.seq_lens, dtype=torch.float64)
        y = torch.tensor(self.peak_bytes[path], dtype=torch.float64)
        A = torch.stack([x ** p for p in range(degree, -1, -1)], dim=1)  # (n, degree + 1)
        coef = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
        err = ((A @ coef - y).abs() / y).max()
        return (*coef.tolist(), float(err))

    def slope(self, path: str) -> float:
        """Exponent k of peak ~ c T^k, from the two longest lengths (log-log slope)."""
        (t0, t1), (y0, y1) = self.seq_lens[-2:], self.peak_bytes[path][-2:]
        return math.log(y1 / y0) / math.log(t1 / t0)


def measure_attention_memory(seq_lens: Sequence[int], *, paths: Sequence[str] = PATHS,
                             q_tile: int = TILES["q_tile"], kv_tile: int = TILES["kv_tile"],
                             num_threads: int | None = 1, show_progress: bool = True,
                             **shape: int) -> AttentionMemory:
    """`peak_bytes` of each path's causal attention at each length, on the CPU (one call
    each: a path allocates the same tensors on every call)."""
    peaks: dict[str, list[int]] = {p: [] for p in paths}
    heads = shape.get("num_heads", SHAPE["num_heads"])
    with intra_op_threads(num_threads), torch.no_grad():
        for T in progress(list(seq_lens), desc="peak memory", enabled=show_progress):
            q, k, v = prefill_inputs(T, **shape)
            for p in paths:
                peaks[p].append(peak_bytes(attention_call(p, q, k, v, q_tile=q_tile,
                                                          kv_tile=kv_tile)))
    return AttentionMemory(tuple(seq_lens), {p: tuple(v) for p, v in peaks.items()},
                           tuple(score_bytes(heads, T, T) for T in seq_lens))


@torch.no_grad()
def time_attention(seq_lens: Sequence[int], *, paths: Sequence[str] = PATHS,
                   q_tile: int = TILES["q_tile"], kv_tile: int = TILES["kv_tile"],
                   warmup: int = 1, repeats: int = 3, device: str = "cpu",
                   num_threads: int | None = 1, show_progress: bool = True,
                   **shape: int) -> dict[str, dict[int, Timing]]:
    """Time of each path's causal attention at each length: path -> length -> Timing.
    (`num_threads` applies to the CPU.)"""
    out: dict[str, dict[int, Timing]] = {p: {} for p in paths}
    with intra_op_threads(num_threads if device == "cpu" else None):
        for T in progress(list(seq_lens), desc="attention time", enabled=show_progress):
            q, k, v = prefill_inputs(T, device=device, **shape)
            for p in paths:
                call = attention_call(p, q, k, v, q_tile=q_tile, kv_tile=kv_tile)
                out[p][T] = measure(call, warmup=warmup, repeats=repeats, device=device)
    return out


# ---------------------------------------------------------------------------------------------
# Online softmax on a handful of numbers
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OnlineStep:
    """The state of one query row after a tile of its scores: keys start..end-1 seen."""

    start: int
    end: int
    m_i: float  # running max
    l_i: float  # running sum of exp(score - m_i)
    alpha: float  # exp(old m_i - new m_i): what the old sum was multiplied by


def online_softmax_trace(scores: Sequence[float], kv_tile: int) -> list[OnlineStep]:
    """Walk one row of scores a tile at a time with the online-softmax update, in floats.

    At the end, l_i * exp(m_i) = sum(exp(scores)) and the softmax is exp(s - m_i) / l_i.
    -inf scores (masked keys) add nothing.

    >>> steps = online_softmax_trace([2, 1, 4, 3], kv_tile=2)  # the max changes in tile 2
    >>> [(s.m_i, round(s.l_i, 4), round(s.alpha, 4)) for s in steps]
    [(2.0, 1.3679, 0.0), (4.0, 1.553, 0.1353)]
    """
    steps, m_i, l_i = [], float("-inf"), 0.0
    for start, end in flash.tiles(len(scores), kv_tile):
        tile = [float(s) for s in scores[start:end]]
        m_new = max(m_i, *tile)
        alpha = math.exp(m_i - m_new) if m_i != float("-inf") else 0.0
        l_i = alpha * l_i + sum(math.exp(s - m_new) for s in tile if s != float("-inf"))
        m_i = m_new
        steps.append(OnlineStep(start, end, m_i, l_i, alpha))
    return steps


def paged_copy(k: torch.Tensor, v: torch.Tensor, context_lens: torch.Tensor, block_size: int,
               seed: int = 0) -> PagedKV:
    """The same keys and values as dense k, v (B, Hkv, S, D), stored in blocks of a pool
    handed out in a shuffled order (as an allocator would after some churn).

    A row of 45 tokens in blocks of 16 takes three blocks, the last holding 13.
    """
    B, Hkv, S, D = k.shape
    need = [-(-int(n) // block_size) for n in context_lens]  # blocks per row
    order = torch.randperm(sum(need), generator=torch.Generator().manual_seed(seed))
    k_pool = k.new_zeros(sum(need), Hkv, block_size, D)  # (NB, Hkv, BS, D)
    v_pool = v.new_zeros(sum(need), Hkv, block_size, D)
    tables = torch.full((B, max(need)), -1, dtype=torch.int32)  # (B, max_blocks)
    used = 0
    for b, n in enumerate(need):
        for col in range(n):
            block, lo = int(order[used + col]), col * block_size
            hi = min(lo + block_size, int(context_lens[b]))
            k_pool[block, :, :hi - lo] = k[b, :, lo:hi]
            v_pool[block, :, :hi - lo] = v[b, :, lo:hi]
            tables[b, col] = block
        used += n
    return PagedKV(k_pool, v_pool, tables, context_lens.to(torch.int32))
