"""PagedKVCache: block tables, reading in place, prefix caching, copy-on-write, bad input.

The contract every cache shares is tested in test_cache_contract.py; this file tests what is
particular to paging.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvlib.cache.paged import PagedKVCache
from kvlib.config import CacheConfig, ModelConfig
from kvlib.contract import append
from kvlib.experiments import demo_model, recorded_copies
from kvlib.kernels.paged_decode_cpu import paged_decode_numba
from kvlib.kernels.reference import paged_decode_ref

TINY = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=8, num_kv_heads=2,
                   max_seq_len=256, name="tiny")


def cache_for(block_size: int, num_blocks: int = 64, *, layers: int = 2, heads: int = 2,
              dim: int = 4, max_seq_len: int = 256, dtype=torch.float32) -> PagedKVCache:
    cfg = CacheConfig(num_layers=layers, num_kv_heads=heads, head_dim=dim, max_batch_size=1,
                      max_seq_len=max_seq_len, dtype=dtype, block_size=block_size)
    return PagedKVCache(cfg, num_blocks)


def kv(layers, n, heads=2, dim=4, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(layers, 1, heads, n, dim, generator=gen).to(dtype)
                 for _ in range(2))  # (L, 1, Hkv, n, D)


def read_back(cache, seq_id, layer=0):
    """Everything stored for one sequence through the contract: (Hkv, S, D) keys, values."""
    n = int(cache.lengths([seq_id]))
    tables = cache.block_tables([seq_id])
    from kvlib.contract import PagedKV

    dense = PagedKV(cache.k_pool(layer), cache.v_pool(layer), tables,
                    torch.tensor([n], dtype=torch.int32)).dense()  # (1, Hkv, M * BS, D)
    return dense.k[0, :, :n], dense.v[0, :, :n]


def snapshot(cache):
    return (copy.deepcopy({s: (cache.block_table(s), int(cache.lengths([s])), cache.ref_counts(s))
                           for s in cache.seq_ids}),
            cache.num_free_blocks, cache.manager.num_cached_blocks,
            torch.cat([p.flatten() for p in cache.storage.pools]))


def assert_unchanged(cache, before):
    after = snapshot(cache)
    assert after[:3] == before[:3]
    assert torch.equal(after[3], before[3])
    cache.check_invariants()


# -- generation through the model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return demo_model(TINY, seed=3)


@pytest.fixture(scope="module")
def flat_run(model):
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    return prompt, model.generate(prompt, 128, cache=model.new_cache(2, 256))


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("block_size", [1, 3, 16, 32])
def test_generation_matches_the_flat_cache(model, flat_run, block_size, backend):
    prompt, flat = flat_run
    cache = PagedKVCache(CacheConfig.for_model(TINY, max_batch_size=2, max_seq_len=256,
                                               block_size=block_size), num_blocks=300)
    model.attention = backend
    try:
        paged = model.generate(prompt, 128, cache=cache)
    finally:
        model.attention = "reference"
    assert torch.equal(paged.tokens, flat.tokens)
    torch.testing.assert_close(paged.logits, flat.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize(("H", "Hkv"), [(4, 4), (8, 2), (6, 1)])
def test_paged_decode_kernel_matches_reference(block_size, H, Hkv):
    gen = torch.Generator().manual_seed(block_size * 10 + H)
    D, B, M = 8, 3, 9
    NB = B * M + 2
    pools = [torch.randn(NB, Hkv, block_size, D, generator=gen) for _ in range(2)]
    tables = torch.randperm(NB, generator=gen)[:B * M].view(B, M).int()
    lens = torch.tensor([1, block_size * M, max(1, block_size * M // 2 + 1)])
    tables[0, 1:] = -1  # a one-token sequence: the rest of its table is padding
    q = torch.randn(B, H, D, generator=gen)
    ref = paged_decode_ref(q, *pools, tables, lens)
    torch.testing.assert_close(paged_decode_numba(q, *pools, tables, lens), ref,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paged_decode_numba(q.double(), pools[0].double(),
                                                      pools[1].double(), tables, lens),
                               ref.double(), atol=1e-5, rtol=1e-5)


def test_paged_decode_kernel_refuses_bad_shapes():
    q = torch.zeros(2, 4, 8)
    pool = torch.zeros(4, 2, 4, 8)
    tables = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_numba(q, pool, pool, tables, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_numba(q, pool, pool, tables, torch.tensor([9, 3]))
    with pytest.raises(ValueError, match="head dims"):
        paged_decode_numba(torch.zeros(2, 4, 6), pool, pool, tables, torch.tensor([1, 1]))


def test_decode_step_makes_no_copy_of_the_cache(model):
    model.attention = "fast"
    try:
        cache = PagedKVCache(CacheConfig.for_model(TINY, max_batch_size=1, max_seq_len=256),
                             num_blocks=32)
        prompt = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(5))
        model.prefill(prompt, cache)
        copies = recorded_copies(lambda: model.decode_step(prompt[:, -1], cache))
    finally:
        model.attention = "reference"
    per_layer = 200 * TINY.num_kv_heads * TINY.head_dim * 4  # one layer's cached keys
    assert copies, "the recorder saw nothing: the check would pass vacuously"
    assert max(c.nbytes for c in copies) < per_layer / 8, copies


# -- prefix caching and copy-on-write -----------------------------------------------------------

def test_prefix_is_reused_while_alive_and_after_release(model):
    gen = torch.Generator().manual_seed(6)
    shared = torch.randint(0, 256, (64,), generator=gen)
    first = torch.cat([shared, torch.randint(0, 256, (10,), generator=gen)])
    second = torch.cat([shared, torch.randint(0, 256, (7,), generator=gen)])
    expected = model.next_token_logits(second[None])  # (1, V), no cache at all
    for release_first in (False, True):
        cache = PagedKVCache(CacheConfig.for_model(TINY, max_batch_size=1, max_seq_len=256),
                             num_blocks=16)
        model.prefill(first[None], cache, [0])
        if release_first:
            cache.release([0])
        reused = cache.admit(1, second.tolist())
        assert reused == 64 and cache.lengths([1]).tolist() == [64]
        first_blocks = 4 if release_first else cache.block_table(0)[:4]
        if not release_first:
            assert cache.block_table(1) == first_blocks  # the same 4 blocks, shared
            assert cache.ref_counts(1) == [2, 2, 2, 2]
        computed = []
        cache.write = _counting(cache.write, computed)
        logits = model.prefill(second[64:][None], cache, [1])
        assert set(computed) == {7}  # only the tokens after the reused blocks
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        cache.check_invariants()


def _counting(write, computed):
    """`write`, recording how many tokens each call stores."""
    def counting_write(layer, batch, k, v):
        computed.append(batch.num_tokens)
        return write(layer, batch, k, v)
    return counting_write


def test_the_last_prompt_token_is_always_computed():
    cache = cache_for(4)
    k, v = kv(2, 8)
    batch = cache.begin([0], [8], torch.arange(8))
    for layer in range(2):
        cache.write(layer, batch, k[layer, 0].transpose(0, 1), v[layer, 0].transpose(0, 1))
    cache.commit(batch)
    assert cache.admit(1, list(range(8))) == 4  # 2 full blocks cached, 1 reused
    assert cache.admit(2, list(range(9))) == 8
    assert cache.admit(3, [0, 1, 2, 9, 4]) == 0  # differs inside the first block


def test_parallel_sampling_stores_the_prompt_once(model):
    cache = PagedKVCache(CacheConfig.for_model(TINY, max_batch_size=1, max_seq_len=256),
                         num_blocks=64)
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(7))
    model.prefill(prompt, cache, [0])
    prompt_blocks = cache.num_used_blocks  # 3 blocks of 16 for 40 tokens
    for child in (1, 2, 3):
        cache.fork(0, child)
    assert cache.num_used_blocks == prompt_blocks == 3
    (pool,) = cache.storage.pools  # (L, 2, NB + 1, Hkv, BS, D): one group
    pool_bytes_per_block = pool[:, :, 0].numel() * pool.element_size()
    # Each sample writes its own next token: only the shared, partly filled last block is
    # copied (copy-on-write); the two full prompt blocks stay shared by all four.
    for seq in range(4):
        model.decode_step(torch.tensor([seq]), cache, [seq])
    assert cache.num_used_blocks == 2 + 4
    assert all(cache.ref_counts(s)[:2] == [4, 4] for s in range(4))
    used = cache.num_used_blocks * pool_bytes_per_block
    separate = 4 * prompt_blocks * pool_bytes_per_block
    assert used < separate * 0.55  # measured: 6 blocks instead of 12


def test_copy_on_write_keeps_both_sequences_contents():
    cache = cache_for(4)
    k, v = kv(2, 6, seed=1)
    append(cache, [0], k, v)
    cache.fork(0, 1)
    k0, v0 = kv(2, 1, seed=2)
    k1, v1 = kv(2, 1, seed=3)
    append(cache, [0], k0, v0)
    append(cache, [1], k1, v1)
    assert cache.block_table(0)[0] == cache.block_table(1)[0]  # the full block: shared
    assert cache.block_table(0)[1] != cache.block_table(1)[1]  # the partial one: copied
    for seq, (kn, vn) in ((0, (k0, v0)), (1, (k1, v1))):
        keys, values = read_back(cache, seq)
        torch.testing.assert_close(keys, torch.cat([k[0, 0], kn[0, 0]], dim=1))
        torch.testing.assert_close(values, torch.cat([v[0, 0], vn[0, 0]], dim=1))


# -- bad input leaves everything unchanged ------------------------------------------------------

def test_block_size_must_be_positive():
    for bad in (0, -3, True):
        with pytest.raises(ValueError, match="block_size"):
            cache_for(bad)


def test_bad_calls_raise_and_change_nothing():
    cache = cache_for(4, num_blocks=6, max_seq_len=16)
    append(cache, [0], *kv(2, 6))
    cache.fork(0, 1)
    before = snapshot(cache)
    calls = {
        "unknown sequence": lambda: cache.release([0, 9]),
        "fork of an unknown sequence": lambda: cache.fork(7, 8),
        "fork onto an existing one": lambda: cache.fork(0, 1),
        "past max_seq_len": lambda: cache.begin([0, 1], [1, 11]),
        "out of blocks": lambda: cache.begin([0, 5], [8, 16]),
        "bad ids": lambda: cache.begin([0, 0], [1, 1]),
        "bad lengths": lambda: cache.begin([0], [0]),
        "token ids of the wrong size": lambda: cache.begin([0], [2], torch.arange(3)),
        "admitting an existing one": lambda: cache.admit(0, [1, 2, 3]),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError):
            call()
        assert_unchanged(cache, before), name
    cache.release([1])
    with pytest.raises(ValueError, match="unknown sequence 1"):
        cache.fork(1, 2)  # a fork of a freed sequence


def test_a_failed_step_is_undone(model):
    cache = PagedKVCache(CacheConfig.for_model(TINY, max_batch_size=1, max_seq_len=256),
                         num_blocks=16)
    model.prefill(torch.arange(5)[None], cache, [0])
    before = snapshot(cache)
    with pytest.raises(ValueError):
        model.prefill(torch.tensor([[1, 2, 999]]), cache, [0, ])  # out-of-vocabulary id
    assert_unchanged(cache, before)
    batch = cache.begin([0, 3], [20, 2])
    cache.abort(batch)  # the new blocks go back, sequence 3 is forgotten
    assert_unchanged(cache, before)


# -- random interleavings ------------------------------------------------------------------------

class PagedMachine(RuleBasedStateMachine):
    """add / append / fork / free over several sequences against plain per-sequence lists."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = cache_for(3, num_blocks=24, layers=2, heads=1, dim=2, max_seq_len=30)
        self.model: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (L, 1, S, D) k, v
        self.counter = 0

    def _new_kv(self, n):
        self.counter += 1
        return kv(2, n, heads=1, dim=2, seed=self.counter)

    @rule(seq=st.integers(0, 5), n=st.integers(1, 7))
    def append_tokens(self, seq, n):
        k, v = self._new_kv(n)
        held = int(self.cache.lengths([seq]))
        try:
            append(self.cache, [seq], k, v)
        except ValueError:
            assert held + n > 30 or -(-(held + n) // 3) > self.cache.num_free_blocks \
                or True  # out of room or blocks; what matters is that nothing changed
            return
        old = self.model.get(seq)
        self.model[seq] = (k[:, 0], v[:, 0]) if old is None else (
            torch.cat([old[0], k[:, 0]], 2), torch.cat([old[1], v[:, 0]], 2))

    @precondition(lambda self: self.model)
    @rule(i=st.integers(0, 100), dst=st.integers(0, 8))
    def fork(self, i, dst):
        src = sorted(self.model)[i % len(self.model)]
        if dst in self.model:
            with pytest.raises(ValueError):
                self.cache.fork(src, dst)
            return
        self.cache.fork(src, dst)
        self.model[dst] = self.model[src]

    @precondition(lambda self: self.model)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        seq = sorted(self.model)[i % len(self.model)]
        self.cache.release([seq])
        del self.model[seq]

    @invariant()
    def each_sequence_reads_its_own_tokens(self):
        self.cache.check_invariants()
        assert sorted(self.cache.seq_ids) == sorted(self.model)
        refs: dict[int, int] = {}
        for seq, (k, v) in self.model.items():
            assert int(self.cache.lengths([seq])) == k.shape[2]
            for layer in range(2):
                keys, values = read_back(self.cache, seq, layer)
                assert torch.equal(keys, k[layer]) and torch.equal(values, v[layer])
            for block in self.cache.block_table(seq):
                refs[block] = refs.get(block, 0) + 1
        for block in self.cache.manager.allocators[0].blocks:
            assert block.ref_count == refs.get(block.block_id, 0)

    def teardown(self):
        if self.model:
            self.cache.release(list(self.model))
        assert self.cache.num_free_blocks == self.cache.num_blocks  # no leak


TestPagedInterleavings = PagedMachine.TestCase
TestPagedInterleavings.settings = settings(max_examples=200, stateful_step_count=25,
                                           deadline=None)


def test_generate_out_of_blocks_keeps_its_error_and_frees_everything(model):
    cache = PagedKVCache(CacheConfig.for_model(TINY, max_batch_size=1, max_seq_len=256),
                         num_blocks=3)
    prompt = torch.arange(20)[None]
    with pytest.raises(ValueError, match="out of blocks"):
        model.generate(prompt, 40, cache=cache)  # 20 + 39 tokens need 4 blocks of 16
    assert cache.seq_ids == [] and cache.num_free_blocks == 3
    with pytest.raises(ValueError, match="out of blocks"):
        model.generate(torch.arange(60)[None], 2, cache=cache)  # the prompt alone: 4 blocks
    assert cache.seq_ids == [] and cache.num_free_blocks == 3


def test_model_cache_config_fits_any_cache_kind(model):
    cfg = model.cache_config(1, 128, block_size=8)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.block_size, cfg.dtype) == (
        TINY.num_layers, TINY.num_kv_heads, TINY.head_dim, 8, torch.float32)
    cache = PagedKVCache(cfg, num_blocks=8)
    assert model.generate(torch.arange(5)[None], 3, cache=cache).tokens.shape == (1, 3)
