"""The engine: every request's output equals generating it alone, however it was batched.

Float64 models, so that a different batch (different summation order) cannot flip a near-tie
between two tokens; the engine itself runs in any dtype.
"""

from __future__ import annotations

import random

import pytest
import torch

from kvlib.config import ModelConfig
from kvlib.engine import BatchedInferenceEngine
from kvlib.model import TransformerLM
from kvlib.sampling import SamplingParams
from kvlib.scheduler import Request, Status
from kvlib.static_batching import static_generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster

V = 61


def make_model(seed: int = 0, d_model: int = 32, num_layers: int = 2) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=d_model, num_layers=num_layers, num_heads=4,
                      num_kv_heads=2, max_seq_len=96)
    return TransformerLM(cfg).double().eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


def alone(model, prompt, sampling, n, stops=()):
    """What TransformerLM.generate gives for this request by itself, cut at a stop token."""
    out = model.generate(torch.tensor([prompt]), n, sampling=sampling).tokens[0].tolist()
    for i, t in enumerate(out):
        if t in stops:
            return out[:i + 1]
    return out


def random_requests(n, seed, max_prompt=30, max_new=16, prefixes=()):
    rng = random.Random(seed)
    prompts, lengths, samplings = [], [], []
    for i in range(n):
        head = list(rng.choice(prefixes)) if prefixes and rng.random() < 0.5 else []
        prompts.append(head + [rng.randrange(V) for _ in range(rng.randint(1, max_prompt))])
        lengths.append(rng.randint(1, max_new))
        samplings.append(SamplingParams() if i % 2 == 0 else SamplingParams(
            temperature=rng.choice([0.7, 1.0, 1.3]), top_k=rng.choice([None, 5]),
            top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(10**6)))
    return prompts, lengths, samplings


def check_no_leak(engine):
    engine.cache.check_invariants()
    used = engine.cache.num_used_blocks
    assert used == 0, f"{used} blocks leaked"
    assert engine.cache.seq_ids == []
    assert not engine.scheduler.waiting and not engine.scheduler.running


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize(("num_blocks", "budget"), [(200, 512), (200, 7), (14, 16)],
                         ids=["roomy", "chunked", "preempting"])
def test_outputs_equal_generate_alone(model, backend, num_blocks, budget):
    prompts, lengths, samplings = random_requests(16, seed=num_blocks + budget)
    engine = BatchedInferenceEngine(model, num_blocks=num_blocks, block_size=4,
                                    max_num_batched_tokens=budget)
    model.attention = backend
    try:
        result = engine.generate(prompts, samplings, lengths, show_progress=False)
    finally:
        model.attention = "reference"
    for p, n, s, out in zip(prompts, lengths, samplings, result.outputs):
        assert out.token_ids == alone(model, p, s, n), (p, n, s)
    assert all(step.num_tokens <= budget for step in result.metrics.steps)
    if budget == 7:
        assert max(len(p) for p in prompts) > 7  # some prompt was really cut into chunks
    if num_blocks == 14:
        assert result.metrics.num_preemptions > 0
        assert any(o.num_preemptions for o in result.outputs)
    check_no_leak(engine)


def test_prefix_reuse_skips_cached_blocks_and_keeps_outputs(model):
    shared = list(range(1, 21))  # 20 tokens: 5 full blocks of 4
    prompts = [shared + [30, 31], shared + [40], shared[:9]]
    samplings = [SamplingParams(), SamplingParams(temperature=1.0, seed=3), SamplingParams()]
    engine = BatchedInferenceEngine(model, num_blocks=64, block_size=4)
    first = engine.generate(prompts[:1], samplings[:1], 6, show_progress=False)
    rest = engine.generate(prompts[1:], samplings[1:], 6, show_progress=False)
    outs = first.outputs + rest.outputs
    # 20 shared tokens = 5 blocks for the second; the third's 9 tokens hold 2 full blocks,
    # and the last prompt token is always recomputed (its logits pick the first new token).
    assert [o.num_cached_tokens for o in outs] == [0, 20, 8]
    assert engine.metrics.num_prefix_hit_tokens == 28
    for p, s, o in zip(prompts, samplings, outs):
        assert o.token_ids == alone(model, p, s, 6)
    check_no_leak(engine)


def test_stop_tokens_end_a_request_early(model):
    prompt = [5, 6, 7]
    full = alone(model, prompt, SamplingParams(), 12)
    stop = full[4]
    engine = BatchedInferenceEngine(model, num_blocks=32, block_size=4)
    out = engine.generate([prompt, [9, 9]], SamplingParams(), 12, stop_token_ids=[stop],
                          show_progress=False).outputs
    assert out[0].token_ids == full[:full.index(stop) + 1]
    assert out[0].finish_reason == "stop"
    check_no_leak(engine)


def test_the_most_recently_admitted_is_preempted_and_its_output_is_unchanged(model):
    # Two requests that each need 5 blocks of 4 at the end; the pool has 7. The first
    # admitted keeps running; the second is preempted, recomputed, and finishes the same.
    prompts, n = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], 14
    engine = BatchedInferenceEngine(model, num_blocks=7, block_size=4)
    out = engine.generate(prompts, SamplingParams(), n, show_progress=False).outputs
    assert [o.num_preemptions for o in out][0] == 0 and out[1].num_preemptions >= 1
    for p, o in zip(prompts, out):
        assert o.token_ids == alone(model, p, SamplingParams(), n)
    kinds = [k for s in engine.metrics.steps for (_, k, _) in s.events]
    assert "preempt" in kinds and kinds.count("finish") == 2
    check_no_leak(engine)


def test_randomized_300_requests_shared_prefixes_and_preemptions():
    small = make_model(seed=7, d_model=16, num_layers=1)
    rng = random.Random(11)
    prefixes = [[rng.randrange(V) for _ in range(rng.randint(4, 14))] for _ in range(6)]
    prompts, lengths, samplings = random_requests(300, seed=12, max_prompt=14, max_new=10,
                                                  prefixes=prefixes)
    engine = BatchedInferenceEngine(small, num_blocks=24, block_size=4,
                                    max_num_batched_tokens=24)
    ids = []
    for i, (p, n, s) in enumerate(zip(prompts, lengths, samplings)):
        ids.append(engine.add_request(Request(p, s, n)))
        if i % 10 == 9:  # arrivals spread over time, so some prefixes are cached by then
            engine.step()
            held = {s.seq_id for s in engine.scheduler.running}
            assert set(engine.cache.seq_ids) == held  # waiting sequences hold no blocks
    engine.run(show_progress=False)
    metrics = engine.metrics
    assert metrics.num_preemptions > 0 and metrics.num_prefix_hit_tokens > 0
    for i, p, n, s in zip(ids, prompts, lengths, samplings):
        assert engine.output(i).token_ids == alone(small, p, s, n), i
    assert max(metrics.used_blocks_per_step) <= 24
    check_no_leak(engine)


def test_bad_requests_are_refused_and_the_engine_keeps_serving(model):
    engine = BatchedInferenceEngine(model, num_blocks=8, block_size=4)
    good = engine.add_request([1, 2, 3], SamplingParams(), 4)
    hot = SamplingParams(temperature=1.0)
    object.__setattr__(hot, "temperature", -1.0)  # as if mutated after validation
    wide = SamplingParams(top_p=0.5)
    object.__setattr__(wide, "top_p", 1.5)
    bad = [
        (([], SamplingParams(), 4), "empty prompt"),
        (([1, V], SamplingParams(), 4), "outside the vocabulary"),
        (([1, -1], SamplingParams(), 4), "outside the vocabulary"),
        (([1] * 90, SamplingParams(), 10), "positions; the model has 96"),
        (([1] * 30, SamplingParams(), 10), "blocks of 4 in the full group; its whole pool has 8"),
        (([1], SamplingParams(), 0), "max_new_tokens must be an int >= 1"),
        (([1], hot, 4), "temperature must be >= 0"),
        (([1], wide, 4), r"top_p must be in \(0, 1\]"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            engine.add_request(*args)
    with pytest.raises(ValueError, match="integer token ids"):
        engine.add_request([1, 2.5], SamplingParams(), 4)
    assert len(engine.scheduler.waiting) == 1  # nothing bad was queued
    other = engine.add_request([4, 5], SamplingParams(), 3)
    engine.run(show_progress=False)
    assert engine.output(good).token_ids == alone(model, [1, 2, 3], SamplingParams(), 4)
    assert engine.output(other).token_ids == alone(model, [4, 5], SamplingParams(), 3)
    with pytest.raises(ValueError, match="not finished"):
        e2 = BatchedInferenceEngine(model, num_blocks=8, block_size=4)
        e2.output(e2.add_request([1], SamplingParams(), 2))
    check_no_leak(engine)


def test_metrics_are_consistent(model):
    prompts, lengths, samplings = random_requests(10, seed=5)
    engine = BatchedInferenceEngine(model, num_blocks=40, block_size=4,
                                    max_num_batched_tokens=16)
    result = engine.generate(prompts, samplings, lengths, show_progress=False)
    m = result.metrics
    assert m.num_generated_tokens == sum(len(o.token_ids) for o in result.outputs)
    assert m.tokens_per_s > 0 and m.mean_seqs_per_step >= 1
    for o in result.outputs:
        assert 0 <= o.queue_s <= o.ttft_s <= o.latency_s and o.tpot_s >= 0
    admitted = [r for s in m.steps for (r, k, _) in s.events if k == "admit"]
    assert sorted(admitted) == list(range(10))  # no preemption here: each admitted once
    for s in m.steps:
        assert s.num_decode_tokens + s.num_prefill_tokens == s.num_tokens
    assert all(engine.scheduler is not None and s.status is Status.FINISHED
               for s in engine._seqs.values())


def test_fast_backend_on_a_mixed_batch_matches_reference(model):
    from kvlib.cache.paged import PagedKVCache
    from kvlib.config import CacheConfig

    @torch.no_grad()
    def run(backend):
        cache = PagedKVCache(CacheConfig.for_model(model.config, max_batch_size=1,
                                                   max_seq_len=96, dtype=torch.float64,
                                                   block_size=4), num_blocks=40)
        model.attention = backend
        try:
            model.packed_hidden_states(torch.arange(1, 12), [5, 6], cache, [0, 1])
            # one decode, one chunk of 7, one new prompt of 1, one decode
            toks = torch.arange(20, 30)
            return model.packed_hidden_states(toks, [1, 7, 1, 1], cache, [0, 1, 2, 3])
        finally:
            model.attention = "reference"

    fast = run("fast")
    torch.testing.assert_close(fast, run("sdpa"), atol=1e-12, rtol=1e-12)
    # the reference and chunked paths keep float64 scores too (kvlib.attention.softmax_dtype)
    torch.testing.assert_close(fast, run("reference"), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fast, run("chunked"), atol=1e-12, rtol=1e-12)


def test_static_baseline_matches_generate_alone(model):
    prompts, lengths, samplings = random_requests(7, seed=9)
    result = static_generate(model, prompts, samplings, lengths, batch_size=3, block_size=4,
                             stop_token_ids=[], show_progress=False)
    for p, n, s, o in zip(prompts, lengths, samplings, result.outputs):
        assert o.token_ids == alone(model, p, s, n)
    # every batch runs as long as its longest member: 3 batches
    expected = sum(max(lengths[b:b + 3]) for b in range(0, 7, 3))
    assert len(result.metrics.steps) == expected
