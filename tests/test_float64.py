"""Attention in float64 keeps float64: scores, softmax and the online-softmax state are
computed in float32 only for narrower inputs (fp16, bf16, fp32), never for wider ones.

Against conftest's naive float64 reference, float64 inputs agree to ~1e-15; scores forced
through float32 would leave errors near 1e-7.
"""

from __future__ import annotations

import pytest
import torch

from kvlib import flash
from kvlib.attention import attention, decode_attention, softmax_dtype
from kvlib.sampling import SamplingParams, filter_logits

TOL = 1e-12


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 8, 13, 32, generator=gen, dtype=torch.float64)  # (B, H, T, D)
    k, v = (torch.randn(2, 2, 50, 32, generator=gen, dtype=torch.float64) for _ in range(2))
    positions = torch.arange(37, 50).expand(2, 13)  # (B, T): a chunk after 37 cached tokens
    kv_lens = torch.tensor([50, 44])
    return q, k, v, positions, kv_lens


def test_softmax_dtype_widens_only():
    assert softmax_dtype(torch.float16) == torch.float32
    assert softmax_dtype(torch.bfloat16) == torch.float32
    assert softmax_dtype(torch.float32) == torch.float32
    assert softmax_dtype(torch.float64) == torch.float64


def test_reference_attention_keeps_float64(naive_attention):
    q, k, v, positions, kv_lens = inputs()
    out = attention(q, k, v, positions, kv_lens)
    assert out.dtype == torch.float64
    exact = naive_attention(q, k, v, positions, kv_lens)
    assert (out - exact).abs().max().item() < TOL


@pytest.mark.parametrize(("q_tile", "kv_tile"), [(4, 7), (13, 50), (1, 1)])
def test_chunked_attention_keeps_float64(naive_attention, q_tile, kv_tile):
    q, k, v, positions, kv_lens = inputs(1)
    out = flash.chunked_attention(q, k, v, positions, kv_lens, q_tile=q_tile, kv_tile=kv_tile)
    assert out.dtype == torch.float64
    assert (out - naive_attention(q, k, v, positions, kv_lens)).abs().max().item() < TOL


def test_split_kv_decode_keeps_float64(naive_decode):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 8, 16, generator=gen, dtype=torch.float64)  # (B, H, D)
    k, v = (torch.randn(3, 2, 40, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    lens = torch.tensor([40, 17, 1])
    exact = naive_decode(q, k, v, lens)
    for out in (flash.split_kv_decode(q, k, v, lens, kv_chunk=7), decode_attention(q, k, v, lens)):
        assert out.dtype == torch.float64
        assert (out - exact).abs().max().item() < TOL
    out, lse = flash.decode_partials(q, flash.dense_loader(k, v), 2, lens, kv_chunk=7)
    assert out.dtype == lse.dtype == torch.float64


def test_float32_inputs_still_score_in_float32():
    q, k, v, positions, kv_lens = (t.float() if t.is_floating_point() else t for t in inputs())
    out = flash.chunked_attention(q, k, v, positions, kv_lens, q_tile=4, kv_tile=8)
    assert out.dtype == torch.float32
    assert torch.allclose(out, attention(q, k, v, positions, kv_lens), atol=1e-5)


def test_sampling_filters_float64_logits_in_float64():
    logits = torch.tensor([[0.0, 1e-12, -1.0]], dtype=torch.float64)
    filtered = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert filtered.dtype == torch.float64
    assert filtered[0, 1] - filtered[0, 0] == 1e-12  # a float32 copy would make them equal
