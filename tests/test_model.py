"""TransformerLM: cached == uncached, chunked prefill, mixed-length batches, RoPE, errors.

The models are random but not timid: weights are re-drawn at unit scale (not the 0.02 init), so
attention is sharp and position-dependent and the logits vary by whole units. A cache that
mixes up positions, rows or layers then changes tokens, not just the fifth decimal.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import unit_scale_model

from kvlib.cache import FlatKVCache
from kvlib.config import Layout, ModelConfig
from kvlib.experiments.batching import to_huggingface
from kvlib.model import Generation, TransformerLM, apply_rotary, rotary_cos_sin
from kvlib.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = [Layout.SEQ_MAJOR, Layout.HEAD_MAJOR]
LAYOUT_IDS = ["seq_major", "head_major"]


def random_model(seed: int = 0, **overrides) -> TransformerLM:
    """A seeded unit-scale fp32 model, norms drawn too (conftest.unit_scale_model)."""
    fields = {"vocab_size": 256, "d_model": 64, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 2, "max_seq_len": 512, "rope_theta": 500.0}
    return unit_scale_model(seed, random_norms=True, **{**fields, **overrides})


def prompt_tokens(B: int, P: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, P), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The headline check: cached and uncached generation agree
# ---------------------------------------------------------------------------------------------

NEW_TOKENS = 256


@pytest.fixture(scope="module")
def headline():
    model = random_model(seed=0)
    prompt = prompt_tokens(2, 8, seed=1)
    uncached = model.generate(prompt, NEW_TOKENS)
    return model, prompt, uncached


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_cached_and_uncached_greedy_generation_are_identical(headline, layout):
    model, prompt, uncached = headline
    cache = model.new_cache(batch_size=2, max_seq_len=8 + NEW_TOKENS, layout=layout)
    cached = model.generate(prompt, NEW_TOKENS, cache=cache)
    assert isinstance(cached, Generation)
    assert cached.tokens.shape == (2, NEW_TOKENS) and cached.logits.shape == (2, NEW_TOKENS, 256)
    assert cached.logits.dtype == torch.float32
    assert torch.equal(cached.tokens, uncached.tokens)
    torch.testing.assert_close(cached.logits, uncached.logits, atol=1e-4, rtol=1e-4)
    # The cache holds prompt + all new tokens but the last (which was never fed back).
    assert cache.lengths([0, 1]).tolist() == [8 + NEW_TOKENS - 1] * 2


def test_headline_generation_is_not_degenerate(headline):
    # Guard for the check above: identical tokens mean little if the model repeats one token.
    _, _, uncached = headline
    for row in uncached.tokens:
        assert len(set(row.tolist())) > 20
    # Greedy: each token is the argmax of the logits it was chosen from.
    assert torch.equal(uncached.tokens, uncached.logits.argmax(-1))


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_cached_equals_uncached_gqa_and_mqa(layout, heads, kv_heads):
    model = random_model(seed=2, num_heads=heads, num_kv_heads=kv_heads)
    prompt = prompt_tokens(3, 5, seed=3)
    uncached = model.generate(prompt, 32)
    cache = model.new_cache(batch_size=3, max_seq_len=40, layout=layout)
    cached = model.generate(prompt, 32, cache=cache)
    assert torch.equal(cached.tokens, uncached.tokens)
    torch.testing.assert_close(cached.logits, uncached.logits, atol=1e-4, rtol=1e-4)


def test_generate_on_non_consecutive_seq_ids():
    # Slots [2, 0] of a 3-slot cache: update gathers a copy instead of returning a view.
    model = random_model(seed=4)
    prompt = prompt_tokens(2, 6, seed=5)
    cache = model.new_cache(batch_size=3, max_seq_len=30)
    cached = model.generate(prompt, 16, cache=cache, seq_ids=[2, 0])
    uncached = model.generate(prompt, 16)
    assert torch.equal(cached.tokens, uncached.tokens)
    torch.testing.assert_close(cached.logits, uncached.logits, atol=1e-4, rtol=1e-4)
    assert cache.lengths([0, 1, 2]).tolist() == [21, 0, 21]


# ---------------------------------------------------------------------------------------------
# Chunked prefill and mixed-length batches
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_forward_in_chunks_equals_one_uncached_forward(layout):
    model = random_model(seed=6)
    tokens = prompt_tokens(2, 12, seed=7)
    full = model(tokens)  # (B, 12, V), no cache
    cache = model.new_cache(batch_size=2, max_seq_len=12, layout=layout)
    chunks = [tokens[:, :5], tokens[:, 5:8]] + [tokens[:, i:i + 1] for i in range(8, 12)]
    pieces = [model(chunk, cache) for chunk in chunks]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.lengths([0, 1]).tolist() == [12, 12]


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_rows_at_different_lengths_decode_together_as_alone(layout):
    model = random_model(seed=8)
    prompts = [prompt_tokens(1, 7, seed=9), prompt_tokens(1, 3, seed=10)]
    steps = prompt_tokens(2, 5, seed=11)  # (B, 5): the tokens fed in each decode step
    # Together: rows prefilled separately into one cache, then decoded as one batch.
    cache = model.new_cache(batch_size=2, max_seq_len=16, layout=layout)
    model.prefill(prompts[0], cache, seq_ids=[0])
    model.prefill(prompts[1], cache, seq_ids=[1])
    assert cache.lengths([0, 1]).tolist() == [7, 3]
    together = torch.stack([model.decode_step(steps[:, i], cache, seq_ids=[0, 1])
                            for i in range(5)], dim=1)  # (2, 5, V)
    assert cache.lengths([0, 1]).tolist() == [12, 8]
    # Alone: each row in its own cache; and uncached over the whole sequence.
    for b in range(2):
        alone_cache = model.new_cache(batch_size=1, max_seq_len=16, layout=layout)
        model.prefill(prompts[b], alone_cache)
        alone = torch.stack([model.decode_step(steps[b:b + 1, i], alone_cache)
                             for i in range(5)], dim=1)  # (1, 5, V)
        torch.testing.assert_close(together[b:b + 1], alone, atol=1e-5, rtol=1e-5)
        whole = torch.cat([prompts[b], steps[b:b + 1]], dim=1)
        uncached = model(whole)[:, -5:]  # logits after each decoded token
        torch.testing.assert_close(together[b:b + 1], uncached, atol=1e-5, rtol=1e-5)


def test_reversed_seq_ids_and_chunks_over_mixed_lengths():
    # A 3-token chunk for two rows at lengths [2, 6], fed in the order [1, 0].
    model = random_model(seed=12)
    a, b = prompt_tokens(1, 2, seed=13), prompt_tokens(1, 6, seed=14)
    chunk = prompt_tokens(2, 3, seed=15)  # row 0 of chunk continues b, row 1 continues a
    cache = model.new_cache(batch_size=2, max_seq_len=10)
    model(a, cache, seq_ids=[0])
    model(b, cache, seq_ids=[1])
    out = model(chunk, cache, seq_ids=[1, 0])  # (2, 3, V)
    torch.testing.assert_close(out[0:1], model(torch.cat([b, chunk[0:1]], 1))[:, -3:],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:2], model(torch.cat([a, chunk[1:2]], 1))[:, -3:],
                               atol=1e-5, rtol=1e-5)
    assert cache.lengths([0, 1]).tolist() == [5, 9]


def test_uncached_batch_rows_are_independent():
    model = random_model(seed=16)
    tokens = prompt_tokens(3, 9, seed=17)
    batched = model(tokens)
    for b in range(3):
        torch.testing.assert_close(batched[b:b + 1], model(tokens[b:b + 1]), atol=1e-5,
                                   rtol=1e-5)


def test_next_token_logits_is_the_last_position_of_forward():
    model = random_model(seed=18)
    tokens = prompt_tokens(2, 6, seed=19)
    torch.testing.assert_close(model.next_token_logits(tokens), model(tokens)[:, -1],
                               atol=1e-6, rtol=1e-6)


def test_tied_embeddings_share_the_weight():
    model = TransformerLM(ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2,
                                      num_kv_heads=1, tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight


def test_cache_keeps_no_autograd_history():
    # Outside torch.no_grad (a notebook calling prefill / decode_step in a loop), a model whose
    # weights require grad produces keys with autograd history. The cache must store values,
    # not the graph: otherwise every step's graph stays alive through `cache.data` (memory
    # grows with each step, and each write is recorded as a CopySlices node).
    model = TransformerLM(ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                                      num_kv_heads=2))
    assert model.embed.weight.requires_grad
    cache = model.new_cache(batch_size=1, max_seq_len=8)
    model.prefill(torch.tensor([[1, 2, 3]]), cache)
    model.decode_step(torch.tensor([4]), cache)
    assert not cache.data.requires_grad
    assert cache.data.grad_fn is None


# ---------------------------------------------------------------------------------------------
# An independent check of the architecture: Hugging Face's Llama, if installed
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (4, 1), (4, 4)], ids=["gqa", "mqa",
                                                                                "mha"])
def test_logits_match_huggingface_llama(heads, kv_heads):
    """transformers' Llama with our weights (kvlib.experiments.batching.to_huggingface, which
    names them through hf.kvlib_name) computes our logits."""
    pytest.importorskip("transformers")
    model = random_model(seed=20, num_heads=heads, num_kv_heads=kv_heads, ffn_dim=96)
    hf = to_huggingface(model)
    if hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation("eager")
    assert len(hf.state_dict()) == len(model.state_dict())  # every weight of ours used once
    tokens = prompt_tokens(2, 20, seed=21)
    with torch.no_grad():
        expected = hf(tokens).logits.float()
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------

def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float = 10_000.0) -> torch.Tensor:
    """x (B, heads, T, D) rotated at positions (B, T)."""
    cos, sin = rotary_cos_sin(positions, x.shape[-1], theta, x.dtype)
    return apply_rotary(x, cos[:, None], sin[:, None])  # (B, 1, T, D) over the heads


def test_rotary_cos_sin_shape():
    cos, sin = rotary_cos_sin(torch.arange(5).expand(3, 5), 8, 10_000.0, torch.float32)
    assert cos.shape == sin.shape == (3, 5, 8)


def test_rotary_worked_example_rotate_half_pairs():
    # D = 4, theta = 100: pairs (x0, x2) turn at 1 rad per position, (x1, x3) at
    # 100 ** (-2/4) = 0.1 rad per position. Position 3: angles 3 and 0.3.
    e0 = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    e1 = torch.tensor([0.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4)
    pos = torch.tensor([[3]])
    torch.testing.assert_close(rotate(e0, pos, 100.0).flatten(),
                               torch.tensor([math.cos(3), 0.0, math.sin(3), 0.0]))
    torch.testing.assert_close(rotate(e1, pos, 100.0).flatten(),
                               torch.tensor([0.0, math.cos(0.3), 0.0, math.sin(0.3)]))
    # Position 0 is the identity.
    x = torch.randn(1, 2, 1, 4)
    torch.testing.assert_close(rotate(x, torch.tensor([[0]]), 100.0), x)


def test_rotary_preserves_norms():
    x = torch.randn(2, 3, 7, 16, generator=torch.Generator().manual_seed(22))
    positions = torch.tensor([[0, 1, 2, 50, 51, 300, 1000], [5, 4, 3, 2, 1, 0, 7]])
    torch.testing.assert_close(rotate(x, positions).norm(dim=-1), x.norm(dim=-1),
                               atol=1e-5, rtol=1e-5)


def test_rotary_dot_product_depends_only_on_relative_position():
    gen = torch.Generator().manual_seed(23)
    q, k = torch.randn(1, 1, 1, 32, generator=gen), torch.randn(1, 1, 1, 32, generator=gen)

    def score(m: int, n: int) -> float:
        qm = rotate(q.double(), torch.tensor([[m]]))
        kn = rotate(k.double(), torch.tensor([[n]]))
        return float((qm * kn).sum())

    for offset in (0, 1, 3, 17):
        reference = score(offset, 0)
        for shift in (1, 10, 123):
            assert score(offset + shift, shift) == pytest.approx(reference, abs=1e-4)
    # ... and it does depend on the offset (the property is not vacuous).
    assert abs(score(3, 0) - score(0, 0)) > 1e-3


# ---------------------------------------------------------------------------------------------
# Errors, and the cache after a failure
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model():
    return random_model(seed=24, max_seq_len=32)


def test_generate_rejects_a_cache_that_already_holds_tokens(small_model):
    cache = small_model.new_cache(batch_size=2, max_seq_len=32)
    small_model.prefill(prompt_tokens(1, 3, seed=25), cache, seq_ids=[1])
    with pytest.raises(ValueError, match="release"):
        small_model.generate(prompt_tokens(2, 3), 2, cache=cache)
    # Other, empty slots are fine.
    small_model.generate(prompt_tokens(1, 3), 2, cache=cache, seq_ids=[0])


@pytest.mark.parametrize("tokens", [
    torch.zeros(2, 3),  # float ids
    torch.zeros(2, 3, dtype=torch.bool),
    torch.zeros(3, dtype=torch.long),  # (T,), no batch dim
    torch.zeros(1, 2, 3, dtype=torch.long),
], ids=["float", "bool", "1d", "3d"])
def test_forward_rejects_bad_token_tensors(small_model, tokens):
    with pytest.raises(ValueError, match="tokens"):
        small_model(tokens)


def test_generate_and_decode_step_reject_bad_shapes(small_model):
    with pytest.raises(ValueError, match="prompt"):
        small_model.generate(torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="prompt"):
        small_model.generate(torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        small_model.generate(prompt_tokens(1, 2), 0)
    cache = small_model.new_cache(batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match=r"\(1, 1\)"):
        small_model.decode_step(torch.zeros(1, 1, dtype=torch.long), cache)


def test_seq_ids_must_match_the_batch(small_model):
    cache = small_model.new_cache(batch_size=3, max_seq_len=8)
    with pytest.raises(ValueError, match="3 seq_ids.*2 rows"):
        small_model(prompt_tokens(2, 2), cache, seq_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="1 seq_ids.*2 rows"):
        small_model(prompt_tokens(2, 2), seq_ids=[0])
    assert cache.lengths([0, 1, 2]).tolist() == [0, 0, 0]


def test_model_max_seq_len_is_enforced(small_model):
    with pytest.raises(ValueError, match="max_seq_len 32"):
        small_model(prompt_tokens(1, 33))
    small_model(prompt_tokens(1, 32))  # exactly the limit is fine
    cache = small_model.new_cache(batch_size=1, max_seq_len=64)  # the cache has room...
    small_model(prompt_tokens(1, 30), cache)
    before = cache.data.clone()
    with pytest.raises(ValueError, match="max_seq_len 32"):  # ...the model's positions do not
        small_model(prompt_tokens(1, 3), cache)
    assert cache.lengths([0]).tolist() == [30]
    assert torch.equal(cache.data, before)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_generate_into_a_too_small_cache_leaves_it_empty(small_model, layout):
    prompt = prompt_tokens(2, 5, seed=26)
    cache = small_model.new_cache(batch_size=3, max_seq_len=8, layout=layout)
    small_model.generate(prompt_tokens(1, 3, seed=25), 2, cache=cache, seq_ids=[2])
    other = (cache.lengths([2]), cache.keys(0)[2].clone())
    with pytest.raises(ValueError, match="no room"):
        small_model.generate(prompt, 10, cache=cache)  # needs 5 + 9 = 14 positions
    # Prefill and three decode steps had finished when the fourth failed: all undone.
    assert cache.lengths([0, 1]).tolist() == [0, 0]
    assert torch.equal(cache.lengths([2]), other[0])  # another sequence is untouched
    assert torch.equal(cache.keys(0)[2], other[1])
    # The emptied slots work as new: same tokens as a fresh, big enough cache.
    short = small_model.generate(prompt, 4, cache=cache)
    fresh = small_model.generate(prompt, 4, cache=small_model.new_cache(2, 8, layout=layout))
    assert torch.equal(short.tokens, fresh.tokens)


def test_generate_checks_the_model_context_before_any_work(small_model):
    cache = small_model.new_cache(batch_size=1, max_seq_len=64)
    with pytest.raises(ValueError, match="needs 33 positions; the model has 32"):
        small_model.generate(prompt_tokens(1, 4), 30, cache=cache)
    assert cache.lengths([0]).tolist() == [0]
    assert small_model.generate(prompt_tokens(1, 4), 29).tokens.shape == (1, 29)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_failed_forward_leaves_cache_as_it_was(small_model, layout):
    cache = small_model.new_cache(batch_size=2, max_seq_len=8, layout=layout)
    small_model(prompt_tokens(2, 6, seed=27), cache)
    before = (cache.data.clone(), cache.lengths([0, 1]))
    with pytest.raises(ValueError, match="no room"):
        small_model(prompt_tokens(2, 3, seed=28), cache)
    assert torch.equal(cache.data, before[0])
    assert torch.equal(cache.lengths([0, 1]), before[1])


class FailingOnLayer(FlatKVCache):
    """A flat cache whose write fails on one layer once: a step that breaks halfway."""

    def __init__(self, config, fail_layer: int) -> None:
        super().__init__(config)
        self.fail_layer = fail_layer

    def write(self, layer, batch, k, v):
        if layer == self.fail_layer:
            self.fail_layer = -1
            raise ValueError("injected failure")
        return super().write(layer, batch, k, v)


def test_step_failing_on_a_late_layer_commits_nothing(small_model):
    tokens = prompt_tokens(1, 6, seed=29)
    reference = small_model(tokens)
    config = small_model.new_cache(batch_size=1, max_seq_len=8).config
    cache = FailingOnLayer(config, fail_layer=1)
    with pytest.raises(ValueError, match="injected"):
        small_model(tokens[:, :4], cache)  # layer 0 wrote, layer 1 failed
    assert cache.lengths([0]).tolist() == [0]
    # Retrying the step (the failure is gone) gives the same logits as if it never failed.
    first = small_model(tokens[:, :4], cache)
    second = small_model(tokens[:, 4:], cache)
    torch.testing.assert_close(torch.cat([first, second], 1), reference, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sampling through generate
# ---------------------------------------------------------------------------------------------

SAMPLERS = [
    SamplingParams(temperature=1.0, seed=7),
    SamplingParams(temperature=1.0, top_k=10, seed=8),
    SamplingParams(temperature=0.8, top_p=0.9, seed=9),
    SamplingParams(temperature=1.3, top_k=40, top_p=0.95, seed=10),
]


@pytest.mark.parametrize("sampling", SAMPLERS, ids=["t1", "top-k", "top-p", "all"])
def test_seeded_sampling_is_reproducible_and_cached_equals_uncached(sampling):
    model = random_model(seed=30)
    prompt = prompt_tokens(2, 4, seed=31)
    first = model.generate(prompt, 24, sampling=sampling)
    second = model.generate(prompt, 24, sampling=sampling)
    assert torch.equal(first.tokens, second.tokens)
    cache = model.new_cache(batch_size=2, max_seq_len=28)
    cached = model.generate(prompt, 24, sampling=sampling, cache=cache)
    assert torch.equal(cached.tokens, first.tokens)
    torch.testing.assert_close(cached.logits, first.logits, atol=1e-4, rtol=1e-4)
    # Each sampled token survived the filters, checked against the returned logits by hand.
    logits = first.logits / sampling.temperature  # (B, N, V)
    for b in range(2):
        for i in range(24):
            row, token = logits[b, i], int(first.tokens[b, i])
            order = row.argsort(descending=True).tolist()
            rank = order.index(token)
            if sampling.top_k is not None:
                assert rank < sampling.top_k
            kept = order[: sampling.top_k] if sampling.top_k else order
            probs = torch.softmax(row[kept].double(), 0)
            assert float(probs[:rank].sum()) < sampling.top_p  # mass before it below top_p


def test_different_seeds_give_different_samples():
    model = random_model(seed=32)
    prompt = prompt_tokens(1, 4, seed=33)
    a = model.generate(prompt, 24, sampling=SamplingParams(temperature=1.0, seed=1))
    b = model.generate(prompt, 24, sampling=SamplingParams(temperature=1.0, seed=2))
    assert not torch.equal(a.tokens, b.tokens)
    greedy = model.generate(prompt, 24)
    assert not torch.equal(a.tokens, greedy.tokens)
