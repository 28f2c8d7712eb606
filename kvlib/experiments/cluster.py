"""Serving on several GPUs, simulated: kvlib's own scheduler and block manager, steps priced.

A replica here is the engine without the model: the real `Scheduler` deciding each step's
batch over a real `BlockManager` (admission, chunked prefill, preemption, prefix caching:
exactly what `BatchedInferenceEngine` does), and a step cost model (`StepCosts`) instead of
the forward pass. Time is simulated; the costs come from measurement (`fit_step_costs`, from
an engine run on this machine) or from the roofline of a GPU (`RooflineStepCosts`). Tokens
are made up -- scheduling and caching depend only on lengths and prefixes.

Three set-ups, each a list of replicas fed by a trace of timed requests:

- `serve_colocated`: n replicas behind a router (kvlib.routing), each prefilling and
  decoding its own requests;
- `serve_disaggregated`: one replica prefills (to the first token), then each request's cache
  crosses a link (`transfer_s(prompt_len)` seconds) to a replica that only decodes.

A `Served` result gives per request the time to first token (TTFT), the mean time per
output token after it (TPOT), the prompt tokens found in the prefix cache, and the makespan.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from kvlib.analysis import Hardware, dtype_bytes, kv_bytes_per_token, param_count
from kvlib.cache.block_manager import BlockManager
from kvlib.cache.groups import CacheGroup
from kvlib.config import ModelConfig
from kvlib.outputs import EngineMetrics
from kvlib.routing import Router
from kvlib.scheduler import Request, ScheduledStep, Scheduler, SequenceState, Status


# -- what a step costs -------------------------------------------------------------------------
class StepCosts(Protocol):
    def seconds(self, plan: ScheduledStep) -> float:
        """The duration of one step running `plan`."""
        ...


@dataclass(frozen=True)
class LinearStepCosts:
    """fixed + per prefill token + per decoding sequence: fitted from measured steps."""

    fixed_s: float
    per_prefill_token_s: float
    per_decode_s: float

    def seconds(self, plan: ScheduledStep) -> float:
        decodes = sum(1 for s, _ in plan.entries if s.is_decoding)
        return (self.fixed_s + self.per_prefill_token_s * (plan.num_tokens - decodes)
                + self.per_decode_s * decodes)


def fit_step_costs(metrics: EngineMetrics) -> LinearStepCosts:
    """Least squares of measured step durations on (1, prefill tokens, decode tokens)."""
    steps = [s for s in metrics.steps if s.num_tokens]
    x = np.array([[1.0, s.num_prefill_tokens, s.num_decode_tokens] for s in steps])  # (n, 3)
    y = np.array([s.duration_s for s in steps])  # (n,)
    coef = np.linalg.lstsq(x, y, rcond=None)[0].clip(min=0.0)  # (3,)
    return LinearStepCosts(*map(float, coef))


@dataclass(frozen=True)
class RooflineStepCosts:
    """A GPU's step, from its roofline: the slower of the FLOPs at `mfu` of peak and the bytes
    (every weight once, each sequence's cache once) at the memory bandwidth, plus `fixed_s`
    (launches, the host's work)."""

    model: ModelConfig
    gpu: Hardware
    mfu: float = 0.5
    fixed_s: float = 2e-3
    dtype: str = "bf16"

    def seconds(self, plan: ScheduledStep) -> float:
        cfg = self.model
        P = param_count(cfg) - cfg.vocab_size * cfg.d_model  # the embedding is a lookup
        kv, b = kv_bytes_per_token(cfg, self.dtype), dtype_bytes(self.dtype)
        pairs = sum(n * (s.num_computed_tokens + (n + 1) / 2) for s, n in plan.entries)
        flops = (2 * P * plan.num_tokens
                 + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs)
        read = P * b + kv * sum(s.num_computed_tokens + n
                                               for s, n in plan.entries)
        return self.fixed_s + max(flops / (self.gpu.peak_flops * self.mfu),
                                  read / self.gpu.bandwidth)


# -- traces ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimedRequest:
    arrival_s: float
    request: Request  # made once per trace: a long prompt's ids are checked once

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.request.prompt_ids


def poisson_arrivals(n: int, rate_per_s: float, rng: random.Random) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        out.append(t)
    return out


def shared_prefix_trace(num_requests: int, rate_per_s: float, *, num_prefixes: int,
                        prefix_len: int, suffix_len: int, max_new_tokens: int,
                        seed: int = 0) -> list[TimedRequest]:
    """Each prompt: one of `num_prefixes` shared prefixes (a system prompt, a document),
    drawn uniformly, then `suffix_len` tokens of its own."""
    rng, tokens = random.Random(seed), np.random.default_rng(seed)
    prefixes = [_draw(tokens, prefix_len) for _ in range(num_prefixes)]
    return [TimedRequest(t, Request(rng.choice(prefixes) + _draw(tokens, suffix_len),
                                    max_new_tokens=max_new_tokens))
            for t in poisson_arrivals(num_requests, rate_per_s, rng)]


def uniform_trace(num_requests: int, rate_per_s: float, prompt_len: int,
                  max_new_tokens: int, seed: int = 0) -> list[TimedRequest]:
    """Prompts of `prompt_len` tokens, nothing shared, Poisson arrivals."""
    rng, tokens = random.Random(seed), np.random.default_rng(seed)
    return [TimedRequest(t, Request(_draw(tokens, prompt_len), max_new_tokens=max_new_tokens))
            for t in poisson_arrivals(num_requests, rate_per_s, rng)]


def _draw(tokens: np.random.Generator, n: int) -> tuple[int, ...]:
    return tuple(tokens.integers(0, 1 << 20, n).tolist())  # made-up token ids


# -- a replica -------------------------------------------------------------------------------
@dataclass
class _Times:
    arrival_s: float
    first_token_s: float | None = None
    finish_s: float | None = None
    num_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class SimReplica:
    """The engine's scheduling and caching, with time advanced by `costs`."""

    costs: StepCosts
    num_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_seq_len: int = 1 << 14
    prefix_caching: bool = True  # False: blocks are never named by their tokens (faster)
    clock: float = 0.0
    inbox: list = field(default_factory=list)  # heap of (time, order, seq, kind)
    busy_s: float = 0.0

    def __post_init__(self) -> None:
        self.manager = BlockManager([CacheGroup(layers=(0,))], self.num_blocks,
                                    self.block_size, self.max_seq_len)
        self.scheduler = Scheduler(self.manager, self.max_num_batched_tokens,
                                   self.max_num_seqs)
        self._order = 0

    @property
    def load(self) -> int:
        """Requests in flight here: arrived or on their way, not finished."""
        return len(self.inbox) + len(self.scheduler.waiting) + len(self.scheduler.running)

    def has_work(self) -> bool:
        return self.scheduler.has_work

    def next_event_s(self) -> float:
        """When this replica next does something: now if it has work, else its next input."""
        if self.has_work():
            return self.clock
        return self.inbox[0][0] if self.inbox else float("inf")

    def put(self, at_s: float, seq: SequenceState, kind: str) -> None:
        """Deliver `seq` at `at_s`: 'new' joins the waiting queue; 'decode' (its prompt's
        cache arriving from a prefill replica) joins the running list once it fits."""
        longest = seq.num_tokens + seq.request.max_new_tokens - len(seq.output_ids) - 1
        self.manager.check_fits_alone(longest, self.max_num_batched_tokens)  # or raises
        heapq.heappush(self.inbox, (at_s, self._order, seq, kind))
        self._order += 1

    def _take_inbox(self, times: dict[int, _Times]) -> None:
        while self.inbox and self.inbox[0][0] <= self.clock:
            _, _, seq, kind = self.inbox[0]
            if kind == "decode":
                n = seq.num_computed_tokens
                if len(self.scheduler.running) >= self.max_num_seqs or not (
                        self.manager.allocate(seq.seq_id, n)):
                    return  # NOTE: first come, first served: later deliveries wait too
                self.manager.commit(seq.seq_id, n, self._named(seq, 0, n))
                self.scheduler.add_running(seq)
                # NOTE: its first token streams from here: TTFT includes the transfer
                times[seq.seq_id].first_token_s = self.clock
            else:
                self.scheduler.add(seq)
            heapq.heappop(self.inbox)

    def _named(self, seq: SequenceState, start: int, n: int) -> list[int] | None:
        return _tokens(seq, start, n) if self.prefix_caching else None

    def step(self, times: dict[int, _Times], on_first_token: Callable | None = None) -> None:
        """One step at the replica's clock (or a jump to its next input when idle)."""
        self._take_inbox(times)
        if not self.has_work():
            self.clock = max(self.clock, self.next_event_s())
            return
        plan = self.scheduler.schedule()
        if not plan.entries:  # waiting for room to come back from elsewhere
            self.clock = max(self.clock, min(self.next_event_s(), self.clock + 1e-3))
            return
        duration = self.costs.seconds(plan)
        self.clock += duration
        self.busy_s += duration
        for seq in plan.admitted:
            times[seq.seq_id].cached_tokens = seq.num_cached_tokens
        for seq, n in plan.entries:
            self.manager.commit(seq.seq_id, n, self._named(seq, seq.num_computed_tokens, n))
            seq.num_computed_tokens += n
            if seq.num_pending_tokens:
                continue
            seq.output_ids.append(len(seq.output_ids))  # a made-up token
            t = times[seq.seq_id]
            t.num_tokens = len(seq.output_ids)
            if t.first_token_s is None:
                t.first_token_s = self.clock
                if on_first_token is not None and len(seq.output_ids) < seq.request.max_new_tokens:
                    on_first_token(self, seq)
                    continue
            if len(seq.output_ids) >= seq.request.max_new_tokens:
                t.finish_s = self.clock
                self.scheduler.finish(seq, "length")


def _tokens(seq: SequenceState, start: int, n: int) -> list[int]:
    """seq.token_ids[start:start + n] without building the whole list (a long prompt's
    decode steps would copy it every step)."""
    prompt = seq.request.prompt_ids
    head = list(prompt[start:start + n])
    return head + seq.output_ids[max(0, start - len(prompt)):start + n - len(prompt)]


# -- set-ups ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    ttft_s: list[float]
    tpot_s: list[float]
    cached_tokens: int
    prompt_tokens: int
    generated_tokens: int
    makespan_s: float
    busy_s: list[float]  # per replica

    @property
    def hit_rate(self) -> float:
        """Prompt tokens found in a prefix cache over all prompt tokens."""
        return self.cached_tokens / max(1, self.prompt_tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.makespan_s


def _run(replicas: list[SimReplica], trace: Sequence[TimedRequest],
         choose: Callable[[TimedRequest], int], on_first_token: Callable | None = None) -> Served:
    times: dict[int, _Times] = {}
    arrivals = sorted(range(len(trace)), key=lambda i: trace[i].arrival_s)
    k = 0
    while True:
        nxt = min(replicas, key=lambda r: r.next_event_s())
        t_next = nxt.next_event_s()
        if k < len(arrivals) and trace[arrivals[k]].arrival_s <= t_next:
            r = trace[arrivals[k]]
            seq = SequenceState(arrivals[k], r.request, arrival_s=r.arrival_s)
            times[seq.seq_id] = _Times(r.arrival_s)
            replicas[choose(r)].put(r.arrival_s, seq, "new")
            k += 1
        elif t_next == float("inf"):
            break
        else:
            nxt.step(times, on_first_token)
    done = list(times.values())
    assert all(t.finish_s is not None for t in done), "a request never finished"
    return Served(
        [t.first_token_s - t.arrival_s for t in done],
        [(t.finish_s - t.first_token_s) / (t.num_tokens - 1) for t in done if t.num_tokens > 1],
        sum(t.cached_tokens for t in done), sum(len(r.prompt_ids) for r in trace),
        sum(t.num_tokens for t in done),
        max(t.finish_s for t in done) - min(t.arrival_s for t in done),
        [r.busy_s for r in replicas])


def serve_colocated(trace: Sequence[TimedRequest], replicas: Sequence[SimReplica],
                    router: Router) -> Served:
    """Each request routed at its arrival (loads as they stand then) to one replica."""
    reps = list(replicas)
    return _run(reps, trace, lambda r: router.route(r.prompt_ids, [x.load for x in reps]))


def serve_disaggregated(trace: Sequence[TimedRequest], prefill: SimReplica,
                        decode: SimReplica, transfer_s: Callable[[int], float]) -> Served:
    """Prefill on one replica, decode on the other; a request's cache takes
    `transfer_s(tokens)` to cross, then waits for room on the decode side."""

    def hand_over(replica: SimReplica, seq: SequenceState) -> None:
        replica.scheduler.remove(seq)
        replica.manager.release([seq.seq_id])
        seq.status = Status.WAITING
        decode.put(replica.clock + transfer_s(seq.num_computed_tokens), seq, "decode")

    return _run([prefill, decode], trace, lambda r: 0, hand_over)
