"""The measurements the book's chapters and the `bench/` scripts share.

Each function builds what it times (a model's cache, a filled flat cache), times it with
`kvlib.bench.measure`, and returns `Timing`s, so a chapter and a benchmark script report the
same experiment. Random inputs come from a seeded generator: runs differ only in timing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvlib.attention import decode_attention
from kvlib.bench import Timing, measure, progress
from kvlib.cache.flat import FlatKVCache
from kvlib.config import CacheConfig, Layout, ModelConfig
from kvlib.contract import append
from kvlib.model import TransformerLM

# The random-weight model the chapters and benchmarks time: Llama-shaped (GQA, SwiGLU),
# small enough that an uncached step at 2,048 tokens takes seconds, not minutes, on a CPU.
DEMO_CONFIG = ModelConfig(vocab_size=8192, d_model=256, num_layers=4, num_heads=8,
                          num_kv_heads=2, ffn_dim=768, max_seq_len=4096, name="kvlib-demo")


def demo_model(config: ModelConfig = DEMO_CONFIG, *, seed: int = 0,
               device: str = "cpu", dtype: torch.dtype = torch.float32) -> TransformerLM:
    """A seeded random-weight model in eval mode: same weights on every run and machine."""
    torch.manual_seed(seed)
    return TransformerLM(config).to(device=device, dtype=dtype).eval()


@dataclass(frozen=True)
class DecodeTimings:
    """Per-token decode time at each context length, with and without a cache."""

    cached: dict[int, Timing]
    uncached: dict[int, Timing]

    @property
    def speedup_by_len(self) -> dict[int, float]:
        """Median uncached time / median cached time, per context length."""
        return {s: self.uncached[s].median_s / self.cached[s].median_s for s in self.cached}


@torch.no_grad()
def time_decode_step(model: TransformerLM, context_len: int, *, cached: bool,
                     batch_size: int = 1, warmup: int = 1, repeats: int = 5,
                     seed: int = 0) -> Timing:
    """Time producing one new token after `context_len` tokens.

    Without a cache that is a forward pass over all context_len + 1 tokens. With one, the
    context is prefilled once (untimed) and each timed call is one `decode_step`; each call
    appends a token, so the context grows by at most warmup + repeats tokens while timing.
    """
    device = model.embed.weight.device
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch_size, context_len + 1), generator=gen).to(device)
    if not cached:
        return measure(lambda: model.next_token_logits(tokens), warmup=warmup,
                       repeats=repeats, device=device)
    cache = model.new_cache(batch_size, context_len + warmup + repeats + 1)
    model.prefill(tokens[:, :context_len], cache)
    last = tokens[:, -1]  # (B,)
    return measure(lambda: model.decode_step(last, cache), warmup=warmup, repeats=repeats,
                   device=device)


def decode_timings(model: TransformerLM, context_lens: Sequence[int], *, batch_size: int = 1,
                   warmup: int = 1, repeats: int = 5, show_progress: bool = True) -> DecodeTimings:
    """`time_decode_step` with and without a cache at each context length."""
    cached, uncached = {}, {}
    for s in progress(list(context_lens), desc="decode step", enabled=show_progress):
        kwargs = {"batch_size": batch_size, "warmup": warmup, "repeats": repeats}
        cached[s] = time_decode_step(model, s, cached=True, **kwargs)
        uncached[s] = time_decode_step(model, s, cached=False, **kwargs)
    return DecodeTimings(cached=cached, uncached=uncached)


@dataclass(frozen=True)
class PathAgreement:
    """Cached against uncached generation of the same prompts, step by step.

    `max_logit_gap` is the largest |cached - uncached| logit over the steps both runs reached
    with the same tokens so far (after a different token, the two continue different texts);
    `diverged_at[i]` is the first step where prompt i's tokens differ, or None.
    """

    max_logit_gap: float
    logit_spread: float  # largest logit minus smallest, for scale
    diverged_at: tuple[int | None, ...]


@torch.no_grad()
def cached_vs_uncached(model: TransformerLM, prompts: torch.Tensor,
                       new_tokens: int) -> PathAgreement:
    """Generate greedily from each row of `prompts` (B, P) with and without a cache."""
    plain = model.generate(prompts, new_tokens)  # (B, N) tokens, (B, N, V) logits
    cache = model.new_cache(prompts.shape[0], prompts.shape[1] + new_tokens)
    cached = model.generate(prompts, new_tokens, cache=cache)
    gap, diverged = 0.0, []
    for b in range(prompts.shape[0]):
        differ = (plain.tokens[b] != cached.tokens[b]).nonzero().flatten().tolist()
        first = differ[0] if differ else None
        same_prefix = slice(0, new_tokens if first is None else first + 1)  # (steps,)
        diff = plain.logits[b, same_prefix].float() - cached.logits[b, same_prefix].float()
        gap = max(gap, float(diff.abs().max()))
        diverged.append(first)
    logits = plain.logits.float()
    return PathAgreement(gap, float(logits.max() - logits.min()), tuple(diverged))


def filled_flat_cache(config: CacheConfig, context_lens: Sequence[int],
                      seed: int = 0) -> FlatKVCache:
    """A flat cache whose slot b holds `context_lens[b]` random tokens in every layer."""
    if len(context_lens) > config.max_batch_size:
        raise ValueError(f"{len(context_lens)} context lengths for max_batch_size "
                         f"{config.max_batch_size}")
    cache = FlatKVCache(config)
    gen = torch.Generator().manual_seed(seed)
    shape = (config.num_kv_heads, config.head_dim)
    for slot, n in enumerate(context_lens):
        if n == 0:
            continue
        k, v = (torch.randn(config.num_layers, 1, shape[0], n, shape[1], generator=gen)
                .to(config.dtype).to(config.device) for _ in range(2))  # (L, 1, Hkv, n, D)
        append(cache, [slot], k, v)
    return cache


@torch.no_grad()
def time_decode_attention(layout: Layout, *, context_len: int, batch_size: int = 4,
                          num_heads: int = 32, num_kv_heads: int = 8, head_dim: int = 128,
                          dtype: torch.dtype = torch.float32, device: str = "cpu",
                          warmup: int = 2, repeats: int = 7) -> Timing:
    """Time `decode_attention` over a filled one-layer flat cache, read through views.

    The caller copies nothing; torch.matmul itself copies SEQ_MAJOR views (`time_layouts`).
    """
    attend, _ = _layout_calls(layout, context_len, batch_size, num_heads, num_kv_heads,
                              head_dim, dtype, device)
    return measure(attend, warmup=warmup, repeats=repeats, device=device)


# ---------------------------------------------------------------------------------------------
# Layouts: what a decode step reads, copies and writes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorCopy:
    """One copy torch made: the aten op, the shape and strides it wrote, and the bytes."""

    op: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    nbytes: int

    @property
    def num_runs(self) -> int:
        """Separate contiguous runs of memory written: dims chain from stride 1 outwards.

        A (Hkv=8, T=1, D=128) write with strides (128, 2048, 1) is one run of 1,024
        elements (heads adjacent); with strides (65536, 128, 1), 8 runs of 128.

        >>> TensorCopy("aten.copy_", (8, 1, 128), (128, 2048, 1), 4096).num_runs
        1
        >>> TensorCopy("aten.copy_", (8, 1, 128), (65536, 128, 1), 4096).num_runs
        8
        """
        run = 1  # elements in one run so far
        for stride, size in sorted((st, sz) for sz, st in zip(self.shape, self.stride) if sz > 1):
            if stride != run:
                break
            run *= size
        return math.prod(self.shape) // run


# Ops that write tensor data somewhere new: copies, and gathers by index (a paged cache
# gathered into contiguous tensors shows up as aten.index).
_COPY_OPS = ("aten.clone", "aten.copy_", "aten._to_copy", "aten.index", "aten.index_select",
             "aten.gather")


class _CopyRecorder(TorchDispatchMode):
    """Sees every aten op below autograd; keeps the ones that copy tensor data."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[TensorCopy] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func.overloadpacket) in _COPY_OPS and isinstance(out, torch.Tensor):
            self.copies.append(TensorCopy(str(func.overloadpacket), tuple(out.shape),
                                          out.stride(), out.numel() * out.element_size()))
        return out


def recorded_copies(fn: Callable[[], Any]) -> list[TensorCopy]:
    """Run `fn` once; list every tensor copy torch made inside it, in order.

    Composite ops such as `torch.matmul` and `reshape` are seen as the aten ops they run, so a
    copy torch makes behind the scenes shows up here. An in-place write (`aten.copy_`, as in
    `t[i] = x`) reports the destination's shape and strides.

    >>> x = torch.zeros(2, 3, 4)                            # (2, 3, 4), strides (12, 4, 1)
    >>> recorded_copies(lambda: x.reshape(6, 4))            # dims fold: a view, no copy
    []
    >>> recorded_copies(lambda: x.transpose(0, 1).reshape(6, 4))  # (3, 2, 4) can't fold
    [TensorCopy(op='aten.clone', shape=(3, 2, 4), stride=(8, 4, 1), nbytes=96)]
    """
    with _CopyRecorder() as recorder:
        fn()
    return recorder.copies


def matmul_batches(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batches of matrices torch.matmul hands to BLAS for Q K^T and for P V.

    matmul folds the batch dims (B, Hkv) into one with `reshape`: a free view when they fold
    into a single stride (HEAD_MAJOR: batch stride = Hkv x head stride), a copy into new
    contiguous memory when they don't (SEQ_MAJOR: head stride D, batch stride S * 2 * Hkv * D).
    This is those two reshapes, alone: k, v (B, Hkv, S, D) -> (B*Hkv, D, S), (B*Hkv, S, D).
    """
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected k, v (B, Hkv, S, D) of equal shape, got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}")
    B, Hkv, S, D = k.shape
    return k.transpose(-1, -2).reshape(B * Hkv, D, S), v.reshape(B * Hkv, S, D)


def _layout_calls(layout: Layout, context_len: int, batch_size: int, num_heads: int,
                  num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  device: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """On one filled one-layer cache: (decode attention over it, `matmul_batches` alone)."""
    config = CacheConfig(num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         max_batch_size=batch_size, max_seq_len=context_len, dtype=dtype,
                         device=torch.device(device), layout=layout)
    cache = filled_flat_cache(config, [context_len] * batch_size)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch_size, num_heads, head_dim, generator=gen).to(dtype).to(device)
    lens = cache.lengths(range(batch_size))  # (B,)
    k, v = cache.keys(0), cache.values(0)  # (B, Hkv, S, D) views in the layout's strides
    return (lambda: decode_attention(q, k, v, lens)), (lambda: matmul_batches(k, v))


@torch.no_grad()
def time_contiguous_copy(layout: Layout, *, context_len: int, batch_size: int = 4,
                         num_kv_heads: int = 8, head_dim: int = 128,
                         dtype: torch.dtype = torch.float32, device: str = "cpu",
                         warmup: int = 2, repeats: int = 7) -> Timing:
    """Time `matmul_batches` on a filled cache like `time_decode_attention`'s: in SEQ_MAJOR,
    the copy of K and V every decode step makes; in HEAD_MAJOR, two views and no copy."""
    _, fold = _layout_calls(layout, context_len, batch_size, num_kv_heads,  # (no q needed)
                            num_kv_heads, head_dim, dtype, device)
    return measure(fold, warmup=warmup, repeats=repeats, device=device)


@torch.no_grad()
def time_append(layout: Layout, *, max_seq_len: int = 4096, batch_size: int = 4,
                num_kv_heads: int = 8, head_dim: int = 128, dtype: torch.dtype = torch.float32,
                device: str = "cpu", warmup: int = 2, repeats: int = 7) -> Timing:
    """Time appending one token per sequence to a one-layer flat cache: begin, write, commit.

    Each call writes one new token's K and V for every head of `batch_size` slots, at the next
    position: in SEQ_MAJOR one run of 2 * Hkv * D elements per slot; in HEAD_MAJOR 2 * Hkv
    runs of D, S * D elements apart.
    """
    if warmup + repeats > max_seq_len:
        raise ValueError(f"{warmup + repeats} appends do not fit max_seq_len {max_seq_len}")
    cache = FlatKVCache(CacheConfig(num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                    max_batch_size=batch_size, max_seq_len=max_seq_len,
                                    dtype=dtype, device=torch.device(device), layout=layout))
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, batch_size, num_kv_heads, 1, head_dim, generator=gen)
            .to(dtype).to(device) for _ in range(2))  # (L=1, B, Hkv, T=1, D)
    seq_ids = list(range(batch_size))
    return measure(lambda: append(cache, seq_ids, k, v), warmup=warmup, repeats=repeats,
                   device=device)


@dataclass(frozen=True)
class LayoutTimings:
    """Decode attention time and `matmul_batches` time per layout and context length."""

    attention: dict[Layout, dict[int, Timing]]
    copy: dict[Layout, dict[int, Timing]]

    @property
    def copy_share_by_len(self) -> dict[int, float]:
        """SEQ_MAJOR's copy time / the gap between the layouts' attention times (medians)."""
        seq, head = Layout.SEQ_MAJOR, Layout.HEAD_MAJOR
        return {s: self.copy[seq][s].median_s
                / (self.attention[seq][s].median_s - self.attention[head][s].median_s)
                for s in self.attention[seq]}


@torch.no_grad()
def time_layouts(context_lens: Sequence[int], *, batch_size: int = 4, num_heads: int = 32,
                 num_kv_heads: int = 8, head_dim: int = 128, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", warmup: int = 2, repeats: int = 9,
                 show_progress: bool = True) -> LayoutTimings:
    """Decode attention and `matmul_batches` on both layouts at each context length.

    At each length the four calls take turns, one timed call each per round, so load from
    elsewhere on a shared machine falls on all four alike instead of on one whole series.
    """
    attention: dict[Layout, dict[int, Timing]] = {lay: {} for lay in Layout}
    copy: dict[Layout, dict[int, Timing]] = {lay: {} for lay in Layout}
    for s in progress(list(context_lens), desc="layouts", enabled=show_progress):
        calls = {lay: _layout_calls(lay, s, batch_size, num_heads, num_kv_heads, head_dim,
                                    dtype, device) for lay in Layout}
        times = {(lay, i): [] for lay in Layout for i in range(2)}  # (layout, call): seconds
        for round_ in range(warmup + repeats):
            for (lay, i), ts in times.items():
                timing = measure(calls[lay][i], warmup=0, repeats=1, device=device)
                if round_ >= warmup:
                    ts.append(timing.times_s[0])
        for lay in Layout:
            attention[lay][s] = Timing(times_s=tuple(times[lay, 0]), device=timing.device)
            copy[lay][s] = Timing(times_s=tuple(times[lay, 1]), device=timing.device)
    return LayoutTimings(attention=attention, copy=copy)
