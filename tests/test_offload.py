"""The host tier: swapping a sequence out and back, preemption by swapping, the second-level
prefix cache. Outputs unchanged (as tests/test_engine_caches.py checks them), and no block
leaked on either tier.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_engine_caches import SETUPS, alone, make_model, random_requests

from kvlib.cache.offload import OffloadingKVCache
from kvlib.cache.paged import PagedKVCache
from kvlib.config import CacheConfig
from kvlib.engine import BatchedInferenceEngine
from kvlib.preemption import Recompute, Swap, SwapLongerThan
from kvlib.scheduler import Request

V = 61
PREEMPTING_BLOCKS = {"paged": 14, "window-6": 7, "gemma-style": 14}  # each preempts below


def small_cache(num_blocks=4, num_host_blocks=8, **fields) -> OffloadingKVCache:
    cfg = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, max_batch_size=1,
                      max_seq_len=64, block_size=4, dtype=torch.float64, **fields)
    return OffloadingKVCache(cfg, num_blocks=num_blocks, num_host_blocks=num_host_blocks)


def fill(cache: OffloadingKVCache, seq_id: int, n: int) -> torch.Tensor:
    """Hold `n` tokens for `seq_id`, its blocks filled with random numbers; their data."""
    assert cache.allocate(seq_id, n)
    cache.device.manager.commit(seq_id, n, list(range(seq_id, seq_id + n)))
    ids = cache.block_table(seq_id)
    pool = cache.device.storage.pools[0]
    pool[:, :, ids] = torch.randn(pool[:, :, ids].shape, dtype=pool.dtype)
    return pool[:, :, ids].clone()  # (L, 2, n, Hkv, BS, D)


def check_no_leak(engine):
    cache = engine.cache
    cache.check_invariants()
    assert cache.num_used_blocks == 0, f"{cache.num_used_blocks} device blocks leaked"
    assert cache.num_host_used_blocks == 0, f"{cache.num_host_used_blocks} host blocks leaked"
    assert not engine.scheduler.waiting and not engine.scheduler.running


def test_swap_out_and_in_keeps_every_number():
    cache = small_cache()
    data = fill(cache, 0, 10)
    copied = cache.swap_out(0)
    assert copied == data.nbytes and cache.num_used_blocks == 0 and cache.is_swapped_out(0)
    host = cache.host.storage.pools[0][:, :, cache.host.block_table(0)]
    assert torch.equal(host, data)
    assert cache.swap_in(0, num_tokens=13)  # 4 blocks: 3 back, one to grow into
    table = cache.block_table(0)
    assert len(table) == 4 and cache.device.manager.length(0) == 10
    assert torch.equal(cache.device.storage.pools[0][:, :, table[:3]], data)
    cache.check_invariants()
    cache.release([0])
    assert cache.num_used_blocks == 0 and cache.num_host_used_blocks == 0


def test_swap_out_without_host_room_changes_nothing():
    cache = small_cache(num_blocks=4, num_host_blocks=2)
    data = fill(cache, 0, 10)
    assert not cache.can_swap_out(0)
    with pytest.raises(ValueError, match="no room"):
        cache.swap_out(0)
    assert cache.num_used_blocks == 3 and cache.num_host_used_blocks == 0
    assert torch.equal(cache.device.storage.pools[0][:, :, cache.block_table(0)], data)
    cache.check_invariants()


def test_swap_in_without_device_room_changes_nothing():
    cache = small_cache(num_blocks=4, num_host_blocks=8)
    fill(cache, 0, 10)
    cache.swap_out(0)
    fill(cache, 1, 8)  # 2 of the 4 device blocks
    assert not cache.swap_in(0, num_tokens=11)
    assert cache.is_swapped_out(0) and cache.num_used_blocks == 2
    assert cache.num_host_used_blocks == 3
    cache.check_invariants()


def test_swapping_needs_a_host_tier():
    model = make_model(SETUPS["paged"])
    with pytest.raises(ValueError, match="host tier"):
        BatchedInferenceEngine(model, num_blocks=8, block_size=4, preemption=Swap())


def test_evicted_blocks_stay_findable_on_the_host():
    """A 3-block prompt is computed, released, evicted from a 4-block device pool by other
    prompts; admitted again, its two full prefix blocks come back from the host."""
    cache = small_cache(num_blocks=4, num_host_blocks=8)
    tokens = list(range(100, 111))  # 11 tokens: 2 full blocks + 3
    assert cache.admit(0, tokens) == 0 and cache.allocate(0, 11)
    cache.device.manager.commit(0, 11, tokens)
    ids = cache.block_table(0)
    pool = cache.device.storage.pools[0]
    pool[:, :, ids] = torch.randn(pool[:, :, ids].shape, dtype=pool.dtype)
    prefix = pool[:, :, ids[:2]].clone()
    cache.release([0])
    for s in (1, 2):  # two 8-token sequences take every device block: the prefix is evicted
        assert cache.admit(s, [s] * 8) == 0 and cache.allocate(s, 8)
    assert cache.device.manager.num_cached_blocks == 0 or cache.num_demoted_blocks >= 2
    cache.release([1, 2])
    plain = PagedKVCache(cache.config, num_blocks=4)  # the same story with no host tier
    assert cache.admit(3, tokens) == 8, "both full prefix blocks found via the host"
    assert torch.equal(pool[:, :, cache.block_table(3)], prefix)
    assert cache.num_promoted_blocks == 2
    assert plain.admit(3, tokens) == 0
    cache.release([3])
    cache.check_invariants()


@pytest.mark.parametrize("setup_name", ["paged", "window-6", "gemma-style"])
@pytest.mark.parametrize("policy", [Swap(), SwapLongerThan(8)], ids=["swap", "longer-than-8"])
def test_outputs_equal_generate_alone(setup_name, policy):
    """A pool small enough to preempt: outputs as if each request ran alone, greedy and
    seeded, whether preempted requests were swapped or recomputed."""
    setup = SETUPS[setup_name]
    model = make_model(setup)
    rng = random.Random(3)
    prefixes = [[rng.randrange(V) for _ in range(12)]]
    prompts, lengths, samplings = random_requests(10, seed=30, prefixes=prefixes)
    cache = OffloadingKVCache(model.cache_config(1, 96, block_size=4),
                              num_blocks=PREEMPTING_BLOCKS[setup_name], num_host_blocks=24)
    engine = BatchedInferenceEngine(model, cache=cache, max_num_batched_tokens=16,
                                    preemption=policy)
    result = engine.generate(prompts, samplings, lengths, show_progress=False)
    for p, n, s, out in zip(prompts, lengths, samplings, result.outputs):
        assert out.token_ids == alone(model, setup, p, s, n), (p, n, s)
    assert result.metrics.num_swaps > 0 and cache.num_swapped_in == result.metrics.num_swaps
    kept = [n for step in result.metrics.steps for _, kind, n in step.events
            if kind == "preempt" and n > 0]
    assert len(kept) == result.metrics.num_swaps and min(kept) >= policy.min_tokens
    check_no_leak(engine)


def test_randomized_requests_on_a_small_host_tier():
    """Arrivals spread over time, shared prefixes, a host tier too small for every swap
    (so some preemptions fall back to recomputation), seeded and greedy requests."""
    setup = SETUPS["paged"]
    small = make_model(setup, seed=7, d_model=16)
    rng = random.Random(21)
    prefixes = [[rng.randrange(V) for _ in range(rng.randint(4, 14))] for _ in range(6)]
    prompts, lengths, samplings = random_requests(120, seed=22, max_prompt=14, max_new=10,
                                                  prefixes=prefixes)
    cache = OffloadingKVCache(small.cache_config(1, 96, block_size=4), num_blocks=16,
                              num_host_blocks=5)
    engine = BatchedInferenceEngine(small, cache=cache, max_num_batched_tokens=24,
                                    preemption=Swap())
    ids = []
    for i, (p, n, s) in enumerate(zip(prompts, lengths, samplings)):
        ids.append(engine.add_request(Request(p, s, n)))
        if i % 10 == 9:
            engine.step()
            cache.check_invariants()
    engine.run(show_progress=False)
    m = engine.metrics
    assert 0 < m.num_swaps < m.num_preemptions  # both swaps and recomputations happened
    assert cache.num_promoted_blocks > 0 and m.num_prefix_hit_tokens > 0
    for i, p, n, s in zip(ids, prompts, lengths, samplings):
        assert engine.output(i).token_ids == alone(small, setup, p, s, n), i
    check_no_leak(engine)


def test_recompute_is_the_default_and_keeps_nothing():
    model = make_model(SETUPS["paged"])
    engine = BatchedInferenceEngine(model, num_blocks=8, block_size=4)
    assert isinstance(engine.scheduler.preemption, Recompute)
    with pytest.raises(ValueError, match="keeps no tokens"):
        Recompute().resume(engine.cache, 0, 4, 5)


def test_swap_keeps_codes_and_scales_of_an_int8_pool():
    """A pool of INT8 codes swaps its per-row scales with its codes, both ways."""
    cache = small_cache(kv_cache_dtype="int8")
    assert cache.allocate(0, 10)
    ids = cache.block_table(0)
    pool, scales = cache.device.storage.pools[0], cache.device.storage.scales[0]
    pool[:, :, ids] = torch.randint(-127, 128, pool[:, :, ids].shape, dtype=torch.int8)
    scales[:, :, ids] = torch.rand(scales[:, :, ids].shape) + 0.5  # (L, 2, n, Hkv, BS)
    codes, rows = pool[:, :, ids].clone(), scales[:, :, ids].clone()
    assert cache.swap_out(0) == codes.nbytes + rows.nbytes == 3 * cache.block_bytes
    host = cache.host.block_table(0)
    assert torch.equal(cache.host.storage.pools[0][:, :, host], codes)
    assert torch.equal(cache.host.storage.scales[0][:, :, host], rows)
    assert cache.swap_in(0, num_tokens=10)
    back = cache.block_table(0)
    assert torch.equal(pool[:, :, back], codes) and torch.equal(scales[:, :, back], rows)
    cache.check_invariants()
