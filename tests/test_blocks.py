"""BlockAllocator and KVCacheBlock: reference counts, the LRU free queue, prefix hashes."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvlib.cache import blocks as blocks_module
from kvlib.cache.blocks import BlockAllocator, hash_block_tokens


def test_module_doctests():
    import doctest

    assert doctest.testmod(blocks_module).failed == 0


def test_allocate_takes_least_recently_freed_first():
    pool = BlockAllocator(4)
    a, b, c, d = pool.allocate(4)
    pool.free([c])
    pool.free([a])
    assert [x.block_id for x in pool.allocate(2)] == [c.block_id, a.block_id]


def test_freed_full_block_is_found_by_hash_until_evicted():
    pool = BlockAllocator(2)
    (a,) = pool.allocate(1)
    h = hash_block_tokens(None, [1, 2, 3])
    pool.cache_block(a, h)
    pool.free([a])
    assert pool.lookup(h) is a and pool.num_free_blocks == 2
    pool.share(a)  # revived from the free queue
    assert a.ref_count == 1 and pool.num_free_blocks == 1
    pool.free([a])
    pool.allocate(2)  # the queue's head is the never-used block 1, then a: evicted
    assert pool.lookup(h) is None and a.block_hash is None


def test_same_hash_from_two_blocks_keeps_the_first():
    pool = BlockAllocator(2)
    a, b = pool.allocate(2)
    h = hash_block_tokens(None, [5])
    pool.cache_block(a, h)
    pool.cache_block(b, h)
    assert pool.lookup(h) is a and b.block_hash is None


def test_hash_chains_on_the_parent():
    first = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(first, [3, 4]) != hash_block_tokens(None, [3, 4])
    assert hash_block_tokens(first, [3, 4]) == hash_block_tokens(first, [3, 4])


@pytest.mark.parametrize("n", [0, -1, True, 1.0, "2"])
def test_bad_counts_raise(n):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(n)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(2).allocate(n)


def test_running_out_raises_and_changes_nothing():
    pool = BlockAllocator(3)
    pool.allocate(2)
    with pytest.raises(ValueError, match="out of blocks: 2 requested, 1 free of 3"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    pool.check_invariants()


def test_double_free_raises_and_frees_nothing():
    pool = BlockAllocator(3)
    a, b = pool.allocate(2)
    with pytest.raises(ValueError, match="double free: block 0"):
        pool.free([b, a, a])
    assert (a.ref_count, b.ref_count, pool.num_free_blocks) == (1, 1, 1)
    pool.free([a])
    with pytest.raises(ValueError, match="double free"):
        pool.free([a])
    pool.check_invariants()


def test_foreign_blocks_are_refused():
    pool, other = BlockAllocator(2), BlockAllocator(2)
    (x,) = other.allocate(1)
    for call in (lambda: pool.free([x]), lambda: pool.share(x), lambda: pool.cache_block(x, 1)):
        with pytest.raises(ValueError, match="not a block of this allocator"):
            call()
    with pytest.raises(ValueError, match="not a block"):
        pool.free(["0"])


def test_cache_block_needs_a_block_in_use():
    pool = BlockAllocator(1)
    (a,) = pool.allocate(1)
    pool.free([a])
    with pytest.raises(ValueError, match="is free"):
        pool.cache_block(a, 1)


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / share / free / cache against a plain count of references."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockAllocator(8)
        self.refs: list = []  # one entry per reference held: the block

    @rule(n=st.integers(1, 4))
    def allocate(self, n):
        if n > self.pool.num_free_blocks:
            with pytest.raises(ValueError):
                self.pool.allocate(n)
            return
        self.refs += self.pool.allocate(n)

    @precondition(lambda self: self.refs)
    @rule(i=st.integers(0, 100))
    def share(self, i):
        block = self.refs[i % len(self.refs)]
        self.pool.share(block)
        self.refs.append(block)

    @precondition(lambda self: self.refs)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        block = self.refs.pop(i % len(self.refs))
        self.pool.free([block])

    @precondition(lambda self: self.refs)
    @rule(i=st.integers(0, 100), tokens=st.lists(st.integers(0, 3), min_size=1, max_size=2))
    def cache(self, i, tokens):
        block = self.refs[i % len(self.refs)]
        h = hash_block_tokens(None, tokens)
        if block.block_hash not in (None, h):
            with pytest.raises(ValueError):
                self.pool.cache_block(block, h)
            return
        self.pool.cache_block(block, h)
        assert self.pool.lookup(h) is not None

    @invariant()
    def counts_agree(self):
        self.pool.check_invariants()
        for block in self.pool.blocks:
            assert block.ref_count == sum(1 for b in self.refs if b is block)
        used = len({id(b) for b in self.refs})
        assert self.pool.num_used_blocks == used
        assert self.pool.num_free_blocks + used == self.pool.num_blocks


TestAllocator = AllocatorMachine.TestCase
TestAllocator.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
