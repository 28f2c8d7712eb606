"""A host-memory tier under the device pool: swapped-out sequences and a second-level prefix cache.

A GPU's memory holds the device pool; the host's memory, ten times larger and a PCIe link
away, holds a second pool of blocks of the same shape (page-locked, so copies run at the
link's speed). `OffloadingKVCache` keeps both and moves blocks between them in two ways:

- Swapping (kvlib.preemption.Swap). `swap_out` moves a preempted sequence's blocks to the
  host through the managers' export and import (`PagedKVCache.export_sequence`,
  `import_sequence`) and frees them on the device; `swap_in` moves them back, with room for
  the sequence's next tokens, in one all-or-nothing act.
- A second-level prefix cache (SGLang's hierarchical cache, LMCache). A full block that leaves
  the device pool's cache -- evicted from the free queue to make room -- is copied to the host
  first, still named by its prefix hash. When a new prompt is admitted, the blocks of its
  prefix that only the host still has are copied back into the device pool as cached blocks,
  and the device's own `admit` then finds them as if they had never left.

Both tiers are `PagedKVCache`s: the host one on the CPU, its block manager doing for host
blocks what the device's does for device blocks (reference counts, LRU, prefix hashes). The
scheduler sees only the device pool (the `KVCacheManager` protocol), plus `SwapSpace` for a
swapping policy.

Worked example (blocks of 4 tokens): a 10-token sequence holds 3 blocks; swapping it out moves
them to the host, and the device pool is empty again.

>>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, max_batch_size=1,
...                   max_seq_len=32, block_size=4)
>>> cache = OffloadingKVCache(cfg, num_blocks=4, num_host_blocks=8)
>>> cache.allocate(0, 10), cache.num_used_blocks
(True, 3)
>>> cache.swap_out(0) == 3 * cache.block_bytes, cache.num_used_blocks, cache.num_host_used_blocks
(True, 0, 3)
>>> cache.swap_in(0, num_tokens=11), cache.num_used_blocks, cache.num_host_used_blocks
(True, 3, 0)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace

import torch

from kvlib.cache.block_manager import SequenceBlocks
from kvlib.cache.blocks import hash_block_tokens
from kvlib.cache.paged import PagedKVCache
from kvlib.cache.storage import BlockData
from kvlib.config import CacheConfig
from kvlib.contract import PagedKV, StepBatch


class OffloadingKVCache:
    """A device `PagedKVCache` of `num_blocks` per group over a host one of `num_host_blocks`.

    Implements the `KVCache` contract and the `KVCacheManager` protocol (for the device pool,
    as the scheduler sees it) and `kvlib.preemption.SwapSpace`.
    """

    def __init__(self, config: CacheConfig, num_blocks: int | Sequence[int],
                 num_host_blocks: int | Sequence[int]) -> None:
        self.device = PagedKVCache(config, num_blocks)
        self.host = PagedKVCache(replace(config, device=torch.device("cpu")), num_host_blocks)
        on_gpu = torch.device(config.device).type == "cuda"
        if on_gpu:
            self.host.storage.pin_memory()
        self._non_blocking = on_gpu  # pinned host memory: copies queue on the stream
        for g, alloc in enumerate(self.device.manager.allocators):
            alloc.on_evict = functools.partial(self._demote, g)
        self.num_swapped_out = self.num_swapped_in = 0
        self.num_demoted_blocks = self.num_promoted_blocks = 0

    # -- what the scheduler and the model see: the device pool ---------------------------------
    @property
    def config(self) -> CacheConfig:
        return self.device.config

    @property
    def num_layers(self) -> int:
        return self.device.num_layers

    @property
    def block_size(self) -> int:
        return self.device.block_size

    @property
    def groups(self):
        return self.device.groups

    @property
    def num_blocks(self) -> int:
        return self.device.num_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.device.num_used_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.device.num_free_blocks

    @property
    def num_host_used_blocks(self) -> int:
        """Host blocks held by swapped-out sequences (cached free ones not counted)."""
        return self.host.num_used_blocks

    @property
    def num_host_cached_blocks(self) -> int:
        """Full blocks the host tier can still hand back by their prefix hash."""
        return self.host.manager.num_cached_blocks

    @property
    def block_bytes(self) -> int:
        """Bytes one block holds over all layers of its group, K and V (group 0), scales
        included for a pool of codes."""
        storage = self.device.storage
        scales = 0 if storage.scales is None else storage.scales[0][:, :, 0].nbytes
        return storage.pools[0][:, :, 0].nbytes + scales

    @property
    def seq_ids(self) -> list[int]:
        return self.device.seq_ids

    def block_table(self, seq_id: int, group: int = 0) -> list[int]:
        return self.device.block_table(seq_id, group)

    def lengths(self, seq_ids: Sequence[int]) -> torch.Tensor:
        return self.device.lengths(seq_ids)  # (B,)

    def admit(self, seq_id: int, token_ids: Sequence[int]) -> int:
        self._promote([int(t) for t in token_ids])
        return self.device.admit(seq_id, token_ids)

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        return self.device.allocate(seq_id, num_tokens)

    def check_fits_alone(self, num_tokens: int, max_query_len: int) -> None:
        self.device.check_fits_alone(num_tokens, max_query_len)

    def begin(self, seq_ids: Sequence[int], query_lens: Sequence[int],
              token_ids: Sequence[int] | torch.Tensor | None = None) -> StepBatch:
        return self.device.begin(seq_ids, query_lens, token_ids)

    def write(self, layer: int, batch: StepBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        self.device.write(layer, batch, k, v)

    def read(self, layer: int, batch: StepBatch) -> PagedKV:
        return self.device.read(layer, batch)

    def commit(self, batch: StepBatch) -> None:
        self.device.commit(batch)

    def abort(self, batch: StepBatch) -> None:
        self.device.abort(batch)

    def fork(self, src: int, dst: int) -> None:
        self.device.fork(src, dst)

    def release(self, seq_ids: Sequence[int]) -> None:
        """Free the sequences' blocks, on the device or (swapped out) on the host."""
        for s in seq_ids:
            if not (self.device.manager.holds(s) or self.host.manager.holds(s)):
                raise ValueError(f"unknown sequence {s}: neither tier holds it")
        for tier in (self.device, self.host):
            held = [s for s in seq_ids if tier.manager.holds(s)]
            if held:
                tier.release(held)

    def export_sequence(self, seq_id: int) -> tuple[SequenceBlocks, list[BlockData]]:
        return self.device.export_sequence(seq_id)

    def import_sequence(self, seq_id: int, blocks: SequenceBlocks,
                        data: Sequence[BlockData]) -> None:
        self.device.import_sequence(seq_id, blocks, data)

    def check_invariants(self) -> None:
        """Both tiers' invariants; and no sequence is held by both."""
        self.device.check_invariants()
        self.host.check_invariants()
        both = set(self.device.seq_ids) & set(self.host.seq_ids)
        assert not both, f"sequences {sorted(both)} are held on the device and the host at once"

    # -- swapping (kvlib.preemption.SwapSpace) --------------------------------------------------
    def is_swapped_out(self, seq_id: int) -> bool:
        return self.host.manager.holds(seq_id)

    def can_swap_out(self, seq_id: int) -> bool:
        blocks = self.device.manager.export(seq_id)
        try:
            self.host.manager.check_import(seq_id, blocks)
        except ValueError:
            return False
        return True

    def swap_out(self, seq_id: int) -> int:
        """Move a sequence's blocks to the host and free them on the device; the bytes
        copied. Raises ValueError, changing nothing, when the host has no room."""
        blocks = self.device.manager.export(seq_id)
        new_ids = self.host.manager.import_sequence(seq_id, blocks)  # raises, changing nothing
        copied = self._copy(self.device, self.host, blocks.block_ids, new_ids)
        self.device.release([seq_id])
        self.num_swapped_out += 1
        return copied

    def swap_in(self, seq_id: int, num_tokens: int) -> bool:
        """Move a swapped-out sequence back with room for its first `num_tokens` tokens:
        True, or False and nothing changed when the device pool cannot hold them."""
        if not self.host.manager.holds(seq_id):
            raise ValueError(f"sequence {seq_id} is not swapped out")
        blocks = self.host.manager.export(seq_id)
        entries = -(-num_tokens // self.block_size)
        for ids, alloc in zip(blocks.block_ids, self.device.manager.allocators):
            need = sum(b is not None for b in ids) + max(0, entries - len(ids))
            if need > alloc.num_free_blocks:
                return False
        new_ids = self.device.manager.import_sequence(seq_id, blocks)
        self._copy(self.host, self.device, blocks.block_ids, new_ids)
        self.host.release([seq_id])
        grown = self.device.allocate(seq_id, num_tokens)
        assert grown, "room was counted above: import and growth take what was free"
        self.num_swapped_in += 1
        return True

    def _copy(self, src: PagedKVCache, dst: PagedKVCache,
              src_ids: Sequence[Sequence[int | None]],
              dst_ids: Sequence[Sequence[int | None]]) -> int:
        """Copy each block to its new place, one block at a time (as vLLM's swap_blocks:
        one memcpy per block, each a (L_g, 2, Hkv, BS, D) tile); the bytes copied."""
        copied = 0
        for g, (olds, news) in enumerate(zip(src_ids, dst_ids)):
            for old, new in zip(olds, news):
                if old is not None:
                    copied += self._copy_block(src, dst, g, old, new)
        return copied

    def _copy_block(self, src: PagedKVCache, dst: PagedKVCache, group: int, old: int,
                    new: int) -> int:
        """Block `old` of `src` into block `new` of `dst` (its scales too, for a pool of
        INT8 or FP8 codes); the bytes copied."""
        pairs = [(src.storage.pools[group], dst.storage.pools[group])]  # (L_g, 2, NB+1, Hkv, BS, D)
        if src.storage.scales is not None:  # (L_g, 2, NB + 1, Hkv, BS)
            pairs.append((src.storage.scales[group], dst.storage.scales[group]))
        for a, b in pairs:
            b[:, :, new].copy_(a[:, :, old], non_blocking=self._non_blocking)
        return sum(b[:, :, new].nbytes for _, b in pairs)

    # -- the second-level prefix cache ----------------------------------------------------------
    def _demote(self, group: int, block_id: int, block_hash: int) -> None:
        """A cached device block is about to be evicted: keep a copy on the host, cached
        under its hash (skipped when the host has it already or has no free block).

        NOTE: called inside the device allocator's `allocate`, where nothing may fail, and
        before the new owner writes: the block's old data is still in the pool."""
        alloc = self.host.manager.allocators[group]
        if alloc.lookup(block_hash) is not None or alloc.num_free_blocks == 0:
            return
        (block,) = alloc.allocate(1)
        self._copy_block(self.device, self.host, group, block_id, block.block_id)
        alloc.cache_block(block, block_hash)
        alloc.free([block])  # free but findable, in the host's LRU order
        self.num_demoted_blocks += 1

    def _promote(self, tokens: list[int]) -> None:
        """Copy back to the device, as cached blocks, the leading full blocks of `tokens`
        that only the host still has, while the device pool has free blocks; the device's
        `admit` then finds them. Never changes what a sequence holds."""
        BS, parent, hashes = self.block_size, None, []
        for i in range((len(tokens) - 1) // BS):  # as admit: the last token is left to compute
            parent = hash_block_tokens(parent, tokens[i * BS:(i + 1) * BS])
            hashes.append(parent)
        for g, group in enumerate(self.groups):
            dev = self.device.manager.allocators[g]
            host = self.host.manager.allocators[g]
            pinned_dev, pinned_host = [], []
            for h in hashes:
                found = dev.lookup(h)
                if found is not None:
                    pinned_dev.append(found)
                elif host.lookup(h) is not None:
                    pinned_host.append((h, host.lookup(h)))
                elif group.window is None:
                    break  # a full-attention prefix is a chain: nothing past a gap is used
            # NOTE: pin what this prompt will use (both tiers), so that the copies below,
            # which may evict device blocks (and demote them), take none of these.
            for block in pinned_dev:
                dev.share(block)
            for _, block in pinned_host:
                host.share(block)
            for h, src in pinned_host:
                if dev.num_free_blocks == 0:
                    break
                (block,) = dev.allocate(1)
                self._copy_block(self.host, self.device, g, src.block_id, block.block_id)
                dev.cache_block(block, h)
                pinned_dev.append(block)
                self.num_promoted_blocks += 1
            dev.free(pinned_dev[::-1])
            host.free([b for _, b in pinned_host[::-1]])
