"""Caches for sliding windows: RingKVCache keeps W + max_query_len - 1 keys per windowed
layer; a PagedKVCache whose config has the model's windows frees the blocks that leave them.

The reference is the flat cache, which keeps every key and lets the attention mask hide the
old ones: both must give the same outputs while storing far less.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kvlib.cache.flat import FlatKVCache
from kvlib.cache.paged import PagedKVCache
from kvlib.cache.ring import RingKVCache
from kvlib.config import CacheConfig, ModelConfig
from kvlib.contract import append
from kvlib.model import TransformerLM

pytestmark = pytest.mark.usefixtures("one_thread")


def windowed_model(window: int = 6, sliding_layers=None, seed: int = 0) -> TransformerLM:
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=256, rope_theta=500.0, sliding_window=window,
                      sliding_layers=sliding_layers)
    torch.manual_seed(seed)
    model = TransformerLM(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 1.5 / math.sqrt(m.in_features))
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0, 1.0)
    return model.eval().requires_grad_(False)


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(seed))


def feed(model, cache, prompt: torch.Tensor, chunk: int) -> torch.Tensor:
    """Run the prompt through the cache in chunks; (1, P, V) logits of every position."""
    out = [model(prompt[:, i:i + chunk], cache) for i in range(0, prompt.shape[1], chunk)]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("layers", [None, (1,)], ids=["all-layers", "layer-1"])
def test_chunked_feed_matches_the_flat_cache(chunk, layers):
    model = windowed_model(window=6, sliding_layers=layers)
    prompt = tokens(40)
    expected = model(prompt)  # no cache: the mask alone
    ring = RingKVCache.for_model(model.config, max_batch_size=1, max_seq_len=64,
                                 max_query_len=chunk)
    flat = model.new_cache(1, 64)
    torch.testing.assert_close(feed(model, ring, prompt, chunk), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feed(model, flat, prompt, chunk), expected, atol=1e-5, rtol=1e-5)
    windowed = [w is not None for w in model.config.layer_windows]
    assert ring.capacities == [6 + chunk - 1 if w else 64 for w in windowed]


def test_generation_with_a_ring_equals_the_flat_cache():
    model = windowed_model(window=5)
    prompt = tokens(12, seed=1)
    flat = model.generate(prompt, 60, cache=model.new_cache(1, 72)).tokens
    ring = RingKVCache.for_model(model.config, max_batch_size=1, max_seq_len=72,
                                 max_query_len=12)
    assert model.generate(prompt, 60, cache=ring).tokens.tolist() == flat.tolist()
    assert ring.capacities == [16, 16]  # 5 + 12 - 1 positions of 72
    assert ring.nbytes * 72 == model.new_cache(1, 72).data.nbytes * 16


@settings(max_examples=40)
@given(schedule=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1,
                         max_size=10),
       window=st.integers(1, 7))
def test_ragged_batches_of_two_sequences_match_flat(schedule, window):
    """Two sequences fed different chunk sizes in one packed step each time."""
    model = windowed_model(window=window, seed=3)
    ring = RingKVCache.for_model(model.config, max_batch_size=2, max_seq_len=64,
                                 max_query_len=4)
    flat = model.new_cache(2, 64)
    gen = torch.Generator().manual_seed(window)
    for a, b in schedule:
        ids = torch.randint(0, 64, (a + b,), generator=gen)
        got = model.packed_hidden_states(ids, [a, b], ring, [0, 1])
        want = model.packed_hidden_states(ids, [a, b], flat, [0, 1])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert ring.lengths([0, 1]).tolist() == flat.lengths([0, 1]).tolist()


def small_ring(window: int = 3, max_query_len: int = 2) -> RingKVCache:
    return RingKVCache(CacheConfig(num_layers=2, num_kv_heads=1, head_dim=2, max_batch_size=2,
                                   max_seq_len=16, layer_windows=(window, None)),
                       max_query_len=max_query_len)


def filled(n: int, cache: RingKVCache, seq: int = 0) -> None:
    for p in range(n):
        kv = torch.full((2, 1, 1, 1, 2), float(p))
        append(cache, [seq], kv, kv)


def test_ring_keeps_the_last_positions_and_the_full_layer_keeps_all():
    cache = small_ring(window=3, max_query_len=2)  # C = 4
    filled(9, cache)
    batch = cache.begin([0], [1])
    new = torch.full((1, 1, 2), 9.0)
    for layer in range(2):
        cache.write(layer, batch, new, new)
    ring, full = cache.read(0, batch), cache.read(1, batch)
    assert ring.key_start.tolist() == [6] and ring.k[0, 0, :, 0].tolist() == [6, 7, 8, 9]
    assert full.key_start is None and full.k[0, 0, :, 0].tolist() == list(range(10))
    cache.commit(batch)
    assert cache.lengths([0]).tolist() == [10]


def test_a_step_longer_than_max_query_len_is_refused_and_changes_nothing():
    cache = small_ring(max_query_len=2)
    filled(5, cache)
    before = [k.clone() for k in cache.k]
    with pytest.raises(ValueError, match="3 tokens exceeds max_query_len 2"):
        cache.begin([0], [3])
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k))
    assert cache.lengths([0]).tolist() == [5]
    cache.begin([0], [2])  # the ledger is not left open by the refusal


def test_no_room_and_bad_ids_are_refused():
    cache = small_ring(max_query_len=2)
    filled(15, cache)
    with pytest.raises(ValueError, match="no room"):
        cache.begin([0], [2])
    with pytest.raises(ValueError, match="out of range"):
        cache.lengths([2])
    with pytest.raises(ValueError, match="layer_windows has 2 entries for 1 layers"):
        CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, max_batch_size=1,
                    max_seq_len=4, layer_windows=(2, 2))
    with pytest.raises(ValueError, match="sink token"):
        RingKVCache(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, max_batch_size=1,
                                max_seq_len=4, layer_windows=(2,), sink_tokens=1))


def test_fork_copies_the_ring_and_release_empties_the_slot():
    cache = small_ring()
    filled(7, cache)
    cache.fork(0, 1)
    assert cache.lengths([0, 1]).tolist() == [7, 7]
    assert all(torch.equal(k[0], k[1]) for k in cache.k)
    with pytest.raises(ValueError, match="release it first"):
        cache.fork(0, 1)
    cache.release([1])
    assert cache.lengths([0, 1]).tolist() == [7, 0]


def test_storage_is_capped_by_the_window():
    cfg = ModelConfig(vocab_size=10, d_model=64, num_layers=4, num_heads=4, num_kv_heads=2,
                      sliding_window=32, sliding_layers=(0, 2))  # Gemma-2's alternation
    ring = RingKVCache.for_model(cfg, max_batch_size=1, max_seq_len=1024)
    flat = FlatKVCache(CacheConfig.for_model(cfg, max_batch_size=1, max_seq_len=1024))
    assert ring.capacities == [32, 1024, 32, 1024]
    assert ring.nbytes == flat.data.nbytes * (32 + 1024) // 2048


# ---------------------------------------------------------------------------------------------
# The paged cache with a window: blocks that leave it go back to the pool
# ---------------------------------------------------------------------------------------------

def windowed_paged(model, num_blocks: int = 64, block_size: int = 4) -> PagedKVCache:
    cfg = CacheConfig.for_model(model.config, max_batch_size=2, max_seq_len=128,
                                block_size=block_size)
    return PagedKVCache(cfg, num_blocks=num_blocks)  # the config carries the model's windows


@settings(max_examples=30)
@given(schedule=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1,
                         max_size=12),
       window=st.integers(1, 9))
def test_paged_window_frees_blocks_and_matches_flat(schedule, window):
    model = windowed_model(window=window, seed=4)
    paged, flat = windowed_paged(model), model.new_cache(2, 128)
    gen = torch.Generator().manual_seed(window)
    for a, b in schedule:
        ids = torch.randint(0, 64, (a + b,), generator=gen)
        got = model.packed_hidden_states(ids, [a, b], paged, [0, 1])
        want = model.packed_hidden_states(ids, [a, b], flat, [0, 1])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for seq, length in zip((0, 1), paged.lengths([0, 1]).tolist()):
            null = paged.manager.null_block(0)
            live = [i for i, block in enumerate(paged.block_table(seq)) if block != null]
            # exactly the blocks holding positions length - W + 1 .. length - 1 stay
            first = max(length - window + 1, 0) // 4
            assert live == list(range(first, -(-length // 4)))
    paged.check_invariants()
    paged.release([0, 1])
    assert paged.num_free_blocks == paged.num_blocks


def test_a_long_generation_holds_a_window_of_blocks():
    model = windowed_model(window=8)
    paged = windowed_paged(model, num_blocks=6)  # 6 blocks of 4 = 24 tokens, never more
    prompt = tokens(4, seed=2)
    flat = model.generate(prompt, 100, cache=model.new_cache(1, 128)).tokens
    assert model.generate(prompt, 100, cache=paged).tokens.tolist() == flat.tolist()
    assert paged.num_used_blocks <= 3  # ceil((8 - 1) / 4) + 1


def test_forked_windowed_sequences_share_then_free():
    model = windowed_model(window=5)
    paged = windowed_paged(model, num_blocks=16)
    model(tokens(10), paged, [0])
    paged.fork(0, 1)
    null = paged.manager.null_block(0)
    assert paged.block_table(1) == paged.block_table(0) and paged.block_table(0)[0] == null
    model(tokens(6, seed=9), paged, [1])  # the fork moves on; its old blocks leave its window
    paged.check_invariants()
    paged.release([0, 1])
    assert paged.num_free_blocks == 16


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="layer_windows entry must be an int >= 1"):
        CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, max_batch_size=1,
                    max_seq_len=8, block_size=4, layer_windows=(0,))


def test_a_backend_without_windows_refuses_a_windowed_layer():
    model = windowed_model(window=4)
    model.attention = "chunked"  # kvlib.flash: no sliding windows
    with pytest.raises(ValueError, match="'chunked' does not implement sliding windows"):
        model(tokens(8))


@pytest.mark.parametrize("backend", ["sdpa", "fast"])
def test_ring_views_on_every_windowed_backend(backend):
    """key_start and the window reach each backend's mask, uniform and ragged batches alike."""
    model = windowed_model(window=5, seed=6)
    ring = RingKVCache.for_model(model.config, max_batch_size=2, max_seq_len=64,
                                 max_query_len=3)
    flat = model.new_cache(2, 64)
    gen = torch.Generator().manual_seed(0)
    for lens in ([3, 3], [1, 3], [2, 1], [1, 1], [3, 2], [1, 1]):
        ids = torch.randint(0, 64, (sum(lens),), generator=gen)
        want = model.packed_hidden_states(ids, lens, flat, [0, 1])  # reference backend
        model.attention = backend
        try:
            got = model.packed_hidden_states(ids, lens, ring, [0, 1])
        finally:
            model.attention = "reference"
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
