"""Attention backends (kvlib.backends) and the model's packed path over them.

Every registered backend must equal the reference -- itself checked against the naive
definition in conftest -- on rectangular and ragged packed batches, over dense views of any
strides and over paged views of the same numbers. The model's `attention` switch must not
change its logits, and a ragged packed batch must give each sequence what it gets alone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import unit_scale_model

from kvlib.backends import BACKENDS, attend
from kvlib.config import Layout
from kvlib.contract import DenseKV, PagedKV, StepBatch
from kvlib.model import TransformerLM

pytestmark = pytest.mark.usefixtures("one_thread")

GARBAGE = 1e4  # padding past each row's keys: large, so a key read past context_lens shows


def random_batch(seed: int, query_lens: list[int], Hkv: int, group: int, D: int = 8,
                 seq_major: bool = False):
    """Queries (N, H, D), a DenseKV padded with garbage, and the StepBatch: sequence b
    holds `query_lens[b]` new tokens after a random number of past ones."""
    gen = torch.Generator().manual_seed(seed)
    B, H = len(query_lens), Hkv * group
    past = torch.randint(0, 9, (B,), generator=gen).tolist()
    ctx = [p + n for p, n in zip(past, query_lens)]
    S = max(ctx) + 3
    if seq_major:  # a flat SEQ_MAJOR view: token-major storage, transposed
        k = torch.randn(B, S, Hkv, D, generator=gen).transpose(1, 2)  # (B, Hkv, S, D)
        v = torch.randn(B, S, Hkv, D, generator=gen).transpose(1, 2)
    else:
        k, v = torch.randn(B, Hkv, S, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen)
    for b, n in enumerate(ctx):
        k[b, :, n:], v[b, :, n:] = GARBAGE, -GARBAGE
    batch = StepBatch.make(list(range(B)), past, query_lens,
                           torch.arange(sum(query_lens)), step=0)
    q = torch.randn(sum(query_lens), H, D, generator=gen)  # (N, H, D)
    return q, DenseKV(k, v, torch.tensor(ctx)), batch


def paged(dense: DenseKV, block_size: int, seed: int) -> PagedKV:
    """The same keys scattered into blocks of a pool in a shuffled order, with spare blocks
    full of garbage. Token j of row b: block `block_tables[b, j // BS]`, offset `j % BS`."""
    B, Hkv, S, D = dense.k.shape
    per_row = -(-int(dense.context_lens.max()) // block_size)
    nb = B * per_row + 2
    order = torch.randperm(nb, generator=torch.Generator().manual_seed(seed))
    k_pool = torch.full((nb, Hkv, block_size, D), GARBAGE)  # (NB, Hkv, BS, D)
    v_pool = torch.full((nb, Hkv, block_size, D), -GARBAGE)
    tables = torch.full((B, per_row + 1), -1, dtype=torch.int32)  # padded with -1
    for b in range(B):
        n = int(dense.context_lens[b])
        for i in range(-(-n // block_size)):
            block = int(order[b * per_row + i])
            tables[b, i] = block
            j = torch.arange(i * block_size, min((i + 1) * block_size, n))
            k_pool[block, :, :len(j)] = dense.k[b, :, j]
            v_pool[block, :, :len(j)] = dense.v[b, :, j]
    return PagedKV(k_pool, v_pool, tables, dense.context_lens.to(torch.int32))


def naive_packed(naive_attention, q, dense, batch) -> torch.Tensor:
    cu, ctx = batch.cu_query_lens.tolist(), dense.context_lens.tolist()
    outs = []
    for b in range(batch.num_seqs):
        qb = q[cu[b]:cu[b + 1]].transpose(0, 1)[None]  # (1, H, T_b, D)
        kb, vb = dense.k[b:b + 1, :, :ctx[b]], dense.v[b:b + 1, :, :ctx[b]]
        pos = batch.positions[cu[b]:cu[b + 1]][None]  # (1, T_b)
        outs.append(naive_attention(qb, kb, vb, pos, torch.tensor([ctx[b]]))[0].transpose(0, 1))
    return torch.cat(outs)  # (N, H, D)


SHAPES = {"decode": [1, 1, 1], "prefill": [5, 5], "ragged": [3, 1, 6, 2], "one": [4]}


def test_registry_has_the_documented_backends():
    assert {"reference", "sdpa", "fast"} <= set(BACKENDS)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("group", [1, 4, 8], ids=lambda g: f"G{g}")
def test_reference_equals_the_naive_definition(naive_attention, shape, group):
    q, dense, batch = random_batch(10 + group, SHAPES[shape], Hkv=2, group=group)
    want = naive_packed(naive_attention, q, dense, batch)
    got = attend(q, dense, batch, "reference")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("group", [1, 4, 8], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("seq_major", [False, True], ids=["contiguous", "seq-major-view"])
def test_backend_equals_reference_on_dense_views(backend, shape, group, seq_major):
    q, dense, batch = random_batch(20 + group, SHAPES[shape], Hkv=2, group=group,
                                   seq_major=seq_major)
    want = attend(q, dense, batch, "reference")
    got = attend(q, dense, batch, backend)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("group", [1, 4, 8], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("block_size", [1, 3, 16], ids=lambda s: f"BS{s}")
def test_backend_on_paged_views_equals_reference_on_dense(backend, shape, group, block_size):
    q, dense, batch = random_batch(30 + group, SHAPES[shape], Hkv=2, group=group)
    kv = paged(dense, block_size, seed=group)
    gathered = kv.dense()
    assert gathered.context_lens.tolist() == dense.context_lens.tolist()
    for b, n in enumerate(dense.context_lens.tolist()):
        assert torch.equal(gathered.k[b, :, :n], dense.k[b, :, :n])
        assert torch.equal(gathered.v[b, :, :n], dense.v[b, :, :n])
    want = attend(q, dense, batch, "reference")
    torch.testing.assert_close(attend(q, kv, batch, backend), want, atol=1e-5, rtol=1e-5)


def test_unknown_backend_and_bad_queries_raise():
    q, dense, batch = random_batch(0, [2, 1], Hkv=1, group=2)
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'.*reference"):
        attend(q, dense, batch, "nope")
    for bad in (q[:-1], q[None], q[:, :, 0]):
        with pytest.raises(ValueError, match=r"N=3"):
            attend(bad, dense, batch)


# ---------------------------------------------------------------------------------------------
# The model's packed path
# ---------------------------------------------------------------------------------------------

def unit_model(seed: int = 0, **overrides) -> TransformerLM:
    """A seeded unit-scale fp32 model (conftest.unit_scale_model): attention is sharp and
    logits vary by whole units, so a mixed-up position cannot hide in the fifth decimal."""
    fields = {"vocab_size": 128, "d_model": 32, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 1, "ffn_dim": 64, "max_seq_len": 64, "rope_theta": 500.0}
    return unit_scale_model(seed, **{**fields, **overrides})


def tokens(n: int, seed: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return unit_model(seed=3)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("layout", [None, *Layout], ids=lambda x: "uncached" if x is None
                         else x.value)
def test_attention_switch_keeps_the_logits(model, backend, layout):
    prompt, step = tokens(12, seed=4).view(2, 6), tokens(2, seed=5).view(2, 1)
    logits = {}
    for name in ("reference", backend):
        model.attention = name
        try:
            if layout is None:
                logits[name] = model(torch.cat([prompt, step], 1))
            else:
                cache = model.new_cache(batch_size=2, max_seq_len=8, layout=layout)
                logits[name] = torch.cat([model(prompt, cache), model(step, cache)], 1)
        finally:
            model.attention = "reference"
    torch.testing.assert_close(logits[backend], logits["reference"], atol=1e-4, rtol=1e-4)


def test_an_unknown_attention_name_raises_and_leaves_the_cache(model):
    cache = model.new_cache(batch_size=1, max_seq_len=8)
    model.attention = "nope"
    try:
        with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
            model(tokens(3, seed=6)[None], cache)
    finally:
        model.attention = "reference"
    assert cache.lengths([0]).tolist() == [0]
    model(tokens(3, seed=6)[None], cache)  # the failed step was aborted


def test_packed_ragged_batch_equals_each_sequence_alone_uncached(model):
    seqs = [tokens(n, seed=10 + n) for n in (5, 1, 3)]
    packed = model.packed_hidden_states(torch.cat(seqs), [5, 1, 3])  # (9, d)
    alone = torch.cat([model.hidden_states(s[None])[0] for s in seqs])  # (9, d)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(Layout), ids=lambda x: x.value)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_packed_ragged_steps_through_a_flat_cache_equal_each_sequence_alone(model, layout,
                                                                            backend):
    # Three sequences, prefilled packed out of order, then a ragged step mixing a prompt
    # chunk, single decode tokens and a new sequence; each compared with its whole history
    # run alone without a cache.
    history = {0: tokens(4, 20), 1: tokens(7, 21), 2: tokens(2, 22), 3: torch.empty(0).long()}
    cache = model.new_cache(batch_size=4, max_seq_len=16, layout=layout)
    model.attention = backend
    try:
        model.packed_hidden_states(torch.cat([history[2], history[0], history[1]]), [2, 4, 7],
                                   cache, seq_ids=[2, 0, 1])
        new = {1: tokens(1, 23), 3: tokens(5, 24), 0: tokens(3, 25), 2: tokens(1, 26)}
        out = model.packed_hidden_states(torch.cat(list(new.values())), [1, 5, 3, 1], cache,
                                         seq_ids=list(new))  # (10, d)
    finally:
        model.attention = "reference"
    assert cache.lengths([0, 1, 2, 3]).tolist() == [7, 8, 3, 5]
    start = 0
    for seq, t in new.items():
        whole = torch.cat([history[seq], t])
        want = model.hidden_states(whole[None])[0, -len(t):]  # (T_b, d)
        torch.testing.assert_close(out[start:start + len(t)], want, atol=1e-4, rtol=1e-4)
        start += len(t)


def test_a_step_without_sequences_raises_a_clear_error(model):
    with pytest.raises(ValueError, match="query_lens is empty"):
        model.packed_hidden_states(torch.empty(0, dtype=torch.long), [])
    with pytest.raises(ValueError, match="query_lens is empty"):
        model(torch.empty(0, 3, dtype=torch.long))


@pytest.mark.parametrize("bad", [128, -1, 1000], ids=str)
def test_token_ids_outside_the_vocabulary_raise_naming_both(model, bad):
    ids = tokens(4, seed=30)
    ids[2] = bad
    cache = model.new_cache(batch_size=2, max_seq_len=8)
    calls = [lambda: model.packed_hidden_states(ids, [3, 1]),
             lambda: model.packed_hidden_states(ids, [1, 3], cache),
             lambda: model(ids.view(2, 2)), lambda: model(ids.view(2, 2), cache),
             lambda: model.generate(ids.view(1, 4), 2),
             lambda: model.generate(ids.view(2, 2), 2, cache=cache)]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert f"token id {bad}" in message and "vocab_size 128" in message, message
    assert cache.lengths([0, 1]).tolist() == [0, 0]
    model(tokens(4, seed=31).view(2, 2), cache)  # no step was left open
    assert cache.lengths([0, 1]).tolist() == [2, 2]
