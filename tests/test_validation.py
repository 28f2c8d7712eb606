"""One validation helper (kvlib.checks) everywhere: bools are not ints, numbers are finite.

`True` is an int to Python (`isinstance(True, int)`), so a check written as `isinstance(x,
int)` lets `top_k=True` through as "keep one token". Every public entry point here refuses
it, and refuses NaN and infinite numbers, with a ValueError naming the argument.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvlib import analysis, checks, flash, real_models
from kvlib.config import CacheConfig, ModelConfig
from kvlib.sampling import SamplingParams

BASE = dict(vocab_size=10, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1)
CACHE = dict(num_layers=1, num_kv_heads=1, head_dim=4, max_batch_size=1, max_seq_len=8)
LLAMA = analysis.PRESETS["llama-3-8b"]


def test_require_int_refuses_bools_and_non_ints():
    assert checks.require_int("n", 3, minimum=1) == 3
    for bad in (True, False, 3.0, "3", None):
        with pytest.raises(ValueError, match="n must be an int"):
            checks.require_int("n", bad)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, True, "1.0", None])
def test_require_number_refuses_bools_and_non_finite(bad):
    with pytest.raises(ValueError, match="x must be a finite number"):
        checks.require_number("x", bad)


def test_require_number_bounds():
    assert checks.require_number("p", 1, above=0, maximum=1) == 1.0
    with pytest.raises(ValueError, match=r"p must be a finite number > 0 and <= 1, got 0"):
        checks.require_number("p", 0, above=0, maximum=1)
    with pytest.raises(ValueError, match=">= 0"):
        checks.require_number("t", -0.5, minimum=0)


@pytest.mark.parametrize(("fields", "name"), [
    (dict(top_k=True), "top_k"),
    (dict(top_k=False), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(seed=True), "seed"),
    (dict(seed=-1), "seed"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_p=True), "top_p"),
])
def test_sampling_params_refuse_bools_and_non_finite_numbers(fields, name):
    with pytest.raises(ValueError, match=f"SamplingParams.{name}"):
        SamplingParams(**fields)


def test_sampling_params_accept_ints_for_floats():
    params = SamplingParams(temperature=1, top_k=5, top_p=1, seed=0)
    assert params.temperature == 1 and params.top_k == 5


@pytest.mark.parametrize("field", ["vocab_size", "d_model", "num_layers", "num_heads",
                                   "num_kv_heads", "max_seq_len", "head_dim", "ffn_dim"])
def test_model_config_refuses_bool_counts(field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**{**BASE, field: True})


@pytest.mark.parametrize(("field", "bad"), [("rope_theta", math.inf), ("rope_theta", math.nan),
                                            ("norm_eps", math.inf), ("norm_eps", True)])
def test_model_config_refuses_non_finite_numbers(field, bad):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**BASE, **{field: bad})


def test_model_config_refuses_a_string_of_layers():
    with pytest.raises(ValueError, match="sliding_layers"):
        ModelConfig(**BASE, sliding_window=4, sliding_layers="01")


@pytest.mark.parametrize("field", list(CACHE) + ["block_size"])
def test_cache_config_refuses_bool_counts(field):
    with pytest.raises(ValueError, match=f"CacheConfig.{field} must be an int >= 1"):
        CacheConfig(**{**CACHE, field: True})


@pytest.mark.parametrize("call", [
    lambda: analysis.kv_cache_bytes(LLAMA, True),
    lambda: analysis.kv_cache_bytes(LLAMA, 8, batch_size=True),
    lambda: analysis.step_weight_bytes(LLAMA, num_tokens=True),
    lambda: analysis.decode_step_cost(LLAMA, True, cached=True),
    lambda: analysis.generation_cost(LLAMA, True, 4, cached=True),
    lambda: analysis.decode_step_operations(LLAMA, 8, batch_size=True),
    lambda: analysis.naive_attention_count(True),
    lambda: real_models.kv_heads_per_gpu(LLAMA, True),
    lambda: real_models.cache_bytes(LLAMA, True),
], ids=["kv_cache_bytes", "batch_size", "num_tokens", "decode_step_cost", "generation_cost",
        "decode_step_operations", "naive_attention_count", "tp", "context_len"])
def test_sizing_refuses_bool_counts(call):
    with pytest.raises(ValueError, match="must be an int"):
        call()


@pytest.mark.parametrize("kwargs", [dict(q_tile=True), dict(kv_tile=False), dict(kv_chunk=True),
                                    dict(q_tile=0), dict(kv_chunk=2.0)])
def test_flash_tiles_refuse_bools(kwargs):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be an int >= 1"):
        flash.make_backend(**kwargs)


def test_split_kv_decode_refuses_a_bool_chunk():
    q, k = torch.randn(1, 2, 4), torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match="kv_chunk must be an int >= 1, got True"):
        flash.split_kv_decode(q, k, k, torch.tensor([5]), kv_chunk=True)


def test_no_module_keeps_its_own_count_check():
    """The one helper replaced config._positive_int, analysis._check_count and
    flash._check_tiles; none of them is left to drift from it."""
    from kvlib import config

    assert not hasattr(config, "_positive_int")
    assert not hasattr(analysis, "_check_count")
    assert not hasattr(flash, "_check_tiles")
