"""What every kernel shares: input checks, which keys a query sees, and where Triton runs.

The kernels take plain tensors, never a cache object:

    q             (B, H, D) one new token per sequence (decode), or (N, H, D) packed (prefill)
    k_pool,       (NB, Hkv, BS, D) one layer's block pool; block b of KV head h is the
    v_pool        contiguous (BS, D) tile pool[b, h]
    block_tables  (B, M) int32 block ids: token j of sequence b lives in block
                  block_tables[b, j // BS] at offset j % BS
    context_lens  (B,) int32 keys per sequence once this step's tokens are stored
    cu_query_lens (B+1,) int32 offsets: sequence b's queries are packed rows cu[b] .. cu[b+1]-1
    window        W (int) or None; sink_tokens k (int >= 0)

Which keys a query sees. The query at position p sees key j iff j <= p and (W is None or
p - j < W or j < k): its last W keys and the first k of its sequence (attention sinks). The
visible keys are two ranges, the sinks below the window and the window itself:

>>> visible_ranges(position=99, window=32, sink_tokens=4)
((0, 4), (68, 100))
>>> visible_ranges(position=10, window=32, sink_tokens=4)  # the window covers the sinks
((0, 0), (0, 11))
>>> visible_ranges(position=99, window=None, sink_tokens=0)
((0, 0), (0, 100))

A kernel walks the first range, then the second, and never reads a block outside both: a
windowed sequence's table holds a null block (or anything) in place of the blocks it freed.

NOTE: on a GPU the wrappers never read a device tensor back to the host (no `.item()`, no
`.tolist()`): that would synchronise with the GPU every step and forbid CUDA graphs. Checks
of values (`context_lens` in range) run only where the tensor is on the CPU; every launch
grid is computed from shapes.

Legend: B sequences, N packed query tokens, H query heads, Hkv KV heads, G = H / Hkv,
D head dim, NB blocks, BS block size, M blocks per table.
"""

from __future__ import annotations

import functools
import os

import torch

from kvlib.checks import require_int

try:
    import triton
    import triton.language as tl
except ImportError:  # kvlib imports without triton; every wrapper falls back to its reference
    triton = None

# NOTE: Triton decides when a kernel is decorated (at import) whether it is compiled for a GPU
# or run by the interpreter on any tensor; every kernel module follows that one decision.
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_DOT = 16  # tl.dot needs every dimension >= 16: small operands are padded to this


def visible_ranges(position: int, window: int | None, sink_tokens: int,
                   ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((0, sink_end), (window_start, position + 1)): the keys the query at `position` sees,
    as two half-open ranges, the first empty when the window reaches back over the sinks."""
    window_start = 0 if window is None else max(0, position - window + 1)
    return (0, min(sink_tokens, window_start)), (window_start, position + 1)


def window_or_all(window: int | None, max_len: int) -> int:
    """The window the kernels are launched with: None becomes `max_len`, the tables' capacity,
    which hides nothing (every key of a table is fewer than `max_len` positions back)."""
    return max_len if window is None else min(window, max_len)


def max_visible(window: int | None, sink_tokens: int, max_len: int) -> int:
    """The most keys one query can see in tables of `max_len` tokens: what splits are planned for.

    >>> max_visible(None, 0, 32768), max_visible(4096, 4, 32768), max_visible(4096, 4, 1024)
    (32768, 4100, 1024)
    """
    return max_len if window is None else min(max_len, window + sink_tokens)


def check_window(window: int | None, sink_tokens: int) -> None:
    if window is not None:
        require_int("window", window, minimum=1)
    require_int("sink_tokens", sink_tokens, minimum=0)


def check_pools(k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(f"expected pools (NB, Hkv, BS, D) of equal shape, got k_pool "
                         f"{tuple(k_pool.shape)}, v_pool {tuple(v_pool.shape)}")


def check_tables(block_tables: torch.Tensor, context_lens: torch.Tensor, num_seqs: int,
                 block_size: int) -> None:
    """Shapes always; the lengths' values only where they are on the CPU (see the NOTE)."""
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"expected block_tables (B={num_seqs}, M), got "
                         f"{tuple(block_tables.shape)}")
    if context_lens.shape != (num_seqs,):
        raise ValueError(f"expected context_lens (B={num_seqs},), got "
                         f"{tuple(context_lens.shape)}")
    if block_tables.dtype.is_floating_point or context_lens.dtype.is_floating_point:
        raise ValueError(f"block_tables and context_lens must be integers, got "
                         f"{block_tables.dtype} and {context_lens.dtype}")
    capacity = block_tables.shape[1] * block_size
    if context_lens.device.type == "cpu" and num_seqs:
        if bool((context_lens < 1).any()) or bool((context_lens > capacity).any()):
            raise ValueError(f"context_lens {context_lens.tolist()} must be in [1, {capacity}] "
                             f"for tables of {block_tables.shape[1]} blocks of {block_size}")


def check_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                 window: int | None = None, sink_tokens: int = 0) -> None:
    """q (B, H, D) over pools (NB, Hkv, BS, D), tables (B, M), lengths (B,)."""
    check_pools(k_pool, v_pool)
    if q.dim() != 3:
        raise ValueError(f"expected q (B, H, D), got {tuple(q.shape)}")
    check_heads(q, k_pool)
    check_tables(block_tables, context_lens, q.shape[0], k_pool.shape[2])
    check_window(window, sink_tokens)


def check_heads(q: torch.Tensor, k_pool: torch.Tensor) -> None:
    H, D = q.shape[1:]
    Hkv, Dk = k_pool.shape[1], k_pool.shape[3]
    if D != Dk or H % Hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit pools {tuple(k_pool.shape)}: head "
                         f"dims must match and H a multiple of Hkv")


def check_prefill(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                  cu_query_lens: torch.Tensor, window: int | None = None,
                  sink_tokens: int = 0) -> None:
    """q (N, H, D) packed, cu_query_lens (B+1,) over tables (B, M) and lengths (B,)."""
    check_pools(k_pool, v_pool)
    if q.dim() != 3:
        raise ValueError(f"expected packed q (N, H, D), got {tuple(q.shape)}")
    check_heads(q, k_pool)
    if cu_query_lens.dim() != 1 or cu_query_lens.shape[0] < 1:
        raise ValueError(f"expected cu_query_lens (B+1,), got {tuple(cu_query_lens.shape)}")
    B = cu_query_lens.shape[0] - 1
    check_tables(block_tables, context_lens, B, k_pool.shape[2])
    check_window(window, sink_tokens)
    if cu_query_lens.device.type == "cpu" and context_lens.device.type == "cpu":
        cu = cu_query_lens.long()
        lens = cu[1:] - cu[:-1]  # (B,)
        if int(cu[0]) != 0 or int(cu[-1]) != q.shape[0] or bool((lens < 1).any()) or bool(
                (lens > context_lens.long()).any()):
            raise ValueError(f"cu_query_lens {cu.tolist()} must rise from 0 to N={q.shape[0]} "
                             f"by query lengths in [1, context_lens] "
                             f"({context_lens.tolist()})")


def check_same_device(q: torch.Tensor, *tensors: torch.Tensor) -> None:
    """On a GPU, every input on q's device: a host tensor would be copied (and synchronised)
    at every launch."""
    for t in tensors:
        if t.device != q.device:
            raise ValueError(f"every input must be on q's device ({q.device}); got one on "
                             f"{t.device} (shape {tuple(t.shape)})")


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take this tensor: on a GPU, or anywhere when interpreted."""
    return triton is not None and (INTERPRETED or t.device.type == "cuda")


def interpreter_runs_kernels() -> bool:
    """Whether this Triton's interpreter can run the kernels here: their loops have run-time
    bounds, which the interpreter handles from Triton 3.9 on (3.6's fails; 3.9 is pinned)."""
    if triton is None:
        return False
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 9)


def require_triton_can_run() -> None:
    if INTERPRETED and not interpreter_runs_kernels():
        raise RuntimeError(f"Triton {triton.__version__}'s interpreter cannot run these kernels "
                           f"(loops with run-time bounds); use Triton >= 3.9 or a GPU")


def supports_block_size(block_size: int) -> bool:
    """Whether the Triton kernels take blocks of this many tokens: a power of two up to 128."""
    return 0 < block_size <= 128 and block_size & (block_size - 1) == 0


def pow2_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor): Triton's tiles have power-of-two sides.

    >>> pow2_at_least(4), pow2_at_least(5), pow2_at_least(4, floor=16)
    (4, 8, 16)
    """
    return max(floor, 1 << max(0, n - 1).bit_length())


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The GPU's streaming multiprocessors (132 on an H100 SXM); 2 under the interpreter,
    so that the tests there still cut rows into a few splits and exercise the merge."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def dot_dtype(dtype: torch.dtype):
    """The dtype the kernels' `tl.dot`s take: q's, except bf16 under the interpreter.

    NOTE: Triton 3.9's interpreter computes `tl.dot` of bf16 tiles wrongly (numpy has no
    bf16); there the tiles are widened to fp32 first. On a GPU bf16 goes to the tensor cores.
    """
    if dtype == torch.bfloat16 and INTERPRETED:
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep full precision in `tl.dot` (no tf32 rounding): the tests compare them
    with the reference at 1e-5."""
    return "ieee" if dtype == torch.float32 else "tf32"


if triton is not None:

    @triton.jit
    def visible_span(position, window, sink_tokens):
        """(sink_end, window_start, count) for the query at `position`: it sees keys
        [0, sink_end) and [window_start, position], `count` in all (see `visible_ranges`)."""
        window_start = tl.maximum(position - window + 1, 0)
        sink_end = tl.minimum(sink_tokens, window_start)
        return sink_end, window_start, sink_end + position + 1 - window_start

    @triton.jit
    def key_position(i, sink_end, window_start):
        """Position of the i-th visible key: the sinks first, then the window."""
        return tl.where(i < sink_end, i, i - sink_end + window_start)
