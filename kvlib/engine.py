"""The batched inference engine: continuous batching over a paged KV cache.

    engine = BatchedInferenceEngine(model, num_blocks=256, max_num_batched_tokens=256)
    result = engine.generate(prompts, SamplingParams(), max_new_tokens=32)
    result.outputs[0].token_ids, result.metrics.tokens_per_s

Each `step()` asks the scheduler (kvlib.scheduler) for a batch -- decodes, chunks of
prompts, newly admitted prompts -- packs every sequence's new tokens into one `(N,)` tensor,
runs it through `TransformerLM.packed_hidden_states` (no padding; each sequence attends only
to its own keys, read from its blocks), and samples one token for every sequence whose tokens
are now all in the cache. A sequence that is done releases its blocks at once, so the next
step can admit a waiting one: the batch changes every step instead of waiting for its slowest
member (static batching, kvlib.static_batching).

Exactness. Each request has its own random generator, seeded from its `SamplingParams`, and
draws from it once per new token on its own `(1, V)` logits -- what `TransformerLM.generate`
does for that request alone -- so batching, chunking, preemption and prefix reuse change
nothing a request sees (up to float rounding of a different batch; the tests use float64).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvlib.bench import progress
from kvlib.cache.paged import PagedKVCache
from kvlib.checks import is_int, require_int
from kvlib.config import CacheConfig
from kvlib.model import TransformerLM
from kvlib.sampling import SamplingParams, sample_next
from kvlib.scheduler import Request, ScheduledStep, Scheduler, Status
from kvlib.scheduler import Sequence as Seq


@dataclass(frozen=True)
class StepRecord:
    """What one step did; `events` are (request_id, kind, tokens) with kind one of
    'admit' (tokens: found in the prefix cache), 'prefill' (a chunk), 'decode', 'preempt',
    'first_token', 'finish' (tokens: generated in all)."""

    step: int
    num_tokens: int
    num_seqs: int
    num_decode_tokens: int
    num_prefill_tokens: int
    num_used_blocks: int  # after the step
    num_waiting: int  # after the step
    duration_s: float
    events: tuple[tuple[int, str, int], ...]


@dataclass(frozen=True)
class RequestOutput:
    request_id: int
    prompt_ids: tuple[int, ...]
    token_ids: list[int]
    finish_reason: str  # "length" or "stop"
    queue_s: float  # arrival -> first scheduled
    ttft_s: float  # arrival -> first new token
    tpot_s: float  # mean time per output token after the first (0 for one token)
    latency_s: float  # arrival -> finished
    num_preemptions: int
    num_cached_tokens: int  # prompt tokens reused from the prefix cache


@dataclass
class EngineMetrics:
    steps: list[StepRecord] = field(default_factory=list)
    wall_s: float = 0.0
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_prefix_hit_tokens: int = 0  # prompt tokens not recomputed thanks to the prefix cache

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time."""
        return self.num_generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        return sum(s.num_tokens for s in self.steps) / max(1, len(self.steps))

    @property
    def mean_seqs_per_step(self) -> float:
        return sum(s.num_seqs for s in self.steps) / max(1, len(self.steps))

    @property
    def used_blocks_per_step(self) -> list[int]:
        return [s.num_used_blocks for s in self.steps]


@dataclass(frozen=True)
class GenerateResult:
    outputs: list[RequestOutput]  # in the order the prompts were given
    metrics: EngineMetrics


class BatchedInferenceEngine:
    """Continuous batching with chunked prefill, preemption by recomputation, prefix reuse.

    Args:
        model: a TransformerLM (any dtype and device; its `attention` backend is used).
        num_blocks: KV cache blocks in the pool (the memory budget).
        block_size: tokens per block.
        max_num_batched_tokens: the token budget of one step (decodes + prompt chunks).
        max_num_seqs: most sequences running at once.
    """

    def __init__(self, model: TransformerLM, num_blocks: int, block_size: int = 16,
                 max_num_batched_tokens: int = 256, max_num_seqs: int = 256) -> None:
        self.model = model
        weight = model.embed.weight
        self.cache = PagedKVCache(CacheConfig.for_model(
            model.config, max_batch_size=1, max_seq_len=model.config.max_seq_len,
            dtype=weight.dtype, device=weight.device, block_size=block_size),
            num_blocks=num_blocks)
        self.scheduler = Scheduler(self.cache, max_num_batched_tokens, max_num_seqs)
        self.metrics = EngineMetrics()
        self._seqs: dict[int, Seq] = {}
        self._next_id = 0
        self._num_steps = 0

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request: Request | Sequence[int] | torch.Tensor,
                    sampling: SamplingParams | None = None, max_new_tokens: int | None = None,
                    stop_token_ids: Sequence[int] = ()) -> int:
        """Validate and queue a request; returns its id. Raises ValueError, queuing nothing."""
        if not isinstance(request, Request):
            request = Request(request, sampling or SamplingParams(),
                              16 if max_new_tokens is None else max_new_tokens, stop_token_ids)
        self._validate(request)
        seq = Seq(self._next_id, request, request.sampling.generator(self.model.embed.weight.device),
                  arrival_s=time.perf_counter())
        self._next_id += 1
        self._seqs[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq.seq_id

    def _validate(self, r: Request) -> None:
        cfg, V = self.model.config, self.model.config.vocab_size
        if not r.prompt_ids:
            raise ValueError("empty prompt: a request needs at least one prompt token")
        bad = [t for t in r.prompt_ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")
        bad = [t for t in r.stop_token_ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary [0, {V})")
        if not is_int(r.max_new_tokens) or r.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {r.max_new_tokens!r}")
        s = r.sampling
        if not isinstance(s, SamplingParams):
            raise ValueError(f"sampling must be SamplingParams, got {type(s).__name__}")
        if not s.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {s.temperature}")
        if not 0.0 < s.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {s.top_p}")
        # NOTE: the last new token is never fed back, so it needs no position and no slot.
        longest = len(r.prompt_ids) + r.max_new_tokens - 1
        if longest > cfg.max_seq_len:
            raise ValueError(f"a {len(r.prompt_ids)}-token prompt plus {r.max_new_tokens} new "
                             f"tokens needs {longest} positions; the model has {cfg.max_seq_len}")
        blocks = -(-longest // self.cache.block_size)
        if blocks > self.cache.num_blocks:
            # NOTE: refused now, or it would preempt everyone and itself forever.
            raise ValueError(f"a {len(r.prompt_ids)}-token prompt plus {r.max_new_tokens} new "
                             f"tokens needs {blocks} blocks of {self.cache.block_size}; the whole "
                             f"pool has {self.cache.num_blocks}")

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[int]:
        """Run one iteration; returns the ids of the requests that finished in it."""
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        events: list[tuple[int, str, int]] = [(s.seq_id, "preempt", 0) for s in plan.preempted]
        finished: list[int] = []
        n_dec = sum(n for s, n in plan.entries if s.is_decoding)  # before the step moves them
        if plan.entries:
            finished = self._run(plan, start, events)
        self.metrics.num_preemptions += len(plan.preempted)
        self.metrics.num_prefix_hit_tokens += plan.num_cached_tokens
        self.metrics.steps.append(StepRecord(
            self._num_steps, plan.num_tokens, len(plan.entries), n_dec, plan.num_tokens - n_dec,
            self.cache.allocator.num_used_blocks, len(self.scheduler.waiting),
            time.perf_counter() - start, tuple(events)))
        self._num_steps += 1
        return finished

    def _run(self, plan: ScheduledStep, start: float, events: list) -> list[int]:
        device = self.model.embed.weight.device
        admitted = {s.seq_id for s in plan.admitted}
        pieces, lens, ids = [], [], []
        for seq, n in plan.entries:
            done = seq.num_computed_tokens
            pieces.append(seq.token_ids[done:done + n])
            lens.append(n)
            ids.append(seq.seq_id)
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = start
            if seq.seq_id in admitted:
                events.append((seq.seq_id, "admit", seq.num_computed_tokens))
            events.append((seq.seq_id, "decode" if seq.is_decoding else "prefill", n))
        token_ids = torch.tensor([t for p in pieces for t in p], dtype=torch.int64,
                                 device=device)  # (N,)
        hidden = self.model.packed_hidden_states(token_ids, lens, self.cache, ids)  # (N, d)
        # Only a sequence whose tokens are now all in the cache samples: the row of its last
        # token. A chunk that ends inside the prompt samples nothing.
        rows, samplers = [], []
        cu = 0
        for (seq, n) in plan.entries:
            cu += n
            seq.num_computed_tokens += n
            if seq.num_pending_tokens == 0:
                rows.append(cu - 1)
                samplers.append(seq)
        if not rows:
            return []
        logits = self.model.lm_head(hidden[rows]).float()  # (K, V), as generate computes them
        now = time.perf_counter()
        finished = []
        for i, seq in enumerate(samplers):
            # NOTE: one (1, V) draw from the request's own generator per token, exactly as
            # generate does for it alone: a batch never shifts anyone's random stream.
            token = int(sample_next(logits[i:i + 1], seq.request.sampling, seq.generator)[0])
            seq.output_ids.append(token)
            if seq.first_token_s is None:
                seq.first_token_s = now
                events.append((seq.seq_id, "first_token", 1))
            reason = ("stop" if token in seq.request.stop_token_ids else
                      "length" if len(seq.output_ids) >= seq.request.max_new_tokens else None)
            if reason is not None:
                seq.finish_s = now
                self.scheduler.finish(seq, reason)  # NOTE: blocks freed now, not at batch end
                events.append((seq.seq_id, "finish", len(seq.output_ids)))
                finished.append(seq.seq_id)
        self.metrics.num_generated_tokens += len(samplers)
        return finished

    # -- running a set -------------------------------------------------------------------------
    def _steps(self) -> Iterator[int]:
        while self.has_unfinished:
            yield len(self.step())

    def run(self, show_progress: bool = True) -> EngineMetrics:
        """Step until every queued request is finished; returns the engine's metrics."""
        start = time.perf_counter()
        bar = progress(self._steps(), desc="engine steps", enabled=show_progress)
        for _ in bar:
            pass
        self.metrics.wall_s += time.perf_counter() - start
        return self.metrics

    def output(self, request_id: int) -> RequestOutput:
        seq = self._seqs[require_int("request_id", request_id, minimum=0)]
        if seq.status is not Status.FINISHED:
            raise ValueError(f"request {request_id} is {seq.status.value}, not finished")
        n = len(seq.output_ids)
        return RequestOutput(
            seq.seq_id, seq.request.prompt_ids, list(seq.output_ids), seq.finish_reason,
            seq.first_scheduled_s - seq.arrival_s, seq.first_token_s - seq.arrival_s,
            (seq.finish_s - seq.first_token_s) / (n - 1) if n > 1 else 0.0,
            seq.finish_s - seq.arrival_s, seq.num_preemptions, seq.num_cached_tokens)

    def generate(self, prompts: Sequence[Sequence[int] | torch.Tensor],
                 sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 max_new_tokens: int | Sequence[int] = 16, stop_token_ids: Sequence[int] = (),
                 show_progress: bool = True) -> GenerateResult:
        """Run `prompts` to completion; one output per prompt, in order, and the metrics."""
        n = len(prompts)
        samplings = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
        lengths = [max_new_tokens] * n if is_int(max_new_tokens) else list(max_new_tokens)
        if len(samplings) != n or len(lengths) != n:
            raise ValueError(f"{n} prompts but {len(samplings)} sampling params and "
                             f"{len(lengths)} max_new_tokens")
        ids = [self.add_request(Request(p, s, m, stop_token_ids))
               for p, s, m in zip(prompts, samplings, lengths)]
        metrics = self.run(show_progress)
        return GenerateResult([self.output(i) for i in ids], metrics)
