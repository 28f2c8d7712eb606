"""The static-batching baseline serves every request the engine serves.

A finished member of a static batch keeps being fed padding until the batch's longest member
is done; near the end of the model's context that padding would run past it. It stops there
instead, and the outputs are those of the engine (and of generating each request alone).
Requests it cannot serve are refused before anything runs.
"""

from __future__ import annotations

import pytest
import torch

from kvlib.config import ModelConfig
from kvlib.engine import BatchedInferenceEngine
from kvlib.model import TransformerLM
from kvlib.sampling import SamplingParams
from kvlib.static_batching import static_generate


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      max_seq_len=40)
    return TransformerLM(cfg).eval()


def engine_outputs(model, prompts, lengths, sampling=SamplingParams()):
    engine = BatchedInferenceEngine(model, num_blocks=64, block_size=4)
    run = engine.generate(prompts, sampling, lengths, show_progress=False)
    return [o.token_ids for o in run.outputs]


@pytest.mark.parametrize("sampling", [SamplingParams(),
                                      SamplingParams(temperature=1.0, seed=3)],
                         ids=["greedy", "seeded"])
def test_a_member_that_ends_near_the_context_is_not_fed_past_it(model, sampling):
    # Request 0 fills the context (37 + 4 - 1 = 40 positions) and finishes at step 4;
    # request 1 runs 30 steps, so request 0's padding would reach position 36 + 29 = 65.
    prompts, lengths = [list(range(1, 38)), [1, 2, 3]], [4, 30]
    result = static_generate(model, prompts, sampling, lengths, batch_size=2, block_size=4,
                             show_progress=False)
    assert [len(o.token_ids) for o in result.outputs] == lengths
    assert [o.token_ids for o in result.outputs] == engine_outputs(model, prompts, lengths,
                                                                   sampling)
    steps = result.metrics.steps
    assert len(steps) == 30  # the longest member still sets the pace
    # request 0 is fed while its padding fits: positions 37..39, i.e. decode steps 1..3
    assert [s.num_seqs for s in steps[1:5]] == [2, 2, 2, 1]
    assert all(s.num_seqs == 1 for s in steps[4:])


def test_every_request_the_engine_serves_at_the_edge_of_the_context(model):
    context = model.config.max_seq_len
    prompts = [list(range(1, p + 1)) for p in (1, 10, 20, 39, 40)]
    lengths = [context - len(p) + 1 for p in prompts]  # prompt + new - 1 = the whole context
    result = static_generate(model, prompts, max_new_tokens=lengths, batch_size=3,
                             block_size=8, show_progress=False)
    assert [o.token_ids for o in result.outputs] == engine_outputs(model, prompts, lengths)


@pytest.mark.parametrize(("prompts", "kwargs", "message"), [
    ([[1, 2]], dict(max_new_tokens=40), "needs 41 positions; the model has 40"),
    ([[1, 50]], {}, "token ids must be an int >= 0 and <= 49"),
    ([[1, True]], {}, "token ids must be an int"),
    ([[1, 2]], dict(max_new_tokens=True), "max_new_tokens"),
    ([[1, 2], [3]], dict(max_new_tokens=[2, 0]), "max_new_tokens of request 1"),
    ([[1, 2]], dict(sampling=["greedy"]), "sampling of request 0"),
    ([[1, 2]], dict(stop_token_ids=[True]), "stop token id"),
    ([[1, 2]], dict(batch_size=True), "batch_size"),
])
def test_requests_it_cannot_serve_are_refused_up_front(model, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        static_generate(model, prompts, show_progress=False, **kwargs)
