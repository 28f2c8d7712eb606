"""kvlib.sampling's batched, counter-based sampler: the distribution it draws from, the
filters it applies per row, and a row's draws being a function of (seed, position) alone.

The chi-square tests draw many positions of one seed at fixed logits (each position is an
independent draw) and compare the counts with softmax(logits / T), renormalised over what
top-k and top-p keep; their seeds are fixed, so they pass or fail the same way every run.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from kvlib.sampling import (
    SamplingBatch,
    SamplingParams,
    filter_batch,
    filter_logits,
    mix32,
    mul32,
    sample,
    stream_key,
    uniform,
)


def draws(values, params, n, seed_offset=0):
    """n draws at fixed logits `values`, positions 0..n-1 of one request."""
    logits = torch.tensor(values, dtype=torch.float64).expand(n, len(values))  # (n, V)
    rows = SamplingBatch.make([params] * n, list(range(seed_offset, seed_offset + n)),
                              len(values), "cpu")
    return torch.bincount(sample(logits, rows), minlength=len(values))  # (V,)


def chi_square(counts, expected):
    n = int(counts.sum())
    return sum((int(counts[j]) - n * p) ** 2 / (n * p) for j, p in expected.items())


def test_mul32_and_mix32_wrap_like_unsigned_32_bit_arithmetic():
    xs = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 123456789]
    for c in (0x7FEB352D, 0x846CA68B, 1, 0xFFFFFFFF):
        assert [mul32(x, c) for x in xs] == [(x * c) % 2**32 for x in xs]
        assert mul32(torch.tensor(xs), c).tolist() == [(x * c) % 2**32 for x in xs]
    assert mix32(torch.tensor(xs)).tolist() == [mix32(x) for x in xs]
    assert all(0 <= mix32(x) < 2**32 for x in xs)
    # a bijection: 2^16 distinct inputs, 2^16 distinct outputs
    assert torch.unique(mix32(torch.arange(2**16))).numel() == 2**16


def test_seeds_of_64_bits_and_positions_give_distinct_keys():
    seeds = [0, 1, 2**32, 2**63, 2**64 - 1]
    keys = {stream_key(s, p) for s in seeds for p in range(50)}
    assert len(keys) == 250


def test_uniforms_are_uniform():
    """Bits of many rows and entries: the mean and the 10 deciles of a uniform in (0, 1)."""
    keys = torch.tensor([stream_key(3, p) for p in range(200)])  # (200,)
    u = uniform(keys, 500, torch.float64).flatten()  # (100_000,)
    assert 0 < float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert chi_square(counts, {j: 0.1 for j in range(10)}) < 27.88  # 9 dof, p = 0.001
    assert abs(float(u.mean()) - 0.5) < 0.005


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_draws_follow_softmax_of_logits_over_temperature(temperature):
    values = [1.0, 0.2, -0.3, 0.8, -2.0, 0.5, 0.0, -1.0]
    weights = [math.exp(x / temperature) for x in values]
    expected = {j: w / sum(weights) for j, w in enumerate(weights)}
    counts = draws(values, SamplingParams(temperature=temperature, seed=11), 20_000)
    assert chi_square(counts, expected) < 24.32  # 7 dof, p = 0.001


def test_draws_respect_top_k_and_follow_the_renormalised_distribution():
    values = [1.0, 0.2, -0.3, 0.8, -2.0, 0.5]
    top4 = [0, 3, 5, 1]
    weights = {j: math.exp(values[j] / 0.7) for j in top4}
    expected = {j: w / sum(weights.values()) for j, w in weights.items()}
    counts = draws(values, SamplingParams(temperature=0.7, top_k=4, seed=2024), 20_000)
    assert counts[2] == 0 and counts[4] == 0
    assert chi_square(counts, expected) < 16.27  # 3 dof, p = 0.001


def test_draws_respect_top_p():
    probs = [0.5, 0.3, 0.15, 0.05]  # top_p = 0.81 keeps three, renormalised by 0.95
    counts = draws([math.log(p) for p in probs], SamplingParams(1.0, top_p=0.81, seed=7),
                   20_000)
    assert counts[3] == 0
    assert chi_square(counts, {j: probs[j] / 0.95 for j in range(3)}) < 13.82  # 2 dof


def test_unseeded_rows_draw_from_the_global_generator():
    values = [0.0, 1.0, 2.0]
    weights = [math.exp(x) for x in values]
    torch.manual_seed(0)
    a = draws(values, SamplingParams(temperature=1.0), 10_000)
    assert chi_square(a, {j: w / sum(weights) for j, w in enumerate(weights)}) < 13.82
    torch.manual_seed(0)
    assert torch.equal(a, draws(values, SamplingParams(temperature=1.0), 10_000))


def test_a_row_draws_the_same_in_any_batch():
    """Row (seed, position) gives one token whatever the rows around it: alone, in a batch
    of others in any order, beside greedy and unseeded rows."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 40, generator=gen, dtype=torch.float64)  # (12, V)
    params = [SamplingParams(temperature=0.9, top_k=[None, 7][i % 2], top_p=[1.0, 0.8][i % 3 > 0],
                             seed=100 + i) for i in range(12)]
    positions = list(range(3, 15))
    together = sample(logits, SamplingBatch.make(params, positions, 40, "cpu")).tolist()
    alone = [int(sample(logits[i:i + 1], SamplingBatch.make(params[i:i + 1], positions[i:i + 1],
                                                            40, "cpu"))[0]) for i in range(12)]
    assert together == alone
    order = torch.randperm(12, generator=gen).tolist()
    mixed = [*params, SamplingParams(), SamplingParams(temperature=1.0)]
    rows = SamplingBatch.make([mixed[i] for i in order] + mixed[12:],
                              [positions[i] for i in order] + [0, 0], 40, "cpu")
    shuffled = sample(torch.cat([logits[order], logits[:2]]), rows).tolist()
    assert [shuffled[order.index(i)] for i in range(12)] == together
    assert shuffled[12] == int(logits[0].argmax())


def test_other_seeds_and_positions_draw_differently():
    logits = torch.zeros(64, 1000, dtype=torch.float64)  # uniform over 1000 tokens
    hot = SamplingParams(temperature=1.0, seed=5)
    a = sample(logits, SamplingBatch.make([hot] * 64, range(64), 1000, "cpu"))
    b = sample(logits, SamplingBatch.make([hot] * 64, range(64, 128), 1000, "cpu"))
    c = sample(logits, SamplingBatch.make([SamplingParams(1.0, seed=6)] * 64, range(64), 1000,
                                          "cpu"))
    assert int((a == b).sum()) < 5 and int((a == c).sum()) < 5  # ~64/1000 equal by chance


@given(st.integers(0, 2**64 - 1), st.lists(st.floats(-5, 5), min_size=2, max_size=30),
       st.one_of(st.none(), st.integers(1, 40)), st.sampled_from([1.0, 0.95, 0.5, 0.1]),
       st.sampled_from([0.3, 1.0, 2.5]), st.integers(0, 10_000))
@example(0, [0.0] * 17, None, 0.5, 0.3, 0)  # all tied: both keep the lowest ids first
@example(0, [1.0, 2.0, 2.0, 2.0, 1.0], 2, 0.5, 1.0, 0)  # ties at the k-th value all stay
def test_filter_batch_equals_filter_logits_and_the_draw_is_kept(seed, values, top_k, top_p,
                                                                temperature, position):
    """The batched filter keeps what the one-params reference keeps, with the same values;
    the token drawn is always one that was kept; greedy rows are the argmax."""
    logits = torch.tensor([values], dtype=torch.float64)  # (1, V)
    V = len(values)
    params = SamplingParams(temperature, top_k, top_p, seed)
    rows = SamplingBatch.make([params, SamplingParams()], [position, 0], V, "cpu")
    ref = filter_logits(logits, params)  # (1, V)
    got = filter_batch(logits.expand(2, V), rows)[:1]  # (1, V)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got[torch.isfinite(got)], ref[torch.isfinite(ref)])
    token, greedy = sample(logits.expand(2, V), rows).tolist()
    assert math.isfinite(float(ref[0, token]))
    assert greedy == int(logits.argmax())


def test_sample_refuses_a_batch_of_another_size():
    rows = SamplingBatch.make([SamplingParams(1.0, seed=1)] * 2, [0, 1], 5, "cpu")
    with pytest.raises(ValueError, match="K=2"):
        sample(torch.zeros(3, 5), rows)
    with pytest.raises(ValueError, match="one of each per row"):
        SamplingBatch.make([SamplingParams()], [0, 1], 5, "cpu")
