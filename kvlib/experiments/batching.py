"""Measurements of batching that chapter 4 and bench/engine.py share.

    request_set        a reproducible set of prompts and output lengths (mixed lengths)
    bench_model        a random Llama-style model of about 10M parameters
    to_huggingface     the same weights in transformers' LlamaForCausalLM
    hf_generate        transformers' generate over static, left-padded batches
    run_trace          the real engine fed by arrivals at given steps (the chapter's timelines)
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvlib.bench import Timing, measure
from kvlib.cache.quant_memory import KVQuantConfig, row_layout
from kvlib.config import ModelConfig
from kvlib.engine import BatchedInferenceEngine, EngineMetrics, RequestOutput
from kvlib.hf import kvlib_name
from kvlib.model import TransformerLM
from kvlib.sampling import SamplingParams
from kvlib.scheduler import Request


@dataclass(frozen=True)
class RequestSet:
    prompts: list[list[int]]
    max_new_tokens: list[int]

    @property
    def num_new_tokens(self) -> int:
        return sum(self.max_new_tokens)


def request_set(num_requests: int, vocab_size: int, prompt_lens: tuple[int, int],
                new_tokens: tuple[int, int], seed: int = 0, *,
                long_tail: bool = True) -> RequestSet:
    """Prompt and output lengths drawn in [lo, hi]; with `long_tail`, from a log-uniform law
    (many short requests, a few long ones: what makes static batches wait)."""
    rng = random.Random(seed)

    def draw(lo: int, hi: int) -> int:
        if not long_tail or lo == hi:
            return rng.randint(lo, hi)
        return min(hi, int(round(lo * (hi / lo) ** rng.random())))

    prompts = [[rng.randrange(vocab_size) for _ in range(draw(*prompt_lens))]
               for _ in range(num_requests)]
    return RequestSet(prompts, [draw(*new_tokens) for _ in range(num_requests)])


def bench_config(**overrides) -> ModelConfig:
    """~10.5M parameters: 8 layers of width 256, 8 heads over 4 KV heads, vocabulary 8192."""
    shape = dict(vocab_size=8192, d_model=256, num_layers=8, num_heads=8, num_kv_heads=4,
                 ffn_dim=768, max_seq_len=1024, name="bench-10m")
    return ModelConfig(**{**shape, **overrides})


def bench_model(config: ModelConfig, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(config).eval()


def to_huggingface(model: TransformerLM):
    """transformers' LlamaForCausalLM with `model`'s weights (same architecture, same names
    up to a renaming)."""
    import transformers

    cfg = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        hidden_act="silu", bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = model.state_dict()
    mapped = {name: ours[kvlib_name(name)] for name in hf.state_dict()}  # hf.py's renaming
    hf.load_state_dict(mapped, strict=True)
    return hf.to(model.embed.weight.dtype)


@torch.no_grad()
def hf_generate(hf, requests: RequestSet, batch_size: int) -> list[list[int]]:
    """Greedy outputs of transformers' generate, `batch_size` requests at a time, left-padded,
    each batch run to its longest request (static batching, with padding)."""
    outs: list[list[int]] = []
    for b0 in range(0, len(requests.prompts), batch_size):
        prompts = requests.prompts[b0:b0 + batch_size]
        lengths = requests.max_new_tokens[b0:b0 + batch_size]
        P = max(map(len, prompts))
        ids = torch.zeros(len(prompts), P, dtype=torch.int64)  # (B, P) left-padded
        mask = torch.zeros(len(prompts), P, dtype=torch.int64)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
        gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lengths),
                          min_new_tokens=max(lengths), do_sample=False, pad_token_id=0,
                          eos_token_id=None)  # (B, P + M)
        outs += [gen[i, P:P + n].tolist() for i, n in enumerate(lengths)]
    return outs


@torch.no_grad()
def hf_continuous(hf, requests: RequestSet, *, num_blocks: int, block_size: int = 16,
                  max_batch_tokens: int = 512) -> list[list[int]]:
    """Greedy outputs of transformers' own continuous batching (`ContinuousBatchingManager`:
    a paged cache of `num_blocks` pages of `block_size` tokens, chunked prefill within
    `max_batch_tokens`, attention as the model's implementation, SDPA here), every request
    with its own `max_new_tokens`, in the order given."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=max(requests.max_new_tokens),
                           eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(page_size=block_size, num_blocks=num_blocks,
                                  max_batch_tokens=max_batch_tokens, auto_switch_to_flash=False)
    results = {}
    with hf.continuous_batching_context_manager(generation_config=gen, warmup=False,
                                                continuous_batching_config=cb) as manager:
        ids = [manager.add_request(list(p), max_new_tokens=n)
               for p, n in zip(requests.prompts, requests.max_new_tokens)]
        while len(results) < len(ids):
            result = manager.get_result(timeout=60)
            if result is None:
                raise RuntimeError("transformers' continuous batching stopped before finishing")
            if result.is_finished():
                results[result.request_id] = result
    return [list(results[i].generated_tokens) for i in ids]


@dataclass(frozen=True)
class Trace:
    """One engine run fed by timed arrivals: per-step records and per-request outputs."""

    metrics: EngineMetrics
    outputs: list[RequestOutput]
    arrival_steps: list[int]
    num_blocks: int


def arrival_steps(num_requests: int, rate: float, seed: int = 0) -> list[int]:
    """Steps at which requests arrive: a Poisson process of `rate` requests per step
    (`rate = inf`: all at step 0)."""
    if rate == float("inf"):
        return [0] * num_requests
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num_requests):
        t += rng.expovariate(rate)
        out.append(int(t))
    return out


@torch.no_grad()
def run_trace(model: TransformerLM, requests: RequestSet, arrivals: Sequence[int], *,
              num_blocks: int, block_size: int = 16, max_num_batched_tokens: int = 256,
              max_num_seqs: int = 256, max_steps: int = 10_000) -> Trace:
    """Feed `requests` to a real engine, request i joining at step `arrivals[i]`, and step
    until all are done. Time is counted in steps, so the picture is the same on any machine."""
    engine = BatchedInferenceEngine(model, num_blocks, block_size, max_num_batched_tokens,
                                    max_num_seqs)
    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i])
    ids: dict[int, int] = {}
    k = 0
    for step in range(max_steps):
        while k < len(order) and arrivals[order[k]] <= step:
            i = order[k]
            ids[i] = engine.add_request(Request(requests.prompts[i], SamplingParams(),
                                                requests.max_new_tokens[i]))
            k += 1
        if k == len(order) and not engine.has_unfinished:
            break
        start = time.perf_counter()
        engine.step()
        engine.metrics.wall_s += time.perf_counter() - start
    outputs = [engine.output(ids[i]) for i in range(len(arrivals))]
    return Trace(engine.metrics, outputs, list(arrivals), num_blocks)


def step_latencies(trace: Trace) -> dict[str, list[int]]:
    """Per request, counted in engine steps: `queue` (arrival -> first scheduled), `ttft`
    (arrival -> the step that sampled its first token, inclusive), `latency` (arrival -> done)."""
    first_run: dict[int, int] = {}
    first_token: dict[int, int] = {}
    done: dict[int, int] = {}
    for s, rec in enumerate(trace.metrics.steps):
        for rid, kind, _ in rec.events:
            if kind in ("prefill", "decode"):
                first_run.setdefault(rid, s)
            elif kind == "first_token":
                first_token[rid] = s
            elif kind == "finish":
                done[rid] = s
    out: dict[str, list[int]] = {"queue": [], "ttft": [], "latency": []}
    for rid, a in enumerate(trace.arrival_steps):
        out["queue"].append(first_run[rid] - a)
        out["ttft"].append(first_token[rid] - a + 1)
        out["latency"].append(done[rid] - a + 1)
    return out


LENGTHS = {  # (prompt lens, new tokens): the chapter's two length distributions
    "uniform": ((16, 48), (8, 32)),
    "long tail": ((4, 96), (2, 64)),
}


def chapter_requests(kind: str, num_requests: int = 16, vocab_size: int = 128,
                     seed: int = 0) -> RequestSet:
    prompt_lens, new_tokens = LENGTHS[kind]
    return request_set(num_requests, vocab_size, prompt_lens, new_tokens, seed,
                       long_tail=kind == "long tail")


def tiny_model(seed: int = 0) -> TransformerLM:
    """The chapter's timeline model: schedules depend only on lengths, so it can be tiny."""
    return bench_model(ModelConfig(vocab_size=128, d_model=32, num_layers=1, num_heads=2,
                                   num_kv_heads=1, max_seq_len=512, name="tiny"), seed)


@dataclass(frozen=True)
class ScheduleTimes:
    """Wall-clock comparison of static and continuous batching on one request set."""

    static_tok_s: float
    continuous_tok_s: float
    static_ttft_s: list[float]
    continuous_ttft_s: list[float]
    static_latency_s: list[float]
    continuous_latency_s: list[float]


def time_schedules(model: TransformerLM, requests: RequestSet, *, batch_size: int,
                   num_blocks: int, block_size: int = 16,
                   max_num_batched_tokens: int = 256) -> ScheduleTimes:
    """Run the set once through each schedule (all requests arriving at once), timed, after
    an untimed warm-up of both on two short requests."""
    from kvlib.static_batching import static_generate

    # Warm up both paths (kernel compilation or loading, first-call allocations) untimed.
    warm = RequestSet(requests.prompts[:2], [2, 2])
    static_generate(model, warm.prompts, max_new_tokens=warm.max_new_tokens,
                    batch_size=batch_size, block_size=block_size, show_progress=False)
    BatchedInferenceEngine(model, num_blocks, block_size, max_num_batched_tokens).generate(
        warm.prompts, max_new_tokens=warm.max_new_tokens, show_progress=False)
    static = static_generate(model, requests.prompts, max_new_tokens=requests.max_new_tokens,
                             batch_size=batch_size, block_size=block_size, show_progress=False)
    engine = BatchedInferenceEngine(model, num_blocks, block_size, max_num_batched_tokens)
    cont = engine.generate(requests.prompts, max_new_tokens=requests.max_new_tokens,
                           show_progress=False)
    n = requests.num_new_tokens
    return ScheduleTimes(n / static.metrics.wall_s, n / cont.metrics.wall_s,
                         [o.ttft_s for o in static.outputs], [o.ttft_s for o in cont.outputs],
                         [o.latency_s for o in static.outputs],
                         [o.latency_s for o in cont.outputs])


def cache_bytes_per_block(model: TransformerLM, block_size: int,
                          quant: KVQuantConfig | None = None) -> int:
    """Bytes one block of the engine's cache takes, every layer, K and V: values in the
    model's dtype, or rows of codes and scales when `quant` is given.

    >>> from kvlib.cache.quantize import QuantScheme
    >>> tiny = tiny_model()      # 1 layer, 1 KV head of 16, fp32
    >>> int8 = QuantScheme("int8", "token")
    >>> cache_bytes_per_block(tiny, 8), cache_bytes_per_block(tiny, 8, KVQuantConfig(int8, int8))
    ...                                 # 16 codes + an fp16 scale per row
    (1024, 288)
    """
    cfg = model.config
    if quant is None:
        row = cfg.head_dim * model.embed.weight.element_size()
    else:
        row = max(row_layout(s, cfg.head_dim).row_bytes for s in (quant.keys, quant.values))
    return cfg.num_layers * 2 * cfg.num_kv_heads * block_size * row


def static_utilization(max_new_tokens: Sequence[int], batch_size: int) -> float:
    """Useful decode rows over all decode rows when batches of `batch_size` (in order) each
    run to their longest output: sum(M_i) / sum over batches of (B * max M_i).

    >>> static_utilization([4, 1, 1, 2], batch_size=2)   # (4 + 1 + 1 + 2) / (2*4 + 2*2)
    0.6666666666666666
    """
    lengths = list(max_new_tokens)
    rows = sum(len(lengths[b:b + batch_size]) * max(lengths[b:b + batch_size])
               for b in range(0, len(lengths), batch_size))
    return sum(lengths) / rows


@torch.no_grad()
def time_decode_batches(model: TransformerLM, batch_sizes: Sequence[int], context_len: int,
                        repeats: int = 7) -> dict[int, Timing]:
    """Median time of one decode step at each batch size, every sequence holding
    `context_len` tokens (a flat cache with room for the timed steps)."""
    out = {}
    for B in batch_sizes:
        cache = model.new_cache(B, context_len + repeats + 4)
        gen = torch.Generator().manual_seed(B)
        prompt = torch.randint(0, model.config.vocab_size, (B, context_len), generator=gen)
        model.prefill(prompt, cache)
        last = prompt[:, -1]  # (B,)
        out[B] = measure(functools.partial(model.decode_step, last, cache), warmup=2,
                         repeats=repeats)
    return out
