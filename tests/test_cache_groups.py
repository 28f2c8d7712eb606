"""Cache groups: one source of truth for each layer's window and sinks.

A cache whose windows are not its model's would drop keys a layer reads (or keep a window the
model does not apply) and give wrong logits without any error; every such mismatch -- window,
sinks, layer count, head shape, dtype -- is refused with a ValueError before any compute.
Models that mix windowed and global layers (Gemma-2) get a block table per group, and the
windowed group frees what its window has passed; sinks plus a window (StreamingLLM) keep the
first tokens' blocks as well.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import unit_scale_model

from kvlib.cache.flat import FlatKVCache
from kvlib.cache.paged import PagedKVCache
from kvlib.cache.quant_memory import PRESETS
from kvlib.cache.quantized import QuantizedKVCache
from kvlib.cache.ring import RingKVCache
from kvlib.config import CacheConfig
from kvlib.contract import append
from kvlib.engine import BatchedInferenceEngine

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2,
            max_seq_len=128, rope_theta=500.0)


def model_with(**fields):
    return unit_scale_model(seed=1, **{**BASE, **fields})


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(seed))


# -- mismatches are refused before any compute ---------------------------------------------------

GLOBAL = model_with()
MISTRAL = model_with(sliding_window=8)  # every layer windowed
GEMMA = model_with(sliding_window=8, sliding_layers=(0, 2))  # windowed and global layers
STREAMING = model_with(sliding_window=8, sink_tokens=4)


def cache_of(kind: str, config: CacheConfig):
    if kind == "flat":
        return FlatKVCache(config)
    if kind == "ring":
        return RingKVCache(config, max_query_len=16)
    if kind == "paged":
        return PagedKVCache(config, num_blocks=32)
    return QuantizedKVCache(config, PRESETS["int8-token"],
                            lambda c: PagedKVCache(c, num_blocks=32))


MISMATCHES = {  # (model, config changes against that model's own, words the error names)
    "window-on-a-global-model": (GLOBAL, dict(layer_windows=(8, 8, 8, 8)),
                                 "layer 0: the model's window is none"),
    "no-window-on-a-windowed-model": (MISTRAL, dict(layer_windows=()),
                                      "layer 0: the model's window is 8 but the cache's is none"),
    "a-smaller-window": (MISTRAL, dict(layer_windows=(8, 8, 4, 8)),
                         "layer 2: the model's window is 8 but the cache's is 4"),
    "every-layer-windowed-on-gemma": (GEMMA, dict(layer_windows=(8, 8, 8, 8)),
                                      "layer 1: the model's window is none"),
    "sinks": (STREAMING, dict(sink_tokens=0), "keep 4 sink token"),
    "layer-count": (GLOBAL, dict(num_layers=3), "num_layers=3"),
    "head-dim": (GLOBAL, dict(head_dim=4), "head_dim=4"),
    "kv-heads": (GLOBAL, dict(num_kv_heads=1), "num_kv_heads=1"),
    "dtype": (GLOBAL, dict(dtype=torch.float64), "float64"),
}


@pytest.mark.parametrize("kind", ["flat", "ring", "paged", "quantized"])
@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_mismatched_cache_is_refused_before_any_compute(kind, case, monkeypatch):
    model, changes, words = MISMATCHES[case]
    own = model.cache_config(1, 128, block_size=4)
    if kind == "ring" and (changes.get("sink_tokens", own.sink_tokens) or
                           "layer_windows" not in changes and own.sink_tokens):
        pytest.skip("a ring refuses sink tokens itself (test_ring_cache.py)")
    if "num_layers" in changes:
        changes = {**changes, "layer_windows": own.layer_windows[:changes["num_layers"]]}
    cache = cache_of(kind, dataclasses.replace(own, **changes))
    monkeypatch.setattr(model, "forward_batch", lambda *a: pytest.fail("computed first"))
    with pytest.raises(ValueError, match=words):
        model(tokens(5), cache)
    assert cache.lengths([0]).tolist() == [0]  # nothing stored, no step left open
    with pytest.raises(ValueError, match=words):
        model.generate(tokens(5), 3, cache=cache)
    if kind in ("paged", "quantized"):
        with pytest.raises(ValueError, match=words):
            BatchedInferenceEngine(model, cache=cache)


@pytest.mark.parametrize("model", [GLOBAL, MISTRAL, GEMMA, STREAMING],
                         ids=["global", "mistral", "gemma", "streaming"])
def test_a_cache_built_from_the_model_matches_it(model):
    expected = model(tokens(40))  # no cache: the model's own masks
    for kind in ("flat", "ring", "paged"):
        if kind == "ring" and model.config.sink_tokens:
            continue
        cache = cache_of(kind, model.cache_config(1, 128, block_size=4))
        got = torch.cat([model(tokens(40)[:, i:i + 8], cache) for i in range(0, 40, 8)], 1)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# -- per-group block tables ----------------------------------------------------------------------

def test_a_mixed_model_gets_a_table_per_group_and_frees_only_windowed_blocks():
    cache = PagedKVCache(GEMMA.cache_config(1, 128, block_size=4), num_blocks=40)
    assert [(g.layers, g.window) for g in cache.groups] == [((0, 2), 8), ((1, 3), None)]
    out = GEMMA.generate(tokens(20), 30, cache=cache)
    assert out.tokens.tolist() == GEMMA.generate(tokens(20), 30).tokens.tolist()
    # 49 tokens held: the global group keeps 13 blocks, the windowed one the 3 its window
    # of 8 still needs (positions 41..48 and the next token's), the rest are the null block
    window_table, global_table = cache.block_table(0, group=0), cache.block_table(0, group=1)
    null = cache.manager.null_block(0)
    assert len(global_table) == len(window_table) == 13
    assert sum(b != null for b in window_table) <= 3 and null not in global_table
    cache.check_invariants()


def test_a_windowed_view_never_reads_another_sequences_blocks():
    """The null block stands in for freed entries: zeros, which the window hides."""
    cache = PagedKVCache(MISTRAL.cache_config(1, 128, block_size=4), num_blocks=24)
    MISTRAL(tokens(30), cache, [0])
    MISTRAL(tokens(30, seed=1), cache, [1])  # reuses what sequence 0 freed
    batch = cache.begin([0], [1])
    view = cache.read(0, batch)
    table = view.block_tables[0].tolist()
    null = cache.manager.null_block(0)
    assert table[:5] == [null] * 5 and view.k_pool.shape[0] == null + 1
    assert not view.k_pool[null].any()  # never written
    cache.abort(batch)


def test_gemma_style_groups_hold_about_half_the_blocks_at_4096_tokens():
    """Windows of 512 on half the layers: the windowed group holds the 32 blocks of positions
    3,584..4,095 (the next query reads 3,585..4,096), the global one all 256, so the sequence
    holds (256 + 32) / (2 * 256) = 56% of an all-global cache's bytes."""
    def held_bytes(windows):
        config = CacheConfig(num_layers=2, num_kv_heads=1, head_dim=2, max_batch_size=1,
                             max_seq_len=4096, layer_windows=windows)
        cache = PagedKVCache(config, num_blocks=256)
        for _ in range(8):  # 4,096 tokens in chunks of 512
            append(cache, [0], torch.zeros(2, 1, 1, 512, 2), torch.zeros(2, 1, 1, 512, 2))
        per_block = [len(g.layers) for g in cache.groups]  # layers a block of each group spans
        return sum(a.num_used_blocks * n for a, n in zip(cache.manager.allocators, per_block))

    mixed, all_global = held_bytes((512, None)), held_bytes(())
    assert all_global == 2 * 256 and mixed == 256 + 32
    assert 0.5 < mixed / all_global < 0.6


def test_sinks_keep_the_first_blocks_and_match_the_mask():
    cache = PagedKVCache(STREAMING.cache_config(1, 128, block_size=4), num_blocks=12)
    out = STREAMING.generate(tokens(10), 80, cache=cache)  # 89 tokens in 12 blocks of 4
    assert out.tokens.tolist() == STREAMING.generate(tokens(10), 80).tokens.tolist()
    table, null = cache.block_table(0), cache.manager.null_block(0)
    assert table[0] != null  # the sink tokens 0..3
    assert sum(b != null for b in table) <= 1 + 3  # sinks + the window's blocks
    # without the sinks the same model reads different keys: the logits move
    windowed = dataclasses.replace(STREAMING.config, sink_tokens=0)
    plain = type(STREAMING)(windowed)
    plain.load_state_dict(STREAMING.state_dict())
    diff = (plain(tokens(40)) - STREAMING(tokens(40))).abs().max()
    assert diff > 1e-3
