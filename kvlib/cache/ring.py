"""RingKVCache: a flat cache whose sliding-window layers keep only their last keys.

A layer with a sliding window W never reads a key W or more positions back (Mistral-7B v0.1:
W = 4,096 on every layer; Gemma-2: on every other layer), so storing it is waste. Here each
such layer keeps a ring of C slots per sequence, position p in slot p mod C, and a new key
overwrites the oldest. Layers without a window keep every position, as `FlatKVCache` does.

Why C = W + max_query_len - 1 and not W: one step writes up to T = max_query_len new keys
before its queries read. Its first query, at the old length L, still needs keys from
L - W + 1 on; the T writes land on positions L - C .. L - C + T - 1, which must all be older
than that: L - C + T - 1 < L - W + 1, i.e. C >= W + T - 1. Decoding (T = 1) needs only W.
The same inequality makes `abort` free: the overwritten keys are ones no later step reads.

Worked example: W = 4, max_query_len = 1, so C = 4. After 10 tokens the ring holds
positions 8, 9, 6, 7 in slots 0..3; `read` hands attention positions 6..9 in order.

>>> from kvlib.contract import append
>>> cache = RingKVCache(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2,
...                                 max_batch_size=1, max_seq_len=64, layer_windows=(4,)))
>>> cache.capacities
[4]
>>> for p in range(10):
...     append(cache, [0], torch.full((1, 1, 1, 1, 2), float(p)), torch.zeros(1, 1, 1, 1, 2))
>>> cache.k[0][0, 0, :, 0].tolist()                 # slot s holds position p, p mod 4 = s
[8.0, 9.0, 6.0, 7.0]
>>> batch = cache.begin([0], [1])
>>> cache.write(0, batch, torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))
>>> view = cache.read(0, batch)                     # positions 7..10, oldest first
>>> view.key_start.tolist(), view.k[0, 0, :, 0].tolist()
([7], [7.0, 8.0, 9.0, 0.0])
>>> cache.abort(batch)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvlib.cache.slots import SlotTable
from kvlib.checks import require_int
from kvlib.config import CacheConfig, ModelConfig
from kvlib.contract import DenseKV, StepBatch, check_query_lens


class RingKVCache:
    """`max_batch_size` slots; layer l keeps `capacities[l]` positions per slot, in a ring.

    Implements the `KVCache` contract (kvlib.contract). Storage per layer is head-major,
    (B, Hkv, C_l, D) for K and for V.
    """

    def __init__(self, config: CacheConfig, max_query_len: int = 1) -> None:
        if config.latent_dim:
            raise ValueError("a ring stores keys and values; for a latent cache (latent_dim "
                             f"{config.latent_dim}) use a PagedKVCache or a FlatKVCache")
        if config.sink_tokens:
            raise ValueError(f"a ring keeps only the last W keys, not {config.sink_tokens} sink "
                             f"token(s): use a PagedKVCache or a FlatKVCache for sinks")
        windows = [config.window(layer) for layer in range(config.num_layers)]
        self.max_query_len = require_int("max_query_len", max_query_len, minimum=1)
        self.config, self.windows = config, windows
        S = config.max_seq_len
        self.capacities = [S if w is None else min(S, w + max_query_len - 1) for w in windows]
        shape = (config.max_batch_size, config.num_kv_heads)
        self.k = [torch.zeros(*shape, c, config.head_dim, dtype=config.dtype,
                              device=config.device) for c in self.capacities]  # (B, Hkv, C, D)
        self.v = [torch.zeros_like(k) for k in self.k]
        # NOTE: lengths are positions written so far, not slots in use; read derives which
        # positions each ring holds from them (the last min(length, C)).
        self._slots = SlotTable(config.max_batch_size, config.max_seq_len, config.num_layers)

    @classmethod
    def for_model(cls, model: ModelConfig, *, max_batch_size: int, max_seq_len: int,
                  max_query_len: int = 1, **kwargs) -> RingKVCache:
        """A ring cache with the model's shape and per-layer windows."""
        return cls(CacheConfig.for_model(model, max_batch_size=max_batch_size,
                                         max_seq_len=max_seq_len, **kwargs), max_query_len)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def nbytes(self) -> int:
        """Bytes of storage, all layers, K and V."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.k, self.v))

    # -- the cache contract -------------------------------------------------------------------
    def lengths(self, seq_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([self._slots.lengths[r] for r in self._slots.row_ids(seq_ids)],
                            dtype=torch.int64)  # (B,)

    def begin(self, seq_ids: Sequence[int], query_lens: Sequence[int],
              token_ids: torch.Tensor | None = None) -> StepBatch:
        """Check the step: at most `max_query_len` tokens per sequence (see the module's
        note), within `max_seq_len` positions. Slot mapping: row * max_seq_len + position
        (each layer then takes the position modulo its capacity)."""
        lens = check_query_lens(query_lens, len(list(seq_ids)))
        batch = self._slots.begin(seq_ids, lens, self.config.device)  # no room: raises here
        if max(lens) > self.max_query_len:
            self._slots.abort(batch)
            raise ValueError(f"a step of {max(lens)} tokens exceeds max_query_len "
                             f"{self.max_query_len}: its writes would overwrite keys its own "
                             f"first queries read; feed the prompt in chunks")
        return batch

    def write(self, layer: int, batch: StepBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        rows, pos = self._slots.check_write(self.config, layer, batch, k, v)  # (N,), (N,)
        ring = pos % self.capacities[layer]  # (N,) slot of each position in this layer's ring
        self.k[layer][rows, :, ring] = k.detach()  # (N, Hkv, D) into (B, Hkv, C, D)
        self.v[layer][rows, :, ring] = v.detach()
        self._slots.ledger.wrote(layer)

    def read(self, layer: int, batch: StepBatch) -> DenseKV:
        """Full layers: views, as a flat cache. Ring layers: the kept keys oldest first, a
        gather of at most C keys per row (a kernel would index the ring in place)."""
        self._slots.check_read(self.config, layer, batch)
        C, device = self.capacities[layer], self.config.device
        rows, lens = self._slots.rows, self._slots.context_lens  # (B,), (B,)
        window = self.windows[layer]
        if C == self.config.max_seq_len:
            S = max(batch.context_lens)
            return DenseKV(self.k[layer][rows, :, :S], self.v[layer][rows, :, :S], lens, window)
        n = min(max(batch.context_lens), C)
        starts = (lens - C).clamp(min=0)  # (B,) oldest position each ring still holds
        ring = (starts[:, None] + torch.arange(n, device=device)) % C  # (B, n)
        k = self.k[layer][rows[:, None], :, ring]  # (B, n, Hkv, D)
        v = self.v[layer][rows[:, None], :, ring]
        return DenseKV(k.transpose(1, 2), v.transpose(1, 2), lens, window,  # (B, Hkv, n, D)
                       key_start=starts)

    def commit(self, batch: StepBatch) -> None:
        self._slots.commit(batch)

    def abort(self, batch: StepBatch) -> None:
        # Nothing to undo: a step only overwrites keys no later step reads (module note).
        self._slots.abort(batch)

    def fork(self, src: int, dst: int) -> None:
        """Copy slot `src` (its rings included) into the empty slot `dst`."""
        src_row, dst_row = self._slots.fork_rows(src, dst)
        for k, v in zip(self.k, self.v):
            k[dst_row], v[dst_row] = k[src_row], v[src_row]
        self._slots.lengths[dst_row] = self._slots.lengths[src_row]

    def release(self, seq_ids: Sequence[int]) -> None:
        self._slots.release(seq_ids)
