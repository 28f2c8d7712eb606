"""Every cache, the model on every backend, and the engine, on each device in fp32, bf16, fp16.

The same tests run on the CPU and, where a GPU exists, on CUDA (`DEVICES`; without one the
CUDA cases skip). Each builds a small seeded model in the dtype and device under test and
checks that it runs there -- every tensor a cache stores or hands attention is on the device
in the model's dtype, and so are the logits -- and that it computes the right thing:

- in fp32, a cache gives the tokens and logits of the cacheless reference run (the
  `reference` backend, fp32, same device); the engine gives each request's tokens exactly;
- in bf16 and fp16, logits are compared with the fp32 reference with a tolerance that is
  honest for half precision (`TOL`), step by step, with the reference's tokens fed back
  (`forced_logits`): a random model's greedy tokens may part at a near-tie between two tokens
  when rounded differently, and after that the runs are not comparable any more.

Lossy caches (quantized) add their own tolerance. Legend: B sequences, P prompt tokens,
N new tokens, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from test_cache_contract import KIVI_G4
from test_engine import check_no_leak
from torch import nn

from kvlib.cache import KVCache, KVQuantConfig, PagedKVCache, QuantizedKVCache
from kvlib.cache.quant_memory import PRESETS as QUANT_PRESETS
from kvlib.cache.quantized import BYTE
from kvlib.cache.ring import RingKVCache
from kvlib.config import Layout, ModelConfig
from kvlib.contract import PagedKV
from kvlib.engine import BatchedInferenceEngine
from kvlib.experiments import demo_model
from kvlib.kernels.paged_decode_cpu import paged_decode_numba
from kvlib.kernels.reference import paged_decode_ref
from kvlib.model import Generation, TransformerLM
from kvlib.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_gpu)]
HALF = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, *HALF]
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Logits (spread over about +-5, see `lm`) against the fp32 reference. fp32: rounding only.
# Half precision: the weights themselves are rounded to 8 (bf16) or 11 (fp16) bits; on the
# CPU every cache and backend stays within 0.12 (bf16) and 0.02 (fp16) of fp32, and the
# tolerances leave about twice that. (A bug is far larger: a layer that ignores its sliding
# window moves logits by up to 5.9, a sequence missing its first token by up to 1.9.)
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4),
       torch.bfloat16: dict(atol=0.2, rtol=0.05),
       torch.float16: dict(atol=0.05, rtol=0.02)}

CONFIG = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_seq_len=64, name="tiny-gqa")  # head dim 16, two query heads a KV head
B, P, N = 2, 20, 8
MAX = 32  # cache room per sequence: P + N - 1 = 27 positions, and some
W = 8  # sliding window of the windowed models: a 20-token prompt is well past it
# What kvlib.backends registers, named here so that a backend another module registers
# later (for one device or dtype only) does not change what this file collects.
BACKENDS = ["chunked", "fast", "reference", "sdpa", "triton"]


def lm(device: str, dtype: torch.dtype, window: int | None = None,
       layers: tuple[int, ...] | None = None) -> TransformerLM:
    """`demo_model`'s seeded weights, the same on every device and in every dtype (made in
    fp32 on the CPU, then moved and cast); `window` on `layers` (None: all) if given.

    The weights are scaled up as in test_ring_cache.windowed_model: with the 0.02 init every
    logit sits within ~0.2 of the others and a half-precision tolerance would check nothing;
    here they spread over a few units (std ~1.5).
    """
    model = demo_model(replace(CONFIG, sliding_window=window, sliding_layers=layers), seed=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(75 / math.sqrt(m.in_features))  # std 0.02 -> 1.5 / sqrt(fan_in)
            elif isinstance(m, nn.Embedding):
                m.weight.mul_(50)  # std 0.02 -> 1
    return model.to(device=device, dtype=dtype).requires_grad_(False)


def prompts(device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, CONFIG.vocab_size, (B, P), generator=gen).to(device)  # (B, P)


def reference(device: str, window: int | None = None,
              layers: tuple[int, ...] | None = None) -> Generation:
    """fp32, the `reference` backend, no cache: every step recomputes the whole sequence."""
    model = lm(device, torch.float32, window, layers)
    model.attention = "reference"
    return model.generate(prompts(device), N)  # tokens (B, N), logits (B, N, V)


@torch.no_grad()
def forced_logits(model: TransformerLM, cache: KVCache, prompt: torch.Tensor,
                  tokens: torch.Tensor) -> torch.Tensor:
    """The steps of `generate` with `tokens` (B, N) fed back instead of the model's own
    choices: (B, N, V) float32 logits, step i's after the prompt and tokens[:, :i]."""
    logits = [model.prefill(prompt, cache)]  # (B, V)
    for i in range(tokens.shape[1] - 1):
        logits.append(model.decode_step(tokens[:, i], cache))
    return torch.stack(logits, dim=1)  # (B, N, V)


# ---------------------------------------------------------------------------------------------
# Every cache kind
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """How to build one cache kind for a model (its dtype and device), and what it needs."""

    make: Callable[[TransformerLM], KVCache]  # an empty cache with room for B x MAX tokens
    window: int | None = None  # the model's sliding window, if the kind needs one
    layers: tuple[int, ...] | None = None  # its windowed layers (None: all)
    atol: float = 0.0  # quantization error allowed on top of the dtype's (`TOL`)


def paged(model: TransformerLM, block_size: int) -> PagedKVCache:
    # the model's windows come with its cache_config: a windowed model's cache frees blocks
    return PagedKVCache(model.cache_config(1, MAX, block_size=block_size),
                        num_blocks=B * -(-MAX // block_size))


def quantized(model: TransformerLM, quant: KVQuantConfig, inner: str) -> QuantizedKVCache:
    if inner == "flat":
        return QuantizedKVCache(model.cache_config(B, MAX), quant)
    return QuantizedKVCache(model.cache_config(1, MAX, block_size=4), quant,
                            lambda c: PagedKVCache(c, num_blocks=B * MAX // 4))


KINDS: dict[str, Kind] = {
    "flat-seq-major": Kind(lambda m: m.new_cache(B, MAX, Layout.SEQ_MAJOR)),
    "flat-head-major": Kind(lambda m: m.new_cache(B, MAX, Layout.HEAD_MAJOR)),
    # layer 0 a ring of W + P - 1 slots, layer 1 global: both kinds of layer
    "ring": Kind(lambda m: RingKVCache(m.cache_config(B, MAX), max_query_len=P), window=W,
                 layers=(0,)),
    "paged-bs1": Kind(lambda m: paged(m, 1)),
    "paged-bs3": Kind(lambda m: paged(m, 3)),  # blocks that are not a power of two
    "paged-bs16": Kind(lambda m: paged(m, 16)),
    "paged-bs4-window": Kind(lambda m: paged(m, 4), window=W),
    # atol: the quantization error, on top of the dtype's. On the CPU the logits stay within
    # (fp32 / bf16 / fp16) 0.07 / 0.19 / 0.09 of the fp32 reference with int8 per token,
    # 0.45 / 0.88 / 0.50 with fp8 e4m3 per tensor (3 mantissa bits; small values of a layer
    # fall to its subnormals), 0.64 / 0.76 / 0.64 with int4 in groups.
    "quantized-int8-flat": Kind(lambda m: quantized(m, QUANT_PRESETS["int8-token"], "flat"),
                                atol=0.15),
    "quantized-fp8-paged": Kind(lambda m: quantized(m, QUANT_PRESETS["vllm-fp8"], "paged"),
                                atol=1.0),
    # KIVI-style int4, keys per channel in groups of 4 tokens (complete ones quantized, the
    # rest read from the full-precision tail), values per token, 2 recent tokens exact
    "quantized-kivi-paged": Kind(lambda m: quantized(m, KIVI_G4, "paged"), atol=1.0),
}


def storage(cache: KVCache) -> list[torch.Tensor]:
    """The tensors a cache keeps its keys and values in."""
    if isinstance(cache, QuantizedKVCache):
        return storage(cache.inner)  # rows of codes and scales, as bytes
    if isinstance(cache, RingKVCache):
        return [*cache.k, *cache.v]
    if isinstance(cache, PagedKVCache):
        return list(cache.storage.pools)
    return [cache.data]


def check_placement(cache: KVCache, device: str, dtype: torch.dtype) -> None:
    """What the cache stores, and every tensor of what it hands attention, is on `device`;
    keys and values in `dtype` (a quantized cache stores bytes, and hands back `dtype`)."""
    stored = BYTE if isinstance(cache, QuantizedKVCache) else dtype
    for t in storage(cache):
        assert (t.device.type, t.dtype) == (device, stored)
    batch = cache.begin([0, 1], [1, 1])  # a step, read and then undone
    try:
        for layer in range(cache.num_layers):
            kv = cache.read(layer, batch)
            tensors = ((kv.k_pool, kv.v_pool) if isinstance(kv, PagedKV) else (kv.k, kv.v))
            for t in tensors:
                assert (t.device.type, t.dtype) == (device, dtype)
            extra = (kv.block_tables,) if isinstance(kv, PagedKV) else ()
            for t in (kv.context_lens, *extra):
                assert t.device.type == device
    finally:
        cache.abort(batch)


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(KINDS))
def test_every_cache_generates_on_the_device(name, device, dtype):
    kind = KINDS[name]
    ref = reference(device, kind.window, kind.layers)
    model = lm(device, dtype, kind.window, kind.layers)
    prompt = prompts(device)
    cache = kind.make(model)
    out = model.generate(prompt, N, cache=cache)  # the model's own greedy tokens
    assert out.tokens.device.type == device and out.logits.device.type == device
    assert out.tokens.shape == (B, N) and cache.lengths([0, 1]).tolist() == [P + N - 1] * 2
    check_placement(cache, device, dtype)
    if isinstance(cache, PagedKVCache):
        cache.check_invariants()
    tol = {**TOL[dtype], "atol": TOL[dtype]["atol"] + kind.atol}
    if dtype == torch.float32 and not kind.atol:
        assert torch.equal(out.tokens, ref.tokens)
        torch.testing.assert_close(out.logits, ref.logits, **tol)
    else:  # the first step has no fed-back token to differ in; then the reference's tokens
        torch.testing.assert_close(out.logits[:, 0], ref.logits[:, 0], **tol)
        forced = forced_logits(model, kind.make(model), prompt, ref.tokens)
        torch.testing.assert_close(forced, ref.logits, **tol)


# ---------------------------------------------------------------------------------------------
# The model on every backend
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_runs_the_model_on_the_device(backend, device, dtype):
    """Each backend over a flat cache (dense views) and paged ones, against the fp32
    reference. Over blocks of 16 `fast` and `triton` decode with a kernel (Triton on a GPU;
    numba for `fast` on the CPU in fp32); blocks of 3 the Triton kernel leaves to sdpa."""
    ref = reference(device)
    model = lm(device, dtype)
    model.attention = backend
    prompt = prompts(device)
    for make in (KINDS["flat-seq-major"].make, KINDS["paged-bs16"].make,
                 KINDS["paged-bs3"].make):
        got = forced_logits(model, make(model), prompt, ref.tokens)  # (B, N, V)
        assert got.device.type == device and got.dtype == torch.float32
        torch.testing.assert_close(got, ref.logits, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["sdpa", "fast"])
def test_windowed_backends_on_the_device(backend, device, dtype):
    """The backends other than `reference` that honour a sliding window, over a ring and a
    windowed paged cache."""
    for kind in (KINDS["ring"], KINDS["paged-bs4-window"]):
        ref = reference(device, kind.window, kind.layers)
        model = lm(device, dtype, kind.window, kind.layers)
        model.attention = backend
        got = forced_logits(model, kind.make(model), prompts(device), ref.tokens)
        torch.testing.assert_close(got, ref.logits, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
def test_cpu_paged_decode_kernel_is_numba_in_fp32_and_the_reference_otherwise(dtype):
    """kvlib.kernels.paged_decode_cpu compiles for float32 (and float64) only; in bf16 and
    fp16 it hands the call to the gather-then-attend reference, as its docstring says."""
    gen = torch.Generator().manual_seed(0)
    NB, Hkv, BS, D = 8, 2, 4, 16
    k_pool, v_pool = torch.randn(2, NB, Hkv, BS, D, generator=gen).to(dtype)  # (NB, Hkv, BS, D)
    q = torch.randn(3, 4, D, generator=gen).to(dtype)  # (B, H, D)
    tables = torch.tensor([[5, 1, -1], [0, 2, 7], [3, -1, -1]], dtype=torch.int32)  # (B, M)
    lens = torch.tensor([6, 12, 1], dtype=torch.int32)  # (B,)
    got = paged_decode_numba(q, k_pool, v_pool, tables, lens)
    want = paged_decode_ref(q, k_pool, v_pool, tables, lens)
    assert got.dtype == dtype and got.shape == q.shape
    if dtype == torch.float32:  # numba: another summation order
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------

def near_greedy_gaps(model: TransformerLM, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """(n,) how far below the best logit each of `tokens` is, when `model` alone (no cache)
    reads the prompt and the tokens before it: 0 where the token is its greedy choice."""
    device = model.embed.weight.device
    seq = torch.tensor([prompt + tokens[:-1]], device=device)  # (1, P + n - 1)
    logits = model(seq)[0, len(prompt) - 1:].float()  # (n, V)
    chosen = logits.gather(-1, torch.tensor(tokens, device=device)[:, None])[:, 0]  # (n,)
    return logits.max(-1).values - chosen


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_engine_on_the_device(backend, device, dtype):
    """Five requests, three sharing a 12-token prefix, in steps of at most 16 tokens (prompts
    cut into chunks beside decodes); one sampled with a seed (a generator on the device)."""
    model = lm(device, dtype)
    model.attention = backend
    shared = list(range(40, 52))
    prompts_ = [shared + [1, 2, 3, 4, 5, 6, 7, 8], shared + [9], [60, 61, 62], shared + [3, 3],
                list(range(100, 120))]
    lengths = [8, 5, 8, 6, 3]
    samplings = [SamplingParams()] * 4 + [SamplingParams(temperature=1.0, seed=5)]
    engine = BatchedInferenceEngine(model, num_blocks=48, block_size=4,
                                    max_num_batched_tokens=16)
    (pool,) = engine.cache.storage.pools
    assert pool.device.type == device and pool.dtype == dtype
    result = engine.generate(prompts_, samplings, lengths, show_progress=False)
    check_no_leak(engine)
    assert result.metrics.num_prefix_hit_tokens > 0  # the shared prefix was reused
    assert max(s.num_tokens for s in result.metrics.steps) <= 16
    for p, n, s, out in zip(prompts_, lengths, samplings, result.outputs):
        assert out.finish_reason == "length" and len(out.token_ids) == n
        assert all(0 <= t < CONFIG.vocab_size for t in out.token_ids)
        alone = model.generate(torch.tensor([p], device=device), n, sampling=s)
        assert alone.tokens.device.type == device
        if dtype == torch.float32:
            # NOTE: a batch rounds differently from a request alone (~1e-6 in fp32); the
            # closest two logits of any greedy step here are ~0.03 apart, so the tokens are
            # the same (and the sampled request draws the same numbers from its own seed).
            assert out.token_ids == alone.tokens[0].tolist(), (p, n, s)
        elif s.greedy:
            # NOTE: in half precision a different batch and chunking round the logits
            # differently (bf16 logits even tie exactly), so at a near-tie the engine may
            # take the other token and the runs part (bf16 with `fast` does, on the CPU).
            # Each of its tokens must still be a greedy choice of the model alone reading
            # that same sequence, up to rounding (on the CPU: within 0.031 in bf16).
            gaps = near_greedy_gaps(model, p, out.token_ids)
            assert float(gaps.max()) <= TOL[dtype]["atol"], (p, gaps)
