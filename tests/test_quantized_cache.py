"""QuantizedKVCache: reads match a plain reference (round trip + exact tail), the contract's
lifecycle (abort, fork, release), the model runs on it, bad input changes nothing, and the
byte accounting matches what is stored."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvlib.cache import KVCache
from kvlib.cache.flat import FlatKVCache
from kvlib.cache.paged import PagedKVCache
from kvlib.cache.quant_memory import PRESETS, KVQuantConfig, memory
from kvlib.cache.quantize import QuantScheme, compute_params, decode, encode, fake_quantize
from kvlib.cache.quantized import QuantizedKVCache
from kvlib.config import CacheConfig
from kvlib.contract import append
from kvlib.experiments import demo_model
from kvlib.experiments.quantization import (
    SMALL_CONFIG,
    attention_error,
    next_token_agreement,
    outlier_keys,
    quantized_cache_for,
    reference_run,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D, HKV, LAYERS = 12, 2, 2
QUANTS = {name: KVQuantConfig(q.keys, q.values, min(q.residual, 5), name)
          for name, q in PRESETS.items()}
QUANTS["channel-g4-int8-token-g5"] = KVQuantConfig(
    QuantScheme("int4", "channel", 4, symmetric=False), QuantScheme("int8", "token", 5), 0)
QUANTS["kivi-style-g4-residual-6"] = KVQuantConfig(  # groups leave the residual mid-step
    QuantScheme("int4", "channel", 4, symmetric=False),
    QuantScheme("int4", "token", 8, symmetric=False), 6)
QUANTS["head-int8-tensor-int4-asym"] = KVQuantConfig(
    QuantScheme("int8", "head"), QuantScheme("int4", "tensor", symmetric=False), 3)
STEPS = (5, 1, 3, 1, 1, 9, 1, 2)  # prefill, decode steps, chunks: groups complete mid-step


INNERS = {"flat": FlatKVCache, "paged": lambda config: PagedKVCache(config, num_blocks=24)}


def make(quant, batch=3, max_seq_len=40, inner="flat"):
    block_size = max(8, quant.token_group)  # a group of tokens must fit in a block
    config = CacheConfig(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, block_size=block_size,
                         max_batch_size=batch, max_seq_len=max_seq_len)
    return QuantizedKVCache(config, quant, INNERS[inner])


def expected(x, scheme, quant, calib):
    """What the cache should return for one sequence's keys or values x (Hkv, n, D), read
    with `read_all`'s zero probe token after them (it may push a group out of the residual):
    the tokens that left the residual through their codes, the rest exactly."""
    x = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)  # (Hkv, n + 1, D)
    lo = quant.quantized_len(x.shape[1])
    out = x.clone()
    if scheme.granularity in ("tensor", "head"):
        scale, zero = compute_params(calib, scheme)  # calibrated on the first codes
        out = decode(encode(x, scale, zero, scheme), scale, zero, scheme)
    elif lo:
        out[:, :lo] = fake_quantize(x[:, :lo], scheme)  # whole groups of tokens, or per token
    out[:, lo:] = x[:, lo:]  # the residual, in full precision
    return out[:, :-1]


def first_codes(quant, steps):
    """Positions (lo, hi) of the first tokens to leave the residual, step by step."""
    n = 0
    for T in (*steps, 1):  # read_all's probe token last
        lo, hi = quant.quantized_len(n), quant.quantized_len(n + T)
        if hi > lo:
            return lo, hi
        n += T
    return 0, 0


def fill(cache, steps=STEPS, seed=0):
    """Append random tokens to sequences 0..2 in `steps`; return all of them, (L, B, Hkv, S, D)."""
    gen = torch.Generator().manual_seed(seed)
    ks, vs = [], []
    for T in steps:
        k, v = torch.randn(2, LAYERS, 3, HKV, T, D, generator=gen)
        append(cache, [0, 1, 2], k, v)
        ks.append(k)
        vs.append(v)
    return torch.cat(ks, dim=3), torch.cat(vs, dim=3)


def read_all(cache, seq_ids, layer):
    """Read a layer by opening a one-token step and aborting it: (B, Hkv, S, D) each, without
    the probe token."""
    batch = cache.begin(seq_ids, [1] * len(seq_ids))
    try:
        for layer_ in range(cache.num_layers):
            cache.write(layer_, batch, torch.zeros(len(seq_ids), HKV, D),
                        torch.zeros(len(seq_ids), HKV, D))
        kv = cache.read(layer, batch)
        return kv.k[:, :, :-1].clone(), kv.v[:, :, :-1].clone()
    finally:
        cache.abort(batch)


def test_implements_the_contract():
    assert isinstance(make(PRESETS["int8-token"]), KVCache)


@pytest.mark.parametrize("inner", list(INNERS))
@pytest.mark.parametrize("name", list(QUANTS))
def test_read_is_the_round_trip_with_an_exact_tail(name, inner):
    quant = QUANTS[name]
    cache = make(quant, inner=inner)
    k, v = fill(cache)
    lo, hi = first_codes(quant, STEPS)  # a per-layer scale is calibrated on these
    for layer in range(LAYERS):
        got_k, got_v = read_all(cache, [0, 1, 2], layer)
        for b in range(3):
            for got, x, scheme in ((got_k, k, quant.keys), (got_v, v, quant.values)):
                calib = x[layer, :, :, lo:hi].transpose(0, 1).reshape(HKV, -1, D)
                want = expected(x[layer, b], scheme, quant, calib)
                torch.testing.assert_close(got[b], want, atol=1e-6, rtol=1e-6)


@given(st.lists(st.integers(1, 7), min_size=1, max_size=8), st.sampled_from(list(INNERS)))
def test_any_sequence_of_step_sizes_reads_back_the_reference(steps, inner):
    quant = QUANTS["kivi-style-g4-residual-6"]
    cache = make(quant, max_seq_len=64, inner=inner)
    k, v = fill(cache, steps, seed=len(steps))
    got_k, got_v = read_all(cache, [0, 1, 2], 1)
    for b in range(3):
        torch.testing.assert_close(got_k[b], expected(k[1, b], quant.keys, quant, None),
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got_v[b], expected(v[1, b], quant.values, quant, None),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("inner", list(INNERS))
def test_abort_and_a_failed_write_change_nothing(inner):
    quant = QUANTS["channel-g4-int8-token-g5"]
    cache, twin = make(quant, inner=inner), make(quant, inner=inner)
    fill(cache)
    fill(twin)
    batch = cache.begin([0, 1], [3, 2])
    cache.write(0, batch, torch.randn(5, HKV, D) * 100, torch.randn(5, HKV, D) * 100)
    with pytest.raises(ValueError, match="dtype"):  # mixed dtypes: refused
        cache.write(1, batch, torch.randn(5, HKV, D, dtype=torch.float64),
                    torch.randn(5, HKV, D))
    with pytest.raises(ValueError, match="shape"):
        cache.write(1, batch, torch.randn(4, HKV, D), torch.randn(4, HKV, D))
    cache.abort(batch)
    assert cache.lengths([0, 1, 2]).tolist() == twin.lengths([0, 1, 2]).tolist()
    for layer in range(LAYERS):
        for a, b in zip(read_all(cache, [0, 1, 2], layer), read_all(twin, [0, 1, 2], layer)):
            assert torch.equal(a, b)
    append(cache, [0], *torch.ones(2, LAYERS, 1, HKV, 4, D))  # and it goes on as the twin
    append(twin, [0], *torch.ones(2, LAYERS, 1, HKV, 4, D))
    assert torch.equal(read_all(cache, [0], 1)[0], read_all(twin, [0], 1)[0])


def test_static_scale_calibration_is_undone_by_abort():
    quant = QUANTS["head-int8-tensor-int4-asym"]
    cache, twin = make(quant), make(quant)
    batch = cache.begin([0], [4])
    assert cache.read(1, batch).k.shape == (1, HKV, 4, D)  # nothing calibrated: no error
    for layer in range(LAYERS):
        cache.write(layer, batch, torch.randn(4, HKV, D) * 1000, torch.randn(4, HKV, D) * 1000)
    cache.abort(batch)
    fill(cache)
    fill(twin)
    assert torch.equal(read_all(cache, [1], 0)[0], read_all(twin, [1], 0)[0])


@pytest.mark.parametrize("inner", list(INNERS))
def test_fork_copies_and_release_forgets(inner):
    quant = QUANTS["channel-g4-int8-token-g5"]
    cache = make(quant, batch=4, inner=inner)
    fill(cache)
    cache.fork(1, 3)
    a, b = read_all(cache, [1, 3], 0)[0]
    assert torch.equal(a, b)
    before = read_all(cache, [1], 0)[0]
    append(cache, [3], *torch.randn(2, LAYERS, 1, HKV, 6, D) * 50)  # completes a group
    assert cache.lengths([1, 3]).tolist() == [sum(STEPS), sum(STEPS) + 6]
    assert torch.equal(read_all(cache, [1], 0)[0], before)  # the source is untouched
    cache.release([3])
    assert cache.lengths([3]).tolist() == [0]
    fresh = torch.randn(2, LAYERS, 1, HKV, 2, D)
    append(cache, [3], *fresh)  # a released id starts empty: no tail of its past is read
    torch.testing.assert_close(read_all(cache, [3], 0)[0][0], fresh[0, 0, 0])


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="larger than the cache"):
        make(KVQuantConfig(QuantScheme(), QuantScheme(), residual=41))
    with pytest.raises(ValueError, match="group of tokens"):
        KVQuantConfig(QuantScheme("int4", "channel"), QuantScheme())
    with pytest.raises(ValueError, match="residual"):
        KVQuantConfig(QuantScheme(), QuantScheme(), residual=-1)
    with pytest.raises(ValueError, match="format"):
        KVQuantConfig(QuantScheme("int2"), QuantScheme())
    with pytest.raises(ValueError, match="group_size"):
        QuantScheme("int4", "token", group_size=0)


def test_paged_blocks_must_hold_whole_token_groups():
    config = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, max_batch_size=1,
                         max_seq_len=64, block_size=8)
    quant = KVQuantConfig(QuantScheme("int4", "channel", 16), QuantScheme())
    with pytest.raises(ValueError, match="block_size"):
        QuantizedKVCache(config, quant, INNERS["paged"])


@pytest.mark.parametrize("inner", list(INNERS))
def test_no_room_raises_and_writes_nothing(inner):
    cache = make(PRESETS["int8-token"], max_seq_len=8, inner=inner)
    append(cache, [0], *torch.randn(2, LAYERS, 1, HKV, 6, D))
    before = read_all(cache, [0], 0)
    with pytest.raises(ValueError, match="no room"):
        cache.begin([0], [3])
    assert cache.lengths([0]).tolist() == [6]
    assert torch.equal(read_all(cache, [0], 0)[0], before[0])


def test_stored_bytes_match_the_accounting():
    quant = PRESETS["llama.cpp-q4_0"]
    cache = make(quant)
    inner = cache.inner
    assert isinstance(inner, FlatKVCache) and inner.data.element_size() == 1
    m = cache.memory(10)
    per_token_rows = 2 * LAYERS * HKV * inner.config.head_dim  # K and V rows, in bytes
    assert m.payload + m.scales + m.zeros + m.padding == 10 * per_token_rows
    assert m.residual == 0


def test_ratios_against_fp16_are_not_the_naive_ones():
    llama = dict(num_layers=32, num_kv_heads=8, head_dim=128, num_tokens=4096)
    q4 = memory(PRESETS["llama.cpp-q4_0"], **llama)
    q8 = memory(PRESETS["llama.cpp-q8_0"], **llama)
    assert round(q4.ratio_vs_fp16, 3) == round(16 / 4.5, 3) and q4.naive_ratio == 4
    assert round(q8.ratio_vs_fp16, 3) == round(16 / 8.5, 3) and q8.naive_ratio == 2
    kivi = memory(PRESETS["kivi-int4"], **llama)
    assert kivi.residual == 2 * 32 * 8 * 128 * 128 * 2  # 128 tokens of fp16 K and V
    assert kivi.ratio_vs_fp16 < q4.ratio_vs_fp16


def test_per_channel_keys_beat_per_token_on_outlier_channels():
    k, v, q = outlier_keys(512, 128, 2, num_outliers=4, strength=20.0)
    for fmt in ("int8", "int4"):
        token = attention_error(k, v, q, QuantScheme(fmt, "token", symmetric=False), None)
        channel = attention_error(k, v, q, QuantScheme(fmt, "channel", 32, symmetric=False),
                                  None)
        assert channel < token, (fmt, channel, token)


def test_model_generates_on_every_preset():
    model = demo_model(SMALL_CONFIG)
    prompt = torch.arange(150)[None]  # past the 128-token windows
    for quant in PRESETS.values():
        cache = quantized_cache_for(model, quant, 170)
        out = model.generate(prompt, 16, cache=cache)
        assert out.tokens.shape == (1, 16) and cache.lengths([0]).tolist() == [165]


def test_int8_per_token_agrees_on_top1_for_256_steps():
    model = demo_model(SMALL_CONFIG)
    agreement = next_token_agreement(model, PRESETS["int8-token"], reference_run(model, 256))
    assert agreement.top1 >= 0.99, agreement.top1
    assert agreement.kl < 1e-4


@pytest.mark.parametrize("inner", list(INNERS))
def test_read_before_write_and_a_second_write_of_a_layer(inner):
    # Found by the shared contract suite: a step whose new tokens complete a group of tokens
    # must still read the committed tokens before it writes, and writing a layer twice in
    # one step must store the same thing.
    quant = QUANTS["channel-g4-int8-token-g5"]  # no residual: a group leaves once complete
    cache, twin = make(quant, inner=inner), make(quant, inner=inner)
    k, v = fill(cache, (3,))
    fill(twin, (3,))
    batch = cache.begin([0, 1, 2], [2, 2, 2])  # positions 3, 4: completes the group 0..3
    kv = cache.read(0, batch)
    torch.testing.assert_close(kv.k[:, :, :3], k[0, :, :, :3])  # the tail, exactly
    new_k, new_v = torch.randn(2, 6, HKV, D)
    for _ in range(2):
        for layer in range(LAYERS):
            cache.write(layer, batch, new_k, new_v)
    cache.commit(batch)
    append(twin, [0, 1, 2], *torch.stack([new_k, new_v]).view(2, 1, 3, 2, HKV, D)
           .transpose(3, 4).expand(2, LAYERS, 3, HKV, 2, D))
    for layer in range(LAYERS):
        for a, b in zip(read_all(cache, [0, 1, 2], layer), read_all(twin, [0, 1, 2], layer)):
            assert torch.equal(a, b)
