"""Cache groups: layers that keep the same tokens, and so can share one block table.

A model's layers do not all read the same keys. A full-attention layer reads every earlier
key; a sliding-window layer (Mistral, Gemma-2's every other layer) only its last W; a layer
run StreamingLLM's way its first k "sink" tokens plus its last W. A paged cache groups the
layers that read alike and gives each group its own block tables, so that a windowed group
can free the blocks its window has passed while a full group keeps every block
(vLLM's "KV cache groups", transformers' per-layer cache types).

The groups are derived from the `CacheConfig` in one place (`cache_groups`), and a cache
built for one model is checked against the model's own layers before any compute
(`check_cache_matches`): a cache that drops keys a layer reads would give wrong logits
without any error.

Which blocks a windowed group still needs. The next query sits at position `length` and
reads keys `length - W + 1 .. length`, plus positions `0 .. k-1` (sinks). A block is dead
once every position in it is older than that window and none is a sink.

Worked example: W = 6, k = 2 sink tokens, blocks of 4, 13 tokens held. The next query (13)
reads 8..13 and the sinks 0..1, so block 0 (sinks) stays, block 1 (positions 4..7) is dead,
blocks 2 and 3 stay.

>>> g = CacheGroup(layers=(0,), window=6, sink_tokens=2)
>>> list(g.dead_blocks(length=13, block_size=4))
[1]
>>> CacheGroup(layers=(1,), window=None).dead_blocks(length=13, block_size=4)
range(0, 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlib.config import CacheConfig, ModelConfig


@dataclass(frozen=True)
class CacheGroup:
    """Layers that read the same keys: all of them (`window=None`), or the last `window`
    plus the first `sink_tokens`."""

    layers: tuple[int, ...]
    window: int | None = None
    sink_tokens: int = 0

    @property
    def kind(self) -> str:
        if self.window is None:
            return "full"
        return f"sinks {self.sink_tokens} + window {self.window}" if self.sink_tokens else (
            f"window {self.window}")

    def dead_blocks(self, length: int, block_size: int) -> range:
        """Blocks no later query of a sequence of `length` tokens reads (see module note)."""
        if self.window is None:
            return range(0)
        first_needed = max(0, length - self.window + 1)  # the next query's oldest window key
        first_free = -(-self.sink_tokens // block_size)  # blocks 0.. hold sinks: never freed
        return range(first_free, max(first_free, first_needed // block_size))

    def max_live_blocks(self, num_tokens: int, max_query_len: int, block_size: int) -> int:
        """The most blocks one sequence of `num_tokens` tokens holds at once in this group,
        fed at most `max_query_len` tokens a step: every block for a full group; for a
        windowed one, the sinks, the window and the step being written (a bound).

        >>> CacheGroup((0,), window=64).max_live_blocks(4096, 16, block_size=16)
        6
        """
        every = -(-num_tokens // block_size)
        if self.window is None:
            return every
        sinks = -(-self.sink_tokens // block_size)
        span = self.window - 1 + max_query_len  # keys from the window's start to the step's end
        return min(every, sinks + -(-span // block_size) + 1)


def cache_groups(config: CacheConfig) -> tuple[CacheGroup, ...]:
    """The config's layers grouped by the keys they read, in order of their first layer.

    >>> cfg = CacheConfig(num_layers=4, num_kv_heads=1, head_dim=2, max_batch_size=1,
    ...                   max_seq_len=64, layer_windows=(8, None, 8, None))
    >>> [(g.layers, g.window) for g in cache_groups(cfg)]
    [((0, 2), 8), ((1, 3), None)]
    """
    by_window: dict[int | None, list[int]] = {}
    for layer in range(config.num_layers):
        by_window.setdefault(config.window(layer), []).append(layer)
    return tuple(CacheGroup(tuple(layers), window,
                            config.sink_tokens if window is not None else 0)
                 for window, layers in by_window.items())


def check_cache_matches(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype,
                        device: torch.device) -> None:
    """Raise ValueError, naming what differs, unless `cache` stores what `model`'s layers
    write and keeps every key they read: layer count, KV heads, head dim, dtype, device,
    each layer's window and the sink tokens; under latent attention, one latent row of the
    model's R + P per token (`ModelConfig.cache_kv_heads`, `cache_head_dim`)."""
    for name, model_value in (("num_layers", model.num_layers),
                              ("num_kv_heads", model.cache_kv_heads),
                              ("head_dim", model.cache_head_dim),
                              ("latent_dim", model.kv_lora_rank)):
        if model_value != getattr(cache, name):
            raise ValueError(f"the cache has {name}={getattr(cache, name)}, the model "
                             f"{model_value}: build it with model.cache_config(...)")
    if cache.dtype != dtype:
        raise ValueError(f"the cache stores {cache.dtype}, the model computes in {dtype}")
    if cache.device.type != torch.device(device).type:
        raise ValueError(f"the cache is on {cache.device}, the model on {device}")
    for layer in range(model.num_layers):
        if model.window(layer) != cache.window(layer):
            raise ValueError(
                f"layer {layer}: the model's window is {_say(model.window(layer))} but the "
                f"cache's is {_say(cache.window(layer))}; a cache must keep every key its "
                f"layer reads: build it with model.cache_config(...)")
    if model.layer_windows != (None,) * model.num_layers and (
            model.sink_tokens != cache.sink_tokens):
        raise ValueError(f"the model's windowed layers keep {model.sink_tokens} sink "
                         f"token(s), the cache {cache.sink_tokens}")


def _say(window: int | None) -> str:
    return "none (every earlier key)" if window is None else str(window)
