"""kvlib.experiments: what each experiment builds, what it times, and what it leaves behind.

Timings themselves are not asserted (the machine is shared and noisy); what is asserted is
the structure of the results and that the timed call is the one the docstring names: the
right cache, the right views, the right number of calls, in the right order.
"""

from __future__ import annotations

import doctest
import itertools
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvlib.experiments as ex
from kvlib.attention import decode_attention
from kvlib.bench import Timing, device_name
from kvlib.cache.flat import FlatKVCache
from kvlib.config import CacheConfig, Layout, ModelConfig

TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   ffn_dim=64, max_seq_len=64, name="tiny")
LAYOUTS = list(Layout)
CPU = device_name("cpu")


def small_config(layout, *, num_layers=2, batch=3, kv_heads=2, head_dim=4, max_seq_len=8):
    return CacheConfig(num_layers=num_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                       max_batch_size=batch, max_seq_len=max_seq_len, layout=layout)


def timing(*times):
    return Timing(times_s=tuple(times), device="test")


def test_doctests():
    result = doctest.testmod(ex)
    assert result.attempted >= 4 and result.failed == 0


# -- demo model ---------------------------------------------------------------------------------

def test_demo_model_is_seeded_in_eval_mode_and_shaped_by_its_config():
    a, b, c = ex.demo_model(TINY, seed=3), ex.demo_model(TINY, seed=3), ex.demo_model(TINY, seed=4)
    assert a.config == TINY and not a.training
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.embed.weight, c.embed.weight)
    assert ex.demo_model(TINY, dtype=torch.float64).embed.weight.dtype == torch.float64
    assert ex.DEMO_CONFIG.num_kv_heads < ex.DEMO_CONFIG.num_heads  # GQA, as documented


# -- decode timings -----------------------------------------------------------------------------

def test_speedup_by_len_divides_medians():
    t = ex.DecodeTimings(cached={8: timing(1.0, 2.0, 9.0), 16: timing(4.0)},
                         uncached={8: timing(10.0, 20.0, 30.0), 16: timing(2.0)})
    assert t.speedup_by_len == {8: 10.0, 16: 0.5}


def test_time_decode_step_cached_times_decode_steps_on_a_correct_cache():
    model = ex.demo_model(TINY)
    seen = {"steps": []}
    prefill, decode_step = model.prefill, model.decode_step

    def spy_prefill(prompt, cache, *args):
        seen["prompt"], seen["cache"] = prompt.clone(), cache
        return prefill(prompt, cache, *args)

    def spy_decode(tokens, cache, *args):
        seen["steps"].append(tokens.clone())
        seen["logits"] = decode_step(tokens, cache, *args)
        return seen["logits"]

    model.prefill, model.decode_step = spy_prefill, spy_decode
    result = ex.time_decode_step(model, 10, cached=True, batch_size=2, warmup=2, repeats=3)
    assert isinstance(result, Timing) and len(result.times_s) == 3 and result.device == CPU
    assert seen["prompt"].shape == (2, 10) and len(seen["steps"]) == 5
    assert seen["cache"].lengths([0, 1]).tolist() == [15, 15]
    # The cache is right if the last cached step's logits match a full uncached forward pass.
    full = torch.cat([seen["prompt"]] + [t[:, None] for t in seen["steps"]], dim=1)  # (2, 15)
    with torch.no_grad():
        expected = model.next_token_logits(full)
    torch.testing.assert_close(seen["logits"], expected, atol=1e-4, rtol=1e-4)


def test_time_decode_step_uncached_runs_the_whole_sequence_each_time():
    model = ex.demo_model(TINY)
    lengths = []
    forward = model.next_token_logits

    def spy(tokens, cache=None, seq_ids=None):
        lengths.append((tuple(tokens.shape), cache))
        return forward(tokens, cache, seq_ids)

    model.next_token_logits = spy
    result = ex.time_decode_step(model, 7, cached=False, batch_size=1, warmup=1, repeats=4)
    assert len(result.times_s) == 4
    assert lengths == [((1, 8), None)] * 5  # context + the new token, no cache, 1 + 4 calls


def test_decode_timings_keys_and_repeats():
    model = ex.demo_model(TINY)
    t = ex.decode_timings(model, [4, 12], warmup=0, repeats=2, show_progress=False)
    assert list(t.cached) == list(t.uncached) == [4, 12]
    assert all(len(x.times_s) == 2 for x in [*t.cached.values(), *t.uncached.values()])
    assert set(t.speedup_by_len) == {4, 12}


# -- filled flat cache ---------------------------------------------------------------------------

class RecordingCache(FlatKVCache):
    """A FlatKVCache that remembers every write: (layer, seq_ids, positions, k, v), with
    k and v the packed (N, Hkv, D) new keys and values and positions (N,) where they go."""

    instances: ClassVar[list[RecordingCache]] = []

    def __init__(self, config):
        super().__init__(config)
        self.writes = []
        RecordingCache.instances.append(self)

    def write(self, layer, batch, k, v):
        seq_rows = torch.tensor(batch.seq_ids)[batch.token_rows]  # (N,) slot of each token
        self.writes.append((layer, seq_rows.tolist(), batch.positions.tolist(), k.clone(),
                            v.clone()))
        return super().write(layer, batch, k, v)


@pytest.fixture
def recording_cache(monkeypatch):
    RecordingCache.instances = []
    monkeypatch.setattr(ex, "FlatKVCache", RecordingCache)
    return RecordingCache.instances


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.value)
def test_filled_flat_cache_holds_what_was_written(layout, recording_cache):
    cache = ex.filled_flat_cache(small_config(layout), [5, 0, 8], seed=1)
    assert cache.lengths([0, 1, 2]).tolist() == [5, 0, 8]
    for layer, slots, positions, k, v in cache.writes:
        for i, (slot, pos) in enumerate(zip(slots, positions)):
            torch.testing.assert_close(cache.keys(layer)[slot, :, pos], k[i], rtol=0, atol=0)
            torch.testing.assert_close(cache.values(layer)[slot, :, pos], v[i], rtol=0, atol=0)
    written = {(layer, slot, pos) for layer, slots, positions, _, _ in cache.writes
               for slot, pos in zip(slots, positions)}
    assert written == {(layer, slot, pos) for layer in range(2) for slot, n in ((0, 5), (2, 8))
                       for pos in range(n)}
    assert not cache.keys(0)[1].any() and not cache.keys(1)[0, :, 5:].any()  # untouched: zero
    again = ex.filled_flat_cache(small_config(layout), [5, 0, 8], seed=1)
    assert torch.equal(again.data, cache.data)  # seeded


def test_filled_flat_cache_rejects_more_sequences_than_slots():
    with pytest.raises(ValueError, match="max_batch_size"):
        ex.filled_flat_cache(small_config(Layout.SEQ_MAJOR, batch=2), [1, 1, 1])


# -- timed calls: patch `measure` to see what would be timed ---------------------------------------

@pytest.fixture
def timed_calls(monkeypatch):
    """Replace `measure` with a fake that runs fn warmup + repeats times and records it."""
    calls = []

    def fake_measure(fn, *, warmup=2, repeats=5, device="cpu"):
        for _ in range(warmup + repeats):
            calls.append((fn, fn()))
        return Timing(times_s=(0.001,) * repeats, device=device_name(device))

    monkeypatch.setattr(ex, "measure", fake_measure)
    return calls


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.value)
def test_time_decode_attention_reads_the_cache_views(layout, monkeypatch):
    seen = []

    def spy(q, k, v, lens):
        seen.append((q.shape, k.shape, k.stride(), k.is_contiguous(), lens.tolist()))
        return decode_attention(q, k, v, lens)

    monkeypatch.setattr(ex, "decode_attention", spy)
    result = ex.time_decode_attention(layout, context_len=16, batch_size=2, num_heads=4,
                                      num_kv_heads=2, head_dim=8, warmup=1, repeats=3)
    assert len(result.times_s) == 3 and len(seen) == 4
    q_shape, k_shape, stride, contiguous, lens = seen[0]
    assert q_shape == (2, 4, 8) and k_shape == (2, 2, 16, 8) and lens == [16, 16]
    expected = (16 * 2 * 2 * 8, 8, 2 * 2 * 8, 1) if layout is Layout.SEQ_MAJOR else \
        (2 * 16 * 8, 16 * 8, 8, 1)
    assert stride == expected and contiguous == (layout is Layout.HEAD_MAJOR)


# -- copies -----------------------------------------------------------------------------------------

def test_recorded_copies_sees_clones_writes_and_dtype_casts_but_not_views():
    x = torch.arange(24.0).reshape(2, 3, 4)  # (2, 3, 4)
    assert ex.recorded_copies(lambda: (x.view(6, 4), x[:, 1], x.transpose(1, 2), x + 1)) == []
    out = ex.recorded_copies(lambda: x.transpose(1, 2).contiguous())
    assert out == [ex.TensorCopy("aten.clone", (2, 4, 3), (12, 3, 1), 96)]
    y = torch.zeros(5, 4)
    out = ex.recorded_copies(lambda: y.__setitem__(slice(1, 3), torch.ones(2, 4)))
    assert [(c.op, c.shape, c.stride, c.nbytes) for c in out] == [("aten.copy_", (2, 4), (4, 1),
                                                                    32)]
    assert [c.op for c in ex.recorded_copies(lambda: x.to(torch.float64))] == ["aten._to_copy"]
    assert [c.shape for c in ex.recorded_copies(lambda: (x.clone(), y.clone()))] == [(2, 3, 4),
                                                                                   (5, 4)]


def test_recorded_copies_lets_errors_through():
    with pytest.raises(ZeroDivisionError):
        ex.recorded_copies(lambda: 1 / 0)
    assert ex.recorded_copies(lambda: None) == []  # and the recorder is gone afterwards


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.value)
def test_decode_attention_copies_k_and_v_exactly_when_the_batch_does_not_fold(layout):
    B, Hkv, S, D = 3, 2, 16, 8
    cache = ex.filled_flat_cache(small_config(layout, num_layers=1, batch=B, kv_heads=Hkv,
                                              head_dim=D, max_seq_len=S), [S] * B)
    k, v, lens = cache.keys(0), cache.values(0), cache.lengths(range(B))
    q = torch.randn(B, 4, D)
    copies = ex.recorded_copies(lambda: decode_attention(q, k, v, lens))
    big = [c.shape for c in copies if c.nbytes >= k.numel() * 4]
    assert big == ([(B, Hkv, D, S), (B, Hkv, S, D)] if layout is Layout.SEQ_MAJOR else [])
    # and matmul_batches is that same copy, alone
    assert [c.shape for c in ex.recorded_copies(lambda: ex.matmul_batches(k, v))] == big


def _brute_force_runs(view: torch.Tensor) -> int:
    """Maximal runs of consecutive addresses in a view of an arange buffer."""
    addresses = sorted(view.flatten().tolist())
    return 1 + sum(b != a + 1 for a, b in itertools.pairwise(addresses))


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_num_runs_matches_the_addresses_written(shape, data):
    buffer = torch.arange(float(torch.Size(shape).numel()))  # each element holds its address
    view = buffer.view(shape).permute(data.draw(st.permutations(range(len(shape)))))
    dim = data.draw(st.integers(0, len(shape) - 1))
    start = data.draw(st.integers(0, view.shape[dim] - 1))
    view = view.narrow(dim, start, data.draw(st.integers(1, view.shape[dim] - start)))
    expected = _brute_force_runs(view)  # before the write below overwrites the addresses
    (copy,) = ex.recorded_copies(lambda: view.copy_(torch.zeros(view.shape)))
    assert copy.shape == tuple(view.shape) and copy.stride == view.stride()
    assert copy.num_runs == expected


# -- matmul batches -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.value)
def test_matmul_batches_are_each_heads_matrices_and_views_only_in_head_major(layout):
    B, Hkv, S, D = 2, 3, 5, 4
    cache = ex.filled_flat_cache(small_config(layout, num_layers=1, batch=B, kv_heads=Hkv,
                                              head_dim=D, max_seq_len=S), [S] * B)
    k, v = cache.keys(0), cache.values(0)
    kt, vb = ex.matmul_batches(k, v)
    assert kt.shape == (B * Hkv, D, S) and vb.shape == (B * Hkv, S, D)
    for b in range(B):
        for h in range(Hkv):
            assert torch.equal(kt[b * Hkv + h], k[b, h].T)
            assert torch.equal(vb[b * Hkv + h], v[b, h])
    shares = kt.untyped_storage().data_ptr() == cache.data.untyped_storage().data_ptr()
    assert shares == (layout is Layout.HEAD_MAJOR)


def test_matmul_batches_checks_shapes():
    with pytest.raises(ValueError, match="equal shape"):
        ex.matmul_batches(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5))
    with pytest.raises(ValueError, match="B, Hkv, S, D"):
        ex.matmul_batches(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.value)
def test_time_contiguous_copy_times_the_fold(layout, timed_calls):
    result = ex.time_contiguous_copy(layout, context_len=8, batch_size=2, num_kv_heads=2,
                                     head_dim=4, warmup=1, repeats=2)
    assert len(result.times_s) == 2 and len(timed_calls) == 3
    fn, (kt, vb) = timed_calls[0]
    assert kt.shape == (4, 4, 8) and vb.shape == (4, 8, 4)
    copied = [c.shape for c in ex.recorded_copies(fn)]
    assert copied == ([(2, 2, 4, 8), (2, 2, 8, 4)] if layout is Layout.SEQ_MAJOR else [])


# -- append ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.value)
def test_time_append_appends_one_token_per_call(layout, recording_cache):
    result = ex.time_append(layout, max_seq_len=16, batch_size=2, num_kv_heads=2, head_dim=4,
                            warmup=1, repeats=3)
    assert len(result.times_s) == 3
    (cache,) = recording_cache
    assert cache.config.layout is layout and cache.lengths([0, 1]).tolist() == [4, 4]
    _, slots, _, k, v = cache.writes[0]  # the same new token every call, (N=B, Hkv, D)
    assert slots == [0, 1] and [w[2] for w in cache.writes] == [[t, t] for t in range(4)]
    for t in range(4):
        assert torch.equal(cache.keys(0)[:, :, t], k)
        assert torch.equal(cache.values(0)[:, :, t], v)
    assert not cache.keys(0)[:, :, 4:].any()


def test_time_append_refuses_more_appends_than_room():
    with pytest.raises(ValueError, match="do not fit"):
        ex.time_append(Layout.SEQ_MAJOR, max_seq_len=4, warmup=2, repeats=3)


# -- layouts, together ----------------------------------------------------------------------------

def test_copy_share_by_len():
    seq, head = Layout.SEQ_MAJOR, Layout.HEAD_MAJOR
    t = ex.LayoutTimings(attention={seq: {8: timing(5.0)}, head: {8: timing(1.0)}},
                         copy={seq: {8: timing(2.0)}, head: {8: timing(0.0)}})
    assert t.copy_share_by_len == {8: 0.5}


def test_time_layouts_takes_turns_and_keys_every_length(monkeypatch):
    order = []
    real_measure = ex.measure

    def spy(fn, **kwargs):
        order.append(fn)
        return real_measure(fn, **kwargs)

    monkeypatch.setattr(ex, "measure", spy)
    t = ex.time_layouts([8, 16], batch_size=2, num_heads=4, num_kv_heads=2, head_dim=4,
                        warmup=1, repeats=3, show_progress=False)
    for table in (t.attention, t.copy):
        assert set(table) == set(Layout)
        for by_len in table.values():
            assert list(by_len) == [8, 16]
            assert all(len(x.times_s) == 3 and x.device == CPU for x in by_len.values())
    assert len(order) == 2 * 4 * 4  # lengths x calls x (warmup + repeats)
    first = order[:16]  # one length: four distinct calls, in the same order every round
    assert len(set(map(id, first[:4]))) == 4
    assert all(first[i] is first[i % 4] for i in range(16))
