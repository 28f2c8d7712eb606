"""Measurements of the paged cache that chapter 3 and bench/paged_decode.py share.

`same_contents` fills a flat and a paged cache with the same random keys and values (the
paged one with its blocks scattered over the pool, as a long-running server's are), and
`time_decode_paths` times one layer's decode attention over them four ways, in one run:

    paged     the fast backend on the paged cache: blocks read in place (no copy)
    gather    the reference on the paged cache: gather blocks into (B, Hkv, S, D), then attend
    flat      the fast backend on the flat cache (head-major views: torch's SDPA, no copy)
    sdpa      torch's scaled_dot_product_attention(enable_gqa=True) on contiguous tensors
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from kvlib import backends
from kvlib.bench import Timing, measure
from kvlib.cache.flat import FlatKVCache
from kvlib.cache.paged import PagedKVCache
from kvlib.config import CacheConfig, Layout
from kvlib.contract import StepBatch, append


def same_contents(batch_size: int, context_len: int, *, num_kv_heads: int = 8,
                  head_dim: int = 128, block_size: int = 16, dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> tuple[FlatKVCache, PagedKVCache]:
    """A head-major flat cache and a paged cache (one layer) holding the same tokens.

    The paged cache's pool has one spare block per sequence, and the sequences are filled a
    block at a time in turn, so each block table is spread over the pool.
    """
    B, S, BS = batch_size, context_len, block_size
    cfg = CacheConfig(num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      max_batch_size=B, max_seq_len=S, dtype=dtype, block_size=BS,
                      layout=Layout.HEAD_MAJOR)
    flat, paged = FlatKVCache(cfg), PagedKVCache(cfg, num_blocks=B * (-(-S // BS) + 1))
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, B, num_kv_heads, S, head_dim, generator=gen).to(dtype)  # (1, B, Hkv, S, D)
    v = torch.randn(1, B, num_kv_heads, S, head_dim, generator=gen).to(dtype)
    append(flat, list(range(B)), k, v)
    for start in range(0, S, BS):  # interleave the sequences' blocks over the pool
        for b in range(B):
            chunk = slice(start, min(start + BS, S))
            append(paged, [b], k[:, b:b + 1, :, chunk], v[:, b:b + 1, :, chunk])
    return flat, paged


def decode_query(batch_size: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                 seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, num_heads, head_dim, generator=gen).to(dtype)  # (B, H, D)


def _read_batch(cache, batch_size: int, context_len: int) -> StepBatch:
    """A StepBatch naming the cache's first B sequences at their current length, for `read`
    alone: decode attention over what is stored, without writing a new token."""
    return StepBatch.make(list(range(batch_size)), [context_len - 1] * batch_size,
                          [1] * batch_size, torch.zeros(batch_size, dtype=torch.int64), step=0)


@dataclass(frozen=True)
class DecodePathTimings:
    paged: Timing
    gather: Timing
    flat: Timing
    sdpa: Timing

    def ratios(self) -> dict[str, float]:
        return {"paged_over_flat": self.paged.median_s / self.flat.median_s,
                "paged_over_sdpa": self.paged.median_s / self.sdpa.median_s,
                "gather_over_sdpa": self.gather.median_s / self.sdpa.median_s}


@torch.no_grad()
def decode_paths(batch_size: int, context_len: int, *, num_heads: int = 32,
                 num_kv_heads: int = 8, head_dim: int = 128, block_size: int = 16,
                 dtype: torch.dtype = torch.float32) -> dict[str, Callable[[], object]]:
    """The four decode-attention calls of the module docstring, as zero-argument functions."""
    flat, paged = same_contents(batch_size, context_len, num_kv_heads=num_kv_heads,
                                head_dim=head_dim, block_size=block_size, dtype=dtype)
    q = decode_query(batch_size, num_heads, head_dim, dtype)  # (B, H, D) = (N, H, D)
    batch = _read_batch(flat, batch_size, context_len)
    tables = paged.block_tables(range(batch_size))  # (B, max_blocks)
    lens = torch.full((batch_size,), context_len, dtype=torch.int32)
    paged_kv = backends.PagedKV(paged.k_pool(0), paged.v_pool(0), tables, lens)
    flat_kv = backends.DenseKV(flat.keys(0)[:, :, :context_len],
                               flat.values(0)[:, :, :context_len], lens.long())
    k = flat_kv.k.contiguous()  # (B, Hkv, S, D)
    v = flat_kv.v.contiguous()
    return {
        "paged": lambda: backends.attend(q, paged_kv, batch, "fast"),
        "gather": lambda: backends.attend(q, paged_kv, batch, "reference"),
        "flat": lambda: backends.attend(q, flat_kv, batch, "fast"),
        "sdpa": lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True),
    }


def time_decode_paths(batch_size: int = 8, context_len: int = 4096, *, warmup: int = 2,
                      repeats: int = 9, **shape) -> DecodePathTimings:
    """Median times of the four paths, measured round-robin in one run (fair on a busy
    machine: a slow moment hits every path, not just one)."""
    calls = decode_paths(batch_size, context_len, **shape)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    device = "cpu"
    for _ in range(repeats):
        for name, fn in calls.items():
            timing = measure(fn, warmup=0, repeats=1)
            times[name] += timing.times_s
            device = timing.device
    return DecodePathTimings(**{name: Timing(tuple(ts), device) for name, ts in times.items()})
