"""FlatKVCache: what only a flat cache promises, in both layouts.

The cache contract (writes read back, commit/abort, bad input, fork, release, attention over
reads) is tested for every cache kind in tests/test_cache_contract.py. Here: the storage
itself -- its layouts, the strides of its views as documented, views sharing storage,
consecutive slots read as views, the slot arithmetic, exact half precision, the messages a
flat cache gives -- checked against `cache.data` by independent indexing.
"""

from __future__ import annotations

import doctest

import pytest
import torch

import kvlib.cache.flat
from kvlib.cache import FlatKVCache
from kvlib.config import CacheConfig, Layout
from kvlib.contract import append

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = [Layout.SEQ_MAJOR, Layout.HEAD_MAJOR]
LAYOUT_IDS = ["seq_major", "head_major"]


def make_cache(layout, *, num_layers=2, batch=4, kv_heads=2, head_dim=4, max_seq_len=16,
               dtype=torch.float32):
    return FlatKVCache(CacheConfig(num_layers=num_layers, num_kv_heads=kv_heads,
                                   head_dim=head_dim, max_batch_size=batch,
                                   max_seq_len=max_seq_len, dtype=dtype, layout=layout))


def fill(cache: FlatKVCache, seq_ids, tokens: int, seed: int = 0) -> None:
    """Append `tokens` random tokens to every layer of `seq_ids` in one step."""
    cfg = cache.config
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.num_layers, len(seq_ids), cfg.num_kv_heads, tokens, cfg.head_dim)
    append(cache, seq_ids, torch.randn(shape, generator=gen).to(cfg.dtype),
           torch.randn(shape, generator=gen).to(cfg.dtype))


def test_module_doctests():
    result = doctest.testmod(kvlib.cache.flat)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_data_is_one_zeroed_tensor_in_the_layout(layout):
    cache = make_cache(layout)
    expected = (2, 4, 16, 2, 2, 4) if layout is Layout.SEQ_MAJOR else (2, 2, 4, 2, 16, 4)
    assert cache.data.shape == cache.config.shape == expected
    assert cache.data.dtype == torch.float32 and not cache.data.any()


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_keys_and_values_are_views_sharing_storage(layout):
    cache = make_cache(layout)
    for layer in range(2):
        k, v = cache.keys(layer), cache.values(layer)
        assert k.shape == v.shape == (4, 2, 16, 4)  # (B, Hkv, S, D)
        ptr = cache.data.untyped_storage().data_ptr()
        assert k.untyped_storage().data_ptr() == ptr == v.untyped_storage().data_ptr()
        k[2, 1, 7, 3] = 11.0  # a write through the view lands in data
        v[2, 1, 7, 3] = 22.0
    # Locate the two writes in `data` by the documented layout (independent indexing).
    if layout is Layout.SEQ_MAJOR:  # (L, B, S, 2, Hkv, D)
        assert cache.data[1, 2, 7, 0, 1, 3] == 11.0 and cache.data[1, 2, 7, 1, 1, 3] == 22.0
    else:  # (L, 2, B, Hkv, S, D)
        assert cache.data[1, 0, 2, 1, 7, 3] == 11.0 and cache.data[1, 1, 2, 1, 7, 3] == 22.0
    assert int((cache.data != 0).sum()) == 4


@pytest.mark.parametrize(("layout", "k_strides", "v_offset"), [
    # L=2, B=4, S=16, Hkv=2, D=4.
    # SEQ_MAJOR (L, B, S, 2, Hkv, D): slot 2*16*2*4=256, token 2*2*4=16, head 4, dim 1;
    # V sits one K-block (Hkv*D = 8 elements) after K.
    (Layout.SEQ_MAJOR, (256, 4, 16, 1), 8),
    # HEAD_MAJOR (L, 2, B, Hkv, S, D): slot 2*16*4=128, head 16*4=64, token 4, dim 1;
    # V sits one whole K half (B*Hkv*S*D = 512 elements) after K.
    (Layout.HEAD_MAJOR, (128, 64, 4, 1), 512),
], ids=LAYOUT_IDS)
def test_view_strides_as_documented(layout, k_strides, v_offset):
    cache = make_cache(layout)
    layer_size = 4 * 16 * 2 * 2 * 4  # B * S * 2 * Hkv * D = 1024 elements per layer
    for layer in range(2):
        k, v = cache.keys(layer), cache.values(layer)
        assert k.stride() == v.stride() == k_strides
        assert k.storage_offset() == layer * layer_size
        assert v.storage_offset() - k.storage_offset() == v_offset
    if layout is Layout.HEAD_MAJOR:
        assert cache.keys(0)[3, 1].is_contiguous()  # one head's (S, D) matrix is contiguous


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_slot_mapping_is_row_times_max_seq_len_plus_position(layout):
    cache = make_cache(layout)
    fill(cache, [1, 3], 2)
    fill(cache, [3], 3)  # lengths [0, 2, 0, 5]
    batch = cache.begin([3, 0, 1], [1, 3, 2])
    assert batch.slot_mapping.tolist() == [[3 * 16 + 5, 0, 1, 2, 16 + 2, 16 + 3]]  # 1 group
    cache.abort(batch)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_write_lands_at_its_slots_and_nowhere_else(layout):
    cache = make_cache(layout)
    fill(cache, [0, 1, 2, 3], 3)
    batch = cache.begin([3, 1], [2, 1])  # slot 3 positions 3, 4; slot 1 position 3
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)  # (N, Hkv, D)
    before = cache.data.clone()
    cache.write(1, batch, k, v)
    # Exactly layer 1, those slots and positions, K and V of every head and dim changed
    # (random normals are never equal to what was there), holding the packed rows in order.
    marker = FlatKVCache(cache.config)  # a scratch cache: mark the expected region
    for rows in (marker.keys(1), marker.values(1)):
        rows[3, :, 3:5] = 1.0
        rows[1, :, 3] = 1.0
    assert torch.equal(cache.data != before, marker.data != 0)
    for i, (slot, pos) in enumerate([(3, 3), (3, 4), (1, 3)]):
        assert torch.equal(cache.keys(1)[slot, :, pos], k[i])
        assert torch.equal(cache.values(1)[slot, :, pos], v[i])
    cache.abort(batch)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_read_over_consecutive_slots_is_a_view(layout):
    cache = make_cache(layout)
    fill(cache, [0, 1, 2, 3], 3)
    ptr = cache.data.untyped_storage().data_ptr()
    batch = cache.begin([1, 2], [2, 1])
    kv = cache.read(0, batch)
    assert kv.k.untyped_storage().data_ptr() == ptr == kv.v.untyped_storage().data_ptr()
    assert kv.k.shape == (2, 2, 5, 4) and kv.context_lens.tolist() == [5, 4]  # S = longest
    assert torch.equal(kv.k, cache.keys(0)[1:3, :, :5])
    cache.abort(batch)
    batch = cache.begin([2, 1], [1, 1])  # out of order: a gathered copy, the same numbers
    kv = cache.read(0, batch)
    assert kv.k.untyped_storage().data_ptr() != ptr
    assert torch.equal(kv.k, cache.keys(0)[[2, 1], :, :4])
    assert torch.equal(kv.v, cache.values(0)[[2, 1], :, :4])
    cache.abort(batch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_cache_stores_exact_values(dtype):
    cache = make_cache(Layout.HEAD_MAJOR, dtype=dtype)
    k, v = torch.randn(2, 2, 2, 3, 4).to(dtype), torch.randn(2, 2, 2, 3, 4).to(dtype)
    append(cache, [1, 0], k, v)  # (L, B, Hkv, T, D)
    for layer in range(2):
        assert torch.equal(cache.keys(layer)[[1, 0], :, :3], k[layer])
        assert torch.equal(cache.values(layer)[[1, 0], :, :3], v[layer])


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_no_room_names_the_slot_its_length_and_max_seq_len(layout):
    cache = make_cache(layout)
    fill(cache, [0, 1], 14)
    fill(cache, [0], 2)  # exactly full is fine
    before = cache.data.clone()
    with pytest.raises(ValueError) as info:
        cache.begin([1, 0], [1, 1])
    message = str(info.value)
    for sub in ("no room", "[0]", "16", "max_seq_len 16"):
        assert sub in message, f"{sub!r} not in {message!r}"
    assert torch.equal(cache.data, before) and cache.lengths([0, 1]).tolist() == [16, 14]


@pytest.mark.parametrize("seq_ids", [[4], [0, 7]], ids=str)
def test_slot_out_of_range_names_max_batch_size(seq_ids):
    cache = make_cache(Layout.SEQ_MAJOR)
    for call in (lambda: cache.begin(seq_ids, [1] * len(seq_ids)),
                 lambda: cache.lengths(seq_ids), lambda: cache.release(seq_ids),
                 lambda: cache.fork(0, seq_ids[-1])):
        with pytest.raises(ValueError, match="max_batch_size 4"):
            call()
    assert not cache.data.any()


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_fork_copies_the_tokens_into_the_destination_slot(layout):
    cache = make_cache(layout)
    fill(cache, [2], 5)
    cache.fork(2, 0)  # a flat cache cannot share storage: the slot's rows are copied
    for layer in range(2):
        for view in (cache.keys(layer), cache.values(layer)):
            assert torch.equal(view[0, :, :5], view[2, :, :5])
            assert not view[0, :, 5:].any()
    assert cache.lengths([0, 2]).tolist() == [5, 5]
