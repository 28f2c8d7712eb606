"""FlatKVCache: one preallocated tensor holding every layer's keys and values.

Each batch slot owns room for `max_seq_len` tokens up front, whether it uses them or not:
simple, fast to index, and wasteful when sequences are short (the paging chapter measures
how wasteful). Sequences are named by their slot: `seq_ids` are batch indices.

Two layouts of the same numbers (see `Layout`):

    SEQ_MAJOR   (L, B, S, 2, Hkv, D)  the original design; one token's K and V are adjacent
    HEAD_MAJOR  (L, 2, B, Hkv, S, D)  each head's keys are one contiguous (S, D) matrix

A latent cache (`CacheConfig.latent_dim`, multi-head latent attention) has one part where
these have 2: one row per token, read whole as the key and its first R numbers as the value.

Worked example: in SEQ_MAJOR with Hkv = 2, D = 4, the key of head 1 at token 5 starts
5 * (2 * 2 * 4) + 1 * 4 = 84 elements after token 0's key of head 0 in the same slot.

>>> cfg = CacheConfig(num_layers=1, num_kv_heads=2, head_dim=4, max_batch_size=1,
...                   max_seq_len=8, layout=Layout.SEQ_MAJOR)
>>> cache = FlatKVCache(cfg)
>>> k = cache.keys(0)           # (B, Hkv, S, D) view
>>> k.stride()                  # stepping one token skips K and V of every head
(128, 4, 16, 1)
>>> k[0, 1, 5].storage_offset() - k[0, 0, 0].storage_offset()
84
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvlib.cache.slots import SlotTable
from kvlib.checks import require_int
from kvlib.config import CacheConfig, Layout
from kvlib.contract import DenseKV, StepBatch


class FlatKVCache:
    """A preallocated cache of `max_batch_size` slots x `max_seq_len` tokens per layer.

    Implements the `KVCache` contract (kvlib.contract). It keeps every position of every
    layer, so it serves windowed layers too: their views carry the window, attention hides
    what it passed.
    """

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.data = torch.zeros(config.shape, dtype=config.dtype, device=config.device)
        # Slot ids, stored lengths and the open step (shared with RingKVCache).
        self._slots = SlotTable(config.max_batch_size, config.max_seq_len, config.num_layers)

    # -- views --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def keys(self, layer: int) -> torch.Tensor:
        """All slots' keys of one layer as a (B, Hkv, S, D) view (no copy, layout's strides)."""
        self._check_layer(layer)
        if self.config.layout is Layout.SEQ_MAJOR:
            return self.data[layer, :, :, 0].transpose(1, 2)  # (B, S, Hkv, D) -> (B, Hkv, S, D)
        return self.data[layer, 0]  # (B, Hkv, S, D)

    def values(self, layer: int) -> torch.Tensor:
        """All slots' values of one layer as a (B, Hkv, S, D) view; for a latent cache the
        first `latent_dim` numbers of each key row, (B, 1, S, R), the same memory."""
        if self.config.latent_dim:
            return self.keys(layer)[..., :self.config.latent_dim]  # (B, 1, S, R)
        self._check_layer(layer)
        if self.config.layout is Layout.SEQ_MAJOR:
            return self.data[layer, :, :, 1].transpose(1, 2)  # (B, Hkv, S, D)
        return self.data[layer, 1]  # (B, Hkv, S, D)

    # -- the cache contract -------------------------------------------------------------------
    def lengths(self, seq_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([self._slots.lengths[r] for r in self._slots.row_ids(seq_ids)],
                            dtype=torch.int64)  # (B,)

    def begin(self, seq_ids: Sequence[int], query_lens: Sequence[int],
              token_ids: torch.Tensor | None = None) -> StepBatch:
        """Check room for the new tokens; slot = row * max_seq_len + position.

        >>> cache = FlatKVCache(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2,
        ...                                 max_batch_size=4, max_seq_len=10))
        >>> cache.begin([2], [3]).slot_mapping.tolist()   # slot 2, positions 0..2 (1 group)
        [[20, 21, 22]]
        """
        return self._slots.begin(seq_ids, query_lens, self.config.device)

    def write(self, layer: int, batch: StepBatch, k: torch.Tensor,
              v: torch.Tensor | None) -> None:
        rows, pos = self._slots.check_write(self.config, layer, batch, k, v)  # (N,), (N,)
        # detach: the cache stores values, never autograd history
        self.keys(layer)[rows, :, pos] = k.detach()  # (N, Hkv, D) into (B, Hkv, S, D)
        if v is not None:  # a latent cache's values are its key rows' first R numbers
            self.values(layer)[rows, :, pos] = v.detach()
        self._slots.ledger.wrote(layer)

    def read(self, layer: int, batch: StepBatch) -> DenseKV:
        self._slots.check_read(self.config, layer, batch)
        rows = list(batch.seq_ids)
        S = max(batch.context_lens)
        keys, values = self.keys(layer), self.values(layer)  # (B_max, Hkv, S_max, D)
        lens, which = self._slots.context_lens, (self.config.window(layer),
                                                  self.config.sink_tokens)
        if rows == list(range(rows[0], rows[0] + len(rows))):  # consecutive slots: a view
            sl = slice(rows[0], rows[0] + len(rows))
            return DenseKV(keys[sl, :, :S], values[sl, :, :S], lens, *which)  # (B, Hkv, S, D)
        index = self._slots.rows  # (B,)
        return DenseKV(keys[index, :, :S], values[index, :, :S], lens, *which)  # gathered copy

    def commit(self, batch: StepBatch) -> None:
        self._slots.commit(batch)

    def abort(self, batch: StepBatch) -> None:
        self._slots.abort(batch)

    def fork(self, src: int, dst: int) -> None:
        """Copy slot `src`'s tokens into the empty slot `dst` (a flat cache cannot share)."""
        src_row, dst_row = self._slots.fork_rows(src, dst)
        n = self._slots.lengths[src_row]
        for layer in range(self.num_layers):
            self.keys(layer)[dst_row, :, :n] = self.keys(layer)[src_row, :, :n]
            if not self.config.latent_dim:  # a latent row was copied whole with the keys
                self.values(layer)[dst_row, :, :n] = self.values(layer)[src_row, :, :n]
        self._slots.lengths[dst_row] = n

    def release(self, seq_ids: Sequence[int]) -> None:
        self._slots.release(seq_ids)

    def _check_layer(self, layer: int) -> None:
        require_int("layer", layer, minimum=0, maximum=self.config.num_layers - 1)
