"""kvlib.attention against a naive loop reference (tests/conftest.py) and torch's SDPA."""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import kvlib.attention
from kvlib.attention import attention, attention_mask, causal_attention, decode_attention

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = [(4, 4), (8, 2), (8, 1)]  # (H, Hkv): MHA, GQA, MQA
HEAD_IDS = ["mha", "gqa", "mqa"]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_module_doctests():
    result = doctest.testmod(kvlib.attention, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# attention_mask: worked examples
# ---------------------------------------------------------------------------------------------

def test_mask_one_decode_token_over_a_longer_key_tensor():
    # The module's worked example: token at position 3 over 4 cached keys, 6 keys given.
    mask = attention_mask(torch.tensor([[3]]), torch.tensor([4]), num_keys=6)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 6)
    assert mask.int().tolist() == [[[1, 1, 1, 1, 0, 0]]]


def test_mask_plain_causal_square():
    mask = attention_mask(torch.arange(3)[None], torch.tensor([3]), num_keys=3)
    assert mask.int().tolist() == [[[1, 0, 0], [1, 1, 0], [1, 1, 1]]]


def test_mask_chunk_of_two_rows_at_different_lengths():
    # Row 0: 2 new tokens at positions 3, 4 (5 keys exist). Row 1: positions 1, 2 (3 keys
    # exist); the key tensor is padded to 6 for both.
    q_positions = torch.tensor([[3, 4], [1, 2]])
    kv_lens = torch.tensor([5, 3])
    assert attention_mask(q_positions, kv_lens, num_keys=6).int().tolist() == [
        [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]],
        [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]],
    ]


def test_mask_kv_lens_cuts_below_the_causal_limit():
    # Key existence wins over causality: position 4 with only 2 keys sees keys 0 and 1.
    assert attention_mask(torch.tensor([[4]]), torch.tensor([2]), 5).int().tolist() == [
        [[1, 1, 0, 0, 0]]]


# ---------------------------------------------------------------------------------------------
# attention / causal_attention / decode_attention vs the naive reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("H", "Hkv"), HEADS, ids=HEAD_IDS)
def test_causal_attention_matches_naive_reference(H, Hkv, naive_attention):
    B, T, D = 2, 7, 8
    q, k, v = randn(B, H, T, D, seed=1), randn(B, Hkv, T, D, seed=2), randn(B, Hkv, T, D, seed=3)
    out = causal_attention(q, k, v)
    assert out.shape == (B, H, T, D) and out.dtype == torch.float32
    expected = naive_attention(q, k, v, torch.arange(T).expand(B, T), torch.full((B,), T))
    torch.testing.assert_close(out.double(), expected, **TOL)


@pytest.mark.parametrize(("H", "Hkv"), HEADS, ids=HEAD_IDS)
def test_causal_attention_matches_torch_sdpa(H, Hkv):
    # A second, unrelated reference: torch's fused kernel with K/V repeated per query head.
    B, T, D = 3, 9, 16
    q, k, v = randn(B, H, T, D, seed=4), randn(B, Hkv, T, D, seed=5), randn(B, Hkv, T, D, seed=6)
    k_rep, v_rep = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))  # (B, H, T, D)
    expected = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v), expected, **TOL)


@pytest.mark.parametrize(("H", "Hkv"), HEADS, ids=HEAD_IDS)
def test_chunk_attention_with_cached_prefix_and_padding(H, Hkv, naive_attention):
    # A chunk of T=3 new tokens per row after different cached prefixes, keys padded to S=9.
    B, T, S, D = 2, 3, 9, 8
    q, k, v = randn(B, H, T, D, seed=7), randn(B, Hkv, S, D, seed=8), randn(B, Hkv, S, D, seed=9)
    q_positions = torch.tensor([[4, 5, 6], [1, 2, 3]])  # row 0: 4 cached, row 1: 1 cached
    kv_lens = q_positions[:, -1] + 1  # (B,) = [7, 4]
    out = attention(q, k, v, q_positions, kv_lens)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, q_positions, kv_lens),
                               **TOL)
    # And against SDPA with an explicit boolean mask built by hand, row by row.
    for b in range(B):
        allowed = torch.zeros(T, S, dtype=torch.bool)
        for t in range(T):
            allowed[t, : int(q_positions[b, t]) + 1] = True
        k_rep = k[b].repeat_interleave(H // Hkv, dim=0)  # (H, S, D)
        v_rep = v[b].repeat_interleave(H // Hkv, dim=0)
        expected = F.scaled_dot_product_attention(q[b], k_rep, v_rep, attn_mask=allowed)
        torch.testing.assert_close(out[b], expected, **TOL)


@pytest.mark.parametrize(("H", "Hkv"), HEADS, ids=HEAD_IDS)
def test_decode_attention_padded_rows_match_naive(H, Hkv, naive_decode):
    B, S, D = 3, 10, 8
    q, k, v = randn(B, H, D, seed=10), randn(B, Hkv, S, D, seed=11), randn(B, Hkv, S, D, seed=12)
    context_lens = torch.tensor([10, 1, 6])
    out = decode_attention(q, k, v, context_lens)
    assert out.shape == (B, H, D)
    torch.testing.assert_close(out.double(), naive_decode(q, k, v, context_lens), **TOL)


def test_decode_with_one_key_returns_that_value():
    # Hand-worked: softmax over a single key is 1, so the output is exactly that value.
    q = randn(2, 4, 8, seed=13)
    k, v = randn(2, 2, 5, 8, seed=14), randn(2, 2, 5, 8, seed=15)
    out = decode_attention(q, k, v, torch.tensor([1, 1]))
    expected = v[:, :, 0].repeat_interleave(2, dim=1)  # (B, H, D): head h reads KV head h // 2
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_gqa_head_grouping_is_consecutive_runs():
    # H=4, Hkv=2: query heads 0, 1 read KV head 0 and heads 2, 3 read KV head 1. With equal
    # keys everywhere the softmax is uniform, so each output is the mean of its KV head's values.
    q = randn(1, 4, 1, 2, seed=16)
    k = torch.zeros(1, 2, 3, 2)
    v = torch.stack([torch.full((3, 2), 1.0), torch.full((3, 2), 5.0)])[None]  # (1, 2, 3, 2)
    out = attention(q, k, v, torch.tensor([[2]]), torch.tensor([3]))
    assert out[0, :, 0, 0].tolist() == [1.0, 1.0, 5.0, 5.0]


def test_large_scores_stay_finite_and_correct(naive_decode):
    # Scores around 1e3: an unstabilised exp would overflow to inf and give NaN.
    q = 100 * randn(2, 4, 8, seed=17)
    k, v = 10 * randn(2, 2, 6, 8, seed=18), randn(2, 2, 6, 8, seed=19)
    lens = torch.tensor([6, 3])
    out = decode_attention(q, k, v, lens)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), naive_decode(q, k, v, lens), **TOL)


# ---------------------------------------------------------------------------------------------
# Padding must not leak; strides must not matter
# ---------------------------------------------------------------------------------------------

def _poison_padding(t: torch.Tensor, lens: torch.Tensor, seed: int) -> torch.Tensor:
    """A copy of t (B, Hkv, S, D) with huge finite garbage past lens[b] in each row."""
    t = t.clone()
    garbage = 1e30 * randn(*t.shape, seed=seed)
    garbage[..., 0] = 3e38  # near float32's max
    for b, n in enumerate(lens.tolist()):
        t[b, :, n:] = garbage[b, :, n:]
    return t


@pytest.mark.parametrize(("H", "Hkv"), HEADS, ids=HEAD_IDS)
def test_garbage_in_padding_does_not_change_decode(H, Hkv, naive_decode):
    B, S, D = 3, 8, 4
    q, k, v = randn(B, H, D, seed=20), randn(B, Hkv, S, D, seed=21), randn(B, Hkv, S, D, seed=22)
    lens = torch.tensor([3, 8, 1])
    clean = decode_attention(q, k, v, lens)
    dirty = decode_attention(q, _poison_padding(k, lens, 23), _poison_padding(v, lens, 24), lens)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean, atol=1e-6, rtol=0)
    torch.testing.assert_close(dirty.double(), naive_decode(q, k, v, lens), **TOL)


def test_garbage_in_padding_does_not_change_chunk_attention(naive_attention):
    B, H, Hkv, T, S, D = 2, 4, 2, 2, 7, 4
    q, k, v = randn(B, H, T, D, seed=25), randn(B, Hkv, S, D, seed=26), randn(B, Hkv, S, D, seed=27)
    q_positions = torch.tensor([[2, 3], [0, 1]])
    lens = torch.tensor([4, 2])
    dirty = attention(q, _poison_padding(k, lens, 28), _poison_padding(v, lens, 29), q_positions,
                      lens)
    torch.testing.assert_close(dirty.double(), naive_attention(q, k, v, q_positions, lens), **TOL)


@pytest.mark.parametrize(("H", "Hkv"), HEADS, ids=HEAD_IDS)
def test_non_contiguous_kv_views_match_contiguous(H, Hkv):
    B, S, D = 2, 6, 8
    q = randn(B, H, D, seed=30)
    # Seq-major storage (B, S, 2, Hkv, D) viewed as (B, Hkv, S, D), like a flat cache.
    store = randn(B, S, 2, Hkv, D, seed=31)
    k_view, v_view = store[:, :, 0].transpose(1, 2), store[:, :, 1].transpose(1, 2)
    assert not k_view.is_contiguous()
    lens = torch.tensor([6, 4])
    out_view = decode_attention(q, k_view, v_view, lens)
    out_contig = decode_attention(q, k_view.contiguous(), v_view.contiguous(), lens)
    torch.testing.assert_close(out_view, out_contig, atol=1e-6, rtol=0)
    # Every other token of a longer tensor: another non-contiguous stride.
    long_k, long_v = randn(B, Hkv, 2 * S, D, seed=32), randn(B, Hkv, 2 * S, D, seed=33)
    torch.testing.assert_close(
        decode_attention(q, long_k[:, :, ::2], long_v[:, :, ::2], lens),
        decode_attention(q, long_k[:, :, ::2].contiguous(), long_v[:, :, ::2].contiguous(),
                         lens),
        atol=1e-6, rtol=0)
    # Non-contiguous queries too.
    q_t = randn(B, D, H, seed=34).transpose(1, 2)
    torch.testing.assert_close(decode_attention(q_t, k_view, v_view, lens),
                               decode_attention(q_t.contiguous(), k_view, v_view, lens),
                               atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Shape errors
# ---------------------------------------------------------------------------------------------

def _qkv(B=2, H=4, Hkv=2, T=3, S=3, D=8):
    return torch.zeros(B, H, T, D), torch.zeros(B, Hkv, S, D), torch.zeros(B, Hkv, S, D)


@pytest.mark.parametrize(("q", "k", "v", "shown"), [
    (torch.zeros(2, 4, 8), *_qkv()[1:], "(2, 4, 8)"),  # q missing T
    (_qkv()[0], torch.zeros(2, 2, 8), _qkv()[2], "(2, 2, 8)"),  # k 3-D
    (*_qkv()[:2], torch.zeros(2, 2, 4, 8), "(2, 2, 4, 8)"),  # v longer than k
    (_qkv()[0], *_qkv(B=3)[1:], "(3, 2, 3, 8)"),  # batch disagrees
    (_qkv()[0], *_qkv(D=4)[1:], "(2, 2, 3, 4)"),  # head dim disagrees
    (_qkv()[0], *_qkv(Hkv=3)[1:], "(3)"),  # 4 query heads, 3 KV heads
], ids=["q-3d", "k-3d", "v-shape", "batch", "head-dim", "groups"])
def test_attention_shape_errors_name_the_shapes(q, k, v, shown):
    B, T = q.shape[0], q.shape[2] if q.dim() == 4 else 1
    with pytest.raises(ValueError) as info:
        attention(q, k, v, torch.zeros(B, T, dtype=torch.long), torch.ones(B, dtype=torch.long))
    assert shown in str(info.value)


def test_causal_attention_needs_as_many_keys_as_queries():
    q, k, v = _qkv(T=3, S=5)
    with pytest.raises(ValueError) as info:
        causal_attention(q, k, v)
    assert "(2, 4, 3, 8)" in str(info.value) and "(2, 2, 5, 8)" in str(info.value)


_GOOD_POS, _GOOD_LENS = torch.arange(3).expand(2, 3), torch.full((2,), 3)


@pytest.mark.parametrize(("q_positions", "kv_lens"), [
    (torch.arange(3), _GOOD_LENS),  # (T,): no batch dim
    (torch.arange(3)[None], _GOOD_LENS),  # (1, T): would broadcast over the batch
    (torch.arange(2).expand(2, 2), _GOOD_LENS),  # T disagrees with q
    (_GOOD_POS, torch.full((1,), 3)),  # (1,): would broadcast over the batch
    (_GOOD_POS, torch.full((2, 1), 3)),  # (B, 1)
], ids=["pos-1d", "pos-batch-1", "pos-T", "lens-batch-1", "lens-2d"])
def test_attention_rejects_positions_or_lengths_of_the_wrong_shape(q_positions, kv_lens):
    # DESIGN.md: public functions check shapes and raise ValueError with the shapes seen.
    # q_positions must be (B, T) and kv_lens (B,), not IndexError or a silent broadcast.
    q, k, v = _qkv(B=2, T=3, S=3)
    with pytest.raises(ValueError) as info:
        attention(q, k, v, q_positions, kv_lens)
    message = str(info.value)
    assert str(tuple(q_positions.shape)) in message or str(tuple(kv_lens.shape)) in message


def test_decode_attention_shape_errors():
    q, k, v = torch.zeros(2, 4, 8), torch.zeros(2, 2, 5, 8), torch.zeros(2, 2, 5, 8)
    with pytest.raises(ValueError, match=r"\(2, 4, 1, 8\)"):
        decode_attention(torch.zeros(2, 4, 1, 8), k, v, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        decode_attention(q, k, v, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        decode_attention(q, k, v, torch.tensor([[1], [1]]))
    with pytest.raises(ValueError, match=r"\[6, 1\].*5 keys"):
        decode_attention(q, k, v, torch.tensor([6, 1]))
    with pytest.raises(ValueError, match=r"\(2, 2, 5, 4\)"):
        decode_attention(q, torch.zeros(2, 2, 5, 4), torch.zeros(2, 2, 5, 4), torch.tensor([1, 1]))


def test_decode_attention_rejects_empty_context():
    # A row with context_lens 0 has no key to attend to: softmax over nothing is NaN. The new
    # token's own key is always cached, so 0 is a caller's bug and must raise, not return NaN.
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(ValueError, match=r"context_lens.*\[0, 3\]"):
        decode_attention(q, k, v, torch.tensor([0, 3]))


# ---------------------------------------------------------------------------------------------
# Property: a padded decode batch equals each row decoded alone, unpadded
# ---------------------------------------------------------------------------------------------

@st.composite
def decode_batches(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.integers(1, 3))
    D = draw(st.sampled_from([2, 4, 8]))
    lens = draw(st.lists(st.integers(1, 9), min_size=B, max_size=B))
    pad = draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, Hkv * G, Hkv, D, lens, max(lens) + pad, seed


@settings(max_examples=60, deadline=None)
@given(case=decode_batches())
def test_property_padded_decode_equals_per_row_unpadded(case, naive_decode):
    B, H, Hkv, D, lens, S, seed = case
    q, k, v = randn(B, H, D, seed=seed), randn(B, Hkv, S, D, seed=seed + 1), \
        randn(B, Hkv, S, D, seed=seed + 2)
    lens_t = torch.tensor(lens)
    k_dirty, v_dirty = _poison_padding(k, lens_t, seed + 3), _poison_padding(v, lens_t, seed + 4)
    batched = decode_attention(q, k_dirty, v_dirty, lens_t)
    for b, n in enumerate(lens):
        alone = decode_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                 torch.tensor([n]))
        torch.testing.assert_close(batched[b:b + 1], alone, **TOL)
    torch.testing.assert_close(batched.double(), naive_decode(q, k, v, lens_t), **TOL)
