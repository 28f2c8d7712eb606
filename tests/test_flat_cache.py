"""FlatKVCache: contents, views, strides, atomic failures and a stateful model, both layouts.

The reference for "what the cache holds" is a plain Python record kept by the tests: for each
slot and layer, the list of (Hkv, 1, D) key/value tensors written so far, in order.
"""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import kvlib.cache.flat
from kvlib.attention import decode_attention
from kvlib.cache import FlatKVCache, KVCache
from kvlib.config import CacheConfig, Layout

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = [Layout.SEQ_MAJOR, Layout.HEAD_MAJOR]
LAYOUT_IDS = ["seq_major", "head_major"]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_cache(layout, *, num_layers=2, batch=4, kv_heads=2, head_dim=4, max_seq_len=16,
               dtype=torch.float32):
    return FlatKVCache(CacheConfig(num_layers=num_layers, num_kv_heads=kv_heads,
                                   head_dim=head_dim, max_batch_size=batch,
                                   max_seq_len=max_seq_len, dtype=dtype, layout=layout))


class Record:
    """What the cache should hold: committed tokens per (slot, layer), as (Hkv, n, D)."""

    def __init__(self, cache: FlatKVCache, seed: int = 0) -> None:
        cfg = cache.config
        self.cache = cache
        self.gen = torch.Generator().manual_seed(seed)
        empty = torch.zeros(cfg.num_kv_heads, 0, cfg.head_dim, dtype=cfg.dtype)
        self.k = {(slot, layer): empty for slot in range(cfg.max_batch_size)
                  for layer in range(cfg.num_layers)}
        self.v = dict(self.k)

    def length(self, slot: int) -> int:
        return self.k[(slot, 0)].shape[1]

    def new_kv(self, batch: int, tokens: int):
        cfg = self.cache.config
        shape = (batch, cfg.num_kv_heads, tokens, cfg.head_dim)
        return (torch.randn(shape, generator=self.gen, dtype=cfg.dtype),
                torch.randn(shape, generator=self.gen, dtype=cfg.dtype))

    def step(self, seq_ids: list[int], tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Write `tokens` new tokens to every layer of `seq_ids` and commit; check each update's
        return value against the record; return what each layer's update returned."""
        returned = []
        new = [self.new_kv(len(seq_ids), tokens) for _ in range(self.cache.num_layers)]
        for layer, (k_new, v_new) in enumerate(new):
            k_all, v_all = self.cache.update(layer, seq_ids, k_new, v_new)
            returned.append((k_all, v_all))
            # The contract: (B, Hkv, S, D) with S at least each row's past + new tokens.
            longest = max(self.length(s) for s in seq_ids) + tokens
            cfg = self.cache.config
            assert k_all.shape == v_all.shape
            assert k_all.shape[:2] == (len(seq_ids), cfg.num_kv_heads)
            assert k_all.shape[3] == cfg.head_dim
            assert longest <= k_all.shape[2] <= cfg.max_seq_len
            for b, s in enumerate(seq_ids):
                past = self.length(s)
                want_k = torch.cat([self.k[(s, layer)], k_new[b]], dim=1)  # (Hkv, past + T, D)
                want_v = torch.cat([self.v[(s, layer)], v_new[b]], dim=1)
                assert torch.equal(k_all[b, :, :past + tokens], want_k)
                assert torch.equal(v_all[b, :, :past + tokens], want_v)
        self.cache.advance(seq_ids, tokens)
        for layer, (k_new, v_new) in enumerate(new):
            for b, s in enumerate(seq_ids):
                self.k[(s, layer)] = torch.cat([self.k[(s, layer)], k_new[b]], dim=1)
                self.v[(s, layer)] = torch.cat([self.v[(s, layer)], v_new[b]], dim=1)
        return returned

    def release(self, seq_ids: list[int]) -> None:
        self.cache.release(seq_ids)
        for s in seq_ids:
            for layer in range(self.cache.num_layers):
                self.k[(s, layer)] = self.k[(s, layer)][:, :0]
                self.v[(s, layer)] = self.v[(s, layer)][:, :0]

    def check(self) -> None:
        cfg = self.cache.config
        all_slots = list(range(cfg.max_batch_size))
        lengths = self.cache.lengths(all_slots)
        assert lengths.dtype == torch.int64 and lengths.device.type == "cpu"
        assert lengths.tolist() == [self.length(s) for s in all_slots]
        for layer in range(cfg.num_layers):
            keys, values = self.cache.keys(layer), self.cache.values(layer)
            for s in all_slots:
                n = self.length(s)
                assert torch.equal(keys[s, :, :n], self.k[(s, layer)])
                assert torch.equal(values[s, :, :n], self.v[(s, layer)])


def snapshot(cache: FlatKVCache):
    return (cache.data.clone(), cache.lengths(range(cache.config.max_batch_size)),
            cache._stored.clone())


def assert_unchanged(cache: FlatKVCache, before) -> None:
    data, lengths, stored = before
    assert torch.equal(cache.data, data), "cache.data changed"
    assert torch.equal(cache.lengths(range(cache.config.max_batch_size)), lengths), \
        "lengths changed"
    assert torch.equal(cache._stored, stored), "_stored changed"


def test_module_doctests():
    result = doctest.testmod(kvlib.cache.flat)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_implements_the_contract_and_starts_empty(layout):
    cache = make_cache(layout)
    assert isinstance(cache, KVCache)
    assert cache.num_layers == 2
    assert cache.lengths([0, 1, 2, 3]).tolist() == [0, 0, 0, 0]
    assert cache.data.shape == cache.config.shape and cache.data.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Decode attention over the cache's own views
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("H", "Hkv"), [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_decode_over_cache_views_matches_reference(layout, H, Hkv, naive_decode):
    cache = make_cache(layout, kv_heads=Hkv, batch=4, max_seq_len=12, head_dim=8)
    rec = Record(cache, seed=1)
    # Give each slot a different history: prefill chunks for some slots, single steps for
    # others, including non-consecutive and out-of-order batches.
    rec.step([0, 1, 2, 3], 1)
    rec.step([2, 0], 3)
    rec.step([3], 6)
    rec.step([0], 2)
    rec.step([1, 3, 0], 1)
    # One more decode step for every slot (the new token's key is written before attending).
    rec.step([0, 1, 2, 3], 1)
    context_lens = cache.lengths([0, 1, 2, 3])
    assert context_lens.tolist() == [8, 3, 5, 9]
    q = torch.randn(4, H, 8, generator=torch.Generator().manual_seed(2))
    for layer in range(cache.num_layers):
        keys, values = cache.keys(layer), cache.values(layer)  # (B, Hkv, 12, D) views
        out = decode_attention(q, keys, values, context_lens)
        # The reference only sees each row's own, unpadded keys from the record.
        for b in range(4):
            n = int(context_lens[b])
            k_row = rec.k[(b, layer)][None]  # (1, Hkv, n, D)
            v_row = rec.v[(b, layer)][None]
            want = naive_decode(q[b:b + 1], k_row, v_row, torch.tensor([n]))
            torch.testing.assert_close(out[b:b + 1].double(), want, **TOL)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_decode_over_update_return_values_matches_reference(layout, naive_decode):
    # What the model does: attend over what update returns, for a non-consecutive batch.
    cache = make_cache(layout, batch=4, kv_heads=2, head_dim=8)
    rec = Record(cache, seed=3)
    rec.step([3], 5)
    rec.step([1], 2)
    returned = rec.step([3, 1], 1)  # gathered (copy) path
    q = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(4))
    lens = cache.lengths([3, 1])
    for layer, (k_all, v_all) in enumerate(returned):
        out = decode_attention(q, k_all, v_all, lens)
        for b, s in enumerate([3, 1]):
            want = naive_decode(q[b:b + 1], rec.k[(s, layer)][None], rec.v[(s, layer)][None],
                                lens[b:b + 1])
            torch.testing.assert_close(out[b:b + 1].double(), want, **TOL)


# ---------------------------------------------------------------------------------------------
# What update returns, views and strides
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_ids", [[0], [1, 2], [0, 1, 2, 3], [2, 0], [3, 1, 0], [1, 0]],
                         ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_update_returns_past_plus_new_at_the_right_positions(layout, seq_ids):
    cache = make_cache(layout)
    rec = Record(cache, seed=5)
    rec.step([0, 1, 2, 3], 2)
    rec.step([1, 3], 3)  # lengths now [2, 5, 2, 5]
    rec.step(seq_ids, 2)  # Record.step checks every returned row against the record
    rec.check()
    # Positions explicitly: the new tokens sit at [old_len, old_len + 2) in each slot.
    for s in seq_ids:
        n = rec.length(s)
        torch.testing.assert_close(cache.keys(1)[s, :, n - 2:n], rec.k[(s, 1)][:, -2:],
                                   atol=0, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_update_writes_nothing_outside_its_rows_and_positions(layout):
    cache = make_cache(layout)
    rec = Record(cache, seed=6)
    rec.step([0, 1, 2, 3], 3)
    before = cache.data.clone()
    k, v = rec.new_kv(2, 2)
    cache.update(1, [3, 1], k, v)
    changed = (cache.data != before)
    # Exactly layer 1, slots 3 and 1, positions 3 and 4, K and V of every head and dim changed
    # (random normals are never equal to what was there).
    marker = FlatKVCache(cache.config)  # a scratch cache: mark the expected region
    marker.keys(1)[[3, 1], :, 3:5] = 1.0
    marker.values(1)[[3, 1], :, 3:5] = 1.0
    expected = marker.data != 0
    assert torch.equal(changed, expected)


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


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_update_over_consecutive_slots_returns_a_view(layout):
    cache = make_cache(layout)
    k, v = Record(cache).new_kv(2, 3)
    k_all, _ = cache.update(0, [1, 2], k, v)
    assert k_all.untyped_storage().data_ptr() == cache.data.untyped_storage().data_ptr()
    k_gathered, _ = cache.update(0, [2, 1], k, v)  # order differs: a gathered copy is fine
    assert torch.equal(k_gathered, k)


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


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError that says what was expected and given; the cache left as it was
# ---------------------------------------------------------------------------------------------

def _filled(layout):
    """A cache (L=2, B=4, S=16, Hkv=2, D=4) with lengths [14, 3, 0, 5]."""
    cache = make_cache(layout)
    rec = Record(cache, seed=7)
    rec.step([0, 1, 3], 3)
    rec.step([0, 3], 2)
    rec.step([0], 9)
    assert cache.lengths([0, 1, 2, 3]).tolist() == [14, 3, 0, 5]
    return cache


def _kv(B=1, Hkv=2, T=1, D=4, dtype=torch.float32, device="cpu"):
    return torch.ones(B, Hkv, T, D, dtype=dtype, device=device)


BAD_UPDATES = {
    # name: (layer, seq_ids, k, v, substrings the message must contain)
    "past-max-seq-len": (0, [0], _kv(T=3), _kv(T=3), ["3 token", "[0]", "14", "16"]),
    "one-row-of-two-has-no-room": (0, [1, 0], _kv(B=2, T=3), _kv(B=2, T=3),
                                   ["[0]", "14", "16"]),
    "wrong-kv-heads": (0, [1], _kv(Hkv=3), _kv(Hkv=3), ["(1, 3, 1, 4)", "Hkv=2"]),
    "wrong-head-dim": (0, [1], _kv(D=5), _kv(D=5), ["(1, 2, 1, 5)", "D=4"]),
    "wrong-head-dim-v-only": (0, [1], _kv(), _kv(D=5), ["(1, 2, 1, 5)", "D=4"]),
    "zero-new-tokens": (0, [1], _kv(T=0), _kv(T=0), ["(1, 2, 0, 4)", "T>=1"]),
    "k-3d": (0, [1], torch.ones(2, 1, 4), _kv(), ["(2, 1, 4)", "(B, Hkv, T, D)"]),
    "k-not-a-tensor": (0, [1], [[1.0]], _kv(), ["list"]),
    "wrong-dtype": (0, [1], _kv(dtype=torch.float64), _kv(dtype=torch.float64),
                    ["float64", "float32"]),
    "wrong-dtype-v-only": (0, [1], _kv(), _kv(dtype=torch.float16), ["float16", "float32"]),
    "wrong-device": (0, [1], _kv(device="meta"), _kv(device="meta"), ["meta", "cpu"]),
    "wrong-device-v-only": (0, [1], _kv(), _kv(device="meta"), ["meta", "cpu"]),
    "batch-index-out-of-range": (0, [4], _kv(), _kv(), ["4", "max_batch_size 4"]),
    "negative-batch-index": (0, [-1], _kv(), _kv(), ["-1", "max_batch_size 4"]),
    "duplicate-seq-ids": (0, [1, 1], _kv(B=2), _kv(B=2), ["duplicate", "[1, 1]"]),
    "bool-seq-id": (0, [True], _kv(), _kv(), ["True"]),
    "tensor-seq-id": (0, [torch.tensor(1)], _kv(), _kv(), ["tensor(1)"]),
    "empty-seq-ids": (0, [], _kv(B=0), _kv(B=0), ["empty"]),
    "layer-out-of-range": (2, [1], _kv(), _kv(), ["[0, 2)", "got 2"]),
    "negative-layer": (-1, [1], _kv(), _kv(), ["[0, 2)", "got -1"]),
    "bool-layer": (True, [1], _kv(), _kv(), ["[0, 2)", "True"]),
    "k-v-length-mismatch": (0, [1], _kv(T=1), _kv(T=2), ["(1, 2, 1, 4)", "(1, 2, 2, 4)"]),
    "batch-bigger-than-seq-ids": (0, [1, 3], _kv(B=3), _kv(B=3), ["(3, 2, 1, 4)", "B=2"]),
    "batch-smaller-than-seq-ids": (0, [1, 3], _kv(B=1), _kv(B=1), ["(1, 2, 1, 4)", "B=2"]),
}


def test_meta_tensors_really_are_another_device():
    t = _kv(device="meta")
    assert t.device.type == "meta" and t.shape == (1, 2, 1, 4) and t.dtype == torch.float32


@pytest.mark.parametrize("name", list(BAD_UPDATES))
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_bad_update_raises_and_leaves_cache_unchanged(layout, name):
    layer, seq_ids, k, v, substrings = BAD_UPDATES[name]
    cache = _filled(layout)
    before = snapshot(cache)
    with pytest.raises(ValueError) as info:
        cache.update(layer, seq_ids, k, v)
    message = str(info.value)
    for sub in substrings:
        assert sub in message, f"{sub!r} not in {message!r}"
    assert_unchanged(cache, before)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_bad_update_after_an_uncommitted_write_keeps_that_write(layout):
    # Layer 0 has written slot 1's next token (not yet committed); a failed layer-1 call must
    # neither undo it nor commit it, and the step can still complete.
    cache = _filled(layout)
    cache.update(0, [1], _kv(), _kv())
    before = snapshot(cache)
    with pytest.raises(ValueError):
        cache.update(1, [1], _kv(D=5), _kv(D=5))
    assert_unchanged(cache, before)
    cache.update(1, [1], _kv(), _kv())
    cache.advance([1], 1)
    assert cache.lengths([1]).tolist() == [4]


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_write_that_exactly_fills_the_slot_is_allowed(layout):
    cache = _filled(layout)
    for layer in range(2):
        cache.update(layer, [0], _kv(T=2), _kv(T=2))  # 14 + 2 = 16 = max_seq_len
    cache.advance([0], 2)
    assert cache.lengths([0]).tolist() == [16]
    before = snapshot(cache)
    with pytest.raises(ValueError, match="no room"):
        cache.update(0, [0], _kv(), _kv())
    assert_unchanged(cache, before)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_advance_without_every_layer_raises_and_changes_nothing(layout):
    cache = _filled(layout)
    cache.update(0, [1, 3], _kv(B=2, T=2), _kv(B=2, T=2))  # layer 1 never written
    before = snapshot(cache)
    with pytest.raises(ValueError) as info:
        cache.advance([1, 3], 2)
    message = str(info.value)
    assert "layer 1" in message and "stores 3" in message and "expected 5" in message
    assert_unchanged(cache, before)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_advance_by_a_different_count_than_written_raises(layout):
    cache = _filled(layout)
    for layer in range(2):
        cache.update(layer, [1], _kv(T=2), _kv(T=2))
    before = snapshot(cache)
    for wrong in (1, 3):
        with pytest.raises(ValueError, match=f"by {wrong}"):
            cache.advance([1], wrong)
        assert_unchanged(cache, before)
    cache.advance([1], 2)
    assert cache.lengths([1]).tolist() == [5]


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_advance_twice_for_one_write_raises(layout):
    cache = _filled(layout)
    for layer in range(2):
        cache.update(layer, [2], _kv(), _kv())
    cache.advance([2], 1)
    before = snapshot(cache)
    with pytest.raises(ValueError):
        cache.advance([2], 1)
    assert_unchanged(cache, before)


@pytest.mark.parametrize("num_tokens", [0, -1, 1.0, "1", None])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_advance_rejects_bad_token_counts(layout, num_tokens):
    cache = _filled(layout)
    before = snapshot(cache)
    with pytest.raises(ValueError, match="num_tokens"):
        cache.advance([1], num_tokens)
    assert_unchanged(cache, before)


@pytest.mark.parametrize("seq_ids", [[4], [-1], [0, 0], [], [True]], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_lengths_advance_release_reject_bad_seq_ids(layout, seq_ids):
    cache = _filled(layout)
    before = snapshot(cache)
    for call in (lambda: cache.lengths(seq_ids), lambda: cache.advance(seq_ids, 1),
                 lambda: cache.release(seq_ids)):
        with pytest.raises(ValueError):
            call()
        assert_unchanged(cache, before)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_release_resets_only_the_released_slots(layout):
    cache = _filled(layout)
    cache.update(0, [3], _kv(), _kv())  # an uncommitted write on a slot being released
    cache.release([3, 0])
    assert cache.lengths([0, 1, 2, 3]).tolist() == [0, 3, 0, 0]
    assert cache._stored[:, [0, 3]].eq(0).all()
    # A released slot starts again at position 0: update returns only the new tokens.
    rec_k = torch.randn(1, 2, 2, 4)
    for layer in range(2):
        k_all, v_all = cache.update(layer, [3], rec_k, rec_k + 1)
        assert k_all.shape == (1, 2, 2, 4)
        assert torch.equal(k_all, rec_k) and torch.equal(v_all, rec_k + 1)
    cache.advance([3], 2)
    assert cache.lengths([0, 1, 2, 3]).tolist() == [0, 3, 0, 2]
    # And the half-written step of the released slot cannot be committed any more.
    with pytest.raises(ValueError):
        cache.advance([0], 1)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_lengths_returns_a_copy(layout):
    cache = _filled(layout)
    lengths = cache.lengths([0, 1])
    lengths += 100
    assert cache.lengths([0, 1]).tolist() == [14, 3]
    assert cache.lengths([3, 0]).tolist() == [5, 14]


def test_half_precision_cache_stores_exact_values():
    cache = make_cache(Layout.HEAD_MAJOR, dtype=torch.bfloat16)
    rec = Record(cache, seed=8)
    rec.step([1, 0], 3)
    rec.check()


# ---------------------------------------------------------------------------------------------
# Stateful property test against the Python record
# ---------------------------------------------------------------------------------------------

SLOTS, LAYERS, MAX_SEQ = 3, 2, 10
slot_subsets = st.lists(st.integers(0, SLOTS - 1), min_size=1, max_size=SLOTS, unique=True)


class FlatCacheMachine(RuleBasedStateMachine):
    """Random steps, partial steps, releases and invalid calls; the record is the truth."""

    layout: Layout  # set by the concrete subclasses below

    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed):
        self.cache = make_cache(self.layout, num_layers=LAYERS, batch=SLOTS, kv_heads=2,
                                head_dim=4, max_seq_len=MAX_SEQ)
        self.rec = Record(self.cache, seed=seed)

    @rule(seq_ids=slot_subsets, tokens=st.integers(1, 4))
    def step(self, seq_ids, tokens):
        if max(self.rec.length(s) for s in seq_ids) + tokens <= MAX_SEQ:
            self.rec.step(seq_ids, tokens)  # checks what update returns, then commits
            return
        before = snapshot(self.cache)
        k, v = self.rec.new_kv(len(seq_ids), tokens)
        with pytest.raises(ValueError, match="no room"):
            self.cache.update(0, seq_ids, k, v)
        assert_unchanged(self.cache, before)

    @rule(seq_ids=slot_subsets, tokens=st.integers(1, 3), layers=st.integers(0, LAYERS - 1))
    def partial_step(self, seq_ids, tokens, layers):
        # Only `layers` of LAYERS layers write; advance must refuse and commit nothing.
        if max(self.rec.length(s) for s in seq_ids) + tokens > MAX_SEQ:
            return
        lengths = self.cache.lengths(range(SLOTS))
        for layer in range(layers):
            self.cache.update(layer, seq_ids, *self.rec.new_kv(len(seq_ids), tokens))
        stored = self.cache._stored.clone()
        with pytest.raises(ValueError):
            self.cache.advance(seq_ids, tokens)
        assert torch.equal(self.cache.lengths(range(SLOTS)), lengths)
        assert torch.equal(self.cache._stored, stored)

    @rule(seq_ids=slot_subsets)
    def release(self, seq_ids):
        self.rec.release(seq_ids)

    @rule(kind=st.sampled_from(["heads", "dim", "dtype", "device", "slot", "dup", "layer",
                                "batch"]),
          seq_ids=slot_subsets)
    def invalid_update(self, kind, seq_ids):
        B, layer = len(seq_ids), 0
        k = v = _kv(B=B)
        if kind == "heads":
            k = v = _kv(B=B, Hkv=3)
        elif kind == "dim":
            k = v = _kv(B=B, D=2)
        elif kind == "dtype":
            k = v = _kv(B=B, dtype=torch.float16)
        elif kind == "device":
            k = v = _kv(B=B, device="meta")
        elif kind == "slot":
            seq_ids = [*seq_ids[:-1], SLOTS]
        elif kind == "dup":
            seq_ids, k, v = [*seq_ids, seq_ids[0]], _kv(B=B + 1), _kv(B=B + 1)
        elif kind == "layer":
            layer = LAYERS
        else:
            k = v = _kv(B=B + 1)
        before = snapshot(self.cache)
        with pytest.raises(ValueError):
            self.cache.update(layer, seq_ids, k, v)
        assert_unchanged(self.cache, before)

    @invariant()
    def matches_record(self):
        if hasattr(self, "rec"):
            self.rec.check()

    @precondition(lambda self: hasattr(self, "rec"))
    @invariant()
    def lengths_within_bounds(self):
        lengths = self.cache.lengths(range(SLOTS))
        assert bool((lengths >= 0).all()) and bool((lengths <= MAX_SEQ).all())


STATEFUL_SETTINGS = settings(max_examples=60, stateful_step_count=30, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


class SeqMajorMachine(FlatCacheMachine):
    layout = Layout.SEQ_MAJOR


class HeadMajorMachine(FlatCacheMachine):
    layout = Layout.HEAD_MAJOR


TestSeqMajorStateful = SeqMajorMachine.TestCase
TestSeqMajorStateful.settings = STATEFUL_SETTINGS
TestHeadMajorStateful = HeadMajorMachine.TestCase
TestHeadMajorStateful.settings = STATEFUL_SETTINGS
