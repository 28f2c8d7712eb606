"""Quantize / dequantize: round-trip bounds for every scheme, packing, bad input, bits counted."""

from __future__ import annotations

import doctest
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kvlib.cache.quant_memory
import kvlib.cache.quantize
from kvlib.cache.quantize import (
    FORMATS,
    GRANULARITIES,
    LLAMA_CPP_Q4_0,
    LLAMA_CPP_Q8_0,
    SCALE_DTYPES,
    QuantScheme,
    bits_per_value,
    dequantize,
    error_bound,
    pack_int4,
    quantize,
    unpack_int4,
)


def all_schemes():
    for fmt, gran, sd in itertools.product(FORMATS, GRANULARITIES, SCALE_DTYPES):
        groups = [None] if gran in ("tensor", "head") else [None, 5, 8]  # 5, 8: do not divide
        syms = [True] if fmt.startswith("fp8") else [True, False]
        for g, sym in itertools.product(groups, syms):
            yield QuantScheme(fmt, gran, g, sym, sd)


SCHEMES = list(all_schemes())


def test_doctests():
    for module in (kvlib.cache.quantize, kvlib.cache.quant_memory):
        assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.name} {s.scale_dtype}")
def test_round_trip_error_within_half_a_step_or_fp8_spacing(scheme):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 37, 19, generator=gen) * 3  # (B, Hkv, S, D): 37, 19 odd sizes
    x[..., 4] *= 50  # an outlier channel
    qt = quantize(x, scheme)
    err = (dequantize(qt) - x).abs()
    bound = error_bound(x, scheme, qt)
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all()), float((err / bound).max())
    assert qt.scale.dtype == scheme.scale_dtype
    assert qt.payload.dtype == torch.uint8
    assert qt.payload.shape[-1] == (10 if scheme.bits == 4 else 19)  # two int4 per byte


@given(st.integers(1, 40), st.integers(1, 9), st.sampled_from(SCHEMES),
       st.floats(1e-3, 1e3))
def test_round_trip_holds_for_any_size_and_magnitude(S, D, scheme, magnitude):
    gen = torch.Generator().manual_seed(S * 100 + D)
    x = torch.randn(1, S, D, generator=gen) * magnitude  # (Hkv, S, D)
    qt = quantize(x, scheme)
    err = (dequantize(qt) - x).abs()
    assert bool((err <= error_bound(x, scheme, qt) * (1 + 1e-5) + 1e-7 * magnitude).all())


def test_constant_and_zero_blocks_come_back_exactly():
    for scheme in SCHEMES:
        zeros = torch.zeros(1, 4, 8)
        assert torch.equal(dequantize(quantize(zeros, scheme)), zeros), scheme.name


def test_int4_packing_round_trips_odd_lengths():
    codes = torch.randint(0, 16, (3, 7), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 4)
    assert torch.equal(unpack_int4(packed, 7), codes)


def test_scale_shapes_follow_the_granularity():
    x = torch.randn(2, 3, 10, 8)  # (B, Hkv, S, D)
    shapes = {
        QuantScheme("int8", "tensor"): (2, 1, 1, 1),
        QuantScheme("int8", "head"): (2, 3, 1, 1),
        QuantScheme("int8", "token"): (2, 3, 10, 1, 1),
        QuantScheme("int8", "token", 3): (2, 3, 10, 3, 1),  # groups 3, 3, 2 of channels
        QuantScheme("int8", "channel"): (2, 3, 1, 1, 8),
        QuantScheme("int8", "channel", 4): (2, 3, 3, 1, 8),  # groups 4, 4, 2 of tokens
    }
    for scheme, shape in shapes.items():
        assert tuple(quantize(x, scheme).scale.shape) == shape, scheme.name


def test_per_channel_beats_per_token_on_outlier_channels():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 256, 64, generator=gen)  # (Hkv, S, D)
    k[..., [3, 17]] *= 30  # two outlier channels, as real keys have
    errs = {}
    for gran in ("token", "channel"):
        scheme = QuantScheme("int4", gran, 32, symmetric=False)
        errs[gran] = float((dequantize(quantize(k, scheme)) - k).norm() / k.norm())
    assert errs["channel"] < errs["token"], errs


def test_bits_per_value_of_the_anchors():
    assert bits_per_value(LLAMA_CPP_Q8_0, 128) == 8.5  # llama.cpp's own figures
    assert bits_per_value(LLAMA_CPP_Q4_0, 128) == 4.5
    assert bits_per_value(QuantScheme("int8", "token", scale_dtype=torch.float32), 128) == 8.25


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "int3"}, "format"),
    ({"format": "int4", "granularity": "row"}, "granularity"),
    ({"group_size": 0}, "group_size"),
    ({"group_size": -4}, "group_size"),
    ({"group_size": True}, "group_size"),
    ({"granularity": "tensor", "group_size": 8}, "group_size"),
    ({"format": "fp8_e4m3", "symmetric": False}, "zero points"),
    ({"scale_dtype": torch.bfloat16}, "scale_dtype"),
])
def test_bad_schemes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantScheme(**kwargs)


def test_bad_tensors_are_refused():
    scheme = QuantScheme()
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.ones(2, 3, 4, dtype=torch.int64), scheme)
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.ones(3, 4), scheme)
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.ones(2, 0, 4), scheme)
    with pytest.raises(ValueError, match="QuantScheme"):
        quantize(torch.ones(2, 3, 4), "int8")
