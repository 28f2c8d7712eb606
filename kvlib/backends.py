"""Attention backends: the one place that decides how a layer attends over what a cache holds.

The model computes packed queries (N, H, D) and asks the cache to `read` a layer; what comes
back is a `DenseKV` (flat caches: views) or a `PagedKV` (block pool and block tables). A
backend turns (queries, view, batch) into the attention output. Each is a plain function
registered by name in `BACKENDS`, so a chapter switches the model's attention in one line
(`model.attention = "chunked"`) without a copy of the model:

    reference   gathers a paged view into dense tensors, then `attention.attention`
                (materialises scores; the thing every fast path is tested against)
    sdpa        torch's scaled_dot_product_attention on dense tensors
    triton      the Triton kernels over paged views (a GPU, or the interpreter): split decode
                for decode steps, the paged prefill kernel for mixed steps; dense: sdpa
    fast        the fastest exact path on this device: `triton` on a GPU; on the CPU paged
                decode rows read their blocks in place (numba), chunks, dense views and pools
                of codes: sdpa (after dequantizing)
    chunked     `flash.chunked`: online softmax over tiles of keys (prefill) and split-KV
                decoding, in plain torch; dense or paged views, read in place

Other modules add theirs with `register`.
Legend: N packed tokens, B sequences, T new tokens per sequence, H query heads, Hkv KV
heads, D head dim, S keys.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch.nn import functional as F

from kvlib import flash
from kvlib.attention import attention, attention_mask
from kvlib.contract import DenseKV, KVView, PagedKV, StepBatch

Backend = Callable[[torch.Tensor, KVView, StepBatch], torch.Tensor]
BACKENDS: dict[str, Backend] = {}
# Backends that honour a view's sliding `window`, its sink tokens and a ring's `key_start`;
# any other is refused such a view rather than let attend to keys the layer must not see.
WINDOWED_BACKENDS = {"reference", "sdpa", "fast", "triton"}
# Backends that read values narrower than keys (latent attention's rows, kvlib.mla).
NARROW_VALUE_BACKENDS = {"reference", "sdpa", "fast", "triton"}


def register(name: str, fn: Backend) -> Backend:
    """Make `fn(q (N, H, D), kv, batch) -> (N, H, D)` selectable as `name`."""
    BACKENDS[name] = fn
    return fn


def attend(q: torch.Tensor, kv: KVView, batch: StepBatch, backend: str = "reference",
           ) -> torch.Tensor:
    """Attention of the batch's packed queries (N, H, D) over `kv`; returns (N, H, D)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known: {sorted(BACKENDS)}")
    if q.dim() != 3 or q.shape[0] != batch.num_tokens:
        raise ValueError(f"q must be (N={batch.num_tokens}, H, D), got {tuple(q.shape)}")
    windowed = kv.window is not None or getattr(kv, "key_start", None) is not None
    if windowed and backend not in WINDOWED_BACKENDS:
        raise ValueError(f"backend {backend!r} does not implement sliding windows (this "
                         f"layer's window: {kv.window}); use one of {sorted(WINDOWED_BACKENDS)}")
    narrow = (kv.v_pool if isinstance(kv, PagedKV) else kv.v).shape[-1] != q.shape[-1]
    if narrow and backend not in NARROW_VALUE_BACKENDS:
        raise ValueError(f"backend {backend!r} needs values as wide as keys (latent attention's "
                         f"are not); use one of {sorted(NARROW_VALUE_BACKENDS)}")
    return BACKENDS[backend](q, kv, batch)


def _per_sequence(q: torch.Tensor, dense: DenseKV, batch: StepBatch,
                  fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Run `fn(q (B, H, T, D), k, v, q_positions (B, T), kv_lens (B,), key_start=)` on
    rectangles (`key_start` (B,) or None: see `DenseKV`).

    A (B, T) batch is one call; a ragged batch is one call per sequence, each over its own
    keys only (a length known on the host: no device read).
    """
    N, H, D = q.shape
    T = batch.uniform_len
    starts = dense.key_start
    if T is not None:
        B = batch.num_seqs
        qb = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        out = fn(qb, dense.k, dense.v, batch.positions.view(B, T), dense.context_lens,
                 key_start=starts)  # (B, H, T, Dv)
        return out.transpose(1, 2).reshape(N, H, -1)  # (N, H, Dv)
    outs = []
    cu = batch.query_starts
    for b in range(batch.num_seqs):
        # keys row b holds: all its positions, or what its ring holds (at most S)
        n = batch.context_lens[b] if starts is None else dense.k.shape[2]
        qb = q[cu[b]:cu[b + 1]].transpose(0, 1)[None]  # (1, H, T_b, D)
        kb, vb = dense.k[b:b + 1, :, :n], dense.v[b:b + 1, :, :n]  # (1, Hkv, n, D)
        out = fn(qb, kb, vb, batch.positions[cu[b]:cu[b + 1]][None], dense.context_lens[b:b + 1],
                 key_start=None if starts is None else starts[b:b + 1])
        outs.append(out[0].transpose(0, 1))  # (T_b, H, Dv)
    return torch.cat(outs)  # (N, H, Dv)


def reference(q: torch.Tensor, kv: KVView, batch: StepBatch) -> torch.Tensor:
    """Gather (if paged), then the plain masked-softmax attention of `kvlib.attention`."""
    return _per_sequence(q, kv.dense(q.dtype), batch, partial(attention, window=kv.window,
                                                       sink_tokens=kv.sink_tokens))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
          kv_lens: torch.Tensor, window: int | None = None,
          key_start: torch.Tensor | None = None, sink_tokens: int = 0) -> torch.Tensor:
    S = k.shape[2]
    mask = attention_mask(q_positions, kv_lens, S, window, key_start, sink_tokens)  # (B, T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                          enable_gqa=True)  # (B, H, T, D)


def sdpa(q: torch.Tensor, kv: KVView, batch: StepBatch) -> torch.Tensor:
    """torch's fused attention on dense tensors (a paged view is gathered first)."""
    return _per_sequence(q, kv.dense(q.dtype), batch, partial(_sdpa, window=kv.window,
                                                       sink_tokens=kv.sink_tokens))


def _kernel_reads(kv: KVView) -> bool:
    """Whether the paged kernels read this view in place: blocks, with keys and values of one
    width (a latent cache's values are narrower: it goes to sdpa; FlashMLA is the kernel that
    reads latent rows in place)."""
    return isinstance(kv, PagedKV) and kv.v_pool.shape[-1] == kv.k_pool.shape[-1]


def triton(q: torch.Tensor, kv: KVView, batch: StepBatch) -> torch.Tensor:
    """The Triton kernels over a paged view, read in place: a pure decode step through the
    split decode kernel (`kvlib.kernels.paged_decode`), any other step -- prompt chunks beside
    decodes -- through the paged prefill kernel (`kvlib.kernels.paged_prefill`), one launch;
    both honour the layer's window and sinks. Dense views, and blocks that are not a power of
    two up to 128 tokens, go to sdpa. On a GPU, or anywhere under TRITON_INTERPRET=1."""
    from kvlib.kernels.common import supports_block_size
    from kvlib.kernels.paged_decode import paged_decode_triton
    from kvlib.kernels.paged_decode_int8 import paged_decode_quantized
    from kvlib.kernels.paged_prefill import paged_prefill_triton

    if not (_kernel_reads(kv) and supports_block_size(kv.block_size)):
        return sdpa(q, kv, batch)
    which = {"window": kv.window, "sink_tokens": kv.sink_tokens}
    if batch.uniform_len == 1 and kv.k_scale is None:
        return paged_decode_triton(q, kv.k_pool, kv.v_pool, kv.block_tables, kv.context_lens,
                                   **which)  # (N, H, D)
    if batch.uniform_len == 1:  # codes and scales, dequantized inside the kernel
        return paged_decode_quantized(q, kv.k_pool, kv.v_pool, kv.k_scale, kv.v_scale,
                                      kv.block_tables, kv.context_lens, **which)  # (N, H, D)
    return paged_prefill_triton(q, kv.k_pool, kv.v_pool, kv.block_tables, kv.context_lens,
                                batch.cu_query_lens, k_scale=kv.k_scale, v_scale=kv.v_scale,
                                **which)  # (N, H, D)


def fast(q: torch.Tensor, kv: KVView, batch: StepBatch) -> torch.Tensor:
    """The fastest exact path for the view and the device: on a GPU the Triton kernels
    (`triton`); on the CPU, paged decode rows read their blocks in place (numba) and prompt
    chunks go to sdpa; dense views to sdpa.

    On the CPU a mixed batch (an engine step: decodes beside prompt chunks) sends all its
    one-token rows to the paged decode kernel in one call, and only the chunks to sdpa.
    """
    if q.device.type == "cuda":
        return triton(q, kv, batch)
    if not _kernel_reads(kv) or kv.k_scale is not None:  # numba reads floats only
        return sdpa(q, kv, batch)
    from kvlib.kernels.paged_decode_cpu import paged_decode_numba

    which = {"window": kv.window, "sink_tokens": kv.sink_tokens}
    if batch.uniform_len == 1:
        return paged_decode_numba(q, kv.k_pool, kv.v_pool, kv.block_tables, kv.context_lens,
                                  **which)  # (B, H, D) = (N, H, D)
    decodes = [b for b, n in enumerate(batch.query_lens) if n == 1]  # one new token each
    if not decodes:
        return sdpa(q, kv, batch)
    cu = batch.query_starts  # (B+1,)
    out = torch.empty_like(q)  # (N, H, D)
    rows = torch.tensor(decodes, device=q.device)  # (Bd,)
    tok = torch.tensor([cu[b] for b in decodes], device=q.device)  # (Bd,) packed index
    out[tok] = paged_decode_numba(q[tok], kv.k_pool, kv.v_pool, kv.block_tables[rows],
                                  kv.context_lens[rows], **which)  # (Bd, H, D)
    for b in (b for b, n in enumerate(batch.query_lens) if n > 1):
        n = batch.context_lens[b]
        dense = PagedKV(kv.k_pool, kv.v_pool, kv.block_tables[b:b + 1],
                        kv.context_lens[b:b + 1]).dense()  # (1, Hkv, S_b, D): this row only
        qb = q[cu[b]:cu[b + 1]].transpose(0, 1)[None]  # (1, H, T_b, D)
        pos = batch.positions[cu[b]:cu[b + 1]][None]  # (1, T_b)
        ob = _sdpa(qb, dense.k[:, :, :n], dense.v[:, :, :n], pos, dense.context_lens, **which)
        out[cu[b]:cu[b + 1]] = ob[0].transpose(0, 1)  # (T_b, H, D)
    return out


register("reference", reference)
register("sdpa", sdpa)
register("triton", triton)
register("fast", fast)
register("chunked", flash.chunked)
