"""The batched inference engine: continuous batching over any paged KV cache.

    engine = BatchedInferenceEngine(model, num_blocks=256, max_num_batched_tokens=256)
    result = engine.generate(prompts, SamplingParams(), max_new_tokens=32)
    result.outputs[0].token_ids, result.metrics.tokens_per_s

The engine builds a `PagedKVCache` shaped for the model (its windowed and global layers in
groups of their own), or, with `quant=`, a `QuantizedKVCache` over one; or it takes any cache
that answers the `KVCacheManager` protocol (`cache=`), checked against the model's layers
before anything runs.

Each `step()` asks the scheduler (kvlib.scheduler) for a batch -- decodes, chunks of
prompts, newly admitted prompts -- packs every sequence's new tokens into one `(N,)` tensor,
runs it through `TransformerLM.packed_hidden_states` (no padding; each sequence attends only
to its own keys, read from its blocks), and samples one token for every sequence whose tokens
are now all in the cache. A sequence that is done releases its blocks at once, so the next
step can admit a waiting one: the batch changes every step instead of waiting for its slowest
member (static batching, kvlib.static_batching).

Exactness. A step samples all its rows at once (`kvlib.sampling.sample`), and a seeded
request's random numbers are a hash of its seed and the number of tokens it generated before
-- what `TransformerLM.generate` draws for that request alone -- so batching, chunking,
preemption and prefix reuse change nothing a request sees (up to float rounding of a
different batch; the tests use float64).

Moving requests. `export_request` takes a decoding request out of the engine with its blocks
(`PagedKVCache.export_sequence`), a `Handoff`; `import_request` puts it
into another engine, which goes on decoding it: the prefill engine hands over to the decode
engine (kvlib.distributed.disaggregation). A `preemption` policy (kvlib.preemption) chooses
between recomputing a preempted request and swapping its blocks to host memory.

Host and device. A step reads one tensor back to the host: the tokens it sampled, all at
once. Everything else (which sequences run, their lengths, the cache's tables) is known on
the host, and the step's index tensors reach the device in one copy (`StepBuilder`), its
sampling parameters in another (`SamplingBatch`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import torch

from kvlib.bench import progress
from kvlib.cache.paged import PagedKVCache
from kvlib.cache.quant_memory import KVQuantConfig
from kvlib.cache.quantized import QuantizedKVCache
from kvlib.checks import is_int, require_int
from kvlib.contract import KVCache, KVCacheManager
from kvlib.cuda_graphs import DecodeGraphs
from kvlib.model import TransformerLM
from kvlib.outputs import EngineMetrics, GenerateResult, RequestOutput, StepRecord
from kvlib.preemption import PreemptionPolicy
from kvlib.sampling import SamplingBatch, SamplingParams, sample
from kvlib.scheduler import Handoff, Request, ScheduledStep, Scheduler, SequenceState, Status


class BatchedInferenceEngine:
    """Continuous batching with chunked prefill, preemption by recomputation, prefix reuse.

    Args:
        model: a TransformerLM (any dtype and device; its `attention` backend is used).
        num_blocks: KV cache blocks in the pool of each cache group (the memory budget),
            when the engine builds its cache.
        block_size: tokens per block, when the engine builds its cache.
        max_num_batched_tokens: the token budget of one step (decodes + prompt chunks).
        max_num_seqs: most sequences running at once.
        preemption: how a preempted sequence is set aside (kvlib.preemption): recomputed
            (the default), or swapped to host memory (a cache with a host tier).
        quant: store the cache quantized in any scheme of chapter 5 (a `QuantizedKVCache`
            over the paged blocks, dequantized on read).
        kv_cache_dtype: "int8" or "fp8_e4m3": a paged cache of codes and per-row scales,
            read in place by the fused kernels (`CacheConfig.kv_cache_dtype`).
        cache: instead of `num_blocks`/`block_size`/`quant`, a cache to serve from: any
            `KVCache` that answers `KVCacheManager` (paged, or quantized over paged), empty.
        cuda_graphs: replay pure decode steps from graphs captured per batch-size bucket
            (kvlib.cuda_graphs). False (default): every step eager. True: a real CUDA graph
            when the cache is on a CUDA device (a paged cache, attention "fast" or
            "triton"); elsewhere the same bucketed steps on persistent buffers, re-run
            instead of replayed. Off unless asked for: graphs are checked against eager
            steps by tests/test_cuda_graphs.py, whose real capture runs only on a GPU.
    """

    def __init__(self, model: TransformerLM, num_blocks: int | None = None,
                 block_size: int = 16, max_num_batched_tokens: int = 256,
                 max_num_seqs: int = 256, *, quant: KVQuantConfig | None = None,
                 kv_cache_dtype: str = "auto", cache: KVCache | None = None,
                 preemption: PreemptionPolicy | None = None,
                 cuda_graphs: bool = False) -> None:
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        self.model = model
        if cache is None:
            if num_blocks is None:
                raise ValueError("give num_blocks (the engine builds a paged cache) or a cache")
            if quant is not None and kv_cache_dtype != "auto":
                raise ValueError("give quant (any scheme, dequantized on read) or "
                                 "kv_cache_dtype (codes the kernels read), not both")
            config = model.cache_config(1, model.config.max_seq_len, block_size=block_size,
                                        kv_cache_dtype=kv_cache_dtype)
            cache = PagedKVCache(config, num_blocks) if quant is None else QuantizedKVCache(
                config, quant, lambda c: PagedKVCache(c, num_blocks))
        elif num_blocks is not None or quant is not None or kv_cache_dtype != "auto":
            raise ValueError("give either a cache or num_blocks/quant/kv_cache_dtype to build "
                             "one, not both")
        if not (isinstance(cache, KVCache) and isinstance(cache, KVCacheManager)):
            raise ValueError(f"the engine serves from a cache with blocks to manage (a "
                             f"PagedKVCache, or a QuantizedKVCache over one); got "
                             f"{type(cache).__name__}")
        model.check_cache(cache)  # windows, sinks, shapes, dtype: before anything runs
        self.cache = cache
        self.scheduler = Scheduler(cache, max_num_batched_tokens, max_num_seqs, preemption)
        on_cuda = torch.device(cache.config.device).type == "cuda"
        self.graphs = DecodeGraphs(model, cache, min(max_num_seqs, max_num_batched_tokens),
                                   use_cuda_graphs=on_cuda) if cuda_graphs else None
        self.metrics = EngineMetrics()
        self._seqs: dict[int, SequenceState] = {}
        self._next_id = 0
        self._num_steps = 0

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request: Request | Sequence[int] | torch.Tensor,
                    sampling: SamplingParams | None = None, max_new_tokens: int | None = None,
                    stop_token_ids: Sequence[int] = ()) -> int:
        """Validate and queue a request; returns its id. Raises ValueError, queuing nothing."""
        request = self._request(request, sampling, max_new_tokens, stop_token_ids)
        return self._queue(request)

    def _request(self, request, sampling, max_new_tokens, stop_token_ids) -> Request:
        if not isinstance(request, Request):
            request = Request(request, SamplingParams() if sampling is None else sampling,
                              16 if max_new_tokens is None else max_new_tokens, stop_token_ids)
        self._validate(request)
        return request

    def _queue(self, request: Request) -> int:
        seq = SequenceState(self._next_id, request, arrival_s=time.perf_counter())
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
        # NOTE: checked again here, not only when the params were made: a frozen dataclass
        # can still be changed with object.__setattr__, and a bad value would fail mid-step.
        if not (isinstance(s.temperature, int | float) and not isinstance(s.temperature, bool)
                and math.isfinite(s.temperature) and s.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 and finite, got {s.temperature!r}")
        if not (isinstance(s.top_p, int | float) and not isinstance(s.top_p, bool)
                and 0.0 < s.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {s.top_p!r}")
        if s.top_k is not None and not (is_int(s.top_k) and s.top_k >= 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {s.top_k!r}")
        # NOTE: the last new token is never fed back, so it needs no position and no slot.
        longest = len(r.prompt_ids) + r.max_new_tokens - 1
        if longest > cfg.max_seq_len:
            raise ValueError(f"a {len(r.prompt_ids)}-token prompt plus {r.max_new_tokens} new "
                             f"tokens needs {longest} positions; the model has {cfg.max_seq_len}")
        # NOTE: refused now, or it would preempt everyone and itself forever.
        try:
            self.cache.check_fits_alone(longest, self.scheduler.max_num_batched_tokens)
        except ValueError as err:
            raise ValueError(f"a {len(r.prompt_ids)}-token prompt plus {r.max_new_tokens} new "
                             f"tokens cannot fit in this engine's cache: {err}") from None

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[int]:
        """Run one iteration; returns the ids of the requests that finished in it."""
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        events: list[tuple[int, str, int]] = [(s.seq_id, "preempt", s.num_computed_tokens)
                                              for s in plan.preempted]
        finished: list[int] = []
        n_dec = sum(n for s, n in plan.entries if s.is_decoding)  # before the step moves them
        if plan.entries:
            finished = self._run(plan, start, events)
        self.metrics.num_preemptions += len(plan.preempted)
        self.metrics.num_swaps += len(plan.swapped)
        self.metrics.num_prefix_hit_tokens += plan.num_cached_tokens
        self.metrics.steps.append(StepRecord(
            self._num_steps, plan.num_tokens, len(plan.entries), n_dec, plan.num_tokens - n_dec,
            self.cache.num_used_blocks, len(self.scheduler.waiting),
            time.perf_counter() - start, tuple(events)))
        self._num_steps += 1
        return finished

    def _run(self, plan: ScheduledStep, start: float, events: list) -> list[int]:
        device = self.model.embed.weight.device
        admitted = {s.seq_id for s in plan.admitted}
        tokens, lens, ids = [], [], []
        for seq, n in plan.entries:
            done = seq.num_computed_tokens
            tokens += seq.token_ids[done:done + n]
            lens.append(n)
            ids.append(seq.seq_id)
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = start
            if seq.seq_id in admitted:
                events.append((seq.seq_id, "admit", seq.num_computed_tokens))
            events.append((seq.seq_id, "decode" if seq.is_decoding else "prefill", n))
        batch = self.cache.begin(ids, lens, tokens)  # room was allocated by the scheduler
        replay = self.graphs is not None and self.graphs.accepts(batch)
        try:
            token_ids = torch.tensor(tokens, dtype=torch.int64, device=device)  # (N,)
            if replay:  # a pure decode step: every row samples, logits from the graph
                logits = self.graphs.run(token_ids, batch)  # (B, V)
            else:
                hidden = self.model.forward_batch(token_ids, batch, self.cache)  # (N, d)
            self.cache.commit(batch)
        except BaseException:
            # NOTE: the cache is as it was, and every sequence keeps its place and its room:
            # the next step plans again, so one failed step loses no request.
            self.cache.abort(batch)
            raise
        # Only a sequence whose tokens are now all in the cache samples: the row of its last
        # token. A chunk that ends inside the prompt samples nothing.
        rows, samplers = [], []
        for (seq, n), end in zip(plan.entries, batch.query_starts[1:]):
            seq.num_computed_tokens += n
            if seq.num_pending_tokens == 0:
                rows.append(end - 1)
                samplers.append(seq)
        if not rows:
            return []
        if not replay:
            logits = self.model.lm_head(hidden[rows]).float()  # (K, V), as generate does
        sampling = SamplingBatch.make([s.request.sampling for s in samplers],
                                      [len(s.output_ids) for s in samplers],
                                      logits.shape[-1], logits.device)
        picked = sample(logits, sampling).tolist()  # the step's one read from the device
        now = time.perf_counter()
        finished = []
        for seq, token in zip(samplers, picked):
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

    # -- moving a request to another engine ------------------------------------------------------
    def export_request(self, request_id: int) -> Handoff:
        """A copy of a decoding request, blocks included, for another
        engine; it keeps running here until `remove_request` (once the other has it).
        Raises ValueError unless it runs with all its tokens but the newest cached."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not Status.RUNNING or not seq.is_decoding:
            raise ValueError(f"request {request_id} is not a decoding request of this engine")
        blocks, data = self.cache.export_sequence(seq.seq_id)
        return Handoff(seq.request, tuple(seq.output_ids), blocks, tuple(data))

    def remove_request(self, request_id: int) -> None:
        """Forget a running request and free its blocks (another engine decodes it now)."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not Status.RUNNING:
            raise ValueError(f"request {request_id} is not running in this engine")
        self.scheduler.remove(seq)
        self.cache.release([seq.seq_id])
        del self._seqs[request_id]

    def import_request(self, handoff: Handoff) -> int:
        """Go on decoding a request another engine exported; returns its id here. Raises
        ValueError, changing nothing, when it does not fit (room, block size, dtype, heads)
        or does not add up (its blocks must hold every token but the newest)."""
        request = self._request(handoff.request, None, None, ())
        held = len(request.prompt_ids) + len(handoff.output_ids) - 1
        if not handoff.output_ids or handoff.blocks.length != held:
            raise ValueError(f"a handoff's blocks hold {handoff.blocks.length} tokens; a "
                             f"decoding request with {len(handoff.output_ids)} new tokens "
                             f"holds {held}")
        if len(self.scheduler.running) >= self.scheduler.max_num_seqs:
            raise ValueError(f"max_num_seqs {self.scheduler.max_num_seqs} sequences already "
                             f"run in this engine")
        self.cache.import_sequence(self._next_id, handoff.blocks, handoff.data)  # or raises
        now = time.perf_counter()
        seq = SequenceState(self._next_id, request, arrival_s=now,
                            output_ids=list(handoff.output_ids), num_computed_tokens=held,
                            first_scheduled_s=now, first_token_s=now)
        self._next_id += 1
        self._seqs[seq.seq_id] = seq
        self.scheduler.add_running(seq)
        return seq.seq_id

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
        require_int("request_id", request_id, minimum=0)
        if request_id not in self._seqs:
            raise ValueError(f"unknown request {request_id}: this engine has requests "
                             f"0..{self._next_id - 1}")
        seq = self._seqs[request_id]
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
        # NOTE: every request is checked before any is queued, so a bad one queues nothing.
        requests = [self._request(Request(p, s, m, stop_token_ids), None, None, ())
                    for p, s, m in zip(prompts, samplings, lengths)]
        ids = [self._queue(r) for r in requests]
        metrics = self.run(show_progress)
        return GenerateResult([self.output(i) for i in ids], metrics)
