"""kvlib.experiments.fragmentation: the closed forms against plain loops, and the invariants
of each reservation scheme as hypothesis properties."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.experiments import fragmentation as fr


def test_doctests():
    result = doctest.testmod(fr)
    assert result.attempted >= 4 and result.failed == 0


@st.composite
def streams(draw, max_len=None):
    max_len = max_len or draw(st.integers(2, 600))
    n = draw(st.integers(1, 30))
    prompts = draw(st.lists(st.integers(1, max_len - 1), min_size=n, max_size=n))
    outputs = [draw(st.integers(1, max_len - p)) for p in prompts]
    return fr.Requests(np.array(prompts), np.array(outputs)), max_len


PROPS = settings(max_examples=200, deadline=None)


# -- references: plain loops beside the closed forms ------------------------------------------

def paged_slot_steps_loop(n, block_size):
    return sum(-(-m // block_size) * block_size for m in range(1, n + 1))


def in_flight_loop(scheme, requests, max_len, block_size):
    held = reserved = 0
    for p, o in zip(requests.prompt_lens.tolist(), requests.output_lens.tolist()):
        final = fr.reserved_slots(scheme, np.array([p + o]), max_len=max_len,
                                  block_size=block_size)[0]
        for t in range(1, o + 1):
            held += p + t
            reserved += (-(-(p + t) // block_size) * block_size) if scheme == "paged" else final
    return held, reserved


@PROPS
@given(st.integers(0, 300), st.integers(1, 40))
def test_paged_slot_steps_matches_the_loop(n, block_size):
    assert fr._paged_slot_steps(np.array([n]), block_size)[0] == paged_slot_steps_loop(
        n, block_size)


@PROPS
@given(streams(), st.integers(1, 64), st.sampled_from(fr.SCHEMES))
def test_in_flight_slots_match_the_loop(stream, block_size, scheme):
    requests, max_len = stream
    held, reserved = fr.in_flight_slots(scheme, requests, max_len=max_len,
                                        block_size=block_size)
    assert (int(held.sum()), int(reserved.sum())) == in_flight_loop(scheme, requests, max_len,
                                                                    block_size)


def test_fits_matches_a_running_total():
    reserved = np.array([5, 9, 1, 20, 3])
    for budget in range(0, 45):
        total, count = 0, 0
        for r in reserved:
            if total + r > budget:
                break
            total, count = total + r, count + 1
        assert fr.fits(reserved, budget) == count


# -- invariants ---------------------------------------------------------------------------------

@PROPS
@given(streams(), st.integers(1, 64))
def test_paging_wastes_less_than_one_block_per_sequence(stream, block_size):
    requests, _ = stream
    lens = requests.total_lens
    waste = fr.paged_slots(lens, block_size) - lens
    assert (waste >= 0).all() and (waste < block_size).all()


@PROPS
@given(streams(), st.integers(1, 64), st.integers(0, 5000))
def test_oracle_is_full_and_bounds_every_other_scheme(stream, block_size, budget):
    requests, max_len = stream
    res = fr.simulate(requests, max_len=max_len, block_size=block_size, budget=budget)
    assert res["oracle"].utilization == 1.0 and res["oracle"].waste_per_seq == 0.0
    for r in res.values():
        assert 0.0 < r.utilization <= 1.0 and 0.0 < r.utilization_in_flight <= 1.0
        assert r.fits <= res["oracle"].fits
    assert res["max"].utilization <= res["pow2"].utilization  # pow2 never reserves past max


@PROPS
@given(streams(), st.integers(0, 20000), st.data())
def test_paging_fits_at_least_as_many_as_preallocating_the_maximum(stream, budget, data):
    requests, max_len = stream
    # Holds when the block size divides max_len: then no sequence takes more than max_len.
    block_size = data.draw(st.sampled_from([d for d in range(1, max_len + 1)
                                            if max_len % d == 0]))
    res = fr.simulate(requests, max_len=max_len, block_size=block_size, budget=budget)
    assert res["paged"].fits >= res["max"].fits


def test_paging_can_fit_fewer_when_the_block_size_does_not_divide_max_len():
    # 100-token sequences, max_len 100, blocks of 16: 7 blocks = 112 slots each.
    requests = fr.Requests(np.array([50, 50]), np.array([50, 50]))
    res = fr.simulate(requests, max_len=100, block_size=16, budget=200)
    assert (res["max"].fits, res["paged"].fits) == (2, 1)


@PROPS
@given(streams(), st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([2, 3, 4]),
       st.integers(0, 20000))
def test_paging_gets_no_better_as_a_block_grows_by_a_whole_factor(stream, block_size, factor,
                                                                  budget):
    # If b divides b', ceil(n / b) * b <= ceil(n / b') * b' for every n. (Not for any
    # larger b: 32 tokens fill two blocks of 16 exactly but waste 4 slots in blocks of 12.)
    requests, max_len = stream
    small, large = (fr.simulate(requests, max_len=max_len, block_size=b, budget=budget)["paged"]
                    for b in (block_size, block_size * factor))
    assert small.utilization >= large.utilization
    assert small.utilization_in_flight >= large.utilization_in_flight
    assert small.fits >= large.fits


def test_paging_is_not_monotonic_in_the_block_size_in_general():
    requests = fr.Requests(np.array([16]), np.array([16]))  # 32 tokens
    assert (fr.simulate(requests, max_len=64, block_size=16, budget=64)["paged"].utilization
            > fr.simulate(requests, max_len=64, block_size=12, budget=64)["paged"].utilization)


@PROPS
@given(streams())
def test_block_size_one_is_the_oracle_at_completion_and_full_in_flight(stream):
    requests, max_len = stream
    res = fr.simulate(requests, max_len=max_len, block_size=1, budget=1000)
    assert res["paged"].utilization == 1.0 and res["paged"].utilization_in_flight == 1.0
    assert res["paged"].fits == res["oracle"].fits


def test_waste_properties_are_complements():
    r = fr.SchemeResult("paged", utilization=0.75, utilization_in_flight=0.5, waste_per_seq=1.0,
                        fits=3)
    assert (r.waste, r.waste_in_flight) == (0.25, 0.5)


# -- streams ------------------------------------------------------------------------------------

@pytest.mark.parametrize("distribution", list(fr.DISTRIBUTIONS))
def test_streams_are_seeded_and_clipped(distribution):
    a = fr.sample_requests(distribution, 5000, 1024, seed=1)
    b = fr.sample_requests(distribution, 5000, 1024, seed=1)
    c = fr.sample_requests(distribution, 5000, 1024, seed=2)
    assert np.array_equal(a.prompt_lens, b.prompt_lens)
    assert np.array_equal(a.output_lens, b.output_lens)
    assert not np.array_equal(a.total_lens, c.total_lens)
    assert a.prompt_lens.min() >= 1 and a.output_lens.min() >= 1
    assert a.total_lens.max() <= 1024 and a.prompt_lens.dtype == np.int64 and len(a) == 5000


@pytest.mark.parametrize("distribution, prompt, output", [("sharegpt", 161.31, 337.99),
                                                          ("alpaca", 19.31, 58.45)])
def test_chat_streams_have_the_means_the_vllm_paper_reports(distribution, prompt, output):
    r = fr.sample_requests(distribution, 200_000, 10**7, seed=0)  # no clipping to speak of
    assert r.prompt_lens.mean() == pytest.approx(prompt, rel=0.03)
    assert r.output_lens.mean() == pytest.approx(output, rel=0.03)


def test_long_tailed_streams_have_a_long_tail():
    lens = fr.sample_requests("pareto", 20000, 10**6, seed=0).total_lens
    assert np.percentile(lens, 99.9) > 10 * np.median(lens)


def test_a_large_stream_is_fast():
    import time
    start = time.perf_counter()
    r = fr.sample_requests("sharegpt", 200_000, 4096)
    fr.sweep_block_sizes(r, [1, 8, 16, 32, 64, 128], max_len=4096, budget=10**6)
    assert time.perf_counter() - start < 30.0  # vectorised: about 0.2 s unloaded; loose for a busy machine


# -- bad input ----------------------------------------------------------------------------------

def test_bad_input_raises():
    with pytest.raises(ValueError, match="unknown distribution"):
        fr.sample_requests("zipf", 10, 100)
    with pytest.raises(ValueError, match="max_len >= 2"):
        fr.sample_requests("uniform", 10, 1)
    with pytest.raises(ValueError, match="equal length"):
        fr.Requests(np.array([1, 2]), np.array([1]))
    with pytest.raises(ValueError, match="at least 1 token"):
        fr.Requests(np.array([0]), np.array([1]))
    requests = fr.Requests(np.array([10]), np.array([10]))
    with pytest.raises(ValueError, match="block_size"):
        fr.simulate(requests, max_len=64, block_size=0, budget=10)
    with pytest.raises(ValueError, match="exceeds max_len"):
        fr.simulate(requests, max_len=16, block_size=4, budget=10)
    with pytest.raises(ValueError, match="unknown scheme"):
        fr.reserved_slots("buddy", np.array([3]), max_len=8, block_size=2)
