"""The cache contract: the four calls an attention layer and an engine make on any KV cache.

Every cache in kvlib (flat, paged, quantized) implements this one small interface, so the
model and the engine run unchanged on any of them. A forward pass over T new tokens of a
batch of sequences goes:

    lens = cache.lengths(seq_ids)                  # (B,) tokens already stored
    for layer in range(num_layers):
        k, v = cache.update(layer, seq_ids, k_new, v_new)
        # k_new, v_new: (B, Hkv, T, D), stored at positions lens[b] .. lens[b] + T - 1
        # k, v: (B, Hkv, S, D), everything to attend to; S >= lens[b] + T, padded past it
    cache.advance(seq_ids, T)                      # commit: lengths += T

NOTE: lengths move only in `advance`, after every layer has written, so all layers of one
step write the same positions and a step that fails halfway commits nothing. Lengths are
stored by the cache, never inferred from tensor contents.

A call that cannot be done (unknown sequence, no room, wrong shape, dtype or device) raises
ValueError naming what was expected and what was given, and leaves the cache as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class KVCache(Protocol):
    """What the model needs from a KV cache. `seq_ids` name sequences, one per batch row."""

    @property
    def num_layers(self) -> int:
        """Layers this cache stores keys and values for."""
        ...

    def lengths(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """(B,) int64 on the CPU: tokens committed for each sequence."""
        ...

    def update(
        self, layer: int, seq_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys and values (B, Hkv, T, D) after each sequence's
        committed tokens; return (keys, values) to attend to, each (B, Hkv, S, D)."""
        ...

    def advance(self, seq_ids: Sequence[int], num_tokens: int) -> None:
        """Commit `num_tokens` new tokens per sequence, once every layer has stored them."""
        ...

    def release(self, seq_ids: Sequence[int]) -> None:
        """Forget these sequences; their room becomes free for new ones."""
        ...
