"""GPU decode measurements shared by chapter 7 and `bench/gpu_decode.py`.

One decode step of one layer: B sequences of S tokens, the same keys and values stored three
ways -- a paged pool with the blocks scattered (what a serving cache holds), a contiguous
(B, Hkv, S, D) cache, and an INT8 pool with per-token scales -- and four ways to attend:

    paged   kvlib's Triton kernel reading the blocks in place (kvlib.kernels.paged_decode)
    sdpa    torch's scaled_dot_product_attention(enable_gqa=True) on the contiguous cache
    gather  the blocks gathered into a contiguous copy, then sdpa (what paging costs naively)
    int8    the Triton kernel over the INT8 pool, dequantizing in registers

Each is timed as a median (`triton.testing.do_bench` on a GPU, which flushes the L2 cache
between calls; wall clock under the interpreter) and turned into bandwidth: bytes of bf16 K
and V per second, beside a device-to-device copy measured in the same run.

Legend: B sequences, S tokens each, H query heads, Hkv KV heads, D head dim, BS block size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from kvlib.bench import measure
from kvlib.cache.contract import PagedKV
from kvlib.kernels.paged_decode import paged_decode_attention
from kvlib.kernels.paged_decode_cpu import paged_decode_attention_ref
from kvlib.kernels.paged_decode_int8 import paged_decode_attention_int8, quantize_int8

# The shapes: (batch, tokens) per row, and the attention shape of Llama-3-8B.
ROWS = ((1, 32768), (8, 4096), (32, 4096), (64, 4096), (32, 16384), (128, 1024))


@dataclass(frozen=True)
class DecodeCase:
    """The same keys and values, stored contiguous, paged (blocks shuffled) and INT8."""

    q: torch.Tensor  # (B, H, D)
    k: torch.Tensor  # (B, Hkv, S, D) contiguous
    v: torch.Tensor
    paged: PagedKV  # pools (NB, Hkv, BS, D), NB = B * S / BS
    k8: torch.Tensor  # (NB, Hkv, BS, D) int8
    v8: torch.Tensor
    k_scale: torch.Tensor  # (NB, Hkv, BS) fp16
    v_scale: torch.Tensor

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V in the working dtype: what every path must read once."""
        return 2 * self.k.numel() * self.k.element_size()


def make_case(B: int, S: int, *, H: int = 32, Hkv: int = 8, D: int = 128, BS: int = 16,
              dtype: torch.dtype = torch.bfloat16, device: str = "cuda", seed: int = 0,
              ) -> DecodeCase:
    """Random queries, keys and values; the paged pool holds the same values, block by block,
    in a random order of blocks. S must be a multiple of BS (every block full)."""
    if S % BS:
        raise ValueError(f"S={S} must be a multiple of the block size {BS}")
    gen = torch.Generator(device=device).manual_seed(seed)
    M = S // BS  # blocks per sequence
    q = torch.randn(B, H, D, device=device, dtype=dtype, generator=gen)  # (B, H, D)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=gen)  # (B, Hkv, S, D)
    v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=gen)
    order = torch.randperm(B * M, device=device, generator=gen)  # (B*M,) where blocks go
    tables = order.view(B, M).to(torch.int32)  # (B, M)
    pools = []
    for x in (k, v):
        pool = torch.empty(B * M, Hkv, BS, D, device=device, dtype=dtype)  # (NB, Hkv, BS, D)
        pool[order] = x.view(B, Hkv, M, BS, D).transpose(1, 2).reshape(B * M, Hkv, BS, D)
        pools.append(pool)
    lens = torch.full((B,), S, dtype=torch.int32, device=device)  # (B,)
    (k8, k_scale), (v8, v_scale) = (quantize_int8(p, torch.float16) for p in pools)
    return DecodeCase(q, k, v, PagedKV(pools[0], pools[1], tables, lens), k8, v8, k_scale,
                      v_scale)


def decode_paths(case: DecodeCase, tile_n: int | None = None) -> dict:
    """The four ways to attend, as zero-argument callables returning (B, H, D)."""
    p = case.paged
    opts = {} if tile_n is None else {"tile_n": tile_n}
    q4 = case.q[:, :, None]  # (B, H, 1, D)
    return {
        "paged": lambda: paged_decode_attention(case.q, p.k_pool, p.v_pool, p.block_tables,
                                                p.context_lens, **opts),
        "sdpa": lambda: F.scaled_dot_product_attention(q4, case.k, case.v,
                                                       enable_gqa=True)[:, :, 0],
        "gather": lambda: _gather_sdpa(q4, p),
        "int8": lambda: paged_decode_attention_int8(case.q, case.k8, case.v8, case.k_scale,
                                                    case.v_scale, p.block_tables,
                                                    p.context_lens, **opts),
    }


def _gather_sdpa(q4: torch.Tensor, paged: PagedKV) -> torch.Tensor:
    dense = paged.dense()  # (B, Hkv, S, D) copies of every block
    return F.scaled_dot_product_attention(q4, dense.k, dense.v, enable_gqa=True)[:, :, 0]


def max_errors(case: DecodeCase, rows: int = 2) -> dict[str, float]:
    """Largest |path - fp32 reference| over the first `rows` sequences, for each path."""
    p = case.paged
    sl = slice(0, rows)
    ref = paged_decode_attention_ref(case.q[sl].float(), p.k_pool.float(), p.v_pool.float(),
                                     p.block_tables[sl], p.context_lens[sl])  # (rows, H, D)
    return {name: float((fn()[sl].float() - ref).abs().max())
            for name, fn in decode_paths(case).items()}


def time_ms(fn, device: torch.device) -> float:
    """Median milliseconds of `fn()`: do_bench on a GPU, a few wall-clock calls otherwise."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
    return measure(fn, warmup=0, repeats=1, device=device).median_ms


def copy_bandwidth(device: str = "cuda", gigabytes: float = 1.0) -> float:
    """TB/s of a device-to-device copy, counting bytes read and written."""
    dev = torch.device(device)
    n = int(gigabytes * 1e9) // 4
    src = torch.empty(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), dev)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e12


def measure_row(B: int, S: int, *, tile_ns=(None,), device: str = "cuda", **shape) -> dict:
    """One row of the benchmark: errors, median ms per path, and the data size.

    With several `tile_ns`, the paged and int8 kernels keep their best tile (and say which).
    """
    case = make_case(B, S, device=device, **shape)
    dev = torch.device(device)
    row = {"B": B, "S": S, "kv_GB": round(case.kv_bytes / 1e9, 4)}
    row.update({f"{k}_max_err": round(v, 5) for k, v in max_errors(case).items()})
    for tile_n in tile_ns:
        for name, fn in decode_paths(case, tile_n).items():
            if tile_n is not None and name in ("sdpa", "gather") and f"{name}_ms" in row:
                continue  # no tile to choose: time once
            ms = time_ms(fn, dev)
            if ms < row.get(f"{name}_ms", float("inf")):
                row[f"{name}_ms"] = round(ms, 4)
                if name in ("paged", "int8"):
                    row[f"{name}_tile_n"] = tile_n
    del case
    return row
