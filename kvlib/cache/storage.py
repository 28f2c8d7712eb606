"""Paged storage: the block pools of every cache group, and the only code that touches them.

Each cache group (`kvlib.cache.groups`) has one tensor for its layers,
`(L_g, 2, NB + 1, Hkv, BS, D)`: K and V of `NB` blocks of `BS` tokens, per layer. Within a
block, each head's keys are one contiguous `(BS, D)` tile: the head-major order chapter 2
found cheapest to read, and the tile a decode kernel loads. (Token-major blocks,
`(BS, Hkv, D)`, are as common -- vLLM's FlashAttention backend and FlashInfer's default
use them -- and FlashInfer measures no real difference; kvlib picks the layout its kernels
and its chapter on layouts explain best.)

A latent cache (`CacheConfig.latent_dim` > 0, multi-head latent attention) stores one row
per token instead of a key and a value: its pools are `(L_g, 1, NB + 1, 1, BS, R + P)`, the
"2" of K and V become the 1 of `config.kv_parts`. `k_pool` is the whole row (the latent,
then the rotary key) and `v_pool` a view of its first R numbers: attention reads the latent
as the value without a second copy in memory.

Row `NB` of every pool is the group's null block: zeros, never written, standing in the block
tables of windowed groups for blocks their window has passed (`kvlib.cache.block_manager`).

With `kv_cache_dtype` "int8" or "fp8_e4m3" the pools hold one code per number and, beside
them, a float32 scale per (block, head, token) in `(L_g, 2, NB + 1, Hkv, BS)`: the encoding of
`kvlib.kernels.quant`, written by a store kernel that quantizes as it writes and read in
place by the fused decode and prefill kernels (INT8 is D + 4 bytes per token and head,
against 2 D in bf16).

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
from kvlib.contract import check_new_rows
from kvlib.kernels.store_kv import store_kv, store_kv_quantized


class PagedStorage:
    """The pools of a paged cache: `num_blocks[g]` blocks (+ the null block) per group."""

    def __init__(self, config: CacheConfig, groups: Sequence[CacheGroup],
                 num_blocks: Sequence[int]) -> None:
        self.config, self.groups = config, tuple(groups)
        Hkv, BS, D = config.num_kv_heads, config.block_size, config.head_dim
        parts = config.kv_parts  # K and V, or one latent row
        stored = config.code_dtype or config.dtype
        self.pools = [torch.zeros(len(g.layers), parts, nb + 1, Hkv, BS, D, dtype=stored,
                                  device=config.device)  # (L_g, 2 or 1, NB + 1, Hkv, BS, D)
                      for g, nb in zip(self.groups, num_blocks)]
        # float32 scale of every stored row when the pools hold codes (1 for a row of zeros)
        self.scales = [torch.ones(p.shape[:-1], dtype=torch.float32, device=config.device)
                       for p in self.pools] if config.code_dtype else None  # (L_g, 2, NB+1, Hkv, BS)
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
        R = self.config.latent_dim
        if R:
            return self.pools[g][i, 0, ..., :R]  # (NB + 1, 1, BS, R): the latent, a view
        return self.pools[g][i, 1]  # (NB + 1, Hkv, BS, D)

    def scale_pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """The layer's (NB + 1, Hkv, BS) float32 key and value scales, or (None, None)."""
        if self.scales is None:
            return None, None
        g, i = self._where[layer]
        return self.scales[g][i, 0], self.scales[g][i, 1]

    def pin_memory(self) -> None:
        """Page-lock host pools, so copies to and from a GPU run asynchronously at the
        link's full speed (a host tier's pools, kvlib.cache.offload)."""
        self.pools = [p.pin_memory() for p in self.pools]
        if self.scales is not None:
            self.scales = [s.pin_memory() for s in self.scales]

    @property
    def nbytes(self) -> int:
        """Bytes of every pool (and its scales), null blocks included."""
        return sum(p.nbytes for p in self.pools) + sum(s.nbytes for s in self.scales or [])

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor | None) -> None:
        """Store (N, Hkv, D) keys and values at `slot_mapping` (N,) of the layer's group; a
        latent cache's (N, 1, R + P) rows as `k`, with `v` None."""
        check_new_rows(self.config, k, v, slot_mapping.shape[0])
        if v is None:  # one row per token: a plain scatter (slot = block * BS + offset)
            pool, BS = self.k_pool(layer), self.config.block_size  # (NB + 1, 1, BS, R + P)
            keep = slot_mapping >= 0  # (N,)
            slots = slot_mapping[keep]  # (N',)
            pool[slots // BS, :, slots % BS] = k.detach()[keep]  # (N', 1, R + P)
        elif self.scales is None:
            store_kv(k.detach(), v.detach(), self.k_pool(layer), self.v_pool(layer),
                     slot_mapping)
        else:  # quantized as it is written, row by row
            store_kv_quantized(k.detach(), v.detach(), self.k_pool(layer), self.v_pool(layer),
                               *self.scale_pools(layer), slot_mapping)

    def copy_blocks(self, copies: Sequence[tuple[int, int, int, int]]) -> None:
        """For each (group, src, dst, n): the first n tokens of block src into block dst,
        in every layer of the group (copy-on-write of a shared, partly filled block)."""
        for g, src, dst, n in copies:
            self.pools[g][:, :, dst, :, :n] = self.pools[g][:, :, src, :, :n]
            if self.scales is not None:
                self.scales[g][:, :, dst, :, :n] = self.scales[g][:, :, src, :, :n]

    def read_blocks(self, group: int, block_ids: Sequence[int]) -> BlockData:
        """A copy of whole blocks: (L_g, 2, n, Hkv, BS, D) (1 for 2 in a latent cache), with
        their (L_g, 2, n, Hkv, BS) scales as a second tensor when the pools hold codes."""
        index = torch.tensor(list(block_ids), dtype=torch.int64, device=self.config.device)
        if self.scales is None:
            return self.pools[group][:, :, index].clone()
        return self.pools[group][:, :, index].clone(), self.scales[group][:, :, index].clone()

    def check_blocks(self, group: int, num_blocks: int, data: BlockData) -> None:
        """Raise ValueError unless `data` is what `read_blocks` gives for `num_blocks`."""
        pool = self.pools[group]
        parts = (data,) if self.scales is None else data
        wanted = [(pool, (*pool.shape[:2], num_blocks, *pool.shape[3:]))]  # 2 parts, or 1
        if self.scales is not None:
            scales = self.scales[group]
            wanted.append((scales, (scales.shape[0], 2, num_blocks, *scales.shape[3:])))
        if not isinstance(parts, tuple) or len(parts) != len(wanted):
            raise ValueError(f"group {group}: blocks must be {len(wanted)} tensor(s) as "
                             f"read_blocks gives, got {type(data).__name__}")
        for part, (like, shape) in zip(parts, wanted):
            if not isinstance(part, torch.Tensor) or tuple(part.shape) != shape or (
                    part.dtype != like.dtype):
                raise ValueError(f"group {group}: blocks must be {like.dtype} {shape}, got "
                                 f"{getattr(part, 'dtype', type(part).__name__)} "
                                 f"{tuple(getattr(part, 'shape', ()))}")

    def write_blocks(self, group: int, block_ids: Sequence[int], data: BlockData) -> None:
        """Fill whole blocks from `data`, as `read_blocks` gives."""
        self.check_blocks(group, len(block_ids), data)
        index = torch.tensor(list(block_ids), dtype=torch.int64, device=self.config.device)
        if self.scales is None:
            self.pools[group][:, :, index] = data.to(self.config.device)
        else:
            self.pools[group][:, :, index] = data[0].to(self.config.device)
            self.scales[group][:, :, index] = data[1].to(self.config.device)


# What a group's exported blocks are: the pool rows, or (codes, scales) for a quantized pool.
BlockData = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
