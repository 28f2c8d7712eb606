"""QuantizedKVCache: a flat or paged cache that stores codes and scales, not numbers.

Composition, not a subclass: an inner cache (flat or paged, any `KVCache`) does what it
always does -- lengths, room, slot mapping, block tables, fork, copy-on-write, release --
but its rows are *bytes*. Each (token, KV head) row holds, llama.cpp-style, the codes of the
D channels followed by their scales and zero points:

    row = [ codes: D bytes (int8, fp8) or D/2 (int4) | scales | zero points ]

so the memory saved is memory really saved, and paging or forking a quantized sequence is
paging or forking its rows. Writing quantizes, reading dequantizes the layer to a `DenseKV`
(a fused kernel that dequantizes while it attends is the GPU chapter's business).

Scales live where their granularity puts them:
  - per token (groups of channels): in the token's own row;
  - per channel (groups of G tokens, KIVI's keys): one group's D scales are spread over the
    group's G rows (ceil(D / G) each), written when the group's last token arrives; until
    then its tokens are read from the full-precision tail;
  - per head / per tensor (vLLM's FP8): one scale per layer, calibrated on the first write
    of that layer and fixed after it (later values beyond it are clipped).

The full-precision tail holds each sequence's C = max(window, G - 1) most recent tokens in
the model's dtype: the `window` most recent tokens are read from it, as are the tokens of a
group not yet complete. Every token also has its quantized row (the tail is a copy), which
the byte accounting (`memory`) counts.

Legend: L layers, B sequences, N packed tokens, Hkv KV heads, S keys, D head dim,
G tokens per scale group, C tail length, W row bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from kvlib.cache.flat import FlatKVCache
from kvlib.cache.quant_memory import KVQuantConfig, Memory, RowLayout, memory, row_layout
from kvlib.cache.quantize import (
    blocked,
    compute_params,
    decode,
    encode,
    pack_int4,
    unblocked,
    unpack_int4,
)
from kvlib.checks import require_int
from kvlib.config import CacheConfig
from kvlib.contract import DenseKV, KVCache, StepBatch, check_new_kv

BYTE = torch.float8_e4m3fn  # the inner cache's 1-byte element type; its bits are never read as floats


@dataclass
class _Open:
    """The open step: what `abort` must put back."""

    step: int
    tails: dict[int, torch.Tensor | None]  # seq_id -> its tail before the step (None: new)
    calibrated: list[tuple[int, int]]  # (layer, 0 for K / 1 for V) calibrated in this step
    written: set[int]  # layers written in this step


class QuantizedKVCache:
    """Quantize on write, dequantize on read, over an inner cache of byte rows.

    Args:
        config: the cache as the model sees it (layers, KV heads, head dim, dtype of keys).
        quant: the schemes for keys and values and the full-precision window.
        inner: makes the inner cache from a CacheConfig (`FlatKVCache`, or e.g.
            `lambda c: PagedKVCache(c, num_blocks=64)`).
    """

    def __init__(self, config: CacheConfig, quant: KVQuantConfig,
                 inner: Callable[[CacheConfig], KVCache] = FlatKVCache) -> None:
        if not isinstance(quant, KVQuantConfig):
            raise ValueError(f"quant must be a KVQuantConfig, got {type(quant).__name__}")
        if config.kv_cache_dtype != "auto":
            raise ValueError(f"config.kv_cache_dtype is {config.kv_cache_dtype!r}: a paged cache "
                             f"of codes already; a QuantizedKVCache takes a config of values")
        if quant.window > config.max_seq_len:
            raise ValueError(f"window {quant.window} is larger than the cache "
                             f"(max_seq_len {config.max_seq_len})")
        self.config, self.quant = config, quant
        D = config.head_dim
        self.layouts = (row_layout(quant.keys, D), row_layout(quant.values, D))
        self.row_bytes = max(lay.row_bytes for lay in self.layouts)
        self.group = quant.token_group  # G: 1 unless a scheme shares scales across tokens
        self.tail_len = quant.tail_len  # C
        self.inner = inner(replace(config, head_dim=self.row_bytes, dtype=BYTE))
        if not isinstance(self.inner, FlatKVCache) and config.block_size % self.group:
            raise ValueError(f"block_size {config.block_size} must be a multiple of the token "
                             f"group {self.group}: a group's rows must share one block")
        self._tails: dict[int, torch.Tensor] = {}  # seq_id -> (L, 2, Hkv, C, D)
        self._static: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._open: _Open | None = None

    # -- the cache contract -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def lengths(self, seq_ids: Sequence[int]) -> torch.Tensor:
        return self.inner.lengths(seq_ids)

    def begin(self, seq_ids: Sequence[int], query_lens: Sequence[int],
              token_ids: torch.Tensor | None = None) -> StepBatch:
        seq_ids = list(seq_ids)
        batch = self.inner.begin(seq_ids, query_lens, token_ids)  # raises, changing nothing
        cfg = self.config
        saved = {s: (self._tails[s].clone() if s in self._tails else None) for s in seq_ids}
        for s in seq_ids:
            if s not in self._tails and self.tail_len:
                self._tails[s] = torch.zeros(cfg.num_layers, 2, cfg.num_kv_heads, self.tail_len,
                                             cfg.head_dim, dtype=cfg.dtype, device=cfg.device)
        self._open = _Open(batch.step, saved, [], set())
        return batch

    def write(self, layer: int, batch: StepBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        require_int("layer", layer, minimum=0, maximum=self.num_layers - 1)
        self._check_open(batch)
        cfg = self.config
        check_new_kv(k, v, batch.num_tokens, cfg.num_kv_heads, cfg.head_dim, cfg.dtype,
                     cfg.device)
        k, v = k.detach(), v.detach()
        # Rows to (re)write: from the start of each sequence's incomplete group to its end,
        # so a group completed in this step is written whole (its scales need all G tokens).
        starts, cu = batch.starts, batch.query_starts
        xs, slots = ([], []), []
        for b, s in enumerate(batch.seq_ids):
            start, lo = starts[b], starts[b] - starts[b] % self.group
            new_slots = batch.slot_mapping[:, cu[b]:cu[b + 1]]  # (G, T_b), a row per group
            # NOTE: positions lo..start-1 lie in start's block (block_size % G == 0), just
            # before it, and `begin` made that block private: rewriting them cannot touch a
            # forked sibling.
            back = torch.arange(lo - start, 0, device=new_slots.device)  # (start - lo,)
            slots.append(torch.cat([new_slots[:, :1] + back, new_slots], dim=1))
            # NOTE: old positions come from the tail as `begin` saved it, so writing a layer
            # twice in one step writes the same rows again.
            before = self._open.tails[s]
            for kind, new in enumerate((k, v)):
                old = self._tail_rows(before, layer, kind, lo, start)  # (start - lo, Hkv, D)
                xs[kind].append(torch.cat([old, new[cu[b]:cu[b + 1]]]))  # (n_b, Hkv, D)
        rows = [self._encode_rows(layer, kind, xs[kind], batch) for kind in (0, 1)]
        slot_mapping = torch.cat(slots, dim=1)  # (G, N')
        wide = replace(batch, slot_mapping=slot_mapping,
                       positions=torch.zeros_like(slot_mapping[0]))  # only the count is read
        self.inner.write(layer, wide, rows[0].view(BYTE), rows[1].view(BYTE))  # (N', Hkv, W)
        for b, s in enumerate(batch.seq_ids):
            self._to_tail(s, layer, k[cu[b]:cu[b + 1]], v[cu[b]:cu[b + 1]], starts[b])
        self._open.written.add(layer)

    def read(self, layer: int, batch: StepBatch) -> DenseKV:
        self._check_open(batch)
        rows = self.inner.read(layer, batch).dense()  # (B, Hkv, S', W) bytes, S' >= S
        S = max(batch.context_lens)
        rows = replace(rows, k=rows.k[:, :, :S], v=rows.v[:, :, :S])  # (B, Hkv, S, W)
        # NOTE: before this layer writes the step, only the committed tokens are stored (a
        # group the new tokens would complete has no rows yet): read those, the rest is
        # unwritten, as in any cache.
        lens = batch.context_lens if layer in self._open.written else batch.starts
        out = []
        for kind, data in enumerate((rows.k, rows.v)):
            x = self._decode_rows(layer, kind, data.view(torch.uint8))  # (B, Hkv, S, D)
            for b, s in enumerate(batch.seq_ids):  # the recent tokens, in full precision
                lo = self.quant.first_tail_position(lens[b])
                if lo < lens[b]:
                    x[b, :, lo:lens[b]] = self._tail_rows(self._tails[s], layer, kind, lo,
                                                          lens[b]).transpose(0, 1)
            out.append(x)
        return DenseKV(out[0], out[1], rows.context_lens.long(), self.config.window(layer),
                       self.config.sink_tokens)

    def commit(self, batch: StepBatch) -> None:
        self.inner.commit(batch)
        self._open = None

    def abort(self, batch: StepBatch) -> None:
        self.inner.abort(batch)
        if self._open is not None:
            for s, tail in self._open.tails.items():
                if tail is None:
                    self._tails.pop(s, None)
                else:
                    self._tails[s] = tail
            for key in self._open.calibrated:
                del self._static[key]
        self._open = None

    def fork(self, src: int, dst: int) -> None:
        self.inner.fork(src, dst)
        if src in self._tails:
            self._tails[dst] = self._tails[src].clone()

    def release(self, seq_ids: Sequence[int]) -> None:
        self.inner.release(seq_ids)
        for s in seq_ids:
            self._tails.pop(s, None)

    # -- the scheduler's protocol (KVCacheManager), when the inner cache is paged ---------------
    # NOTE: over a flat cache these raise AttributeError (a flat cache has no blocks), so
    # `isinstance(cache, KVCacheManager)` is False and an engine refuses it.
    @property
    def block_size(self) -> int:
        return self.inner.block_size

    @property
    def num_used_blocks(self) -> int:
        return self.inner.num_used_blocks

    def admit(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Admit with the cached prefix blocks, when there is no full-precision tail: a
        reused prefix has only its quantized rows, not the recent tokens a tail would read
        in full precision, so a cache with a tail computes every prompt."""
        return self.inner.admit(seq_id, token_ids if not self.tail_len else [])

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        return self.inner.allocate(seq_id, num_tokens)

    def check_fits_alone(self, num_tokens: int, max_query_len: int) -> None:
        self.inner.check_fits_alone(num_tokens, max_query_len)

    def check_invariants(self) -> None:
        self.inner.check_invariants()

    # -- encoding and decoding rows ---------------------------------------------------------
    def _encode_rows(self, layer: int, kind: int, xs: list[torch.Tensor],
                     batch: StepBatch) -> torch.Tensor:
        """Per-sequence (n_b, Hkv, D) runs starting at a group boundary -> (N', Hkv, W) uint8."""
        scheme, lay = (self.quant.keys, self.quant.values)[kind], self.layouts[kind]
        x = torch.cat(xs)  # (N', Hkv, D)
        if scheme.granularity in ("tensor", "head"):
            if (layer, kind) not in self._static:  # calibrate on this layer's first write
                new = x.transpose(0, 1)  # (Hkv, N', D)
                self._static[(layer, kind)] = compute_params(new, scheme)
                self._open.calibrated.append((layer, kind))
            scale, zero = self._static[(layer, kind)]
            codes = encode(x.transpose(0, 1), scale, zero, scheme).transpose(0, 1)
            return self._pack(lay, codes, None, None)  # (N', Hkv, W)
        if scheme.granularity == "token":
            xb = blocked(x[:, :, None], scheme)  # (N', Hkv, 1, nG, g)
            scale, zero = compute_params(xb, scheme)  # (N', Hkv, 1, nG, 1)
            codes = unblocked(encode(xb, scale, zero, scheme), scheme, (*x.shape[:2], 1,
                                                                       x.shape[2]))
            return self._pack(lay, codes[:, :, 0], scale.flatten(2),
                              None if zero is None else zero.flatten(2))
        out = []  # per channel, groups of G tokens: only complete groups get codes
        G = scheme.group_size
        for xb_ in xs:
            n, Hkv, D = xb_.shape
            full = n - n % G
            rows = x.new_zeros(n, Hkv, self.row_bytes, dtype=torch.uint8)
            if full:
                grp = blocked(xb_[:full].transpose(0, 1), scheme)  # (Hkv, nG, G, D)
                scale, zero = compute_params(grp, scheme)  # (Hkv, nG, 1, D)
                codes = encode(grp, scale, zero, scheme).flatten(1, 2)  # (Hkv, full, D)
                spread = [None if t is None else _spread(t, G, lay.num_scales)
                          for t in (scale, zero)]  # (Hkv, full, ceil(D/G))
                rows[:full] = self._pack(lay, codes.transpose(0, 1), *[
                    None if t is None else t.transpose(0, 1) for t in spread])
            out.append(rows)
        return torch.cat(out)  # (N', Hkv, W)

    def _pack(self, lay: RowLayout, codes: torch.Tensor, scale: torch.Tensor | None,
              zero: torch.Tensor | None) -> torch.Tensor:
        """codes (N, Hkv, D) uint8, scale/zero (N, Hkv, n) -> rows (N, Hkv, W) uint8."""
        parts = [pack_int4(codes) if lay.scheme.bits == 4 else codes]
        parts += [t.contiguous().view(torch.uint8) for t in (scale, zero) if t is not None]
        row = torch.cat(parts, dim=-1)  # (N, Hkv, lay.row_bytes)
        return torch.nn.functional.pad(row, (0, self.row_bytes - row.shape[-1]))  # (N, Hkv, W)

    def _decode_rows(self, layer: int, kind: int, data: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, S, W) bytes -> (B, Hkv, S, D) in the cache's dtype."""
        scheme, lay = (self.quant.keys, self.quant.values)[kind], self.layouts[kind]
        D, dtype = self.config.head_dim, self.config.dtype
        payload = data[..., :lay.payload]
        codes = unpack_int4(payload, D) if scheme.bits == 4 else payload  # (B, Hkv, S, D)
        if scheme.granularity in ("tensor", "head"):
            if (layer, kind) not in self._static:  # nothing written to this layer yet
                return torch.zeros(codes.shape, dtype=dtype, device=codes.device)
            scale, zero = self._static[(layer, kind)]
            return decode(codes, scale, zero, scheme, dtype)
        params = [data[..., a:b].contiguous().view(scheme.scale_dtype)
                  for a, b in lay.param_spans]  # (B, Hkv, S, n) each
        if scheme.granularity == "token":
            shape = (*codes.shape[:3], 1, D)
            cb = blocked(codes[:, :, :, None], scheme)  # (B, Hkv, S, 1, nG, g)
            pb = [p[:, :, :, None, :, None] for p in params]  # (B, Hkv, S, 1, nG, 1)
            x = unblocked(decode(cb, pb[0], pb[1] if len(pb) > 1 else None, scheme, dtype),
                          scheme, shape)
            return x[:, :, :, 0]
        G, S = scheme.group_size, codes.shape[2]
        extra = -S % G
        codes = torch.nn.functional.pad(codes, (0, 0, 0, extra))  # (B, Hkv, S', D)
        pb = [_gather(torch.nn.functional.pad(p, (0, 0, 0, extra)), G, D) for p in params]
        cb = codes.unflatten(2, (-1, G))  # (B, Hkv, nG, G, D)
        x = decode(cb, pb[0], pb[1] if len(pb) > 1 else None, scheme, dtype)
        return x.flatten(2, 3)[:, :, :S]  # (B, Hkv, S, D)

    # -- the full-precision tail -------------------------------------------------------------
    def _tail_rows(self, tail: torch.Tensor | None, layer: int, kind: int, lo: int,
                   hi: int) -> torch.Tensor:
        """Positions lo..hi-1 of a tail (L, 2, Hkv, C, D), a ring indexed by position % C:
        (hi - lo, Hkv, D)."""
        if hi <= lo:
            return torch.zeros(0, self.config.num_kv_heads, self.config.head_dim,
                               dtype=self.config.dtype, device=self.config.device)
        assert hi - lo <= self.tail_len, "the tail holds only the last C positions"
        index = torch.arange(lo, hi, device=self.config.device) % self.tail_len
        assert tail is not None, "a sequence with committed tokens has a tail"
        return tail[layer, kind][:, index].transpose(0, 1)

    def _to_tail(self, seq_id: int, layer: int, k: torch.Tensor, v: torch.Tensor,
                 start: int) -> None:
        C = self.tail_len
        if not C:
            return
        n = k.shape[0]
        keep = min(n, C)  # only the last C new tokens can still be needed
        index = torch.arange(start + n - keep, start + n, device=self.config.device) % C
        self._tails[seq_id][layer, 0][:, index] = k[n - keep:].transpose(0, 1)
        self._tails[seq_id][layer, 1][:, index] = v[n - keep:].transpose(0, 1)

    def _check_open(self, batch: StepBatch) -> None:
        if self._open is None or batch.step != self._open.step:
            raise ValueError(f"batch of step {batch.step} is not the open step: begin a step "
                             f"before writing or reading, and use its batch")

    # -- memory ---------------------------------------------------------------------------
    def memory(self, num_tokens: int, window_dtype: torch.dtype | None = None) -> Memory:
        """Bytes one sequence of `num_tokens` tokens occupies (see `quant_memory.memory`)."""
        cfg = self.config
        return memory(self.quant, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_tokens,
                      window_dtype or cfg.dtype)


def _spread(t: torch.Tensor, G: int, per_row: int) -> torch.Tensor:
    """(Hkv, nG, 1, D) group parameters -> (Hkv, nG * G, per_row): each group's D values
    spread over its G rows, per_row = ceil(D / G) each (zero-padded)."""
    Hkv, nG, _, D = t.shape
    flat = torch.nn.functional.pad(t[:, :, 0], (0, G * per_row - D))  # (Hkv, nG, G*per_row)
    return flat.view(Hkv, nG * G, per_row)


def _gather(p: torch.Tensor, G: int, D: int) -> torch.Tensor:
    """Inverse of `_spread`: (B, Hkv, S', per_row) -> (B, Hkv, nG, 1, D)."""
    B, Hkv, S, per = p.shape
    return p.reshape(B, Hkv, S // G, G * per)[..., :D][:, :, :, None]
