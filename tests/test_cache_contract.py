"""The cache contract, one suite for every cache kind (kvlib.contract).

Every test here runs against every kind in `CACHE_KINDS`, through the public contract only:
`begin`, `write`, `read`, `commit`, `abort`, `lengths`, `fork`, `release`. What a cache holds
is what `read(...).dense()` hands attention; the truth is `Harness`'s plain record of each
sequence's keys and values, written by the tests. A lossy kind (quantized) gives an `atol`:
the largest difference allowed between a value written and the value read back.

Windowed kinds (a ring, paged caches whose layer 0 has a window, with or without sink tokens)
must hold every key their windowed layer can still read -- the sinks and the last W positions
before the step's first new token, and everything after -- and may drop the rest; the
harness compares exactly those, at the positions the view says they are (`key_start`).

Adding a kind is one line in `CACHE_KINDS`: a function of (num_layers, num_kv_heads,
head_dim, capacity, max_seqs, dtype, windows, sink_tokens) that returns an empty cache able to
hold `capacity` tokens in each of `max_seqs` sequences at once (it may hold more), whose
sequence ids include 0 .. max_seqs - 1, with `windows` (a window or None per layer) and
`sink_tokens` in its config.
"""

from __future__ import annotations

import doctest
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import kvlib.contract
from kvlib.backends import BACKENDS, WINDOWED_BACKENDS, attend
from kvlib.cache import (
    FlatKVCache,
    KVCache,
    KVQuantConfig,
    PagedKVCache,
    QuantizedKVCache,
    QuantScheme,
)
from kvlib.cache.quant_memory import PRESETS as QUANT_PRESETS
from kvlib.cache.ring import RingKVCache
from kvlib.config import CacheConfig, Layout
from kvlib.contract import StepBatch, append

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Kind:
    """How to build one kind of cache, how exactly it stores values, which keys it keeps."""

    make: Callable[..., KVCache]
    atol: float = 0.0  # |read - written| allowed per stored value; 0: exact
    windows: tuple[int | None, ...] = ()  # per layer (layers past the tuple: None)
    sink_tokens: int = 0


def _config(num_layers, num_kv_heads, head_dim, max_seqs, max_seq_len, dtype, windows,
            sink_tokens, **kwargs):
    windows = (tuple(windows) + (None,) * num_layers)[:num_layers] if windows else ()
    return CacheConfig(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       max_batch_size=max_seqs, max_seq_len=max_seq_len, dtype=dtype,
                       layer_windows=windows, sink_tokens=sink_tokens, **kwargs)


def flat(num_layers, num_kv_heads, head_dim, capacity, max_seqs, dtype, windows, sinks, *,
         layout):
    return FlatKVCache(_config(num_layers, num_kv_heads, head_dim, max_seqs, capacity, dtype,
                               windows, sinks, layout=layout))


def ring(num_layers, num_kv_heads, head_dim, capacity, max_seqs, dtype, windows, sinks):
    # Room for 4x the capacity, so that the windowed layers' rings (W + 8 - 1 slots) really
    # wrap around; steps of at most 8 tokens (every test's steps are shorter).
    return RingKVCache(_config(num_layers, num_kv_heads, head_dim, max_seqs, 4 * capacity,
                               dtype, windows, sinks), max_query_len=8)


def paged(num_layers, num_kv_heads, head_dim, capacity, max_seqs, dtype, windows, sinks, *,
          block_size, kv_cache_dtype="auto"):
    # Blocks for `capacity` tokens in each sequence; one sequence may grow past its share
    # (max_seq_len), so the pool, not a per-sequence limit, is what runs out.
    return PagedKVCache(_config(num_layers, num_kv_heads, head_dim, 1, capacity * max_seqs,
                                dtype, windows, sinks, block_size=block_size,
                                kv_cache_dtype=kv_cache_dtype),
                        num_blocks=max_seqs * -(-capacity // block_size))


def quantized(num_layers, num_kv_heads, head_dim, capacity, max_seqs, dtype, windows, sinks, *,
              quant, inner):
    # The same rooms as `flat` or `paged`, holding codes and scales (kvlib.cache.quantized).
    config = _config(num_layers, num_kv_heads, head_dim, max_seqs, capacity, dtype, windows,
                     sinks, block_size=4)
    if inner == "paged":
        config = replace(config, max_batch_size=1, max_seq_len=capacity * max_seqs)
        return QuantizedKVCache(config, quant, lambda c: PagedKVCache(
            c, num_blocks=max_seqs * -(-capacity // c.block_size)))
    return QuantizedKVCache(config, quant)


KIVI_G4 = KVQuantConfig(QuantScheme("int4", "channel", 4, symmetric=False),  # keys: per channel
                        QuantScheme("int4", "token", symmetric=False), residual=2)
CACHE_KINDS: dict[str, Kind] = {
    "flat-seq-major": Kind(partial(flat, layout=Layout.SEQ_MAJOR)),
    "flat-head-major": Kind(partial(flat, layout=Layout.HEAD_MAJOR)),
    "ring-window3": Kind(ring, windows=(3,)),  # layer 0 a ring, layer 1 every position
    "paged-bs1": Kind(partial(paged, block_size=1)),
    "paged-bs3": Kind(partial(paged, block_size=3)),
    "paged-bs16": Kind(partial(paged, block_size=16)),
    # two cache groups (Gemma-2-style): layer 0 frees blocks its window of 3 has passed
    "paged-bs2-window3": Kind(partial(paged, block_size=2), windows=(3,)),
    # StreamingLLM's policy on layer 0: the first 2 tokens and the last 4
    "paged-bs2-sinks2-window4": Kind(partial(paged, block_size=2), windows=(4,),
                                     sink_tokens=2),
    # codes the fused kernels read: one int8 (or e4m3) code per number, a scale per row;
    # atol: half a step of randn values (< 5 / 127 / 2 in int8; e4m3 keeps 3 mantissa bits)
    "paged-bs4-int8": Kind(partial(paged, block_size=4, kv_cache_dtype="int8"), atol=0.03),
    "paged-bs4-fp8-window3": Kind(partial(paged, block_size=4, kv_cache_dtype="fp8_e4m3"),
                                  atol=0.35, windows=(3,)),
    # atol: half a step of randn values, int8 per token (< 5 / 127 / 2) and int4 in groups
    # of 4 tokens or one token's 4 channels ((max - min) / 15 / 2 < 0.5)
    "quantized-int8-flat": Kind(partial(quantized, quant=QUANT_PRESETS["int8-token"],
                                        inner="flat"), atol=0.05),
    "quantized-kivi-paged": Kind(partial(quantized, quant=KIVI_G4, inner="paged"), atol=0.5),
}
NO_ROOM = r"no room|out of blocks"  # a sequence's limit, or a shared pool's


@pytest.fixture(params=list(CACHE_KINDS))
def kind(request) -> Kind:
    return CACHE_KINDS[request.param]


class Harness:
    """A cache and the record of what it should hold: per sequence, K and V (L, Hkv, n, D).

    Every step through the harness checks the batch `begin` returns and, after each layer's
    write, that `read` gives every sequence's past and new tokens at their positions.
    """

    def __init__(self, kind: Kind, *, num_layers=2, num_kv_heads=2, head_dim=4, capacity=16,
                 max_seqs=4, dtype=torch.float32, seed=0) -> None:
        self.kind, self.dtype = kind, dtype
        self.cache = kind.make(num_layers, num_kv_heads, head_dim, capacity, max_seqs, dtype,
                               kind.windows, kind.sink_tokens)
        self.windows = (tuple(kind.windows) + (None,) * num_layers)[:num_layers]
        self.L, self.Hkv, self.D = num_layers, num_kv_heads, head_dim
        self.capacity, self.seqs = capacity, list(range(max_seqs))
        self.gen = torch.Generator().manual_seed(seed)
        empty = torch.zeros(num_layers, num_kv_heads, 0, head_dim, dtype=dtype)
        self.k = {s: empty for s in self.seqs}  # seq -> (L, Hkv, n, D)
        self.v = dict(self.k)

    def length(self, seq: int) -> int:
        return self.k[seq].shape[2]

    def new_kv(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.L, num_tokens, self.Hkv, self.D)  # (L, N, Hkv, D)
        return (torch.randn(shape, generator=self.gen).to(self.dtype),
                torch.randn(shape, generator=self.gen).to(self.dtype))

    def close(self, got: torch.Tensor, want: torch.Tensor) -> None:
        torch.testing.assert_close(got, want, rtol=0, atol=self.kind.atol)

    def kept(self, layer: int, start: int, end: int) -> list[int]:
        """Positions < `end` a cache must still hold in `layer` when the step's first new
        token is at `start`: all of them, or the sinks and the last W before `start` on."""
        w = self.windows[layer]
        return [p for p in range(end)
                if w is None or p < self.kind.sink_tokens or p > start - w]

    def close_kept(self, dense, b: int, layer: int, start: int, want_k, want_v) -> None:
        """Row b of a read holds `want` (Hkv, n, D) at every position it must keep."""
        first = 0 if dense.key_start is None else int(dense.key_start[b])
        keep = self.kept(layer, start, want_k.shape[1])
        cols = [p - first for p in keep]
        self.close(dense.k[b][:, cols], want_k[:, keep])
        self.close(dense.v[b][:, cols], want_v[:, keep])

    # -- one step ---------------------------------------------------------------------------
    def begin(self, seq_ids, query_lens) -> StepBatch:
        before = self.cache.lengths(seq_ids).tolist()
        batch = self.cache.begin(seq_ids, query_lens)
        N = sum(query_lens)
        assert batch.seq_ids == tuple(seq_ids) and batch.num_tokens == N
        assert batch.query_lens == tuple(query_lens)
        assert batch.context_lens == tuple(s + n for s, n in zip(before, query_lens))
        assert batch.positions.tolist() == [p for s, n in zip(before, query_lens)
                                            for p in range(s, s + n)]
        assert batch.cu_query_lens.tolist() == [0, *itertools.accumulate(query_lens)]
        assert batch.query_starts == tuple(batch.cu_query_lens.tolist())
        for slots in batch.slot_mapping.tolist():  # one row per cache group
            stored = [x for x in slots if x >= 0]  # < 0: not at a slot (a quantized residual)
            assert len(slots) == N and len(set(stored)) == len(stored), "two tokens, one slot"
        assert self.cache.lengths(seq_ids).tolist() == before, "begin moved a length"
        return batch

    def write(self, layer: int, batch: StepBatch, k: torch.Tensor, v: torch.Tensor):
        """Write layer `layer`'s slice of k, v (L, N, Hkv, D); check and return the read."""
        self.cache.write(layer, batch, k[layer], v[layer])
        return self.check_read(layer, batch, k, v)

    def check_read(self, layer, batch, k, v):
        kv = self.cache.read(layer, batch)
        dense = kv.dense()
        ctx = list(batch.context_lens)
        assert kv.context_lens.tolist() == ctx
        assert (kv.window, kv.sink_tokens) == (self.windows[layer], self.kind.sink_tokens
                                               if self.windows[layer] else 0)
        assert dense.k.shape[:2] == (batch.num_seqs, self.Hkv) and dense.k.shape[3] == self.D
        assert dense.v.shape == dense.k.shape
        assert dense.key_start is not None or dense.k.shape[2] >= max(ctx)
        cu = batch.query_starts
        for b, seq in enumerate(batch.seq_ids):
            new_k = k[layer, cu[b]:cu[b + 1]].transpose(0, 1)  # (Hkv, T_b, D)
            new_v = v[layer, cu[b]:cu[b + 1]].transpose(0, 1)
            self.close_kept(dense, b, layer, batch.starts[b],
                            torch.cat([self.k[seq][layer], new_k], dim=1),
                            torch.cat([self.v[seq][layer], new_v], dim=1))
        return kv

    def commit(self, batch: StepBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.commit(batch)
        cu = batch.query_starts
        for b, seq in enumerate(batch.seq_ids):
            self.k[seq] = torch.cat([self.k[seq], k[:, cu[b]:cu[b + 1]].transpose(1, 2)], 2)
            self.v[seq] = torch.cat([self.v[seq], v[:, cu[b]:cu[b + 1]].transpose(1, 2)], 2)

    def step(self, seq_ids, query_lens) -> None:
        batch = self.begin(seq_ids, query_lens)
        k, v = self.new_kv(batch.num_tokens)
        for layer in range(self.L):
            self.write(layer, batch, k, v)
        self.commit(batch, k, v)

    # -- the rest of the lifecycle ----------------------------------------------------------
    def fork(self, src: int, dst: int) -> None:
        self.cache.fork(src, dst)
        self.k[dst], self.v[dst] = self.k[src], self.v[src]

    def release(self, seq_ids) -> None:
        self.cache.release(seq_ids)
        for s in seq_ids:
            self.k[s], self.v[s] = self.k[s][:, :, :0], self.v[s][:, :, :0]

    # -- what the cache holds ---------------------------------------------------------------
    def check_contents(self, seq: int) -> None:
        """The committed K and V of `seq` (every position the next step can read), read
        through a step then aborted (the contract has no other way to read; needs room for
        one more token)."""
        n = int(self.cache.lengths([seq])[0])
        batch = self.cache.begin([seq], [1])
        try:
            for layer in range(self.L):
                dense = self.cache.read(layer, batch).dense()
                self.close_kept(dense, 0, layer, n, self.k[seq][layer], self.v[seq][layer])
        finally:
            self.cache.abort(batch)

    def check(self, seqs=None) -> None:
        """Lengths of every sequence, and contents of `seqs` (default: every one not full)."""
        lengths = self.cache.lengths(self.seqs)
        assert lengths.dtype == torch.int64 and lengths.device.type == "cpu"
        assert lengths.tolist() == [self.length(s) for s in self.seqs]
        for s in seqs if seqs is not None else self.seqs:
            if 0 < self.length(s) < self.capacity:
                self.check_contents(s)


def filled(kind: Kind, **kwargs) -> Harness:
    """Four sequences holding [9, 3, 0, 5] tokens, written in ragged, out-of-order steps."""
    h = Harness(kind, **kwargs)
    h.step([0, 1, 3], [2, 3, 1])
    h.step([3, 0], [4, 1])
    h.step([0], [6])
    assert h.cache.lengths([0, 1, 2, 3]).tolist() == [9, 3, 0, 5]
    return h


def test_contract_doctests():
    result = doctest.testmod(kvlib.contract)
    assert result.attempted > 0 and result.failed == 0


def test_implements_the_protocol_and_starts_empty(kind):
    h = Harness(kind)
    assert isinstance(h.cache, KVCache) and h.cache.num_layers == 2
    assert h.cache.lengths([0, 1, 2, 3]).tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------
# Writes read back where they belong
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("seq_ids", "query_lens"), [
    ([0], [1]), ([1, 2], [4, 1]), ([0, 1, 2, 3], [1, 2, 3, 4]), ([2, 0], [1, 5]),
    ([3, 1, 0], [2, 1, 3]), ([1, 0], [1, 1]),
], ids=str)
def test_ragged_steps_read_back_at_their_positions(kind, seq_ids, query_lens):
    # Harness.step checks every row of every layer's read against the record; `check` then
    # reads back every sequence, so a write outside its rows or positions shows too.
    h = filled(kind)
    h.step(seq_ids, query_lens)
    h.check()


def test_a_layer_write_touches_no_other_layer_or_sequence(kind):
    h = filled(kind)
    batch = h.begin([3, 1], [2, 1])
    k, v = h.new_kv(3)
    h.write(1, batch, k, v)  # layer 0 not written yet: its committed part must be as before
    dense = h.cache.read(0, batch).dense()
    for b, seq in enumerate([3, 1]):
        h.close_kept(dense, b, 0, h.length(seq), h.k[seq][0], h.v[seq][0])
    h.cache.abort(batch)
    h.check()


def test_lengths_returns_a_copy(kind):
    h = filled(kind)
    lengths = h.cache.lengths([0, 1])
    lengths += 100
    assert h.cache.lengths([0, 1]).tolist() == [9, 3]
    assert h.cache.lengths([3, 0, 2]).tolist() == [5, 9, 0]


# ---------------------------------------------------------------------------------------------
# Steps: commit, abort, one open step at a time
# ---------------------------------------------------------------------------------------------

def test_abort_leaves_the_cache_as_it_was(kind):
    h = filled(kind)
    batch = h.begin([1, 3], [2, 3])
    k, v = h.new_kv(5)
    for layer in range(h.L):
        h.write(layer, batch, k, v)
    h.cache.abort(batch)
    h.check()
    h.step([3, 1], [3, 2])  # the next step starts where the aborted one did
    h.check()


def test_commit_requires_every_layer_written(kind):
    h = filled(kind)
    batch = h.begin([1, 2], [1, 2])
    k, v = h.new_kv(3)
    h.write(0, batch, k, v)
    with pytest.raises(ValueError, match=r"\[1\]"):
        h.cache.commit(batch)
    assert h.cache.lengths([0, 1, 2, 3]).tolist() == [9, 3, 0, 5]
    h.write(1, batch, k, v)  # the step is still open: finish it
    h.commit(batch, k, v)
    h.check()


def test_a_failed_commit_can_be_aborted(kind):
    h = filled(kind)
    batch = h.begin([0], [2])
    with pytest.raises(ValueError):
        h.cache.commit(batch)
    h.cache.abort(batch)
    h.check()


def test_one_open_step_at_a_time(kind):
    h = filled(kind)
    batch = h.begin([1], [2])
    k, v = h.new_kv(2)
    for call in (lambda: h.cache.begin([2], [1]), lambda: h.cache.begin([1], [1]),
                 lambda: h.cache.fork(1, 2), lambda: h.cache.release([3])):
        with pytest.raises(ValueError, match="open"):
            call()
    for layer in range(h.L):
        h.write(layer, batch, k, v)  # the open step is unharmed
    h.commit(batch, k, v)
    h.check()


@pytest.mark.parametrize("end", ["commit", "abort"])
def test_a_closed_steps_batch_is_refused(kind, end):
    h = filled(kind)
    batch = h.begin([1], [1])
    k, v = h.new_kv(1)
    for layer in range(h.L):
        h.write(layer, batch, k, v)
    if end == "commit":
        h.commit(batch, k, v)
    else:
        h.cache.abort(batch)
    calls = [lambda: h.cache.write(0, batch, k[0], v[0]), lambda: h.cache.read(0, batch),
             lambda: h.cache.commit(batch), lambda: h.cache.abort(batch)]
    for call in calls:
        with pytest.raises(ValueError, match="not the open step"):
            call()
    h.check()
    newer = h.begin([1], [1])  # with a newer step open, the old batch is still refused
    for call in calls:
        with pytest.raises(ValueError, match="not the open step"):
            call()
    h.cache.abort(newer)
    h.check()


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError, and the cache as it was
# ---------------------------------------------------------------------------------------------

BAD_SEQ_IDS = [[True], [-1], [0, 0], [], [1.0], ["1"], [None]]


@pytest.mark.parametrize("seq_ids", BAD_SEQ_IDS, ids=str)
def test_bad_seq_ids_raise_and_change_nothing(kind, seq_ids):
    h = filled(kind)
    calls = [lambda: h.cache.lengths(seq_ids), lambda: h.cache.release(seq_ids),
             lambda: h.cache.begin(seq_ids, [1] * len(seq_ids))]
    if len(seq_ids) == 1:
        calls += [lambda: h.cache.fork(0, seq_ids[0]), lambda: h.cache.fork(seq_ids[0], 2)]
    for call in calls:
        with pytest.raises(ValueError):
            call()
        h.check()
    h.step([1, 2], [1, 1])  # no step was left open


@pytest.mark.parametrize("query_lens", [[0], [-1], [True], [1.0], [1, 1], [], [None]], ids=str)
def test_bad_query_lens_raise_and_change_nothing(kind, query_lens):
    h = filled(kind)
    with pytest.raises(ValueError):
        h.cache.begin([1], query_lens)
    h.check()
    h.step([1], [1])


def _ones(shape, dtype=torch.float32, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


# name: function of N (tokens in the step) -> (layer, k, v, a substring of the message)
BAD_WRITES = {
    "one-token-too-many": lambda N: (1, _ones((N + 1, 2, 4)), _ones((N + 1, 2, 4)),
                                     str((N + 1, 2, 4))),
    "one-token-too-few": lambda N: (1, _ones((N - 1, 2, 4)), _ones((N - 1, 2, 4)),
                                    str((N - 1, 2, 4))),
    "wrong-kv-heads": lambda N: (1, _ones((N, 3, 4)), _ones((N, 3, 4)), str((N, 3, 4))),
    "wrong-head-dim": lambda N: (1, _ones((N, 2, 5)), _ones((N, 2, 5)), str((N, 2, 5))),
    "v-wrong-head-dim": lambda N: (1, _ones((N, 2, 4)), _ones((N, 2, 5)), str((N, 2, 5))),
    "batched-4d": lambda N: (1, _ones((1, 2, N, 4)), _ones((1, 2, N, 4)), str((1, 2, N, 4))),
    "not-a-tensor": lambda N: (1, [[1.0]], _ones((N, 2, 4)), "list"),
    "wrong-dtype": lambda N: (1, _ones((N, 2, 4), torch.float64),
                              _ones((N, 2, 4), torch.float64), "float64"),
    "v-wrong-dtype": lambda N: (1, _ones((N, 2, 4)), _ones((N, 2, 4), torch.float16),
                                "float16"),
    "wrong-device": lambda N: (1, _ones((N, 2, 4), device="meta"),
                               _ones((N, 2, 4), device="meta"), "meta"),
    "v-wrong-device": lambda N: (1, _ones((N, 2, 4)), _ones((N, 2, 4), device="meta"), "meta"),
    "layer-past-the-end": lambda N: (2, _ones((N, 2, 4)), _ones((N, 2, 4)), "2"),
    "negative-layer": lambda N: (-1, _ones((N, 2, 4)), _ones((N, 2, 4)), "-1"),
    "bool-layer": lambda N: (True, _ones((N, 2, 4)), _ones((N, 2, 4)), "True"),
}


@pytest.mark.parametrize("name", list(BAD_WRITES))
def test_bad_write_raises_and_keeps_the_step_as_it_was(kind, name):
    h = filled(kind)
    batch = h.begin([3, 1], [1, 2])
    k, v = h.new_kv(3)
    h.write(0, batch, k, v)
    layer, bad_k, bad_v, substring = BAD_WRITES[name](3)
    with pytest.raises(ValueError) as info:
        h.cache.write(layer, batch, bad_k, bad_v)
    assert substring in str(info.value), f"{substring!r} not in {str(info.value)!r}"
    h.check_read(0, batch, k, v)  # layer 0's write is still there, nothing else changed
    h.write(1, batch, k, v)
    h.commit(batch, k, v)
    h.check()


def test_bad_reads_raise(kind):
    h = filled(kind)
    batch = h.begin([1], [1])
    for layer in (-1, 2, True):
        with pytest.raises(ValueError):
            h.cache.read(layer, batch)
    h.cache.abort(batch)


def test_no_room_raises_and_changes_nothing(kind):
    h = filled(kind)
    with pytest.raises(ValueError, match=NO_ROOM):
        h.cache.begin([1, 0], [1, 10**6])
    h.check()
    h.step([1, 0], [1, 1])  # no step was left open, and the room is still there


def test_each_sequence_holds_its_capacity_and_then_refuses(kind):
    h = Harness(kind, capacity=7)
    h.step(h.seqs, [7, 3, 6, 1])
    h.step([3, 2, 1], [6, 1, 4])  # every sequence exactly full
    h.check()  # lengths (a full sequence cannot begin a step to be read)
    for _ in range(len(h.seqs) * h.capacity + 1):  # a kind may hold more; not unboundedly
        try:
            batch = h.cache.begin([0], [1])
        except ValueError as err:
            assert re.search(NO_ROOM, str(err)), str(err)
            break
        h.cache.abort(batch)
        h.step([0], [1])
    else:
        pytest.fail("the cache never ran out of room")
    h.check()
    h.release([1])
    h.step([1], [2])  # released room is usable again
    h.check()


# ---------------------------------------------------------------------------------------------
# Lifecycle: fork and release
# ---------------------------------------------------------------------------------------------

def test_fork_copies_and_later_writes_stay_apart(kind):
    h = filled(kind)
    h.fork(3, 2)  # 5 tokens: a partly filled block in a paged cache
    assert h.cache.lengths([2, 3]).tolist() == [5, 5]
    h.check()
    h.step([2], [1])
    h.check()
    h.step([3, 2], [2, 1])
    h.step([3], [1])
    h.check()
    h.release([3])  # the fork outlives its source
    h.check()
    h.step([2], [3])
    h.check()


def test_fork_of_a_fork(kind):
    h = filled(kind)
    h.fork(0, 2)
    h.step([2], [1])
    h.release([1])
    h.fork(2, 1)
    h.step([0, 1, 2], [1, 2, 3])
    h.check()


@pytest.mark.parametrize(("src", "dst"), [(0, 1), (0, 0), (2, 2)])
def test_fork_into_a_held_or_same_sequence_raises(kind, src, dst):
    h = filled(kind)
    with pytest.raises(ValueError):
        h.cache.fork(src, dst)
    h.check()


def test_release_forgets_only_the_released(kind):
    h = filled(kind)
    h.release([3, 0])
    assert h.cache.lengths([0, 1, 2, 3]).tolist() == [0, 3, 0, 0]
    h.check()
    h.step([3, 1], [2, 1])  # a released sequence starts again at position 0
    h.check()


def test_append_helper_is_one_step(kind):
    h = filled(kind)
    k, v = torch.randn(2, 2, 2, 3, 4), torch.randn(2, 2, 2, 3, 4)  # (L, B, Hkv, T, D)
    append(h.cache, [2, 0], k, v)
    for b, seq in enumerate([2, 0]):
        h.k[seq] = torch.cat([h.k[seq], k[:, b]], dim=2)
        h.v[seq] = torch.cat([h.v[seq], v[:, b]], dim=2)
    h.check()
    with pytest.raises(ValueError, match="float64"):
        append(h.cache, [1], k[:, :1].double(), v[:, :1].double())
    h.check()
    h.step([1], [1])  # the failed append left no step open


# ---------------------------------------------------------------------------------------------
# Attention over what `read` hands it
# ---------------------------------------------------------------------------------------------

def _reference(naive_attention, q, dense, batch) -> torch.Tensor:
    """Each sequence alone, on its own keys, by the naive definition (float64)."""
    cu, ctx = batch.query_starts, batch.context_lens
    outs = []
    for b in range(batch.num_seqs):
        qb = q[cu[b]:cu[b + 1]].transpose(0, 1)[None]  # (1, H, T_b, D)
        kb, vb = dense.k[b:b + 1], dense.v[b:b + 1]  # (1, Hkv, S, D)
        pos = batch.positions[cu[b]:cu[b + 1]][None]  # (1, T_b)
        start = None if dense.key_start is None else dense.key_start[b:b + 1]
        outs.append(naive_attention(qb, kb, vb, pos, torch.tensor([ctx[b]]), dense.window,
                                    dense.sink_tokens, start)[0].transpose(0, 1))
    return torch.cat(outs)  # (N, H, D)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize(("H", "Hkv"), [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize(("seq_ids", "query_lens"), [([0, 1, 2, 3], [1, 1, 1, 1]),
                                                     ([2, 0, 3], [3, 1, 2])],
                         ids=["decode", "ragged"])
def test_attention_over_read_equals_reference(kind, backend, H, Hkv, seq_ids, query_lens,
                                              naive_attention):
    if kind.windows and backend not in WINDOWED_BACKENDS:
        pytest.skip(f"{backend} refuses windowed views (tests/test_ring_cache.py checks it)")
    h = Harness(kind, num_kv_heads=Hkv, head_dim=8, capacity=12, seed=1)
    h.step([0, 1, 2, 3], [1, 1, 1, 1])
    h.step([2, 0], [3, 1])
    h.step([3], [6])
    h.step([1, 3, 0], [1, 1, 2])
    batch = h.begin(seq_ids, query_lens)
    k, v = h.new_kv(batch.num_tokens)
    q = torch.randn(batch.num_tokens, H, 8, generator=torch.Generator().manual_seed(2))
    for layer in range(h.L):
        kv = h.write(layer, batch, k, v)  # checks what was read against the record
        out = attend(q, kv, batch, backend)  # (N, H, D)
        assert out.shape == (batch.num_tokens, H, 8)
        want = _reference(naive_attention, q, kv.dense(), batch)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    h.commit(batch, k, v)


# ---------------------------------------------------------------------------------------------
# Stateful: random steps, partial steps, aborts, forks, releases and bad calls
# ---------------------------------------------------------------------------------------------

SEQS, LAYERS, CAP = 3, 2, 8
seq_subsets = st.lists(st.integers(0, SEQS - 1), min_size=1, max_size=SEQS, unique=True)


class CacheMachine(RuleBasedStateMachine):
    """The record is the truth; one open step at most, as (batch, k, v, layers written)."""

    kind: Kind  # set by the generated subclasses below

    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed):
        self.h = Harness(self.kind, num_layers=LAYERS, max_seqs=SEQS, capacity=CAP, seed=seed)
        self.open = None
        self.closed = None  # the last closed step's batch

    def idle(self):
        return self.open is None

    def _lens(self, seq_ids, data):
        """Query lengths within each sequence's capacity, or None if one is full."""
        room = [CAP - self.h.length(s) for s in seq_ids]
        if min(room) < 1:
            return None
        return [data.draw(st.integers(1, min(r, 4))) for r in room]

    @precondition(idle)
    @rule(seq_ids=seq_subsets, data=st.data())
    def step(self, seq_ids, data):
        lens = self._lens(seq_ids, data)
        if lens is not None:
            self.h.step(seq_ids, lens)

    @precondition(idle)
    @rule(seq_ids=seq_subsets, data=st.data())
    def begin(self, seq_ids, data):
        lens = self._lens(seq_ids, data)
        if lens is not None:
            batch = self.h.begin(seq_ids, lens)
            self.open = (batch, *self.h.new_kv(batch.num_tokens), set())

    @precondition(lambda self: not self.idle())
    @rule(layer=st.integers(0, LAYERS - 1))
    def write(self, layer):
        batch, k, v, written = self.open
        self.h.write(layer, batch, k, v)  # a second write of a layer writes the same again
        written.add(layer)

    @precondition(lambda self: not self.idle())
    @rule()
    def commit(self):
        batch, k, v, written = self.open
        if len(written) < LAYERS:
            with pytest.raises(ValueError):
                self.h.cache.commit(batch)
            return
        self.h.commit(batch, k, v)
        self.open, self.closed = None, batch

    @precondition(lambda self: not self.idle())
    @rule()
    def abort(self):
        self.h.cache.abort(self.open[0])
        self.open, self.closed = None, self.open[0]

    @precondition(idle)
    @rule(data=st.data())
    def fork(self, data):
        held = [s for s in self.h.seqs if self.h.length(s)]
        empty = [s for s in self.h.seqs if not self.h.length(s)]
        if held and empty:
            self.h.fork(data.draw(st.sampled_from(held)), data.draw(st.sampled_from(empty)))

    @precondition(idle)
    @rule(seq_ids=seq_subsets)
    def release(self, seq_ids):
        # Only held ones: releasing an id never held is a no-op for a flat cache's slot and
        # an error for a paged cache (the contract does not say which).
        held = [s for s in seq_ids if self.h.length(s)]
        if held:
            self.h.release(held)

    @rule(bad=st.sampled_from(["seq_ids", "query_lens", "no-room", "begin-while-open",
                               "write-shape", "write-dtype", "stale", "fork-into-self",
                               "fork-into-held", "fork-while-open", "release-while-open"]),
          seq_ids=seq_subsets)
    def invalid(self, bad, seq_ids):
        cache, N = self.h.cache, (self.open[0].num_tokens if self.open else 1)
        calls = {
            "seq_ids": lambda: cache.begin([*seq_ids, seq_ids[0]], [1] * (len(seq_ids) + 1)),
            "query_lens": lambda: cache.begin(seq_ids, [1] * (len(seq_ids) - 1) + [0]),
            "no-room": lambda: cache.begin(seq_ids, [1] * (len(seq_ids) - 1) + [10**6]),
            "begin-while-open": lambda: cache.begin(seq_ids, [1] * len(seq_ids)),
            "write-shape": lambda: cache.write(0, self.open[0], _ones((N, 2, 3)),
                                               _ones((N, 2, 3))),
            "write-dtype": lambda: cache.write(1, self.open[0], _ones((N, 2, 4), torch.half),
                                               _ones((N, 2, 4), torch.half)),
            "stale": lambda: cache.write(0, self.closed, _ones((self.closed.num_tokens, 2, 4)),
                                         _ones((self.closed.num_tokens, 2, 4))),
            "fork-into-self": lambda: cache.fork(seq_ids[0], seq_ids[0]),
            "fork-into-held": lambda: cache.fork(seq_ids[0], seq_ids[-1]),
            "fork-while-open": lambda: cache.fork(seq_ids[0], seq_ids[-1]),
            "release-while-open": lambda: cache.release(seq_ids),
        }
        needs_open = bad in ("begin-while-open", "write-shape", "write-dtype", "fork-while-open",
                             "release-while-open")
        if (needs_open and self.idle()) or (bad == "stale" and self.closed is None) or (
                bad == "fork-into-held" and (len(seq_ids) < 2 or not self.h.length(seq_ids[-1]))):
            return
        with pytest.raises(ValueError):
            calls[bad]()
        if self.open is not None:  # layers written before the bad call are still there
            batch, k, v, written = self.open
            for layer in written:
                self.h.check_read(layer, batch, k, v)

    @invariant()
    def lengths_match(self):
        if hasattr(self, "h"):
            lengths = self.h.cache.lengths(self.h.seqs).tolist()
            assert lengths == [self.h.length(s) for s in self.h.seqs]

    @invariant()
    def contents_match(self):  # of every sequence with room to begin a step (Harness.check)
        if hasattr(self, "h") and self.idle():
            self.h.check()


STATEFUL_SETTINGS = settings(max_examples=50, stateful_step_count=25, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])

for _name, _kind in CACHE_KINDS.items():
    _machine = type(f"CacheMachine_{_name}", (CacheMachine,), {"kind": _kind})
    _test = _machine.TestCase
    _test.settings = STATEFUL_SETTINGS
    globals()[f"TestStateful_{_name.replace('-', '_')}"] = _test
del _name, _kind, _machine, _test
