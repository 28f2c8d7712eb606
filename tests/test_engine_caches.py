"""The engine over every cache kind: outputs equal generating each request alone.

The same checks as test_engine.py -- greedy and seeded sampling, chunked prefill, preemption,
prefix reuse, a 300-request fuzz with no leaked block -- on every cache the engine serves:
quantized over paged blocks (INT8 and INT4 per token, compared with generating alone through
the same quantized cache), a model whose window is shorter than its prompts, a Gemma-2-style
model (windowed and global layers, a block table per group), sinks plus a window, and latent
attention (MLA: one latent row per token), alone and with sinks plus a window.
Float64 models, so a different batch cannot flip a near-tie.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from kvlib.cache.paged import PagedKVCache
from kvlib.cache.quant_memory import KVQuantConfig
from kvlib.cache.quantize import QuantScheme
from kvlib.cache.quantized import QuantizedKVCache
from kvlib.config import ModelConfig
from kvlib.engine import BatchedInferenceEngine
from kvlib.model import TransformerLM
from kvlib.sampling import SamplingParams
from kvlib.scheduler import Request

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster

V = 61
# Per-token scales, no full-precision window: what a query reads of a key does not depend on
# how the steps were cut, so the engine and a request alone read the same numbers.
_INT4_G8 = QuantScheme("int4", "token", group_size=8, symmetric=False)
INT8 = KVQuantConfig(QuantScheme("int8", "token"), QuantScheme("int8", "token"), residual=0,
                     name="int8 per token")
INT4 = KVQuantConfig(_INT4_G8, _INT4_G8, residual=0, name="int4 per token, groups of 8")


@dataclass(frozen=True)
class Setup:
    fields: dict  # ModelConfig changes
    quant: KVQuantConfig | None = None
    kv_cache_dtype: str = "auto"  # codes the fused kernels read


SETUPS = {
    "paged": Setup({}),
    "int8": Setup({}, INT8),
    "int4": Setup({}, INT4),
    "int8-codes": Setup({}, kv_cache_dtype="int8"),  # one code + a float32 scale per row
    "window-6": Setup(dict(sliding_window=6)),  # every prompt below outgrows it
    "gemma-style": Setup(dict(sliding_window=6, sliding_layers=(0,))),
    "sinks-2-window-6": Setup(dict(sliding_window=6, sink_tokens=2)),
    # latent attention (kvlib.mla): one latent row per token and layer in the paged cache
    "mla": Setup(dict(num_kv_heads=4, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
                      v_head_dim=6, q_lora_rank=12)),
    "mla-sinks-2-window-6": Setup(dict(num_kv_heads=4, kv_lora_rank=8, qk_rope_head_dim=4,
                                       qk_nope_head_dim=4, v_head_dim=6, sliding_window=6,
                                       sink_tokens=2)),
}


def make_model(setup: Setup, seed: int = 0, d_model: int = 32,
               num_layers: int = 2) -> TransformerLM:
    torch.manual_seed(seed)
    fields = {**dict(num_kv_heads=2), **setup.fields}  # MLA setups set num_kv_heads
    if num_layers == 1 and "sliding_layers" in fields:
        fields["sliding_layers"] = (0,)  # keep the window on the one layer
    cfg = ModelConfig(vocab_size=V, d_model=d_model, num_layers=num_layers, num_heads=4,
                      max_seq_len=96, **fields)
    return TransformerLM(cfg).double().eval()


def alone(model, setup, prompt, sampling, n):
    """Generating this request by itself: through a flat cache (which keeps every key; a
    windowed layer's view hides what its window passed), or through a quantized cache of the
    same scheme when the engine's cache is quantized."""
    cache = model.new_cache(1, len(prompt) + n)
    if setup.quant is not None:
        cache = QuantizedKVCache(model.cache_config(1, 96, block_size=4), setup.quant,
                                 lambda c: PagedKVCache(c, num_blocks=24))
    elif setup.kv_cache_dtype != "auto":
        cache = PagedKVCache(model.cache_config(1, 96, block_size=4,
                                                kv_cache_dtype=setup.kv_cache_dtype), 24)
    return model.generate(torch.tensor([prompt]), n, sampling=sampling,
                          cache=cache).tokens[0].tolist()


def random_requests(n, seed, max_prompt=20, max_new=12, prefixes=()):
    rng = random.Random(seed)
    prompts, lengths, samplings = [], [], []
    for i in range(n):
        head = list(rng.choice(prefixes)) if prefixes and rng.random() < 0.5 else []
        prompts.append(head + [rng.randrange(V) for _ in range(rng.randint(1, max_prompt))])
        lengths.append(rng.randint(1, max_new))
        samplings.append(SamplingParams() if i % 2 == 0 else SamplingParams(
            temperature=rng.choice([0.7, 1.0]), top_k=rng.choice([None, 5]),
            top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(10**6)))
    return prompts, lengths, samplings


def check_no_leak(engine):
    engine.cache.check_invariants()
    assert engine.cache.num_used_blocks == 0, f"{engine.cache.num_used_blocks} blocks leaked"
    assert not engine.scheduler.waiting and not engine.scheduler.running


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request):
    return SETUPS[request.param]


@pytest.fixture(scope="module")
def model(setup):
    return make_model(setup)


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize(("num_blocks", "budget"), [(200, 512), (200, 7), (14, 16)],
                         ids=["roomy", "chunked", "preempting"])
def test_outputs_equal_generate_alone(setup, model, backend, num_blocks, budget):
    rng = random.Random(budget)
    prefixes = [[rng.randrange(V) for _ in range(12)]]
    prompts, lengths, samplings = random_requests(10, seed=num_blocks + budget,
                                                  prefixes=prefixes)
    engine = BatchedInferenceEngine(model, num_blocks=num_blocks, block_size=4,
                                    max_num_batched_tokens=budget, quant=setup.quant,
                                    kv_cache_dtype=setup.kv_cache_dtype)
    model.attention = backend
    try:
        result = engine.generate(prompts, samplings, lengths, show_progress=False)
    finally:
        model.attention = "fast"
    for p, n, s, out in zip(prompts, lengths, samplings, result.outputs):
        assert out.token_ids == alone(model, setup, p, s, n), (p, n, s)
    if num_blocks == 14:
        assert result.metrics.num_preemptions > 0
    check_no_leak(engine)


def test_randomized_300_requests(setup):
    small = make_model(setup, seed=7, d_model=16, num_layers=1)
    rng = random.Random(11)
    prefixes = [[rng.randrange(V) for _ in range(rng.randint(4, 14))] for _ in range(6)]
    prompts, lengths, samplings = random_requests(300, seed=12, max_prompt=14, max_new=10,
                                                  prefixes=prefixes)
    engine = BatchedInferenceEngine(small, num_blocks=24, block_size=4,
                                    max_num_batched_tokens=24, quant=setup.quant,
                                    kv_cache_dtype=setup.kv_cache_dtype)
    ids = []
    for i, (p, n, s) in enumerate(zip(prompts, lengths, samplings)):
        ids.append(engine.add_request(Request(p, s, n)))
        if i % 10 == 9:  # arrivals spread over time, so some prefixes are cached by then
            engine.step()
    engine.run(show_progress=False)
    assert engine.metrics.num_preemptions > 0
    assert engine.metrics.num_prefix_hit_tokens > 0  # shared prefixes found in the cache
    for i, p, n, s in zip(ids, prompts, lengths, samplings):
        assert engine.output(i).token_ids == alone(small, setup, p, s, n), i
    check_no_leak(engine)


def test_a_quantized_cache_fits_more_sequences_in_the_same_bytes():
    """The same pool bytes hold ~3.8x the tokens in INT8 rows (codes + scales) as in float64,
    so far fewer preemptions; what each request generates does not change."""
    model = make_model(SETUPS["int8"])
    prompts, lengths, samplings = random_requests(24, seed=3, max_new=12)
    plain = BatchedInferenceEngine(model, num_blocks=12, block_size=4)
    D = model.config.head_dim
    ratio = D * 8 / (D + 2)  # float64 values against int8 codes + an fp16 scale per row
    int8 = BatchedInferenceEngine(model, num_blocks=int(12 * ratio), block_size=4, quant=INT8)
    assert int8.cache.row_bytes == D + 2
    a = plain.generate(prompts, samplings, lengths, show_progress=False).metrics
    b = int8.generate(prompts, samplings, lengths, show_progress=False).metrics
    assert int8.cache.inner.nbytes <= plain.cache.nbytes * 1.05
    assert b.num_preemptions < a.num_preemptions
    check_no_leak(int8)
