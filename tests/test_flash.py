"""kvlib.flash: chunked attention and split-KV decoding equal the references they replace.

Prefill and decode, dense and paged, uniform and ragged batches, against `kvlib.attention`
(and once against the float64 loop in conftest), for random shapes with lengths that are not
multiples of the tile, GQA ratios 1, 4 and 8, and single-token caches. Then the whole model:
the same greedy tokens on the chunked path as on the reference.
"""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvlib.flash
from kvlib import backends, flash
from kvlib.attention import attention, decode_attention
from kvlib.cache.paged import PagedKVCache
from kvlib.config import CacheConfig, ModelConfig
from kvlib.contract import DenseKV, PagedKV, StepBatch
from kvlib.experiments import demo_model

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"atol": 1e-5, "rtol": 1e-5}
RATIOS = [1, 4, 8]  # query heads per KV head: MHA, GQA, GQA


def randn(*shape, gen):
    return torch.randn(*shape, generator=gen)


def test_module_doctests():
    result = doctest.testmod(kvlib.flash, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


# -- prefill ----------------------------------------------------------------------------------

@st.composite
def prefill_case(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.sampled_from(RATIOS))
    D = draw(st.sampled_from([4, 8]))
    S = draw(st.integers(1, 40))
    T = draw(st.integers(1, 12))
    kv_lens = [draw(st.integers(1, S)) for _ in range(B)]
    # Each row's T queries start anywhere: position 0 (a prompt), or after cached tokens (a
    # chunk of a prompt), possibly past kv_lens (then the row's length cuts, as in `attention`).
    starts = [draw(st.integers(0, S)) for _ in range(B)]
    q_tile, kv_tile = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    return B, H, Hkv, D, S, T, kv_lens, starts, q_tile, kv_tile, seed


def _prefill_inputs(B, H, Hkv, D, S, T, kv_lens, starts, seed):
    gen = torch.Generator().manual_seed(seed)
    q = randn(B, H, T, D, gen=gen)  # (B, H, T, D)
    k, v = randn(B, Hkv, S, D, gen=gen), randn(B, Hkv, S, D, gen=gen)  # (B, Hkv, S, D)
    positions = torch.tensor(starts)[:, None] + torch.arange(T)  # (B, T)
    return q, k, v, positions, torch.tensor(kv_lens)


@given(prefill_case())
@settings(max_examples=150)
def test_chunked_attention_equals_the_reference(case):
    *shape, q_tile, kv_tile, seed = case
    q, k, v, positions, kv_lens = _prefill_inputs(*shape, seed)
    expected = attention(q, k, v, positions, kv_lens)
    got = flash.chunked_attention(q, k, v, positions, kv_lens, q_tile=q_tile, kv_tile=kv_tile)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("ratio", RATIOS)
def test_chunked_attention_equals_the_float64_loop(naive_attention, ratio):
    # Lengths 11 and 7 with tiles of 3 and 4: no length is a multiple of a tile.
    q, k, v, positions, kv_lens = _prefill_inputs(2, 2 * ratio, 2, 8, 11, 7, [11, 9], [4, 0], 3)
    got = flash.chunked_attention(q, k, v, positions, kv_lens, q_tile=3, kv_tile=4)
    torch.testing.assert_close(got.double(), naive_attention(q, k, v, positions, kv_lens), **TOL)


def test_chunked_attention_on_a_strided_view_and_one_token():
    gen = torch.Generator().manual_seed(0)
    storage = randn(1, 5, 2, 1, 8, gen=gen)  # (B, S, 2, Hkv, D): a seq-major cache
    k, v = storage[:, :, 0].transpose(1, 2), storage[:, :, 1].transpose(1, 2)  # (1, 1, 5, 8)
    q = randn(1, 4, 1, 8, gen=gen)
    pos, lens = torch.tensor([[0]]), torch.tensor([1])  # a single-token cache
    torch.testing.assert_close(flash.chunked_attention(q, k, v, pos, lens, q_tile=2, kv_tile=2),
                               attention(q, k, v, pos, lens), **TOL)


# -- decode -----------------------------------------------------------------------------------

@st.composite
def decode_case(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.sampled_from(RATIOS))
    D = draw(st.sampled_from([4, 8]))
    S = draw(st.integers(1, 50))
    context_lens = [draw(st.integers(1, S)) for _ in range(B)]
    return B, H, Hkv, D, S, context_lens, draw(st.integers(1, 12)), draw(st.integers(0, 2**16))


@given(decode_case())
@example((1, 8, 1, 4, 1, [1], 1, 0))  # a single-token cache, MQA
@example((2, 4, 1, 8, 33, [33, 1], 16, 1))  # one row full, one row a single token
@settings(max_examples=150)
def test_split_kv_decode_equals_the_reference(case):
    B, H, Hkv, D, S, context_lens, kv_chunk, seed = case
    gen = torch.Generator().manual_seed(seed)
    q = randn(B, H, D, gen=gen)
    k, v = randn(B, Hkv, S, D, gen=gen), randn(B, Hkv, S, D, gen=gen)
    lens = torch.tensor(context_lens)
    torch.testing.assert_close(flash.split_kv_decode(q, k, v, lens, kv_chunk=kv_chunk),
                               decode_attention(q, k, v, lens), **TOL)


def test_split_kv_decode_equals_the_float64_loop(naive_decode):
    gen = torch.Generator().manual_seed(5)
    q, k, v = randn(2, 8, 8, gen=gen), randn(2, 1, 13, 8, gen=gen), randn(2, 1, 13, 8, gen=gen)
    lens = torch.tensor([13, 6])
    got = flash.split_kv_decode(q, k, v, lens, kv_chunk=4)
    torch.testing.assert_close(got.double(), naive_decode(q, k, v, lens), **TOL)


@given(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**16))
def test_merging_two_halves_equals_one_softmax(n, cut, seed):
    gen = torch.Generator().manual_seed(seed)
    scores, values = randn(n, gen=gen) * 5, randn(n, 3, gen=gen)  # (n,), (n, 3)
    cut = min(cut, n)

    def part(s, v):  # softmax-weighted values and log-sum-exp of one chunk (empty: -inf)
        if len(s) == 0:
            return torch.zeros(3), torch.tensor(float("-inf"))
        return torch.softmax(s, 0) @ v, s.logsumexp(0)

    (o1, l1), (o2, l2) = part(scores[:cut], values[:cut]), part(scores[cut:], values[cut:])
    out, lse = flash.merge_partials(torch.stack([o1, o2]), torch.stack([l1, l2]))
    torch.testing.assert_close(out, torch.softmax(scores, 0) @ values, **TOL)
    torch.testing.assert_close(lse, scores.logsumexp(0), **TOL)


# -- paged ------------------------------------------------------------------------------------

def paged_view(context_lens, Hkv, D, block_size, seed, spare_blocks=3):
    """A pool whose blocks are handed out in a shuffled order; tables padded with -1."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in context_lens]
    NB = sum(need) + spare_blocks
    k_pool, v_pool = randn(NB, Hkv, block_size, D, gen=gen), randn(NB, Hkv, block_size, D,
                                                                   gen=gen)
    order = torch.randperm(NB, generator=gen)
    tables = torch.full((len(need), max(need) + 1), -1, dtype=torch.int32)  # one spare column
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = order[used:used + n].int()
        used += n
    return PagedKV(k_pool, v_pool, tables, torch.tensor(context_lens, dtype=torch.int32))


@given(st.lists(st.integers(1, 45), min_size=1, max_size=3), st.sampled_from([1, 2, 4, 16]),
       st.sampled_from(RATIOS), st.integers(1, 20), st.integers(0, 2**16))
@example([1], 16, 8, 16, 0)  # a single-token cache in a 16-token block
def test_paged_split_kv_decode_equals_dense(context_lens, block_size, ratio, kv_chunk, seed):
    kv = paged_view(context_lens, 2, 8, block_size, seed)
    q = randn(len(context_lens), 2 * ratio, 8, gen=torch.Generator().manual_seed(seed + 1))
    dense = kv.dense()
    expected = flash.split_kv_decode(q, dense.k, dense.v, dense.context_lens, kv_chunk=kv_chunk)
    got = flash.paged_split_kv_decode(q, kv, kv_chunk=kv_chunk)
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(got, decode_attention(q, dense.k, dense.v, dense.context_lens),
                               **TOL)


@given(st.lists(st.integers(1, 45), min_size=1, max_size=2), st.sampled_from([1, 4, 16]),
       st.sampled_from(RATIOS), st.integers(1, 10), st.integers(1, 10), st.integers(0, 2**16))
def test_paged_chunked_attention_equals_dense(context_lens, block_size, ratio, q_tile, kv_tile,
                                              seed):
    kv = paged_view(context_lens, 1, 4, block_size, seed)
    T = min(context_lens)  # every row's last T tokens are new: a chunk after cached ones
    positions = torch.tensor(context_lens)[:, None] - T + torch.arange(T)  # (B, T)
    q = randn(len(context_lens), ratio, T, 4, gen=torch.Generator().manual_seed(seed + 1))
    dense = kv.dense()
    got = flash.paged_chunked_attention(q, kv, positions, q_tile=q_tile, kv_tile=kv_tile)
    torch.testing.assert_close(got, attention(q, dense.k, dense.v, positions,
                                              dense.context_lens), **TOL)


def test_paged_loader_reads_only_the_tiles_blocks():
    kv = paged_view([45], 1, 2, 16, seed=0)  # 45 tokens: two full blocks and 13 in the third
    reads = []

    class Pool(torch.Tensor):  # records which block ids each read touches
        def __getitem__(self, ids):
            reads.append(torch.as_tensor(ids).flatten().tolist())
            return super().__getitem__(ids).as_subclass(torch.Tensor)

    watched = PagedKV(kv.k_pool.as_subclass(Pool), kv.v_pool, kv.block_tables, kv.context_lens)
    k, _ = flash.paged_loader(watched)(20, 36)  # keys 20..35: columns 1 and 2
    assert reads == [kv.block_tables[0, 1:3].tolist()]
    torch.testing.assert_close(k, kv.dense().k[:, :, 20:36])


# -- the backend and the model ----------------------------------------------------------------

def _batch(starts, query_lens):
    N = sum(query_lens)
    return StepBatch.make(list(range(len(starts))), starts, query_lens, torch.arange(N), step=0)


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [5, 5, 5], [1, 7, 3]],
                         ids=["decode", "uniform", "ragged"])
@pytest.mark.parametrize("view", ["dense", "paged"])
def test_chunked_backend_equals_the_reference_backend(query_lens, view):
    starts = [30, 0, 12]
    context_lens = [s + n for s, n in zip(starts, query_lens)]
    kv = paged_view(context_lens, 2, 8, 4, seed=3)
    if view == "dense":
        kv = kv.dense()
        assert isinstance(kv, DenseKV)
    batch = _batch(starts, query_lens)
    q = randn(batch.num_tokens, 8, 8, gen=torch.Generator().manual_seed(4))  # (N, H, D)
    tiny = flash.make_backend(q_tile=2, kv_tile=3, kv_chunk=5)
    expected = backends.attend(q, kv, batch, "reference")
    torch.testing.assert_close(backends.attend(q, kv, batch, "chunked"), expected, **TOL)
    torch.testing.assert_close(tiny(q, kv, batch), expected, **TOL)


SMALL = ModelConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=8, num_kv_heads=2,
                    ffn_dim=128, max_seq_len=512, name="flash-test")


@pytest.mark.parametrize("backend", ["chunked", "tiny tiles"])
def test_model_generates_identical_tokens_on_the_chunked_path(backend, monkeypatch):
    # A 150-token prompt and 128 new tokens: prefill spans 3 query tiles and 2 key tiles of the
    # default sizes, decode 2 chunks of 256 keys; "tiny tiles" makes every step many tiles.
    monkeypatch.setitem(backends.BACKENDS, "tiny tiles", flash.make_backend(16, 24, 40))
    model = demo_model(SMALL)
    prompt = torch.randint(0, SMALL.vocab_size, (2, 150), generator=torch.Generator()
                           .manual_seed(0))
    with torch.no_grad():
        expected = model.generate(prompt, 128, cache=model.new_cache(2, 278))
        model.attention = backend
        got = model.generate(prompt, 128, cache=model.new_cache(2, 278))
    assert torch.equal(got.tokens, expected.tokens)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_model_on_a_paged_cache_generates_identical_tokens_on_the_chunked_path(monkeypatch):
    # The paged cache hands attention a PagedKV: prefill tiles and decode chunks read blocks
    # where they lie; tiny tiles make them straddle blocks of 16.
    monkeypatch.setitem(backends.BACKENDS, "tiny tiles", flash.make_backend(16, 24, 40))
    model = demo_model(SMALL)
    prompt = torch.randint(0, SMALL.vocab_size, (2, 70), generator=torch.Generator()
                           .manual_seed(1))
    with torch.no_grad():
        expected = model.generate(prompt, 128, cache=model.new_cache(2, 198))
        model.attention = "tiny tiles"
        config = CacheConfig.for_model(SMALL, max_batch_size=2, max_seq_len=198)
        got = model.generate(prompt, 128, cache=PagedKVCache(config, num_blocks=32))
    assert torch.equal(got.tokens, expected.tokens)


# -- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("tiles", [{"q_tile": 0}, {"kv_tile": -1}, {"q_tile": True},
                                   {"kv_tile": 2.0}])
def test_tile_sizes_must_be_positive_ints(tiles):
    q, k, v, positions, lens = _prefill_inputs(1, 2, 1, 4, 5, 3, [5], [0], 0)
    with pytest.raises(ValueError, match="tile must be an int >= 1"):
        flash.chunked_attention(q, k, v, positions, lens, **tiles)
    with pytest.raises(ValueError, match="tile must be an int >= 1"):
        flash.make_backend(**tiles)


@pytest.mark.parametrize("chunk", [0, -3, False])
def test_kv_chunk_must_be_a_positive_int(chunk):
    q, k = torch.zeros(1, 2, 4), torch.zeros(1, 1, 5, 4)
    with pytest.raises(ValueError, match="kv_chunk must be an int >= 1"):
        flash.split_kv_decode(q, k, k, torch.tensor([5]), kv_chunk=chunk)
    with pytest.raises(ValueError, match="kv_chunk must be an int >= 1"):
        flash.paged_split_kv_decode(q, paged_view([5], 1, 4, 4, 0), kv_chunk=chunk)


def test_mismatched_prefill_shapes_raise():
    q, k, v, positions, lens = _prefill_inputs(1, 4, 2, 4, 6, 3, [6], [0], 0)
    bad = {
        "k and v differ": (q, k, v[:, :, :5], positions, lens),
        "head dims differ": (q[..., :2], k, v, positions, lens),
        "H not a multiple of Hkv": (q[:, :3], k, v, positions, lens),
        "positions (B, T)": (q, k, v, positions[:, :2], lens),
        "kv_lens (B,)": (q, k, v, positions, lens[None]),
        "negative position": (q, k, v, positions - 1, lens),
        "empty row": (q, k, v, positions, lens * 0),
    }
    for name, args in bad.items():
        with pytest.raises(ValueError):
            flash.chunked_attention(*args)
            pytest.fail(name)


def test_mismatched_decode_and_paged_shapes_raise():
    q, k = torch.zeros(2, 4, 8), torch.zeros(2, 2, 6, 8)
    for args in [(q[0], k, k, torch.tensor([6, 6])),  # q not (B, H, D)
                 (q, k, k[:, :1], torch.tensor([6, 6])),  # k, v differ
                 (q, k, k, torch.tensor([6])),  # context_lens not (B,)
                 (q, k, k, torch.tensor([7, 6])),  # more keys than given
                 (q, k, k, torch.tensor([0, 6]))]:  # no key at all
        with pytest.raises(ValueError):
            flash.split_kv_decode(*args)
    kv = paged_view([6, 3], 2, 8, 4, seed=0)  # 2 blocks + a spare column per row
    for qq, view in [(q[:, :, :4], kv),  # head dim differs
                     (q[:, :3], kv),  # 3 query heads over 2 KV heads
                     (q[:1], kv),  # one row of queries, two block tables
                     (q, PagedKV(kv.k_pool, kv.v_pool, kv.block_tables,
                                 torch.tensor([13, 3], dtype=torch.int32)))]:  # past the table
        with pytest.raises(ValueError):
            flash.paged_split_kv_decode(qq, view)
    with pytest.raises(ValueError, match=r"q must be \(B, H, T, D\)"):
        flash.paged_chunked_attention(q, kv, torch.zeros(2, 1, dtype=torch.long))
