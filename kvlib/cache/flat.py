"""FlatKVCache: one preallocated tensor holding every layer's keys and values.

Each batch slot owns room for `max_seq_len` tokens up front, whether it uses them or not:
simple, fast to index, and wasteful when sequences are short (the paging chapter measures
how wasteful). Sequences are named by their slot: `seq_ids` are batch indices.

Two layouts of the same numbers (see `Layout`):

    SEQ_MAJOR   (L, B, S, 2, Hkv, D)  the original design; one token's K and V are adjacent
    HEAD_MAJOR  (L, 2, B, Hkv, S, D)  each head's keys are one contiguous (S, D) matrix

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

from kvlib.config import CacheConfig, Layout


class FlatKVCache:
    """A preallocated cache of `max_batch_size` slots x `max_seq_len` tokens per layer.

    Implements the `KVCache` contract (kvlib.cache.contract).
    """

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.data = torch.zeros(config.shape, dtype=config.dtype, device=config.device)
        # NOTE: lengths live on the CPU so checks need no device sync; they are the only
        # truth about how much of `data` is in use (zeros are valid keys).
        self._lengths = torch.zeros(config.max_batch_size, dtype=torch.int64)  # (B,)
        # Tokens stored per (layer, slot), committed or not, so `advance` can check that
        # every layer wrote before lengths move.
        self._stored = torch.zeros(config.num_layers, config.max_batch_size, dtype=torch.int64)

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
        """All slots' values of one layer as a (B, Hkv, S, D) view."""
        self._check_layer(layer)
        if self.config.layout is Layout.SEQ_MAJOR:
            return self.data[layer, :, :, 1].transpose(1, 2)  # (B, Hkv, S, D)
        return self.data[layer, 1]  # (B, Hkv, S, D)

    # -- the cache contract -------------------------------------------------------------------
    def lengths(self, seq_ids: Sequence[int]) -> torch.Tensor:
        rows = self._check_seq_ids(seq_ids)
        return self._lengths[rows].clone()  # (B,)

    def update(
        self, layer: int, seq_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_layer(layer)
        rows = self._check_seq_ids(seq_ids)
        self._check_new(k, v, len(rows))
        T = k.shape[2]
        starts = self._lengths[rows]  # (B,)
        ends = starts + T
        if int(ends.max()) > self.config.max_seq_len:
            full = [s for s, e in zip(rows, ends.tolist()) if e > self.config.max_seq_len]
            raise ValueError(
                f"no room: writing {T} token(s) to slot(s) {full} (lengths "
                f"{self._lengths[full].tolist()}) would pass max_seq_len "
                f"{self.config.max_seq_len}"
            )
        # All checks passed; from here on nothing raises, so a failed call wrote nothing.
        keys, values = self.keys(layer), self.values(layer)  # (B_max, Hkv, S_max, D)
        for b, (row, start) in enumerate(zip(rows, starts.tolist())):
            # detach: the cache stores values, never autograd history
            keys[row, :, start:start + T] = k[b].detach()  # (Hkv, T, D)
            values[row, :, start:start + T] = v[b].detach()
        self._stored[layer, rows] = ends
        S = int(ends.max())
        if rows == list(range(rows[0], rows[0] + len(rows))):  # consecutive slots: a view
            sl = slice(rows[0], rows[0] + len(rows))
            return keys[sl, :, :S], values[sl, :, :S]  # (B, Hkv, S, D)
        index = torch.tensor(rows, device=keys.device)
        return keys[index, :, :S], values[index, :, :S]  # (B, Hkv, S, D), gathered copy

    def advance(self, seq_ids: Sequence[int], num_tokens: int) -> None:
        rows = self._check_seq_ids(seq_ids)
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        target = self._lengths[rows] + num_tokens  # (B,)
        stored = self._stored[:, rows]  # (L, B)
        missing = (stored != target[None, :]).nonzero().tolist()
        if missing:
            layer, b = missing[0]
            raise ValueError(
                f"cannot advance slot {rows[b]} by {num_tokens}: layer {layer} stores "
                f"{int(stored[layer, b])} token(s), expected {int(target[b])}; call update "
                f"on every layer with the same new tokens first"
            )
        self._lengths[rows] = target

    def release(self, seq_ids: Sequence[int]) -> None:
        rows = self._check_seq_ids(seq_ids)
        self._lengths[rows] = 0
        self._stored[:, rows] = 0

    # -- checks ------------------------------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if (not isinstance(layer, int) or isinstance(layer, bool)
                or not 0 <= layer < self.config.num_layers):
            raise ValueError(f"layer must be an int in [0, {self.config.num_layers}), "
                             f"got {layer!r}")

    def _check_seq_ids(self, seq_ids: Sequence[int]) -> list[int]:
        rows = list(seq_ids)
        B = self.config.max_batch_size
        if not rows:
            raise ValueError("seq_ids is empty: name at least one batch slot")
        for s in rows:
            if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < B:
                raise ValueError(f"batch index {s!r} out of range for a cache with "
                                 f"max_batch_size {B} (valid: 0..{B - 1})")
        if len(set(rows)) != len(rows):
            raise ValueError(f"seq_ids has duplicates: {rows}")
        return rows

    def _check_new(self, k: torch.Tensor, v: torch.Tensor, batch: int) -> None:
        cfg = self.config
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a (B, Hkv, T, D) tensor, got {got}")
            expected = (batch, cfg.num_kv_heads, t.shape[2], cfg.head_dim)
            if tuple(t.shape) != expected or t.shape[2] < 1:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, expected (B={batch}, "
                    f"Hkv={cfg.num_kv_heads}, T>=1, D={cfg.head_dim})"
                )
            if t.dtype != cfg.dtype:
                raise ValueError(f"{name} has dtype {t.dtype}, the cache stores {cfg.dtype}")
            if not _same_device(t.device, cfg.device):
                raise ValueError(f"{name} is on {t.device}, the cache is on {cfg.device}")
        if k.shape != v.shape:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 name the same device when the current device is 0."""
    if a.type != b.type:
        return False
    index = torch.cuda.current_device() if a.type == "cuda" else 0
    return (a.index if a.index is not None else index) == (b.index if b.index is not None
                                                          else index)
