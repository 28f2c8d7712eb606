"""GPU decode measurements shared by chapter 7 and `bench/gpu_decode.py`.

One decode step of one layer: B sequences of S tokens, the same keys and values stored
several ways -- a paged pool with the blocks scattered (what a serving cache holds), a
contiguous (B, Hkv, S, D) cache, and INT8 (and, where the GPU has FP8, e4m3) pools with an
fp32 scale per token and head (`kvlib.kernels.quant`) -- and ways to attend (`PATHS`):

    paged   kvlib's Triton kernel reading the blocks in place (kvlib.kernels.paged_decode)
    sdpa    torch's scaled_dot_product_attention(enable_gqa=True) on the contiguous cache
    gather  the blocks gathered into a contiguous copy (one pass), then sdpa: paging, naively
    int8    the Triton kernel over the INT8 pool (kvlib.kernels.paged_decode_int8), its
            default variant; int8_<variant> and fp8_<variant> the others

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from kvlib.bench import measure
from kvlib.experiments import recorded
from kvlib.kernels.paged_decode import DecodeLaunch, paged_decode_triton
from kvlib.kernels.paged_decode_int8 import INT8_LAUNCH, paged_decode_quantized
from kvlib.kernels.quant import quantize_kv
from kvlib.kernels.reference import paged_decode_ref

# The shapes measured: (batch, tokens) per row, and the attention shape of Llama-3-8B.
ROWS = ((1, 32768), (8, 4096), (32, 4096), (64, 4096), (32, 16384), (128, 1024))

# GPU datasheet peaks live in kvlib.analysis.GPUS; figures quoted from runs made elsewhere
# live in kvlib.experiments.quoted, apart from what this module measures.

# The quantized paths: pool ("int8" or "fp8") and launch. `int8` is the kernel's default.
QUANT_PATHS = {
    "int8": ("int8", INT8_LAUNCH),
    "int8_dot16": ("int8", INT8_LAUNCH.with_(variant="dot16")),
    "int8_i8dot": ("int8", INT8_LAUNCH.with_(variant="i8dot")),
    "int8_fma": ("int8", DecodeLaunch(tile_n=32, num_warps=4, num_stages=3, variant="fma")),
    "fp8": ("fp8", INT8_LAUNCH),
    "fp8_dot16": ("fp8", INT8_LAUNCH.with_(variant="dot16")),
    "fp8_fma": ("fp8", DecodeLaunch(tile_n=32, num_warps=4, num_stages=3, variant="fma")),
}
PATHS = ("paged", "sdpa", "gather", *QUANT_PATHS)
CHAPTER_PATHS = ("paged", "sdpa", "gather", "int8")  # what chapter 7's live cell times


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


def has_fp8(device: str | torch.device) -> bool:
    """Whether the kernels can widen e4m3 codes here: compute capability 8.9 (Ada) or newer,
    or the interpreter on a CPU."""
    dev = torch.device(device)
    return dev.type != "cuda" or torch.cuda.get_device_capability(dev) >= (8, 9)


@dataclass(frozen=True)
class DecodeCase:
    """The same keys and values, stored contiguous, paged (blocks shuffled), INT8 and FP8."""

    q: torch.Tensor  # (B, H, D)
    k: torch.Tensor  # (B, Hkv, S, D) contiguous
    v: torch.Tensor
    k_pool: torch.Tensor  # (NB, Hkv, BS, D), NB = B * S / BS
    v_pool: torch.Tensor
    block_tables: torch.Tensor  # (B, M) int32
    context_lens: torch.Tensor  # (B,) int32
    codes: dict  # "int8" / "fp8" -> (k codes, v codes, k scale, v scale), pools' layout

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V in the working dtype: what every path must read once."""
        return 2 * self.k.numel() * self.k.element_size()


def make_case(B: int, S: int, *, H: int = 32, Hkv: int = 8, D: int = 128, BS: int = 16,
              dtype: torch.dtype = torch.bfloat16, device: str = "cuda", seed: int = 0,
              quantized: tuple[str, ...] = ("int8", "fp8")) -> DecodeCase:
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
    formats = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
    codes = {}
    for name in quantized:
        (kq, ks), (vq, vs) = (quantize_kv(p, formats[name]) for p in pools)
        codes[name] = (kq, vq, ks, vs)
    return DecodeCase(q, k, v, pools[0], pools[1], tables, lens, codes)


def decode_paths(case: DecodeCase, launches: dict[str, DecodeLaunch] | None = None,
                 paths: tuple[str, ...] = PATHS) -> dict[str, Callable[[], torch.Tensor]]:
    """The ways to attend, as zero-argument callables returning (B, H, D); `launches`
    overrides a kernel path's launch options. Quantized paths whose pool the case lacks are
    left out."""
    launches = launches or {}
    q4 = case.q[:, :, None]  # (B, H, 1, D)
    fns = {
        "paged": lambda: paged_decode_triton(case.q, case.k_pool, case.v_pool,
                                             case.block_tables, case.context_lens,
                                             launch=launches.get("paged")),
        "sdpa": lambda: F.scaled_dot_product_attention(q4, case.k, case.v,
                                                       enable_gqa=True)[:, :, 0],
        "gather": lambda: _gather_sdpa(q4, case),
    }
    for name, (pool, launch) in QUANT_PATHS.items():
        if pool in case.codes:
            fns[name] = _quantized_path(case, pool, launches.get(name, launch))
    return {name: fns[name] for name in paths if name in fns}


def _quantized_path(case: DecodeCase, pool: str, launch: DecodeLaunch):
    kq, vq, ks, vs = case.codes[pool]
    return lambda: paged_decode_quantized(case.q, kq, vq, ks, vs, case.block_tables,
                                          case.context_lens, launch=launch)


def gather(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """(NB, Hkv, BS, D) pool -> (B, Hkv, M*BS, D) contiguous, in one copy (every block full).

    The reference gather copies twice: index, then permute to head-major. Here the head
    index goes into the same advanced indexing, so the copy lands head-major.
    """
    B, M = block_tables.shape
    NB, Hkv, BS, D = pool.shape
    heads = torch.arange(Hkv, device=pool.device)[None, :, None]  # (1, Hkv, 1)
    tiles = pool[block_tables.long()[:, None, :], heads]  # (B, Hkv, M, BS, D)
    return tiles.view(B, Hkv, M * BS, D)


def _gather_sdpa(q4: torch.Tensor, case: DecodeCase) -> torch.Tensor:
    k = gather(case.k_pool, case.block_tables)  # (B, Hkv, S, D): a copy of every block
    v = gather(case.v_pool, case.block_tables)
    return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)[:, :, 0]


def max_errors(case: DecodeCase, paths: tuple[str, ...] = PATHS, rows: int = 2,
               ) -> dict[str, float | str]:
    """Largest |path - fp32 reference| over the first `rows` sequences, for each path; for a
    path that raises (a kernel this GPU cannot compile), the error's text instead."""
    sl = slice(0, rows)
    ref = paged_decode_ref(case.q[sl].float(), case.k_pool.float(), case.v_pool.float(),
                           case.block_tables[sl], case.context_lens[sl])  # (rows, H, D)
    errors = {}
    for name, fn in decode_paths(case, paths=paths).items():
        try:
            errors[name] = float((fn()[sl].float() - ref).abs().max())
        except Exception as exc:  # noqa: BLE001 - an unattended run records it and goes on
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
    return errors


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


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def time_decode_row(B: int, S: int, *, paths: tuple[str, ...] = CHAPTER_PATHS,
                    rounds: int = 1, graphs: bool = False, device: str = "cuda",
                    case: DecodeCase | None = None, **shape) -> dict:
    """One row of the benchmark: errors, median ms per path, and the data size.

    The paths are timed `rounds` times, interleaved, and each reports the median round and
    the spread (`<path>_ms_spread`: fastest and slowest); a path that raises gets
    `<path>_error` instead of times. `sdpa_ms_again` times SDPA once
    more at the end, to show the drift between two runs of one thing. With `graphs` (CUDA
    only), every path is also timed replayed from a CUDA graph (`<path>_graph_ms`).
    """
    case = case or make_case(B, S, device=device, quantized=_pools_for(paths, device),
                             **shape)
    dev = torch.device(device)
    row = {"B": B, "S": S, "kv_GB": round(case.kv_bytes / 1e9, 4)}
    fns = decode_paths(case, paths=paths)
    for name, err in max_errors(case, paths).items():
        if isinstance(err, str):  # it raised: no time, the reason instead
            row[f"{name}_error"] = err
            del fns[name]
        else:
            row[f"{name}_max_err"] = round(err, 5)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, dev))
    for name, ms in times.items():
        row[f"{name}_ms"] = round(median(ms), 4)
        if rounds > 1:
            row[f"{name}_ms_spread"] = [round(min(ms), 4), round(max(ms), 4)]
    if graphs and dev.type == "cuda":
        for name, fn in fns.items():
            try:
                row[f"{name}_graph_ms"] = round(time_graph_ms(fn), 4)
            except Exception as exc:  # noqa: BLE001 - a path that cannot be captured says why
                row[f"{name}_graph_ms"] = None
                row[f"{name}_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if "sdpa" in fns:
        row["sdpa_ms_again"] = round(time_ms(fns["sdpa"], dev), 4)
    return row


def _pools_for(paths: tuple[str, ...], device: str) -> tuple[str, ...]:
    wanted = {QUANT_PATHS[p][0] for p in paths if p in QUANT_PATHS}
    return tuple(p for p in ("int8", "fp8") if p in wanted and (p != "fp8" or has_fp8(device)))


def sweep_kernel(case: DecodeCase, path: str, launches: list[DecodeLaunch], device: str,
                 rounds: int = 1, rep_ms: int = 20) -> dict:
    """Time one kernel path under each launch (short runs, median of `rounds`).

    Returns {"ms": {launch.key: ms}, "max_diff_from_default": float, "errors": {key: str}}:
    a launch that fails (a GPU without the resources, a compiler error) is recorded, not
    raised, so one bad config costs one entry of an unattended run.
    """
    dev = torch.device(device)
    default_out = decode_paths(case, paths=(path,))[path]().float()
    result = {"ms": {}, "max_diff_from_default": 0.0, "errors": {}}
    for launch in launches:
        fn = decode_paths(case, {path: launch}, paths=(path,))[path]
        try:
            diff = float((fn().float() - default_out).abs().max())
            ms = median([time_ms(fn, dev, rep_ms=rep_ms) for _ in range(rounds)])
        except Exception as exc:  # noqa: BLE001 - recorded, see the docstring
            result["errors"][launch.key] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        result["ms"][launch.key] = round(ms, 4)
        result["max_diff_from_default"] = max(result["max_diff_from_default"], diff)
    return result


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
from kvlib.kernels.paged_decode import DecodeLaunch, paged_decode_triton
from kvlib.kernels.reference import paged_decode_ref
gen = torch.Generator().manual_seed(0)
B, H, Hkv, D, BS, M = 3, 8, 2, 32, 16, 4
lens = torch.tensor([5, 33, 64], dtype=torch.int32)  # partial and full last blocks
tables = torch.randperm(B * M, generator=gen).view(B, M).to(torch.int32)
errors = {}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    q = torch.randn(B, H, D, generator=gen).to(dtype)
    k, v = torch.randn(2, B * M, Hkv, BS, D, generator=gen).to(dtype)
    ref = paged_decode_ref(q.float(), k.float(), v.float(), tables, lens)
    out = paged_decode_triton(q, k, v, tables, lens, launch=DecodeLaunch(tile_n=16))
    errors[str(dtype).split(".")[1]] = float((out.float() - ref).abs().max())
print(json.dumps(errors))
"""


def interpreter_check() -> dict[str, float] | str:
    """Run the paged decode kernel under TRITON_INTERPRET=1 in a child process on tiny
    shapes (3 sequences, 8/2 heads of 32, blocks of 16) in fp32, fp16 and bf16; return the
    largest error against the reference per dtype, or a sentence saying why it could not run.
    """
    from kvlib.kernels.common import interpreter_runs_kernels, triton

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


def bandwidth_ranges(result: dict) -> dict[str, tuple[float, float]]:
    """A recorded run's (low, high) TB/s per path, by the labels of the quoted figures
    (`kvlib.experiments.quoted`), so the two compare like with like: K and V bytes over each
    path's whole time, "gather + sdpa" included, and the copy's reads and writes."""
    rows = result["rows"]

    def span(path: str, keep) -> tuple[float, float]:
        tbps = [r["kv_GB"] / r[f"{path}_ms"] for r in rows if keep(r)]  # GB/ms = TB/s
        return min(tbps), max(tbps)

    return {"copy": (result["copy_TBps"], result["copy_TBps"]),
            "sdpa, 0.13 GB of KV": span("sdpa", lambda r: r["kv_GB"] < 0.2),
            "sdpa, 0.5-2.1 GB": span("sdpa", lambda r: r["kv_GB"] >= 0.5),
            "gather + sdpa": span("gather", lambda r: True)}


def graph_savings_us(result: dict, paths: tuple[str, ...] = ("paged", "sdpa", "gather", "int8"),
                     ) -> dict[str, list[float]]:
    """Microseconds each path saved per row when replayed from a CUDA graph (eager minus
    graph; negative where the graph was slower), for a run recorded with `--graphs`."""
    return {p: [round((r[f"{p}_ms"] - r[f"{p}_graph_ms"]) * 1e3, 1) for r in result["rows"]]
            for p in paths}


def recorded_results(folder: str | Path | None = None) -> list[dict]:
    """Every `bench/results/gpu_decode_*.json` recorded so far: from `folder`, or wherever
    `kvlib.experiments.recorded` finds them (the repository, or the installed package)."""
    paths = (sorted(Path(folder).glob("gpu_decode_*.json")) if folder
             else recorded.files("gpu_decode_*.json"))
    return [json.loads(p.read_text()) for p in paths]
