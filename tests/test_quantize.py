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
    VLLM_FP8,
    VLLM_FP8_KEYS,
    VLLM_FP8_VALUES,
    QuantScheme,
    bits_per_value,
    blocked,
    code_range,
    compute_params,
    decode,
    dequantize,
    encode,
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
    ({"max_code": 0}, "max_code"),
    ({"max_code": 128}, r"max_code \(or None\) must be a finite number > 0 and <= 127"),
    ({"format": "fp8_e4m3", "max_code": 449.0}, "<= 448"),
    ({"max_code": True}, "max_code"),
    ({"max_code": float("nan")}, "max_code"),
    ({"symmetric": False, "max_code": 100}, "max_code is for symmetric schemes"),
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


# -- every block keeps its own step, however small its values --------------------------------

INT_SCHEMES = [QuantScheme(fmt, "token", 32, sym, sd) for fmt in ("int8", "int4")
               for sym in (True, False) for sd in SCALE_DTYPES]


@pytest.mark.parametrize("scheme", INT_SCHEMES, ids=lambda s: f"{s.name} {s.scale_dtype}")
@pytest.mark.parametrize("magnitude", [1.0, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-8])
def test_small_blocks_keep_the_bound_of_their_own_step(scheme, magnitude):
    """|error| <= step / 2, step = the block's own range / the largest code, rounded up to the
    scale dtype: relative 2^-10 in fp16, plus at most half its smallest subnormal (2^-25).
    (Asymmetric: the range from the stored zero point, the block's minimum rounded down.)
    Scales clamped to fp16's smallest *normal* (6.1e-5) broke this below ~8e-3 (int8)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 40, 64, generator=gen) * magnitude  # (Hkv, S, D)
    xb = blocked(x, scheme)  # (Hkv, S, nG, g)
    top = code_range(scheme)[1]
    qt = quantize(x, scheme)
    span = (xb.abs().amax(-1, keepdim=True) if scheme.symmetric
            else xb.amax(-1, keepdim=True) - qt.zero.float())
    fp16 = scheme.scale_dtype == torch.float16
    relative = 2.0 ** -10 if fp16 else 2.0 ** -23
    absolute = 2.0 ** -25 if fp16 else 2.0 ** -150
    bound = span / top / 2 * (1 + relative) + absolute + 1e-6 * span / top  # float32 slack
    err = (blocked(dequantize(qt), scheme) - xb).abs()
    assert bool((err <= bound).all()), float((err / (span / top / 2)).max())


def test_a_block_of_1e_3_gets_its_own_int8_step():
    x = torch.full((1, 1, 32), 1e-3)
    x[..., ::2] = -0.37e-3  # (Hkv, S, D)
    qt = quantize(x, QuantScheme("int8", "token"))
    step = 1e-3 / 127
    assert step <= qt.scale.float().item() < step * 1.01  # not 6.1e-5, 7.7x coarser
    assert float((dequantize(qt) - x).abs().max()) <= step / 2 * 1.01


@pytest.mark.parametrize(("x", "message"), [
    (torch.tensor([[[1.0, float("nan")]]]), "NaN or infinite"),
    (torch.tensor([[[1.0, float("inf")]]]), "NaN or infinite"),
    (torch.tensor([[[1.0, 1e7]]]), "too large.*scale_dtype=torch.float32"),
    (torch.tensor([[[-1e7, 1.0]]]), "too large"),
])
def test_values_without_a_finite_fp16_scale_are_refused(x, message):
    for scheme in (QuantScheme("int8", "token"), QuantScheme("int4", "token", symmetric=False)):
        with pytest.raises(ValueError, match=message):
            quantize(x, scheme)


def test_float32_scales_hold_what_fp16_cannot():
    x = torch.tensor([[[1.0, 1e7]]])
    back = dequantize(quantize(x, QuantScheme("int8", "token", scale_dtype=torch.float32)))
    assert torch.allclose(back, x, rtol=1e-2, atol=1e7 / 254)


# -- max_code: vLLM's calibration headroom ----------------------------------------------------

def test_max_code_maps_the_largest_value_below_the_top_code():
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))  # (Hkv, S, D)
    amax = float(x.abs().max())
    for scheme, code in ((VLLM_FP8, 448.0), (VLLM_FP8_KEYS, 200.0), (VLLM_FP8_VALUES, 100.0)):
        scale = quantize(x, scheme).scale.float().item()
        assert scale == pytest.approx(amax / code, rel=1e-6), scheme.name
    assert VLLM_FP8_KEYS.name == "fp8_e4m3 per-tensor max 200"


def test_headroom_keeps_later_larger_values_from_clipping():
    """A scale computed once (on `first`) and kept: values twice as large later clip without
    headroom (448 is the top code) and fit with vLLM's (keys map to 200 of 448)."""
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(1, 32, 64, generator=gen)  # (Hkv, S, D)
    later = 2 * first
    errors = {}
    for scheme in (VLLM_FP8, VLLM_FP8_KEYS):
        scale, zero = compute_params(first, scheme)
        back = decode(encode(later, scale, zero, scheme), scale, zero, scheme)
        errors[scheme.max_code] = float((back - later).norm() / later.norm())
    assert errors[200.0] < 0.05 < errors[None], errors


def test_the_calibration_experiment_shows_the_headroom():
    from kvlib.cache.quant_memory import KVQuantConfig
    from kvlib.experiments.quantization import calibration_errors

    gen = torch.Generator().manual_seed(0)
    first = torch.randn(1, 32, 128, generator=gen)  # (Hkv, T, D)
    first[..., :4] *= 10
    later = torch.randn(1, 32, 128, generator=gen)
    later[..., :4] *= 20  # outliers twice as strong as the first write's
    kvlib_way = KVQuantConfig(keys=VLLM_FP8, values=VLLM_FP8)
    vllm_way = KVQuantConfig(keys=VLLM_FP8_KEYS, values=VLLM_FP8_VALUES)
    (first_a, later_a), (first_b, later_b) = (calibration_errors(q, first, later)
                                              for q in (kvlib_way, vllm_way))
    assert max(first_a, first_b) < 0.05  # the first write itself is fine either way
    assert later_b < 0.05 < later_a  # clipped without headroom, kept with it
