"""Blocks and the block allocator: the memory manager under the paged cache.

The pool is `num_blocks` blocks of `block_size` tokens. A `KVCacheBlock` is the bookkeeping
of one block (its id, who references it, what it holds); the keys and values themselves live
in the paged cache's tensor at that id. `BlockAllocator` hands blocks out and takes them
back, in O(1) per block:

- Reference counts. A block can be in several sequences' block tables at once (a shared
  prompt, a forked sequence); it is free only when nobody references it.
- Prefix hashes. A full block is named by a hash of its tokens chained to the hash of the
  block before it, so equal hashes mean equal tokens *from position 0*: a later sequence
  whose prompt starts the same way finds those blocks with `lookup` and shares them.
- A free queue in least-recently-used order. A freed block keeps its contents and its hash,
  and waits at the tail; `allocate` takes from the head, so the block evicted (its hash
  forgotten) is the one freed longest ago. Until then it can be revived by `share`.

Invariants, checked by `check_invariants` (and in the tests after every operation):
    free + used == num_blocks
    a block is in the free queue  <=>  its ref_count == 0
    every hash in the lookup table names a block that carries that hash

>>> pool = BlockAllocator(num_blocks=4)
>>> a, b = pool.allocate(2)
>>> a.block_id, b.block_id, pool.num_free_blocks
(0, 1, 2)
>>> pool.share(a); a.ref_count                      # a second sequence uses block 0
2
>>> pool.free([b, a]); pool.num_free_blocks, a.ref_count   # block 0 is still in use
(3, 1)
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kvlib.checks import require_int


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """The hash of a full block: its tokens, chained to the previous block's hash.

    Deterministic across runs (sha256, not Python's salted `hash`), so two sequences agree.

    >>> first = hash_block_tokens(None, [1, 2])
    >>> first == hash_block_tokens(None, [1, 2]), first == hash_block_tokens(7, [1, 2])
    (True, False)
    """
    # NOTE: bytes, not text: a long prompt's blocks are hashed at every admission and commit
    head = b"-" if parent_hash is None else b"+" + parent_hash.to_bytes(8, "little")
    body = struct.pack(f"<{len(token_ids)}q", *map(int, token_ids))
    return int.from_bytes(hashlib.sha256(head + body).digest()[:8], "little")


@dataclass(eq=False)
class KVCacheBlock:
    """One block's bookkeeping; its data lives in the pool tensor at `block_id`."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and its tokens are known
    # Links of the free queue (a doubly linked list, so removing from the middle is O(1)).
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Free blocks, least recently freed first; O(1) append, pop from the head, remove."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)  # sentinels: no special cases at the ends
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        block.prev_free, block.next_free = last, self._tail
        last.next_free = self._tail.prev_free = block
        self.num_free_blocks += 1

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        assert block is not None and block is not self._tail, "popleft on an empty free queue"
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"block {block.block_id} is not free"
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def __iter__(self):
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


class BlockAllocator:
    """Hands out blocks of a pool of `num_blocks`, shares them, and caches full ones."""

    def __init__(self, num_blocks: int) -> None:
        require_int("num_blocks", num_blocks, minimum=1)
        self.num_blocks = num_blocks
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self.blocks)
        self._cached: dict[int, KVCacheBlock] = {}  # block_hash -> the block holding it
        # Told (block_id, block_hash) just before a cached block is evicted, while its data is
        # still in the pool: a host tier keeps a copy there (kvlib.cache.offload).
        self.on_evict: Callable[[int, int], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody references (cached ones included: they can be reused)."""
        return self._free.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Full blocks findable by their hash (in use, or free and not yet evicted)."""
        return len(self._cached)

    def allocate(self, num_blocks: int = 1) -> list[KVCacheBlock]:
        """`num_blocks` blocks with ref_count 1; the least recently freed are taken first."""
        require_int("num_blocks", num_blocks, minimum=1)
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"out of blocks: {num_blocks} requested, {self.num_free_blocks} "
                             f"free of {self.num_blocks}")
        out = []
        for _ in range(num_blocks):
            block = self._free.popleft()
            if block.block_hash is not None:  # evict: its old contents are about to go
                if self.on_evict is not None:
                    self.on_evict(block.block_id, block.block_hash)
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            out.append(block)
        return out

    def share(self, block: KVCacheBlock) -> None:
        """One more reference to `block`; a free cached block comes back into use."""
        self._check_own(block)
        if block.ref_count == 0:
            self._free.remove(block)  # NOTE: in the free queue exactly when unreferenced
        block.ref_count += 1

    def free(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Drop one reference to each block; unreferenced ones join the free queue's tail.

        Pass a sequence's blocks tail first: the queue then evicts its last blocks (unique
        to it) before its first ones (a prompt prefix others may ask for). Checks all blocks
        before changing any, so a bad call frees nothing.
        """
        blocks = list(blocks)
        drops: dict[int, int] = {}
        for block in blocks:
            self._check_own(block)
            drops[block.block_id] = drops.get(block.block_id, 0) + 1
            if drops[block.block_id] > block.ref_count:
                raise ValueError(f"double free: block {block.block_id} has ref_count "
                                 f"{block.ref_count} but is freed {drops[block.block_id]} time(s)")
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free.append(block)

    def lookup(self, block_hash: int) -> KVCacheBlock | None:
        """The block holding the full-block hash `block_hash`, if any (in use or free)."""
        return self._cached.get(block_hash)

    def cache_block(self, block: KVCacheBlock, block_hash: int) -> None:
        """Record that the full, in-use `block` holds the tokens named by `block_hash`.

        If another block already holds the same hash (two sequences computed the same
        prefix independently), the first stays the one `lookup` finds.
        """
        self._check_own(block)
        if block.ref_count < 1:
            raise ValueError(f"block {block.block_id} is free: only a block in use is cached")
        if block.block_hash is not None:
            if block.block_hash != block_hash:
                raise ValueError(f"block {block.block_id} already holds hash "
                                 f"{block.block_hash}, not {block_hash}")
            return
        if block_hash not in self._cached:
            self._cached[block_hash] = block
            block.block_hash = block_hash

    def check_invariants(self) -> None:
        """Assert the allocator's invariants (the tests call this after every operation)."""
        in_queue = list(self._free)
        assert len(in_queue) == self.num_free_blocks, "free queue length and count disagree"
        assert len({b.block_id for b in in_queue}) == len(in_queue), "a block is queued twice"
        for block in self.blocks:
            assert block.ref_count >= 0, f"block {block.block_id}: negative ref_count"
            assert (block.ref_count == 0) == (block.prev_free is not None), (
                f"block {block.block_id}: ref_count {block.ref_count} but "
                f"{'' if block.prev_free is not None else 'not '}in the free queue")
        for block_hash, block in self._cached.items():
            assert block.block_hash == block_hash, f"stale lookup entry for {block_hash}"

    def _check_own(self, block: KVCacheBlock) -> None:
        if not (isinstance(block, KVCacheBlock) and 0 <= block.block_id < self.num_blocks
                and self.blocks[block.block_id] is block):
            raise ValueError(f"{block!r} is not a block of this allocator")
