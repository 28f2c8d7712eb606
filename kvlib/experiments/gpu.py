"""GPU decode measurements shared by chapter 7 and `bench/gpu_decode.py`.

One decode step of one layer: B sequences of S tokens, the same keys and values stored three
ways -- a paged pool with the blocks scattered (what a serving cache holds), a contiguous
(B, Hkv, S, D) cache, and an INT8 pool with per-token scales -- and four ways to attend:

    paged   kvlib's Triton kernel reading the blocks in place (kvlib.kernels.paged_decode)
    sdpa    torch's scaled_dot_product_attention(enable_gqa=True) on the contiguous cache
    gather  the blocks gathered into a contiguous copy (one pass), then sdpa: paging, naively
    int8    the Triton kernel over the INT8 pool, dequantizing in registers

Each is timed as a median (`triton.testing.do_bench` on a GPU, which flushes the L2 cache
between calls; wall clock under the interpreter) and turned into bandwidth: bytes of bf16 K
and V per second, beside a device-to-device copy measured in the same run.

Legend: B sequences, S tokens each, H query heads, Hkv KV heads, D head dim, BS block size.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from kvlib.analysis import Hardware
from kvlib.bench import measure
from kvlib.cache.contract import PagedKV
from kvlib.experiments import recorded
from kvlib.kernels.paged_decode import (
    NUM_STAGES,
    NUM_WARPS,
    PROGRAMS_PER_SM,
    TILE_N,
    multiprocessors,
    paged_decode_attention,
    split_plan,
)
from kvlib.kernels.paged_decode_cpu import paged_decode_attention_ref
from kvlib.kernels.paged_decode_int8 import paged_decode_attention_int8, quantize_int8

# The shapes measured: (batch, tokens) per row, and the attention shape of Llama-3-8B.
ROWS = ((1, 32768), (8, 4096), (32, 4096), (64, 4096), (32, 16384), (128, 1024))

# Datasheet peaks (dense bf16, memory bandwidth) beside kvlib.analysis.GPUS.
H200 = Hardware("NVIDIA H200", 989e12, 4.8e12)

# Quoted, not measured by kvlib: an H200 run of 2026-11-26 made with other scripts;
# TB/s of bf16 K and V read per decode step, 32/8 heads of 128.
QUOTED_H200 = {"copy": (4.27, 4.27), "sdpa, 0.13 GB of KV": (2.7, 2.7),
               "sdpa, 0.5-2.1 GB": (3.9, 4.4), "gather + sdpa": (1.1, 1.3)}


def decode_attention_intensity(num_heads: int, num_kv_heads: int, bytes_per_element: float,
                               ) -> float:
    """FLOP per byte of decode attention: 2 * (H / Hkv) / bytes per element.

    Per cached token and KV head, a step reads a key row and a value row (2 D elements) and
    spends 2 D FLOPs on q.k and 2 D on p v for each of the G = H / Hkv query heads sharing
    them: 4 D G / (2 D b) = 2 G / b.

    >>> decode_attention_intensity(32, 8, 2)   # Llama-3-8B in bf16
    4.0
    >>> decode_attention_intensity(32, 8, 1)   # ... with INT8 keys and values
    8.0
    """
    return 2 * (num_heads / num_kv_heads) / bytes_per_element


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


@dataclass(frozen=True)
class KernelConfig:
    """How the paged kernels are launched: tile, warps, pipelining depth, and how many
    programs per multiprocessor the split plan aims at. The defaults are the float kernel's
    (the INT8 kernel's own default depth is `paged_decode_int8.INT8_NUM_STAGES`)."""

    tile_n: int = TILE_N
    num_warps: int = NUM_WARPS
    num_stages: int = NUM_STAGES
    programs_per_sm: int = PROGRAMS_PER_SM

    @property
    def key(self) -> str:
        """A short name: 'tile64 w4 s3 p2'."""
        return (f"tile{self.tile_n} w{self.num_warps} s{self.num_stages} "
                f"p{self.programs_per_sm}")

    def launch_options(self, case: DecodeCase) -> dict:
        """Keyword arguments for the kernels, the split count planned as the kernel does."""
        B, M = case.paged.block_tables.shape
        BS, Hkv = case.paged.k_pool.shape[2], case.paged.k_pool.shape[1]
        sms = multiprocessors(case.q.device)
        num_splits, _ = split_plan(M * BS, B * Hkv, max(self.tile_n, BS),
                                   self.programs_per_sm * sms)
        return dict(tile_n=self.tile_n, num_warps=self.num_warps, num_stages=self.num_stages,
                    num_splits=num_splits)


# The launch options `bench/gpu_decode.py --sweep full` tries for both kernels on every row:
# 36 configs, 12 compiled variants per kernel (the split count is a run-time argument).
SWEEP = tuple(KernelConfig(t, w, s, p) for t in (32, 64, 128) for w in (4, 8) for s in (2, 3)
              for p in (2, 4, 8))
# `--sweep candidates`: the runners-up of the full sweep and the defaults before it
# (tile 64, 4 warps, 3 stages, 4 programs per SM), timed again beside the defaults.
CANDIDATES = (KernelConfig(64, 4, 3, 4), KernelConfig(64, 4, 2, 4), KernelConfig(64, 4, 2, 8),
              KernelConfig(128, 4, 2, 2))


def decode_paths(case: DecodeCase, config: KernelConfig | None = None) -> dict:
    """The four ways to attend, as zero-argument callables returning (B, H, D)."""
    p = case.paged
    opts = {} if config is None else config.launch_options(case)
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


def gather(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """(NB, Hkv, BS, D) pool -> (B, Hkv, M*BS, D) contiguous, in one copy (every block full).

    `PagedKV.dense` (the reference) copies twice: index, then permute to head-major. Here
    the head index goes into the same advanced indexing, so the copy lands head-major.
    """
    B, M = block_tables.shape
    NB, Hkv, BS, D = pool.shape
    heads = torch.arange(Hkv, device=pool.device)[None, :, None]  # (1, Hkv, 1)
    tiles = pool[block_tables.long()[:, None, :], heads]  # (B, Hkv, M, BS, D)
    return tiles.view(B, Hkv, M * BS, D)


def _gather_sdpa(q4: torch.Tensor, paged: PagedKV) -> torch.Tensor:
    k = gather(paged.k_pool, paged.block_tables)  # (B, Hkv, S, D): a copy of every block
    v = gather(paged.v_pool, paged.block_tables)
    return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)[:, :, 0]


def max_errors(case: DecodeCase, rows: int = 2) -> dict[str, float]:
    """Largest |path - fp32 reference| over the first `rows` sequences, for each path."""
    p = case.paged
    sl = slice(0, rows)
    ref = paged_decode_attention_ref(case.q[sl].float(), p.k_pool.float(), p.v_pool.float(),
                                     p.block_tables[sl], p.context_lens[sl])  # (rows, H, D)
    return {name: float((fn()[sl].float() - ref).abs().max())
            for name, fn in decode_paths(case).items()}


def time_ms(fn, device: torch.device, rep_ms: int = 100) -> float:
    """Median milliseconds of `fn()`: do_bench on a GPU (`rep_ms` of repeats, L2 flushed
    before each), a few wall-clock calls otherwise."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    return measure(fn, warmup=0, repeats=1, device=device).median_ms


def time_graph_ms(fn, rep_ms: int = 100) -> float:
    """Median milliseconds of `fn()` replayed from a CUDA graph (`do_bench_cudagraph`): the
    GPU's own time, without the host's launch overhead (no L2 flush between calls)."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def copy_bandwidth(device: str = "cuda", gigabytes: float = 1.0) -> float:
    """TB/s of a device-to-device copy, counting bytes read and written."""
    dev = torch.device(device)
    n = int(gigabytes * 1e9) // 4
    src = torch.empty(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), dev)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e12


def time_decode_row(B: int, S: int, *, sweep: tuple[KernelConfig, ...] = (), rounds: int = 1,
                    graphs: bool = False, device: str = "cuda", **shape) -> dict:
    """One row of the benchmark: errors, median ms per path, and the data size.

    `paged_ms` and `int8_ms` time the kernels with their default launch options. The four
    paths are timed `rounds` times, interleaved, and each reports the median round and the
    spread (`<path>_ms_spread`: fastest and slowest). With a `sweep`, each kernel is also
    timed under every config (short runs, median of `rounds`); the fastest is timed again like
    the others and reported as `<path>_best_ms` with its config, and every config's time and
    largest difference from the default's output go in `sweep`. `sdpa_ms_again` times SDPA
    once more at the end, to show the drift between two runs of one thing. With `graphs`
    (CUDA only), every path is also timed replayed from a CUDA graph (`<path>_graph_ms`).
    """
    case = make_case(B, S, device=device, **shape)
    dev = torch.device(device)
    row = {"B": B, "S": S, "kv_GB": round(case.kv_bytes / 1e9, 4)}
    row.update({f"{k}_max_err": round(v, 5) for k, v in max_errors(case).items()})
    times = {name: [] for name in decode_paths(case)}
    for _ in range(rounds):
        for name, fn in decode_paths(case).items():
            times[name].append(time_ms(fn, dev))
    for name, ms in times.items():
        row[f"{name}_ms"] = round(sorted(ms)[len(ms) // 2], 4)
        if rounds > 1:
            row[f"{name}_ms_spread"] = [round(min(ms), 4), round(max(ms), 4)]
    if graphs and dev.type == "cuda":
        for name, fn in decode_paths(case).items():
            try:
                row[f"{name}_graph_ms"] = round(time_graph_ms(fn), 4)
            except Exception as exc:  # noqa: BLE001 - a path that cannot be captured says why
                row[f"{name}_graph_ms"] = None
                row[f"{name}_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if sweep:
        row["sweep"] = {}
        for name in ("paged", "int8"):
            default_out = decode_paths(case)[name]().float()
            config_ms, diffs = {}, {}
            for config in sweep:
                fn = decode_paths(case, config)[name]
                diffs[config.key] = float((fn().float() - default_out).abs().max())
                ms = sorted(time_ms(fn, dev, rep_ms=20) for _ in range(rounds))
                config_ms[config.key] = round(ms[len(ms) // 2], 4)
            best = min(config_ms, key=config_ms.get)
            config = next(c for c in sweep if c.key == best)
            ms = sorted(time_ms(decode_paths(case, config)[name], dev) for _ in range(rounds))
            row[f"{name}_best_ms"] = round(ms[len(ms) // 2], 4)
            row[f"{name}_best_config"] = best
            row["sweep"][name] = {"ms": config_ms, "max_diff_from_default": max(diffs.values())}
    row["sdpa_ms_again"] = round(time_ms(decode_paths(case)["sdpa"], dev), 4)
    del case
    return row


def kernel_source(name: str = "_split_kernel") -> str:
    """The source of one of `kvlib.kernels.paged_decode`'s kernels, read from the module's
    file (so it is shown even where Triton is not installed)."""
    from kvlib.kernels import paged_decode

    source = inspect.getsource(paged_decode)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            lines = source.splitlines()[node.lineno - 1:node.end_lineno]
            return textwrap.dedent("\n".join(lines))
    raise ValueError(f"no function {name!r} in {paged_decode.__file__}")


_INTERPRETER_CHECK = """
import json, torch
from kvlib.kernels.paged_decode import paged_decode_attention
from kvlib.kernels.paged_decode_cpu import paged_decode_attention_ref
gen = torch.Generator().manual_seed(0)
B, H, Hkv, D, BS, M = 3, 8, 2, 32, 16, 4
lens = torch.tensor([5, 33, 64], dtype=torch.int32)  # partial and full last blocks
tables = torch.randperm(B * M, generator=gen).view(B, M).to(torch.int32)
errors = {}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    q = torch.randn(B, H, D, generator=gen).to(dtype)
    k, v = torch.randn(2, B * M, Hkv, BS, D, generator=gen).to(dtype)
    ref = paged_decode_attention_ref(q.float(), k.float(), v.float(), tables, lens)
    out = paged_decode_attention(q, k, v, tables, lens, tile_n=16)
    errors[str(dtype).split(".")[1]] = float((out.float() - ref).abs().max())
print(json.dumps(errors))
"""


def interpreter_check() -> dict[str, float] | str:
    """Run the paged decode kernel under TRITON_INTERPRET=1 in a child process on tiny
    shapes (3 sequences, 8/2 heads of 32, blocks of 16) in fp32, fp16 and bf16; return the
    largest error against the reference per dtype, or a sentence saying why it could not run.
    """
    from kvlib.kernels.paged_decode import interpreter_runs_kernels, triton

    if triton is None:
        return "Triton is not installed here (pip install triton), so the check cannot run."
    if not interpreter_runs_kernels():
        return (f"Triton {triton.__version__}'s interpreter cannot run the kernel (loops with "
                f"run-time bounds need Triton >= 3.9), so the check is skipped here.")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env,
                         capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        return f"the interpreter run failed: {run.stderr.strip().splitlines()[-1]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def recorded_results(folder: str | Path | None = None) -> list[dict]:
    """Every `bench/results/gpu_decode_*.json` recorded so far: from `folder`, or wherever
    `kvlib.experiments.recorded` finds them (the repository, or the installed package)."""
    paths = (sorted(Path(folder).glob("gpu_decode_*.json")) if folder
             else recorded.files("gpu_decode_*.json"))
    return [json.loads(p.read_text()) for p in paths]
