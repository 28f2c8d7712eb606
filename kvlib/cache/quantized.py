"""QuantizedKVCache: recent tokens in full precision, the rest as codes and scales.

Composition, not a subclass: an inner cache (flat or paged, any `KVCache`) holds the rows of
codes (`kvlib.cache.quant_rows`: codes, scales, zero points, in bytes) of every token that has
left the *residual*; the residual -- each sequence's most recent tokens, `quant.residual` of
them plus a group not yet complete -- stays in full precision here. Every token is stored
once: it is written to the residual, and quantized when it leaves it, as transformers'
`QuantizedCache` and KIVI do. So the inner cache's lengths lag the sequence's by the residual
(`quant.quantized_len`), and the memory it holds is `memory()`'s.

Worked example: KIVI-style INT4 (a residual of 128, keys in groups of 32 tokens), a sequence
of 300 tokens: (300 - 128) // 32 * 32 = 160 tokens are codes in the inner cache, the last 140
are in full precision; after 12 more tokens group 160..191 leaves the residual at once.

A step: `begin` works out which tokens leave the residual (and opens a step of the inner
cache for them); each layer's `write` quantizes those (the old residual's first tokens and
perhaps new ones) into the inner step, and keeps the rest as the new residual; `read` hands
attention codes decoded, then the residual. Over a paged inner cache it also answers the
scheduler's `KVCacheManager`, in tokens: room for a sequence is blocks for its codes.

Legend: L layers, B sequences, N packed tokens, Hkv KV heads, S keys, D head dim, W row bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from kvlib.cache.flat import FlatKVCache
from kvlib.cache.quant_memory import KVQuantConfig, Memory, memory
from kvlib.cache.quant_rows import RowCodec
from kvlib.checks import require_ids, require_int
from kvlib.config import CacheConfig
from kvlib.contract import (
    DenseKV,
    KVCache,
    KVCacheManager,
    PagedKV,
    StepBatch,
    StepLedger,
    check_new_kv,
    check_query_lens,
)

BYTE = torch.float8_e4m3fn  # the inner cache's 1-byte element type; its bits are never read as floats


@dataclass
class _Open:
    """The open step: what leaves each sequence's residual, and the new residuals."""

    batch: StepBatch
    leaving: dict[int, tuple[int, int]]  # seq_id -> quantized length before, after
    inner_batch: StepBatch | None  # the inner step storing the codes of the leaving tokens
    residuals: dict[int, torch.Tensor]  # seq_id -> (L, 2, Hkv, n, D) after the step
    fresh: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (layer, seq)
    # -> (2, Hkv, leaving, D): this step's codes, decoded, for reads within the step
    calibrated: set[tuple[int, int]] = field(default_factory=set)


class QuantizedKVCache:
    """The residual in full precision, every older token as codes in an inner cache.

    Args:
        config: the cache as the model sees it (layers, KV heads, head dim, dtype of keys).
        quant: the schemes for keys and values and the residual's length.
        inner: makes the inner cache from a CacheConfig (`FlatKVCache`, or e.g.
            `lambda c: PagedKVCache(c, num_blocks=64)`).
    """

    def __init__(self, config: CacheConfig, quant: KVQuantConfig,
                 inner: Callable[[CacheConfig], KVCache] = FlatKVCache) -> None:
        if not isinstance(quant, KVQuantConfig):
            raise ValueError(f"quant must be a KVQuantConfig, got {type(quant).__name__}")
        if config.latent_dim:
            raise ValueError(f"kvlib quantizes keys and values, not a latent row (latent_dim "
                             f"{config.latent_dim}): use a PagedKVCache for latent attention")
        if config.kv_cache_dtype != "auto":
            raise ValueError(f"config.kv_cache_dtype is {config.kv_cache_dtype!r}: a paged cache "
                             f"of codes already; a QuantizedKVCache takes a config of values")
        if quant.residual > config.max_seq_len:
            raise ValueError(f"residual {quant.residual} is larger than the cache "
                             f"(max_seq_len {config.max_seq_len})")
        self.config, self.quant = config, quant
        self.codec = RowCodec(quant, config.head_dim, config.dtype)
        self.row_bytes = self.codec.row_bytes  # W
        self.group = quant.token_group  # G: 1 unless a scheme shares scales across tokens
        self.inner = inner(replace(config, head_dim=self.row_bytes, dtype=BYTE))
        self._paged = isinstance(self.inner, KVCacheManager)
        if self._paged and config.block_size % self.group:
            raise ValueError(f"block_size {config.block_size} must be a multiple of the token "
                             f"group {self.group}: a group's rows must share one block")
        self._lengths: dict[int, int] = {}  # seq_id -> tokens held (codes + residual)
        self._residuals: dict[int, torch.Tensor] = {}  # seq_id -> (L, 2, Hkv, n, D)
        self._ledger = StepLedger(config.num_layers)
        self._open: _Open | None = None

    # -- the cache contract -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def tail_len(self) -> int:
        return self.quant.tail_len

    def lengths(self, seq_ids: Sequence[int]) -> torch.Tensor:
        ids = self._ids(seq_ids)
        return torch.tensor([self._lengths.get(s, 0) for s in ids], dtype=torch.int64)  # (B,)

    def begin(self, seq_ids: Sequence[int], query_lens: Sequence[int],
              token_ids: Sequence[int] | torch.Tensor | None = None) -> StepBatch:
        ids = self._ids(seq_ids)
        lens = check_query_lens(query_lens, len(ids))
        self._ledger.require_idle("begin a step")
        starts = [self._lengths.get(s, 0) for s in ids]
        for s, start, n in zip(ids, starts, lens):
            if start + n > self.config.max_seq_len:
                raise ValueError(f"no room: sequence {s} holds {start} token(s); {n} more would "
                                 f"pass max_seq_len {self.config.max_seq_len}")
        q = self.quant.quantized_len
        leaving = {s: (q(a), q(a + n)) for s, a, n in zip(ids, starts, lens)}
        moving = [s for s in ids if leaving[s][1] > leaving[s][0]]
        inner_batch = None
        if moving:  # raises, changing nothing, when the inner cache has no room
            # NOTE: without a residual every new token leaves at once: its id goes with its
            # codes, so full blocks get prefix hashes (and `admit` can find them).
            ids_in = None if token_ids is None or self.tail_len else token_ids
            inner_batch = self.inner.begin(moving, [leaving[s][1] - leaving[s][0]
                                                     for s in moving], ids_in)
        step = self._ledger.open()  # from here on nothing raises
        cfg = self.config
        residuals = {s: torch.zeros(cfg.num_layers, 2, cfg.num_kv_heads,
                                    a + n - leaving[s][1], cfg.head_dim, dtype=cfg.dtype,
                                    device=cfg.device)  # (L, 2, Hkv, n_after, D)
                     for s, a, n in zip(ids, starts, lens)}
        slots = torch.full((1, sum(lens)), -1, dtype=torch.int64, device=cfg.device)  # (1, N)
        batch = StepBatch.make(ids, starts, lens, slots, step)  # new tokens: no slot, residual
        self._open = _Open(batch, leaving, inner_batch, residuals)
        return batch

    def write(self, layer: int, batch: StepBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        require_int("layer", layer, minimum=0, maximum=self.num_layers - 1)
        self._ledger.check(batch)
        cfg = self.config
        check_new_kv(k, v, batch.num_tokens, cfg.num_kv_heads, cfg.head_dim, cfg.dtype,
                     cfg.device)
        k, v = k.detach(), v.detach()
        op, cu = self._open, batch.query_starts
        runs: tuple[list, list] = ([], [])
        for b, s in enumerate(batch.seq_ids):
            before, after = op.leaving[s]
            for kind, new in enumerate((k, v)):
                # NOTE: from the residual as it was when the step began, so writing a layer
                # twice in one step writes the same again.
                old = self._residuals[s][layer, kind] if s in self._residuals else (
                    new.new_zeros(cfg.num_kv_heads, 0, cfg.head_dim))  # (Hkv, n_old, D)
                rows = torch.cat([old, new[cu[b]:cu[b + 1]].transpose(0, 1)], 1)  # (Hkv, n, D)
                op.residuals[s][layer, kind] = rows[:, after - before:]
                if after > before:
                    runs[kind].append(rows[:, :after - before].transpose(0, 1))  # (n_b, Hkv, D)
        if op.inner_batch is None:
            self._ledger.wrote(layer)
            return
        known = set(self.codec.static)
        codes = [self.codec.encode(layer, kind, runs[kind]) for kind in (0, 1)]  # (N', Hkv, W)
        op.calibrated |= set(self.codec.static) - known
        self.inner.write(layer, op.inner_batch, codes[0].view(BYTE), codes[1].view(BYTE))
        decoded = [self.codec.decode(layer, kind, c.transpose(0, 1)[None])[0]  # (Hkv, N', D)
                   for kind, c in enumerate(codes)]
        at = 0
        for s in op.inner_batch.seq_ids:
            n = op.leaving[s][1] - op.leaving[s][0]
            op.fresh[(layer, s)] = torch.stack([d[:, at:at + n] for d in decoded])
            at += n
        self._ledger.wrote(layer)

    def read(self, layer: int, batch: StepBatch) -> DenseKV:
        """Every key of the batch's sequences: codes decoded, then the residual. NOTE: before
        this layer writes the step, only the committed tokens are there, as in any cache."""
        require_int("layer", layer, minimum=0, maximum=self.num_layers - 1)
        self._ledger.check(batch)
        op, cfg = self._open, self.config
        written = self._ledger.has_written(layer)
        rows = []
        for s in batch.seq_ids:
            before = op.leaving[s][0]
            parts = [self._stored(layer, s, before)]  # (2, Hkv, before, D)
            if written:
                if (layer, s) in op.fresh:
                    parts.append(op.fresh[(layer, s)])
                parts.append(op.residuals[s][layer])
            elif s in self._residuals:
                parts.append(self._residuals[s][layer])
            rows.append(torch.cat(parts, dim=2))  # (2, Hkv, n, D)
        S = max(batch.context_lens)
        kv = torch.zeros(2, len(rows), cfg.num_kv_heads, S, cfg.head_dim, dtype=cfg.dtype,
                         device=cfg.device)  # (2, B, Hkv, S, D)
        for b, r in enumerate(rows):
            kv[:, b, :, :r.shape[2]] = r
        lens = torch.tensor(batch.context_lens, device=cfg.device)  # (B,)
        return DenseKV(kv[0], kv[1], lens, cfg.window(layer), cfg.sink_tokens)

    def commit(self, batch: StepBatch) -> None:
        self._ledger.close(batch, complete=True)
        op = self._open
        if op.inner_batch is not None:
            self.inner.commit(op.inner_batch)
        for s, c in zip(batch.seq_ids, batch.context_lens):
            self._lengths[s] = c
            self._residuals[s] = op.residuals[s]
        self._open = None

    def abort(self, batch: StepBatch) -> None:
        self._ledger.close(batch, complete=False)
        op = self._open
        if op.inner_batch is not None:
            self.inner.abort(op.inner_batch)
        for key in op.calibrated:  # a scale calibrated by this step goes with it
            del self.codec.static[key]
        self._open = None

    def fork(self, src: int, dst: int) -> None:
        self._ledger.require_idle("fork")
        src, dst = self._ids([src, dst])
        if src not in self._lengths:
            raise ValueError(f"unknown sequence {src}: this cache holds {sorted(self._lengths)}")
        if self._lengths.get(dst, 0):
            raise ValueError(f"cannot fork into sequence {dst}: it holds tokens; release it "
                             f"first")
        if self.quant.quantized_len(self._lengths[src]):
            self.inner.fork(src, dst)
        self._lengths[dst] = self._lengths[src]
        self._residuals[dst] = self._residuals[src].clone()

    def release(self, seq_ids: Sequence[int]) -> None:
        ids = self._ids(seq_ids)
        self._ledger.require_idle("release")
        unknown = [s for s in ids if s not in self._lengths]
        if unknown and self._paged:
            raise ValueError(f"unknown sequence(s) {unknown}: this cache holds "
                             f"{sorted(self._lengths)}")
        stored = [s for s in ids if s in self._lengths and (
            not self._paged or self.inner.manager.holds(s))]
        if stored:
            self.inner.release(stored)
        for s in ids:
            self._lengths.pop(s, None)
            self._residuals.pop(s, None)

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
        """Admit with the cached prefix blocks, when there is no residual: a reused prefix has
        only its codes, not the recent tokens a residual would read in full precision, so a
        cache with a residual computes every prompt."""
        self._ledger.require_idle("admit a sequence")
        found = self.inner.admit(seq_id, token_ids if not self.tail_len else [])
        self._lengths[seq_id], self._residuals[seq_id] = found, self._empty_residual()
        return found

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Room for the codes of the first `num_tokens` tokens (the residual is not in
        blocks)."""
        done = self.inner.allocate(seq_id, self.quant.quantized_len(num_tokens))
        if done and seq_id not in self._lengths:
            self._lengths[seq_id], self._residuals[seq_id] = 0, self._empty_residual()
        return done

    def check_fits_alone(self, num_tokens: int, max_query_len: int) -> None:
        self.inner.check_fits_alone(self.quant.quantized_len(num_tokens), max_query_len)

    def check_invariants(self) -> None:
        self.inner.check_invariants()
        for s, n in self._lengths.items():
            held = self._residuals[s].shape[3]
            assert held == n - self.quant.quantized_len(n), f"seq {s}: residual of {held}"

    # -- memory ---------------------------------------------------------------------------
    def memory(self, num_tokens: int, residual_dtype: torch.dtype | None = None) -> Memory:
        """Bytes one sequence of `num_tokens` tokens occupies (see `quant_memory.memory`)."""
        cfg = self.config
        return memory(self.quant, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_tokens,
                      residual_dtype or cfg.dtype)

    # -- internals ------------------------------------------------------------------------
    def _ids(self, seq_ids: Sequence[int]) -> list[int]:
        """Checked ids: the inner cache's rule (a flat cache's slots, a paged cache's ints)."""
        ids = require_ids("seq_ids", seq_ids)
        self.inner.lengths(ids)  # raises for ids the inner cache could never hold
        return ids

    def _empty_residual(self) -> torch.Tensor:
        cfg = self.config
        return torch.zeros(cfg.num_layers, 2, cfg.num_kv_heads, 0, cfg.head_dim,
                           dtype=cfg.dtype, device=cfg.device)  # (L, 2, Hkv, 0, D)

    def _stored(self, layer: int, seq_id: int, n: int) -> torch.Tensor:
        """The first `n` tokens' codes of a sequence, decoded: (2, Hkv, n, D)."""
        cfg = self.config
        if n == 0:
            return torch.zeros(2, cfg.num_kv_heads, 0, cfg.head_dim, dtype=cfg.dtype,
                               device=cfg.device)
        if self._paged:
            g = self.inner.storage.group_of(layer)
            tables = self.inner.block_tables([seq_id], group=g)  # (1, M)
            lens = torch.tensor([n], dtype=torch.int32, device=cfg.device)
            rows = PagedKV(self.inner.k_pool(layer), self.inner.v_pool(layer), tables,
                           lens).dense()  # (1, Hkv, M * BS, W)
            data = (rows.k[0, :, :n], rows.v[0, :, :n])  # (Hkv, n, W) each
        else:
            data = (self.inner.keys(layer)[seq_id, :, :n], self.inner.values(layer)[seq_id, :, :n])
        return torch.stack([self.codec.decode(layer, kind, x.view(torch.uint8)[None])[0]
                            for kind, x in enumerate(data)])  # (2, Hkv, n, D)

