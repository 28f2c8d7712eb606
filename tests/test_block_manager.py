"""The block manager: room in one call, windows that free blocks, export and import.

The manager is host bookkeeping only (kvlib.cache.block_manager); what the storage does with
the block ids is tested through the paged cache (test_paged_cache.py, test_cache_groups.py).
A hypothesis state machine drives admit / allocate / commit / fork / release / export /
import over a manager with a full group, a windowed group and a sinks-plus-window group, and
checks after every operation that no block leaks, ref counts match the tables, and a refused
call changes nothing.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvlib.cache.block_manager import BlockManager, SequenceBlocks
from kvlib.cache.groups import CacheGroup

FULL = CacheGroup(layers=(0,))
WINDOW = CacheGroup(layers=(1,), window=5)
SINKS = CacheGroup(layers=(2,), window=4, sink_tokens=3)


def manager(groups=(FULL,), num_blocks=12, block_size=4, max_seq_len=64) -> BlockManager:
    return BlockManager(list(groups), num_blocks, block_size, max_seq_len)


def state(m: BlockManager):
    """Everything observable about a manager, for 'nothing changed' checks."""
    return copy.deepcopy((
        {s: ([m.block_table(s, g) for g in range(len(m.groups))], m.length(s),
             [m.ref_counts(s, g) for g in range(len(m.groups))]) for s in m.seq_ids},
        [a.num_free_blocks for a in m.allocators], m.num_cached_blocks))


def test_allocate_is_all_or_nothing_across_groups():
    m = manager([FULL, WINDOW], num_blocks=[6, 2])
    assert m.allocate(0, 8)  # two blocks in each group
    before = state(m)
    assert not m.allocate(0, 12)  # the full group has room, the windowed one none
    assert state(m) == before
    assert not m.allocate_many([(0, 8), (1, 24)])  # the second item does not fit
    assert state(m) == before
    m.check_invariants()


def test_a_window_frees_blocks_into_the_null_block():
    m = manager([FULL, WINDOW], num_blocks=16)
    assert m.allocate(0, 13)
    m.commit(0, 13, token_ids=None)
    # the next query (13) reads 9..13 (window 5): blocks 0 and 1 (positions 0..7) are dead
    null = m.null_block(1)
    assert null == 16 and m.block_table(0, 1) == [null, null, 2, 3]
    assert m.block_table(0, 0) == [0, 1, 2, 3]  # the full group keeps everything
    assert m.allocators[1].num_free_blocks == 14 and m.allocators[0].num_free_blocks == 12
    m.check_invariants()


def test_sink_blocks_are_never_freed():
    m = manager([SINKS], num_blocks=16)
    assert m.allocate(0, 30)
    m.commit(0, 30, token_ids=None)
    # sinks 0..2 live in block 0; the next query (30) reads 27..30: blocks 6, 7
    null = m.null_block(0)
    assert m.block_table(0) == [0, null, null, null, null, null, 6, 7]
    m.check_invariants()


def test_prefix_reuse_needs_only_what_each_group_reads():
    m = manager([FULL, WINDOW], num_blocks=32)
    tokens = list(range(40))
    assert m.allocate(0, 40)
    m.commit(0, 40, tokens)
    m.release([0])  # blocks stay cached in the free queues
    found = m.admit(1, tokens + [99])
    assert found == 40  # every full block (the last token is always left to compute)
    null = m.null_block(1)
    # the windowed group took only the blocks the next query reads (positions 36..40)
    assert m.block_table(1, 1)[:9] == [null] * 9 and m.block_table(1, 1)[9] != null
    assert len(m.block_table(1, 0)) == 10 and null not in m.block_table(1, 0)
    m.check_invariants()


def test_export_then_import_holds_the_same_sequence_elsewhere():
    a = manager([FULL, WINDOW], num_blocks=16)
    tokens = list(range(22))
    assert a.allocate(0, 22)
    a.commit(0, 22, tokens)
    out = a.export(0)
    assert out.length == 22 and out.token_ids == tuple(tokens) and len(out.hashes) == 5
    assert out.block_ids[1][:4] == (None,) * 4  # freed window blocks travel as None
    b = manager([FULL, WINDOW], num_blocks=16)
    b.allocate(7, 9)  # b's own sequence takes blocks 0..2 first
    new = b.import_sequence(3, out)
    assert b.length(3) == 22 and [x is None for x in new[1]] == [x is None for x in out.block_ids[1]]
    assert b.block_table(3, 0) == [x for x in new[0]]
    # the imported blocks are findable by their prefix in b
    b.release([3])
    assert b.admit(4, tokens + [1]) == 20
    b.check_invariants()


@pytest.mark.parametrize("case", ["no room", "other block size", "other groups", "held id",
                                  "not exported"])
def test_a_bad_import_changes_nothing(case):
    a = manager([FULL, WINDOW], num_blocks=16)
    assert a.allocate(0, 22)
    a.commit(0, 22, None)
    out = a.export(0)
    groups, nb, bs, seq = [FULL, WINDOW], 16, 4, 3
    if case == "no room":
        nb = 4
    elif case == "other block size":
        bs = 8
    elif case == "other groups":
        groups = [FULL, CacheGroup(layers=(1,), window=6)]
    b = manager(groups, num_blocks=nb, block_size=bs)
    b.allocate(1, 4)
    if case == "held id":
        seq = 1
    before = state(b)
    with pytest.raises(ValueError):
        b.import_sequence(seq, out if case != "not exported" else {"length": 22})
    assert state(b) == before
    b.check_invariants()


def test_bad_calls_raise_and_change_nothing():
    m = manager([FULL, WINDOW])
    assert m.allocate(0, 6)
    m.commit(0, 6, [1, 2, 3, 4, 5, 6])
    before = state(m)
    for call in (lambda: m.admit(0, [1]), lambda: m.release([0, 5]), lambda: m.fork(0, 0),
                 lambda: m.fork(9, 1), lambda: m.allocate(0, 10**6),
                 lambda: m.allocate(0, -1), lambda: m.commit(5, 1, None)):
        with pytest.raises(ValueError):
            call()
        assert state(m) == before
    m.check_invariants()


def test_check_fits_alone_bounds_each_group():
    m = manager([FULL, WINDOW], num_blocks=[40, 4], max_seq_len=160)
    m.check_fits_alone(160, max_query_len=1)  # 40 full blocks; the window holds 3 at most
    with pytest.raises(ValueError, match="window 5 group"):
        m.check_fits_alone(160, max_query_len=16)  # a 16-token step spans 6 windowed blocks
    with pytest.raises(ValueError, match="full group"):
        m.check_fits_alone(161, max_query_len=1)


class ManagerMachine(RuleBasedStateMachine):
    """Random operations over three groups; the truth is each sequence's committed length."""

    def __init__(self) -> None:
        super().__init__()
        self.m = manager([FULL, WINDOW, SINKS], num_blocks=[20, 8, 9], block_size=3,
                         max_seq_len=45)
        self.lengths: dict[int, int] = {}
        self.room: dict[int, int] = {}  # tokens allocated for
        self.other = manager([FULL, WINDOW, SINKS], num_blocks=[20, 8, 9], block_size=3,
                             max_seq_len=45)

    @rule(seq=st.integers(0, 5), n=st.integers(1, 9))
    def allocate_and_commit(self, seq, n):
        length = self.lengths.get(seq, 0)
        before = state(self.m)
        if length + n > 45:
            with pytest.raises(ValueError):
                self.m.allocate(seq, length + n)
            assert state(self.m) == before
            return
        if not self.m.allocate(seq, length + n):
            assert state(self.m) == before, "a refused allocate changed something"
            return
        self.m.commit(seq, n, None)
        self.lengths[seq] = length + n

    @rule(seq=st.integers(0, 5), tokens=st.lists(st.integers(0, 3), min_size=1, max_size=20))
    def admit(self, seq, tokens):
        if seq in self.lengths:
            return
        found = self.m.admit(seq, tokens)
        assert found % 3 == 0 and found < len(tokens)
        self.lengths[seq] = found

    @precondition(lambda self: self.lengths)
    @rule(i=st.integers(0, 100), dst=st.integers(0, 8))
    def fork(self, i, dst):
        src = sorted(self.lengths)[i % len(self.lengths)]
        if dst in self.lengths:
            with pytest.raises(ValueError):
                self.m.fork(src, dst)
            return
        self.m.fork(src, dst)
        self.lengths[dst] = self.lengths[src]

    @precondition(lambda self: self.lengths)
    @rule(i=st.integers(0, 100))
    def release(self, i):
        seq = sorted(self.lengths)[i % len(self.lengths)]
        self.m.release([seq])
        del self.lengths[seq]

    @precondition(lambda self: self.lengths)
    @rule(i=st.integers(0, 100))
    def move_to_the_other_manager(self, i):
        seq = sorted(self.lengths)[i % len(self.lengths)]
        out = self.m.export(seq)
        assert isinstance(out, SequenceBlocks) and out.length == self.lengths[seq]
        before = state(self.other)
        try:
            self.other.import_sequence(seq, out)
        except ValueError:
            assert state(self.other) == before  # no room there: nothing changed
            return
        assert self.other.length(seq) == self.lengths[seq]
        self.other.release([seq])

    @invariant()
    def consistent(self):
        self.m.check_invariants()
        self.other.check_invariants()
        assert sorted(self.m.seq_ids) == sorted(self.lengths)
        for seq, n in self.lengths.items():
            assert self.m.length(seq) == n
            for g, group in enumerate(self.m.groups):
                live = [b for b in self.m.block_table(seq, g) if b != self.m.null_block(g)]
                dead = group.dead_blocks(n, 3)
                assert len(self.m.block_table(seq, g)) - len(live) <= len(dead)

    def teardown(self):
        if self.lengths:
            self.m.release(list(self.lengths))
        assert self.m.num_used_blocks == 0 and self.other.num_used_blocks == 0  # no leak


TestManagerInterleavings = ManagerMachine.TestCase
TestManagerInterleavings.settings = settings(max_examples=150, stateful_step_count=30,
                                             deadline=None)
