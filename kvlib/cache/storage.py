"""Paged storage: the block pools of every cache group, and the only code that touches them.

Each cache group (`kvlib.cache.groups`) has one tensor for its layers,
`(L_g, 2, NB + 1, Hkv, BS, D)`: K and V of `NB` blocks of `BS` tokens, per layer. Within a
block, each head's keys are one contiguous `(BS, D)` tile: the head-major order chapter 2
found cheapest to read, and the tile a decode kernel loads. (Token-major blocks,
`(BS, Hkv, D)`, are as common -- vLLM's FlashAttention backend and FlashInfer's default
use them -- and FlashInfer measures no real difference; kvlib picks the layout its kernels
and its chapter on layouts explain best.)

Row `NB` of every pool is the group's null block: zeros, never written, standing in the block
tables of windowed groups for blocks their window has passed (`kvlib.cache.block_manager`).

What the storage does: write a layer's new keys and values at the step's `slot_mapping` (a
Triton kernel on a GPU), hand out a layer's pools, copy blocks (copy-on-write), and read or
fill whole blocks (export and import of a sequence).

Legend: L_g layers in a group, NB blocks, BS block size, Hkv KV heads, D head dim, N tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvlib.cache.groups import CacheGroup
from kvlib.config import CacheConfig
from kvlib.contract import check_new_kv
from kvlib.kernels.store_kv import store_kv


class PagedStorage:
    """The pools of a paged cache: `num_blocks[g]` blocks (+ the null block) per group."""

    def __init__(self, config: CacheConfig, groups: Sequence[CacheGroup],
                 num_blocks: Sequence[int]) -> None:
        self.config, self.groups = config, tuple(groups)
        Hkv, BS, D = config.num_kv_heads, config.block_size, config.head_dim
        self.pools = [torch.zeros(len(g.layers), 2, nb + 1, Hkv, BS, D, dtype=config.dtype,
                                  device=config.device)  # (L_g, 2, NB + 1, Hkv, BS, D)
                      for g, nb in zip(self.groups, num_blocks)]
        # layer -> (its group, its index among the group's layers)
        self._where = {layer: (g, i) for g, group in enumerate(self.groups)
                       for i, layer in enumerate(group.layers)}

    def group_of(self, layer: int) -> int:
        return self._where[layer][0]

    def k_pool(self, layer: int) -> torch.Tensor:
        g, i = self._where[layer]
        return self.pools[g][i, 0]  # (NB + 1, Hkv, BS, D)

    def v_pool(self, layer: int) -> torch.Tensor:
        g, i = self._where[layer]
        return self.pools[g][i, 1]  # (NB + 1, Hkv, BS, D)

    def pin_memory(self) -> None:
        """Page-lock host pools, so copies to and from a GPU run asynchronously at the
        link's full speed (a host tier's pools, kvlib.cache.offload)."""
        self.pools = [p.pin_memory() for p in self.pools]

    @property
    def nbytes(self) -> int:
        """Bytes of every pool, null blocks included."""
        return sum(p.nbytes for p in self.pools)

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store (N, Hkv, D) keys and values at `slot_mapping` (N,) of the layer's group."""
        cfg = self.config
        check_new_kv(k, v, slot_mapping.shape[0], cfg.num_kv_heads, cfg.head_dim, cfg.dtype,
                     cfg.device)
        store_kv(k.detach(), v.detach(), self.k_pool(layer), self.v_pool(layer), slot_mapping)

    def copy_blocks(self, copies: Sequence[tuple[int, int, int, int]]) -> None:
        """For each (group, src, dst, n): the first n tokens of block src into block dst,
        in every layer of the group (copy-on-write of a shared, partly filled block)."""
        for g, src, dst, n in copies:
            self.pools[g][:, :, dst, :, :n] = self.pools[g][:, :, src, :, :n]

    def read_blocks(self, group: int, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy of whole blocks: (L_g, 2, n, Hkv, BS, D)."""
        index = torch.tensor(list(block_ids), dtype=torch.int64, device=self.config.device)
        return self.pools[group][:, :, index].clone()

    def write_blocks(self, group: int, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Fill whole blocks from `data` (L_g, 2, n, Hkv, BS, D), as `read_blocks` gives."""
        pool = self.pools[group]
        expected = (pool.shape[0], 2, len(block_ids), *pool.shape[3:])
        if not isinstance(data, torch.Tensor) or tuple(data.shape) != expected:
            raise ValueError(f"blocks for group {group} must be a tensor {expected} (L_g, 2, "
                             f"n, Hkv, BS, D), got "
                             f"{tuple(data.shape) if isinstance(data, torch.Tensor) else data!r}")
        if data.dtype != pool.dtype:
            raise ValueError(f"blocks are {data.dtype}, this cache stores {pool.dtype}")
        index = torch.tensor(list(block_ids), dtype=torch.int64, device=pool.device)
        pool[:, :, index] = data.to(pool.device)
