"""The block manager: which blocks each sequence holds, in each cache group, on the host.

The host-side half of a paged cache (the pools themselves are `PagedStorage`). For every
cache group (`kvlib.cache.groups`) it keeps a `BlockAllocator` and, per sequence, a block
table: the ids of the blocks holding its tokens, in order. It is what a scheduler talks to,
through three questions asked in one call each (the `KVCacheManager` protocol):

- `admit(seq_id, token_ids)`: hold a new sequence, with the cached blocks its tokens start
  with (prefix caching);
- `allocate(seq_id, num_tokens)`: room for its first `num_tokens` tokens in every group, or
  False and nothing changed (vLLM's `allocate_slots`: the answer and the allocation are one
  act, so no caller keeps a second copy of the room arithmetic);
- `release(seq_ids)`: give the blocks back.

Windowed groups. At `commit`, a group with a window frees the blocks its window has passed
(`CacheGroup.dead_blocks`) and puts the pool's *null block* in their table entries: a real,
zero-filled block (the pool's last, id `num_blocks`) that is never allocated or written, so
a kernel walking the table reads zeros that the window hides -- never another sequence's
keys, never an address outside the pool. A table still maps position j to entry j // BS.

Export and import move a sequence between managers (host offload, another engine): `export`
lists its blocks, tokens and hashes; `import_sequence` takes fresh blocks for them in one
call, or refuses and changes nothing.

Worked example (blocks of 4, one full group): 10 tokens take 3 blocks; a second sequence
with the same first 8 tokens shares the two full ones.

>>> from kvlib.cache.groups import CacheGroup
>>> m = BlockManager([CacheGroup(layers=(0,))], num_blocks=8, block_size=4, max_seq_len=64)
>>> m.allocate(0, 10), m.block_table(0)
(True, [0, 1, 2])
>>> m.commit(0, 10, token_ids=list(range(10)))
>>> m.admit(1, list(range(8)) + [99, 98]), m.block_table(1)   # 8 tokens found cached
(8, [0, 1])
>>> m.num_used_blocks
3
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kvlib.cache.blocks import BlockAllocator, KVCacheBlock, hash_block_tokens
from kvlib.cache.groups import CacheGroup
from kvlib.checks import require_ids, require_int


@dataclass
class _Held:
    """One sequence: its committed length, and per group its blocks and their ids."""

    blocks: list[list[KVCacheBlock | None]]  # per group; None: freed, the null block in `ids`
    ids: list[np.ndarray]  # per group (max_blocks,) int32: the block table, -1 past its end
    length: int = 0  # committed tokens
    tokens: list[int] | None = field(default_factory=list)  # known ids, for prefix hashes
    hashes: list[int] = field(default_factory=list)  # of its first len(hashes) full blocks


@dataclass(frozen=True)
class SequenceBlocks:
    """What `export` says of a sequence: enough for another manager to hold it."""

    length: int  # committed tokens
    block_size: int
    groups: tuple[CacheGroup, ...]
    block_ids: tuple[tuple[int | None, ...], ...]  # per group, per table entry; None: freed
    token_ids: tuple[int, ...] | None  # the tokens it holds, if known
    hashes: tuple[int, ...]  # prefix hashes of its first full blocks


class BlockManager:
    """Block tables of every sequence in every group; `num_blocks` blocks per group."""

    def __init__(self, groups: Sequence[CacheGroup], num_blocks: int | Sequence[int],
                 block_size: int, max_seq_len: int) -> None:
        self.groups = tuple(groups)
        counts = [num_blocks] * len(self.groups) if not isinstance(num_blocks, Sequence) else (
            list(num_blocks))
        if len(counts) != len(self.groups):
            raise ValueError(f"{len(counts)} block counts for {len(self.groups)} cache groups")
        self.allocators = [BlockAllocator(require_int("num_blocks", n, minimum=1))
                           for n in counts]
        self.block_size = require_int("block_size", block_size, minimum=1)
        self.max_blocks_per_seq = -(-require_int("max_seq_len", max_seq_len, minimum=1)
                                    // block_size)
        # (group, source block, destination block, tokens to copy): copy-on-write copies the
        # storage must make before the step that needed them writes (see `allocate`).
        self.pending_copies: list[tuple[int, int, int, int]] = []
        self._seqs: dict[int, _Held] = {}

    # -- what anyone may ask ---------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return sum(a.num_blocks for a in self.allocators)

    @property
    def num_free_blocks(self) -> int:
        return sum(a.num_free_blocks for a in self.allocators)

    @property
    def num_used_blocks(self) -> int:
        return sum(a.num_used_blocks for a in self.allocators)

    @property
    def num_cached_blocks(self) -> int:
        """Full blocks findable by their prefix hash, every group counted."""
        return sum(a.num_cached_blocks for a in self.allocators)

    def null_block(self, group: int) -> int:
        """Id of the group's null block: the pool row after its allocator's blocks."""
        return self.allocators[group].num_blocks

    @property
    def seq_ids(self) -> list[int]:
        return list(self._seqs)

    def holds(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def length(self, seq_id: int) -> int:
        return self._held(seq_id).length

    def table(self, seq_id: int, group: int) -> np.ndarray:
        """(num_entries,) int32 view of the sequence's block table in `group`."""
        held = self._held(seq_id)
        return held.ids[group][:len(held.blocks[group])]

    def block_table(self, seq_id: int, group: int = 0) -> list[int]:
        return self.table(seq_id, group).tolist()

    def ref_counts(self, seq_id: int, group: int = 0) -> list[int]:
        return [0 if b is None else b.ref_count for b in self._held(seq_id).blocks[group]]

    # -- the scheduler's questions (KVCacheManager) ------------------------------------------
    def admit(self, seq_id: int, token_ids: Sequence[int]) -> int:
        require_int("seq_id", seq_id, minimum=0)
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already held: admit takes new ones")
        tokens = [int(t) for t in token_ids]
        hashes, n = self._cached_prefix(tokens)
        held = self._new_held()
        for g, (group, alloc) in enumerate(zip(self.groups, self.allocators)):
            dead = group.dead_blocks(n * self.block_size, self.block_size)
            for i in range(n):
                block = None if i in dead else alloc.lookup(hashes[i])
                if block is not None:
                    alloc.share(block)
                self._append(held, g, block)
        held.length, held.tokens, held.hashes = n * self.block_size, tokens[:n * self.block_size], (
            hashes[:n])
        self._seqs[seq_id] = held
        return held.length

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        return self.allocate_many([(seq_id, num_tokens)])

    def allocate_many(self, items: Sequence[tuple[int, int]]) -> bool:
        """Room for each (seq_id, num_tokens) at once, or False and nothing changed. A
        sequence not held yet is admitted empty."""
        needs = self.blocks_needed(items)
        if any(n > a.num_free_blocks for n, a in zip(needs, self.allocators)):
            return False
        for seq_id, num_tokens in items:  # from here on nothing fails
            held = self._seqs.setdefault(seq_id, self._new_held())
            for g, alloc in enumerate(self.allocators):
                if self._writes_shared_block(held, g, num_tokens):
                    self._copy_on_write(held, g)
                grow = -(-num_tokens // self.block_size) - len(held.blocks[g])
                for block in alloc.allocate(grow) if grow > 0 else []:
                    self._append(held, g, block)
        return True

    def release(self, seq_ids: Sequence[int]) -> None:
        ids = require_ids("seq_ids", seq_ids)
        for s in ids:
            self._held(s)
        for s in ids:
            held = self._seqs.pop(s)
            for alloc, blocks in zip(self.allocators, held.blocks):
                # NOTE: tail first, so the free queue evicts a sequence's own last blocks
                # before the prompt prefix others may ask for (BlockAllocator.free).
                alloc.free([b for b in blocks[::-1] if b is not None])

    def check_fits_alone(self, num_tokens: int, max_query_len: int) -> None:
        for group, alloc in zip(self.groups, self.allocators):
            need = group.max_live_blocks(num_tokens, max_query_len, self.block_size)
            if need > alloc.num_blocks:
                raise ValueError(f"{num_tokens} tokens need {need} blocks of {self.block_size} "
                                 f"in the {group.kind} group; its whole pool has "
                                 f"{alloc.num_blocks}")

    # -- what the cache does -----------------------------------------------------------------
    def commit(self, seq_id: int, num_new: int, token_ids: Sequence[int] | None) -> None:
        """`num_new` tokens of the step are stored: lengths move, full blocks get their
        prefix hash, windowed groups free the blocks their window has passed."""
        held = self._held(seq_id)
        held.length += num_new
        if held.length > len(held.blocks[0]) * self.block_size:
            raise ValueError(f"sequence {seq_id}: {held.length} tokens committed in "
                             f"{len(held.blocks[0])} blocks: allocate before writing")
        if held.tokens is not None and token_ids is not None:
            held.tokens += [int(t) for t in token_ids]
            self._hash_full_blocks(held)
        else:
            held.tokens = None  # contents unknown from here on: no more prefix hashes
        for g, (group, alloc) in enumerate(zip(self.groups, self.allocators)):
            for i in group.dead_blocks(held.length, self.block_size):
                block = held.blocks[g][i]
                if block is not None:
                    alloc.free([block])
                    held.blocks[g][i] = None
                    held.ids[g][i] = self.null_block(g)

    def truncate(self, seq_id: int, num_entries: Sequence[int]) -> None:
        """Drop table entries past `num_entries[g]` in each group (undoing an allocate)."""
        held = self._held(seq_id)
        for g, alloc in enumerate(self.allocators):
            extra = held.blocks[g][num_entries[g]:]
            del held.blocks[g][num_entries[g]:]
            held.ids[g][num_entries[g]:] = -1
            alloc.free([b for b in extra[::-1] if b is not None])

    def num_entries(self, seq_id: int) -> list[int]:
        return [len(b) for b in self._held(seq_id).blocks]

    def fork(self, src: int, dst: int) -> None:
        """`dst` shares every block of `src`; copies happen when one of them writes."""
        parent = self._held(src)
        require_int("dst", dst, minimum=0)
        if dst in self._seqs:
            raise ValueError(f"cannot fork into sequence {dst}: it already exists")
        for alloc, blocks in zip(self.allocators, parent.blocks):
            for block in blocks:
                if block is not None:
                    alloc.share(block)
        self._seqs[dst] = _Held([list(b) for b in parent.blocks], [i.copy() for i in parent.ids],
                                parent.length,
                                None if parent.tokens is None else list(parent.tokens),
                                list(parent.hashes))

    def export(self, seq_id: int) -> SequenceBlocks:
        held = self._held(seq_id)
        return SequenceBlocks(
            held.length, self.block_size, self.groups,
            tuple(tuple(None if b is None else b.block_id for b in blocks)
                  for blocks in held.blocks),
            None if held.tokens is None else tuple(held.tokens), tuple(held.hashes))

    def import_sequence(self, seq_id: int, exported: SequenceBlocks) -> list[list[int | None]]:
        """Hold `exported` as sequence `seq_id` in fresh blocks; returns, per group, the new
        block id of each exported entry (None where it was freed), for the storage to fill.
        Raises ValueError, changing nothing, if it does not fit or does not match."""
        needs = self.check_import(seq_id, exported)
        held = self._new_held()
        out: list[list[int | None]] = []
        for g, (alloc, ids) in enumerate(zip(self.allocators, exported.block_ids)):
            fresh = iter(alloc.allocate(needs[g]) if needs[g] else [])
            for old in ids:
                self._append(held, g, None if old is None else next(fresh))
            out.append([None if b is None else b.block_id for b in held.blocks[g]])
        held.length = exported.length
        held.tokens = None if exported.token_ids is None else list(exported.token_ids)
        held.hashes = []
        if held.tokens is not None:
            self._hash_full_blocks(held)  # the new blocks become findable by their prefix
        self._seqs[seq_id] = held
        return out

    def check_import(self, seq_id: int, exported: SequenceBlocks) -> list[int]:
        """Raise ValueError unless `exported` can be imported as `seq_id`; the blocks each
        group would take."""
        require_int("seq_id", seq_id, minimum=0)
        if not isinstance(exported, SequenceBlocks):
            raise ValueError(f"expected SequenceBlocks (from export), got "
                             f"{type(exported).__name__}")
        if seq_id in self._seqs:
            raise ValueError(f"cannot import into sequence {seq_id}: it already exists")
        if exported.block_size != self.block_size or exported.groups != self.groups:
            raise ValueError(f"exported blocks of {exported.block_size} tokens in groups "
                             f"{[g.kind for g in exported.groups]} do not fit this manager's "
                             f"blocks of {self.block_size} in {[g.kind for g in self.groups]}")
        if len(exported.block_ids[0]) > self.max_blocks_per_seq:
            raise ValueError(f"{len(exported.block_ids[0])} blocks exceed this manager's "
                             f"{self.max_blocks_per_seq} per sequence")
        needs = [sum(b is not None for b in ids) for ids in exported.block_ids]
        for need, alloc, group in zip(needs, self.allocators, self.groups):
            if need > alloc.num_free_blocks:
                raise ValueError(f"no room to import: the {group.kind} group needs {need} "
                                 f"blocks, {alloc.num_free_blocks} are free")
        return needs

    def check_invariants(self) -> None:
        """Each allocator's invariants, and every reference count equals the table entries
        pointing at that block (so nothing leaks and nothing is freed while in use)."""
        for g, alloc in enumerate(self.allocators):
            alloc.check_invariants()
            refs = [0] * alloc.num_blocks
            for seq_id, held in self._seqs.items():
                for i, block in enumerate(held.blocks[g]):
                    want = self.null_block(g) if block is None else block.block_id
                    assert held.ids[g][i] == want, f"seq {seq_id}: table and blocks disagree"
                    if block is not None:
                        refs[block.block_id] += 1
                assert (held.ids[g][len(held.blocks[g]):] == -1).all(), "stale table entries"
            assert refs == [b.ref_count for b in alloc.blocks], f"group {g}: ref counts drift"

    # -- internals -------------------------------------------------------------------------
    def _held(self, seq_id: int) -> _Held:
        require_int("seq_id", seq_id, minimum=0)
        if seq_id not in self._seqs:
            raise ValueError(f"unknown sequence {seq_id}: this cache holds {sorted(self._seqs)}")
        return self._seqs[seq_id]

    def _new_held(self) -> _Held:
        n = len(self.groups)
        return _Held([[] for _ in range(n)],
                     [np.full(self.max_blocks_per_seq, -1, dtype=np.int32) for _ in range(n)])

    def _append(self, held: _Held, group: int, block: KVCacheBlock | None) -> None:
        i = len(held.blocks[group])
        held.blocks[group].append(block)
        held.ids[group][i] = self.null_block(group) if block is None else block.block_id

    def blocks_needed(self, items: Sequence[tuple[int, int]]) -> list[int]:
        """New blocks each group must hand out for `items` (seq_id, num_tokens), copy-on-write
        included."""
        needs = [0] * len(self.groups)
        sharers: dict[tuple[int, int], int] = {}  # (group, block id) -> writers met so far
        for seq_id, num_tokens in items:
            require_int("num_tokens", num_tokens, minimum=0)
            if -(-num_tokens // self.block_size) > self.max_blocks_per_seq:
                raise ValueError(f"sequence {seq_id}: {num_tokens} tokens need more than the "
                                 f"{self.max_blocks_per_seq} blocks a sequence may hold")
            held = self._seqs.get(seq_id)
            for g in range(len(self.groups)):
                have = 0 if held is None else len(held.blocks[g])
                needs[g] += max(0, -(-num_tokens // self.block_size) - have)
                if held is not None and self._writes_shared_block(held, g, num_tokens):
                    # NOTE: each copy drops the shared block's ref count, so of the sharers
                    # that write now only the first ref_count - 1 copy; the last keeps it.
                    last = held.blocks[g][-1]
                    key = (g, last.block_id)
                    sharers[key] = sharers.get(key, 0) + 1
                    needs[g] += sharers[key] < last.ref_count
        return needs

    def _writes_shared_block(self, held: _Held, group: int, num_tokens: int) -> bool:
        """The next write lands in a partly filled last block another sequence shares."""
        blocks = held.blocks[group]
        return (num_tokens > held.length and held.length % self.block_size != 0
                and len(blocks) * self.block_size > held.length
                and blocks[held.length // self.block_size] is not None
                and blocks[held.length // self.block_size].ref_count > 1)

    def _copy_on_write(self, held: _Held, group: int) -> None:
        i = held.length // self.block_size
        old = held.blocks[group][i]
        (new,) = self.allocators[group].allocate(1)
        self.pending_copies.append((group, old.block_id, new.block_id,
                                    held.length % self.block_size))
        self.allocators[group].free([old])
        held.blocks[group][i] = new
        held.ids[group][i] = new.block_id

    def _hash_full_blocks(self, held: _Held) -> None:
        BS = self.block_size
        for i in range(len(held.hashes), held.length // BS):
            parent = held.hashes[-1] if held.hashes else None
            block_hash = hash_block_tokens(parent, held.tokens[i * BS:(i + 1) * BS])
            for g, alloc in enumerate(self.allocators):
                block = held.blocks[g][i]
                if block is not None:
                    alloc.cache_block(block, block_hash)
            held.hashes.append(block_hash)

    def _cached_prefix(self, tokens: list[int]) -> tuple[list[int], int]:
        """Prefix hashes of `tokens`' full blocks, and how many leading blocks every group
        can take from its cache. NOTE: the last token is always left to compute, even when
        every block is cached: its logits choose the next new token."""
        BS, hashes, parent = self.block_size, [], None
        for i in range((len(tokens) - 1) // BS):
            parent = hash_block_tokens(parent, tokens[i * BS:(i + 1) * BS])
            hashes.append(parent)
        n = len(hashes)
        for group, alloc in zip(self.groups, self.allocators):
            if group.window is None:  # every block up to n, in order: a chain from block 0
                n = next((i for i in range(n) if alloc.lookup(hashes[i]) is None), n)
        while n > 0 and not all(  # windowed groups need only what the next query reads
                all(alloc.lookup(hashes[i]) is not None for i in range(n)
                    if i not in group.dead_blocks(n * BS, BS))
                for group, alloc in zip(self.groups, self.allocators) if group.window):
            n -= 1
        return hashes, n
