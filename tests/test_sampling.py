"""kvlib.sampling: greedy, temperature, top-k, top-p by hand; validation; seeded frequencies."""

from __future__ import annotations

import dataclasses
import doctest
import itertools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import kvlib.sampling
from kvlib.sampling import SamplingParams, filter_logits, sample_next


def kept(logits: torch.Tensor, **params) -> list[list[int]]:
    """Indices that survive filtering, per row."""
    out = filter_logits(logits, SamplingParams(**params))
    return [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in out]


def test_module_doctests():
    result = doctest.testmod(kvlib.sampling, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# Greedy and temperature
# ---------------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    expected = [max(range(50), key=lambda j: float(row[j])) for row in logits]
    assert sample_next(logits, SamplingParams()).tolist() == expected
    # top_k / top_p / seed have no effect when temperature is 0.
    assert sample_next(logits, SamplingParams(top_k=3, top_p=0.5, seed=1)).tolist() == expected
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy


def test_temperature_divides_the_logits():
    logits = torch.tensor([[2.0, 1.0, -0.5, 0.0]])
    torch.testing.assert_close(filter_logits(logits, SamplingParams(temperature=2.0)),
                               torch.tensor([[1.0, 0.5, -0.25, 0.0]]))
    # Softmax at T = 0.5 is softmax(2 * logits): sharper, computed by hand.
    probs = torch.softmax(filter_logits(logits, SamplingParams(temperature=0.5)), -1)
    weights = [math.exp(2 * x) for x in (2.0, 1.0, -0.5, 0.0)]
    torch.testing.assert_close(probs[0], torch.tensor([w / sum(weights) for w in weights]))


def test_filter_does_not_modify_its_input():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    copy = logits.clone()
    filter_logits(logits, SamplingParams(temperature=0.7, top_k=2, top_p=0.5))
    assert torch.equal(logits, copy)


# ---------------------------------------------------------------------------------------------
# top-k
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 5, 19, 20, 100])
def test_top_k_keeps_exactly_the_k_largest(k):
    # Distinct logits (a permutation of 0..19), so there are no ties at the k-th value.
    logits = torch.randperm(20, generator=torch.Generator().manual_seed(k)).float()[None]
    expected = sorted(range(20), key=lambda j: -float(logits[0, j]))[: min(k, 20)]
    assert kept(logits, temperature=1.0, top_k=k) == [sorted(expected)]


def test_top_k_per_row():
    logits = torch.tensor([[0.0, 5.0, 1.0, 3.0], [9.0, 8.0, 7.0, 6.0]])
    assert kept(logits, temperature=1.0, top_k=2) == [[1, 3], [0, 1]]


def test_top_k_values_survive_unchanged():
    logits = torch.tensor([[0.5, 4.0, -1.0, 2.0]])
    out = filter_logits(logits, SamplingParams(temperature=0.5, top_k=2))
    assert out[0].tolist() == [float("-inf"), 8.0, float("-inf"), 4.0]


# ---------------------------------------------------------------------------------------------
# top-p: the smallest prefix (by probability) whose mass reaches p
# ---------------------------------------------------------------------------------------------

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


@pytest.mark.parametrize(("p", "count"), [
    (0.3, 1),  # 0.5 >= 0.3
    (0.5, 1),  # 0.5 reaches 0.5 exactly
    (0.51, 2),
    (0.8, 2),  # 0.5 + 0.3 reaches 0.8 exactly
    (0.81, 3),  # needs 0.15 too: 0.95
    (0.95, 3),
    (0.96, 4),
    (1.0, 4),
])
def test_top_p_hand_worked(p, count):
    assert kept(PROBS.log(), temperature=1.0, top_p=p) == [list(range(count))]


def test_top_p_follows_probability_order_not_index_order():
    # The same distribution, shuffled: kept indices are where 0.5 and 0.3 went.
    logits = torch.tensor([[0.05, 0.3, 0.15, 0.5]]).log()
    assert kept(logits, temperature=1.0, top_p=0.8) == [[1, 3]]


def test_top_p_applies_after_temperature():
    # At T = 0.5 the probabilities are proportional to [0.25, 0.09, 0.0225, 0.0025]:
    # normalised 0.6948, 0.2501, ...: 0.6 is reached by the first alone.
    assert kept(PROBS.log(), temperature=0.5, top_p=0.6) == [[0]]
    assert kept(PROBS.log(), temperature=1.0, top_p=0.6) == [[0, 1]]


def test_top_k_then_top_p_on_the_renormalised_distribution():
    # top_k = 3 keeps [0.4, 0.3, 0.2], renormalised to [4/9, 3/9, 2/9]; top_p = 0.75 is
    # reached by 4/9 + 3/9 = 0.778: two tokens (the convention of HF and vLLM; over the raw
    # probabilities 0.4 + 0.3 = 0.7 would need a third).
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    assert kept(logits, temperature=1.0, top_k=3, top_p=0.75) == [[0, 1]]


@settings(max_examples=60, deadline=None)
@given(probs=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=12),
       p=st.floats(0.05, 0.99))
def test_property_top_p_matches_a_plain_loop(probs, p):
    total = sum(probs)
    probs = [x / total for x in probs]
    order = sorted(range(len(probs)), key=lambda j: -probs[j])
    # No ties, not even in float32: the order must be the same for the test and the code.
    assume(all(probs[a] - probs[b] > 1e-5 for a, b in itertools.pairwise(order)))
    expected, mass = [], 0.0
    for j in order:  # take tokens until the mass reaches p
        expected.append(j)
        mass += probs[j]
        if mass >= p:
            break
    # Stay clear of float32 rounding right at the boundary.
    running = [sum(probs[j] for j in order[:i + 1]) for i in range(len(order))]
    assume(all(abs(r - p) > 1e-4 for r in running))
    logits = torch.tensor([probs]).log()
    assert kept(logits, temperature=1.0, top_p=p) == [sorted(expected)]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "field"), [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -3}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
])
def test_bad_params_raise_naming_the_field(override, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**override)


def test_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 1.0  # type: ignore[misc]


def test_sample_next_rejects_non_2d_logits():
    with pytest.raises(ValueError, match=r"\(5,\)"):
        sample_next(torch.zeros(5), SamplingParams())
    with pytest.raises(ValueError, match=r"\(1, 2, 5\)"):
        sample_next(torch.zeros(1, 2, 5), SamplingParams(temperature=1.0))


# ---------------------------------------------------------------------------------------------
# Seeds and frequencies
# ---------------------------------------------------------------------------------------------

def test_generator_is_seeded_or_none():
    assert SamplingParams(temperature=1.0).generator() is None
    a, b = SamplingParams(seed=5).generator(), SamplingParams(seed=5).generator()
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    draws = [sample_next(logits, params, params.generator()).tolist() for _ in range(2)]
    assert draws[0] == draws[1]
    other = SamplingParams(temperature=1.0, top_p=0.9, seed=124)
    # 8 draws from ~10 likely tokens each: equal by chance with probability ~1e-7.
    assert sample_next(logits, other, other.generator()).tolist() != draws[0]


def test_empirical_frequencies_match_the_filtered_distribution():
    # Logits of 6 tokens; T = 0.7 and top_k = 4. The expected distribution is computed by
    # hand: exp(x / T) over the 4 largest, normalised; the other two must never appear.
    values = [1.0, 0.2, -0.3, 0.8, -2.0, 0.5]
    top4 = sorted(range(6), key=lambda j: -values[j])[:4]  # [0, 3, 5, 1]
    weights = {j: math.exp(values[j] / 0.7) for j in top4}
    expected = {j: w / sum(weights.values()) for j, w in weights.items()}
    n = 20_000
    logits = torch.tensor(values).expand(n, 6)
    params = SamplingParams(temperature=0.7, top_k=4, seed=2024)
    counts = torch.bincount(sample_next(logits, params, params.generator()), minlength=6)
    assert counts[2] == 0 and counts[4] == 0
    chi2 = sum((int(counts[j]) - n * expected[j]) ** 2 / (n * expected[j]) for j in top4)
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, p = 0.001


def test_empirical_frequencies_with_top_p():
    # probs [0.5, 0.3, 0.15, 0.05], top_p = 0.81 keeps three, renormalised by 0.95.
    n = 20_000
    logits = PROBS.log().expand(n, 4)
    params = SamplingParams(temperature=1.0, top_p=0.81, seed=7)
    counts = torch.bincount(sample_next(logits, params, params.generator()), minlength=4)
    assert counts[3] == 0
    expected = [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]
    chi2 = sum((int(counts[j]) - n * e) ** 2 / (n * e) for j, e in enumerate(expected))
    assert chi2 < 13.82  # 2 degrees of freedom, p = 0.001
