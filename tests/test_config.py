"""kvlib.config: derived sizes, validation with the field's name, cache shapes and bytes."""

from __future__ import annotations

import dataclasses
import doctest
import re

import pytest
import torch

import kvlib.config
from kvlib.config import CacheConfig, Layout, ModelConfig

MODEL = {"vocab_size": 100, "d_model": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
CACHE = {"num_layers": 2, "num_kv_heads": 4, "head_dim": 8, "max_batch_size": 3, "max_seq_len": 10}


def test_module_doctests():
    result = doctest.testmod(kvlib.config, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# ModelConfig
# ---------------------------------------------------------------------------------------------

def test_model_config_derives_head_dim_and_ffn_dim():
    cfg = ModelConfig(**MODEL)
    assert cfg.head_dim == 16  # 64 / 4
    assert cfg.ffn_dim == 256  # 4 * 64
    assert cfg.queries_per_kv == 2  # 4 / 2


def test_model_config_keeps_explicit_head_dim_and_ffn_dim():
    # Decoupled head_dim (as in some real models): d_model need not equal H * D.
    cfg = ModelConfig(**{**MODEL, "num_heads": 3, "num_kv_heads": 1}, head_dim=10, ffn_dim=96)
    assert (cfg.head_dim, cfg.ffn_dim, cfg.queries_per_kv) == (10, 96, 3)


def test_model_config_mqa_and_mha_group_sizes():
    assert ModelConfig(**{**MODEL, "num_kv_heads": 1}).queries_per_kv == 4
    assert ModelConfig(**{**MODEL, "num_kv_heads": 4}).queries_per_kv == 1


def test_model_config_is_frozen():
    cfg = ModelConfig(**MODEL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 128  # type: ignore[misc]


def test_model_config_equality_ignores_name():
    assert ModelConfig(**MODEL, name="a") == ModelConfig(**MODEL, name="b")


INVALID_MODEL = [
    # (override, field the message must name)
    ({"vocab_size": 0}, "vocab_size"),
    ({"vocab_size": -5}, "vocab_size"),
    ({"vocab_size": 100.0}, "vocab_size"),
    ({"vocab_size": True}, "vocab_size"),
    ({"d_model": 0, "head_dim": 8}, "d_model"),
    ({"d_model": -64}, "d_model"),
    ({"d_model": 64.0}, "d_model"),
    ({"num_layers": 0}, "num_layers"),
    ({"num_layers": -1}, "num_layers"),
    ({"num_layers": 2.0}, "num_layers"),
    ({"num_heads": 0}, "num_heads"),
    ({"num_heads": -4}, "num_heads"),
    ({"num_heads": 4.0}, "num_heads"),
    ({"num_heads": 3}, "num_heads"),  # 64 not divisible by 3 and no head_dim given
    ({"num_kv_heads": 0}, "num_kv_heads"),
    ({"num_kv_heads": -2}, "num_kv_heads"),
    ({"num_kv_heads": 2.0}, "num_kv_heads"),
    ({"num_kv_heads": 3}, "num_kv_heads"),  # 4 query heads are not a multiple of 3
    ({"num_heads": 6, "num_kv_heads": 4, "head_dim": 8}, "num_kv_heads"),
    ({"head_dim": -8}, "head_dim"),
    ({"head_dim": 7}, "head_dim"),  # odd: rotary pairs need an even head_dim
    ({"d_model": 36, "num_heads": 4}, "head_dim"),  # derived 9: odd
    ({"head_dim": 8.0}, "head_dim"),
    ({"ffn_dim": -1}, "ffn_dim"),
    ({"ffn_dim": 10.5}, "ffn_dim"),
    ({"max_seq_len": 0}, "max_seq_len"),
    ({"max_seq_len": -1}, "max_seq_len"),
    ({"rope_theta": 0.0}, "rope_theta"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"rope_theta": float("nan")}, "rope_theta"),
    ({"rope_theta": "fast"}, "rope_theta"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"norm_eps": -1e-6}, "norm_eps"),
]


@pytest.mark.parametrize(("override", "field"), INVALID_MODEL,
                         ids=[f"{f}={list(o.values())}" for o, f in INVALID_MODEL])
def test_model_config_rejects_invalid_field_naming_it(override, field):
    with pytest.raises(ValueError) as info:
        ModelConfig(**{**MODEL, **override})
    message = str(info.value)
    assert "ModelConfig" in message
    assert re.search(rf"\b{field}\b", message), message


# ---------------------------------------------------------------------------------------------
# CacheConfig
# ---------------------------------------------------------------------------------------------

def test_cache_config_for_model_copies_model_dimensions():
    model = ModelConfig(**{**MODEL, "num_heads": 8, "num_kv_heads": 2})  # head_dim 8
    cfg = CacheConfig.for_model(model, max_batch_size=5, max_seq_len=33, dtype=torch.float16,
                                layout=Layout.HEAD_MAJOR)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (2, 2, 8)
    assert (cfg.max_batch_size, cfg.max_seq_len) == (5, 33)
    assert cfg.dtype == torch.float16 and cfg.layout is Layout.HEAD_MAJOR


def test_cache_config_defaults_and_coercions():
    cfg = CacheConfig(**CACHE)
    assert cfg.dtype == torch.float32
    assert cfg.device == torch.device("cpu")
    assert cfg.layout is Layout.SEQ_MAJOR
    assert cfg.block_size == 16
    # Strings are accepted where a reader would naturally write them, and normalised.
    cfg = CacheConfig(**CACHE, layout="head_major", device="cpu")
    assert cfg.layout is Layout.HEAD_MAJOR
    assert isinstance(cfg.device, torch.device) and cfg.device.type == "cpu"
    assert CacheConfig(**CACHE, device="meta").device == torch.device("meta")


@pytest.mark.parametrize(("layout", "expected"), [
    # L=2, B=3, S=10, Hkv=4, D=8
    (Layout.SEQ_MAJOR, (2, 3, 10, 2, 4, 8)),
    (Layout.HEAD_MAJOR, (2, 2, 3, 4, 10, 8)),
])
def test_cache_config_shape_per_layout(layout, expected):
    assert CacheConfig(**CACHE, layout=layout).shape == expected


@pytest.mark.parametrize(("dtype", "expected"), [
    # 2 (K, V) x 2 layers x 4 KV heads x 8 dims = 128 elements per token
    (torch.float32, 128 * 4),
    (torch.float16, 128 * 2),
    (torch.bfloat16, 128 * 2),
    (torch.float64, 128 * 8),
])
def test_cache_config_bytes_per_token(dtype, expected):
    assert CacheConfig(**CACHE, dtype=dtype).bytes_per_token == expected


def test_cache_bytes_per_token_matches_a_real_model_by_hand():
    # Llama-2-7B: 32 layers, 32 KV heads, head_dim 128, fp16: 2*32*32*128*2 = 524,288 bytes
    # (0.5 MiB per token).
    cfg = CacheConfig(num_layers=32, num_kv_heads=32, head_dim=128, max_batch_size=1,
                      max_seq_len=1, dtype=torch.float16)
    assert cfg.bytes_per_token == 524_288


def test_cache_config_is_frozen():
    cfg = CacheConfig(**CACHE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_seq_len = 20  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layout = Layout.HEAD_MAJOR  # type: ignore[misc]


INVALID_CACHE = [
    ({"num_layers": 0}, "num_layers"),
    ({"num_layers": -2}, "num_layers"),
    ({"num_layers": 2.0}, "num_layers"),
    ({"num_kv_heads": 0}, "num_kv_heads"),
    ({"num_kv_heads": -1}, "num_kv_heads"),
    ({"num_kv_heads": "4"}, "num_kv_heads"),
    ({"head_dim": 0}, "head_dim"),
    ({"head_dim": 8.5}, "head_dim"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_batch_size": -3}, "max_batch_size"),
    ({"max_batch_size": False}, "max_batch_size"),
    ({"max_seq_len": 0}, "max_seq_len"),
    ({"max_seq_len": 10.0}, "max_seq_len"),
    ({"block_size": 0}, "block_size"),
    ({"block_size": -16}, "block_size"),
    ({"dtype": torch.int8}, "dtype"),
    ({"dtype": torch.int64}, "dtype"),
    ({"dtype": torch.bool}, "dtype"),
    ({"dtype": torch.complex64}, "dtype"),
    ({"dtype": "float32"}, "dtype"),
    ({"layout": "diagonal"}, "layout"),
    ({"layout": 3}, "layout"),
    ({"device": "tpu9000"}, "device"),
    ({"device": 3.5}, "device"),
]


@pytest.mark.parametrize(("override", "field"), INVALID_CACHE,
                         ids=[f"{f}={list(o.values())}" for o, f in INVALID_CACHE])
def test_cache_config_rejects_invalid_field_naming_it(override, field):
    with pytest.raises(ValueError) as info:
        CacheConfig(**{**CACHE, **override})
    message = str(info.value)
    assert "CacheConfig" in message
    # The field itself (lower case, as written in the call), not just a type name.
    assert re.search(rf"\b{field}\b", message), message
