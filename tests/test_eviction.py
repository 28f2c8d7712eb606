"""kvlib.eviction: what a shrunken cache keeps. The compiled step loop equals its plain
reference; invariants every policy must keep hold for random inputs (hypothesis); and the
paging arithmetic of per-head choices."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib import eviction


def random_logits(seed: int, Hkv: int, G: int, S: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(Hkv, G, S, S, generator=gen, dtype=dtype) * 2  # (Hkv, G, S, S)
    logits[..., 0] += 3  # a sink-like first key, as trained models have
    return logits


@pytest.mark.parametrize("scorer", eviction.SCORERS)
@pytest.mark.parametrize("budget", [2, 7, 30, 64])
def test_the_compiled_loop_equals_the_reference(scorer, budget):
    logits = random_logits(budget, 2, 3, 64)
    fast = eviction.evict_while_decoding(logits, budget, scorer, observation=8, pool=5)
    ref = eviction.evict_while_decoding_reference(logits, budget, scorer, observation=8, pool=5)
    assert torch.equal(fast, ref)


@settings(max_examples=40)
@given(seed=st.integers(0, 10**6), S=st.integers(2, 40), budget=st.integers(2, 45),
       scorer=st.sampled_from(eviction.SCORERS), observation=st.integers(1, 9))
def test_evicting_as_decoding_goes_keeps_its_promises(seed, S, budget, scorer, observation):
    logits = random_logits(seed, 2, 2, S, torch.float32)
    vis = eviction.evict_while_decoding(logits, budget, scorer, observation)  # (Hkv, S, S)
    t = torch.arange(S)
    counts = vis.sum(-1)  # (Hkv, S)
    assert torch.equal(counts, torch.minimum(t + 1, torch.tensor(budget)).expand(2, S))
    assert bool(vis[:, t, t].all())  # a query always sees its own key
    assert not bool((vis & ~torch.ones(S, S, dtype=torch.bool).tril()).any())  # no future
    # an evicted key never comes back: visible at t+1 implies visible at t (or it is t+1)
    later, earlier = vis[:, 1:, :], vis[:, :-1, :]
    new = torch.zeros_like(later)
    new[:, t[:-1], t[1:]] = True
    assert not bool((later & ~earlier & ~new).any())
    recent = budget // 2 if scorer == "h2o" else min(observation, budget - 1)
    for row in range(S):  # the protected recent keys are all there
        assert bool(vis[:, row, max(0, row - recent + 1):row + 1].all())


@settings(max_examples=40)
@given(S=st.integers(1, 40), budget=st.integers(1, 45), sinks=st.integers(0, 6))
def test_sinks_and_window(S, budget, sinks):
    sinks = min(sinks, budget - 1)
    vis = eviction.sinks_and_window(S, budget, sinks)
    t = torch.arange(S)
    assert torch.equal(vis.sum(-1), torch.minimum(t + 1, torch.tensor(budget)))
    assert bool(vis[:, :sinks].tril().eq(torch.ones(S, min(sinks, S)).tril().bool()).all())


@pytest.mark.parametrize("scorer", eviction.SCORERS)
@settings(max_examples=30)
@given(seed=st.integers(0, 10**6), P=st.integers(1, 50), budget=st.integers(1, 60))
def test_compress_prompt_keeps_the_budget_and_the_recent_tokens(scorer, seed, P, budget):
    probs = random_logits(seed, 2, 2, P).masked_fill(
        ~torch.ones(P, P, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    kept = eviction.compress_prompt(probs, budget, scorer, observation=8)  # (Hkv, P)
    assert torch.equal(kept.sum(-1), torch.full((2,), min(budget, P)))
    recent = budget // 2 if scorer == "h2o" else min(8, budget)
    assert bool(kept[:, P - min(recent, P):].all())


def test_snapkv_votes_with_its_observation_window_and_pools():
    P = 12
    probs = torch.zeros(1, 1, P, P)
    probs[0, 0, :, 0] = 1.0  # every query but the last few looks at token 0
    probs[0, 0, -3:, 0] = 0.0
    probs[0, 0, -3:, 5] = 1.0  # the observation window looks at token 5
    kept = eviction.compress_prompt(probs, budget=6, scorer="snapkv", observation=3, pool=3)
    assert kept[0].nonzero().flatten().tolist() == [4, 5, 6, 9, 10, 11]  # 5 and neighbours
    h2o = eviction.compress_prompt(probs, budget=4, scorer="h2o")
    assert h2o[0].nonzero().flatten().tolist() == [0, 5, 10, 11]  # most attention overall


@settings(max_examples=40)
@given(seed=st.integers(0, 10**6), P=st.integers(1, 70), budget=st.integers(1, 80),
       block=st.sampled_from([1, 4, 16]), recent=st.integers(0, 40))
def test_shared_blocks_are_whole_blocks_within_the_budget(seed, P, budget, block, recent):
    scores = torch.rand(3, 2, P, generator=torch.Generator().manual_seed(seed))
    kept = eviction.shared_blocks(scores, budget, block, recent)  # (P,)
    assert int(kept.sum()) <= max(budget, 0)
    padded = torch.nn.functional.pad(kept, (0, -P % block))
    per_block = padded.view(-1, block)
    full_or_empty = per_block.all(1) | ~per_block.any(1)
    assert bool(full_or_empty[:-1].all())  # the last block may be a partial one


def test_per_head_choices_free_few_blocks():
    """Half of every head's keys dropped, at random per head: no 16-token block is free."""
    gen = torch.Generator().manual_seed(0)
    kept = torch.rand(4, 2, 256, generator=gen) < 0.5  # (L, Hkv, P)
    assert eviction.freeable_blocks(kept, 16) == 0.0
    same = kept[:1, :1].expand(4, 2, 256)  # one choice for every head and layer
    assert eviction.freeable_blocks(same, 1) == pytest.approx(1 - float(kept[0, 0].float().mean()))


def test_bad_arguments_are_refused():
    logits = random_logits(0, 1, 1, 8)
    with pytest.raises(ValueError, match="scorer"):
        eviction.evict_while_decoding(logits, 4, "tova")
    with pytest.raises(ValueError, match="budget"):
        eviction.evict_while_decoding(logits, 1, "h2o")
    with pytest.raises(ValueError, match="sink_tokens"):
        eviction.sinks_and_window(8, budget=4, sink_tokens=4)
