"""The scheduler: which sequences run in the next step, and how many tokens each feeds.

A waiting queue and a running list (vLLM's and nano-vllm's design), over any cache that
answers the `KVCacheManager` protocol (kvlib.contract): a paged cache, a quantized one over
paged blocks, windowed or mixed groups. The scheduler never sees block tables or pools: it
asks the cache for room (`allocate`, which checks and allocates in one call, changing
nothing when it says no) and takes the answer. Every step has a token budget,
`max_num_batched_tokens`, shared by everything it runs:

1. decodes: each running sequence whose tokens are all in the cache but its newest feeds that
   one token (oldest admitted first);
2. chunks: running sequences still prefilling (a long prompt cut into chunks, or a preempted
   sequence being recomputed) feed as many tokens as the budget allows;
3. admissions: waiting sequences join, front of the queue first, each with a chunk of its
   prompt, while the budget, the cache's room and `max_num_seqs` allow.

When the cache has no room for a running sequence's tokens (a decode needs a new block and
none is free), the most recently admitted running sequence is preempted and goes back to the
front of the waiting queue. How is a policy's choice (kvlib.preemption): by default its blocks
are freed, and when it is admitted again its prompt *and the tokens it already generated* are
recomputed as one long prefill; a swapping policy copies its blocks to host memory instead,
and resuming copies them back. Either way it goes on sampling from where it stopped, so its
output does not change. A waiting sequence with computed tokens is one a policy kept: it is
resumed through the policy, not admitted afresh.

Worked example (block size 4, token budget 6): sequence A is decoding, and a 9-token prompt B
waits. Step 1: A feeds 1 token; B is admitted with a chunk of 5 (its first 5 tokens, 2 blocks).
Step 2: A feeds 1; B feeds its other 4, and the row of its last prompt token gives its first
new token. Step 3: both feed 1.

>>> Request([1, 2, 3], max_new_tokens=2).prompt_ids
(1, 2, 3)
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from kvlib.cache.block_manager import SequenceBlocks
from kvlib.cache.storage import BlockData
from kvlib.checks import require_int
from kvlib.contract import KVCacheManager
from kvlib.preemption import PreemptionPolicy, Recompute
from kvlib.sampling import SamplingParams


@dataclass(frozen=True)
class Request:
    """What a client asks for: continue `prompt_ids` by up to `max_new_tokens` tokens,
    stopping early after any token in `stop_token_ids` (which is kept in the output)."""

    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()

    def __init__(self, prompt_ids, sampling: SamplingParams = SamplingParams(),
                 max_new_tokens: int = 16, stop_token_ids=()) -> None:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.reshape(-1).tolist()
        object.__setattr__(self, "prompt_ids", _token_ids("prompt_ids", prompt_ids))
        object.__setattr__(self, "sampling", sampling)
        object.__setattr__(self, "max_new_tokens", max_new_tokens)
        object.__setattr__(self, "stop_token_ids", _token_ids("stop_token_ids", stop_token_ids))


def _token_ids(name: str, ids) -> tuple[int, ...]:
    """Integers only (numpy and torch integer scalars too): 2.7 is not a token id."""
    try:
        return tuple(operator.index(t) for t in ids)
    except TypeError:
        raise ValueError(f"{name} must be integer token ids, got {list(ids)!r}") from None


@dataclass(frozen=True)
class Handoff:
    """A decoding request on its way to another engine: everything it needs to go on."""

    request: Request
    output_ids: tuple[int, ...]  # generated so far (the newest one not in the cache yet)
    blocks: SequenceBlocks  # its cache blocks, as the manager exported them
    # per cache group (L_g, 2, n, Hkv, BS, D), with (L_g, 2, n, Hkv, BS) scales beside codes
    data: tuple[BlockData, ...]
    # NOTE: no random state moves: a seeded request's draws are hashed from its seed and
    # len(output_ids) (kvlib.sampling.sample), both in the handoff already.

    @property
    def nbytes(self) -> int:
        """Bytes of cache data that move (what a link carries; the rest is a few ints)."""
        return sum(t.nbytes for d in self.data for t in ((d,) if isinstance(d, torch.Tensor)
                                                          else d))


class Status(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SequenceState:
    """One request inside the engine: its tokens so far and how many the cache holds."""

    seq_id: int
    request: Request
    arrival_s: float
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose keys and values are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "length" or "stop"
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache, over all admissions
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def token_ids(self) -> list[int]:
        """Prompt then generated tokens: what the cache must hold before the next sample."""
        return [*self.request.prompt_ids, *self.output_ids]

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens not in the cache yet: 1 while decoding, more while (re)prefilling."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        return bool(self.output_ids) and self.num_pending_tokens == 1


@dataclass
class ScheduledStep:
    """The plan of one step: (sequence, tokens it feeds) in batch order, and what changed."""

    entries: list[tuple[SequenceState, int]] = field(default_factory=list)
    admitted: list[SequenceState] = field(default_factory=list)  # resumed ones included
    preempted: list[SequenceState] = field(default_factory=list)
    swapped: list[SequenceState] = field(default_factory=list)  # preempted, tokens kept
    num_cached_tokens: int = 0  # prompt tokens the admitted ones found in the prefix cache

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.entries)


class Scheduler:
    """Decides each step's batch; owns the waiting queue and the running list."""

    def __init__(self, cache: KVCacheManager, max_num_batched_tokens: int,
                 max_num_seqs: int, preemption: PreemptionPolicy | None = None) -> None:
        self.cache = cache
        self.preemption = Recompute() if preemption is None else preemption
        self.preemption.check(cache)
        self.max_num_batched_tokens = require_int("max_num_batched_tokens",
                                                  max_num_batched_tokens, minimum=1)
        self.max_num_seqs = require_int("max_num_seqs", max_num_seqs, minimum=1)
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []  # NOTE: admission order; preemption takes the last

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: SequenceState) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: SequenceState) -> None:
        """A sequence whose computed tokens the cache already holds (imported from another
        engine) joins the running list; it decodes in the next step."""
        if len(self.running) >= self.max_num_seqs:
            raise ValueError(f"{len(self.running)} sequences are running: max_num_seqs "
                             f"{self.max_num_seqs} leaves no room for sequence {seq.seq_id}")
        seq.status = Status.RUNNING
        self.running.append(seq)

    def remove(self, seq: SequenceState) -> None:
        """Take a running sequence out of the plan; its blocks are the caller's to free
        (the engine frees them once another engine holds the sequence)."""
        if seq not in self.running:
            raise ValueError(f"sequence {seq.seq_id} is {seq.status.value}, not running")
        self.running.remove(seq)

    # -- planning ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        """The next step's batch. Every sequence in it already holds room for the tokens it
        feeds (allocated here), so the step itself cannot run out of blocks."""
        plan = ScheduledStep()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        # 1. Decodes first: a running sequence waiting for one token is the cheapest progress
        # there is, and holding its blocks while it waits would waste them.
        # 2. Then chunks of running prefills, as much as the budget allows.
        decoding = [s for s in self.running if s.is_decoding]
        prefilling = [s for s in self.running if not s.is_decoding]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_pending_tokens, budget)
            while (not self.cache.allocate(seq.seq_id, seq.num_computed_tokens + n)
                   and self._preempt_for(seq, plan, scheduled)):
                pass
            if seq.status is Status.RUNNING:
                plan.entries.append((seq, n))
                scheduled.add(seq.seq_id)
                budget -= n
        # 3. Admissions. NOTE: none in a step that preempted: the freed blocks are what the
        # running sequences need next, and admitting into them would only preempt again.
        while (self.waiting and budget > 0 and not plan.preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            n = self._admit_chunk(seq, budget, plan)
            if n == 0:
                break  # NOTE: first come, first served: a later, smaller request never jumps ahead
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.entries.append((seq, n))
            plan.admitted.append(seq)
            budget -= n
        return plan

    def _admit_chunk(self, seq: SequenceState, budget: int, plan: ScheduledStep) -> int:
        """Give `seq` its cached prefix (or what its preemption kept) and room for its first
        chunk; 0 (and no change) if the cache cannot hold that chunk."""
        if seq.num_computed_tokens > 0:  # kept by the preemption policy: bring it back
            n = min(seq.num_pending_tokens, budget)
            done = seq.num_computed_tokens
            return n if self.preemption.resume(self.cache, seq.seq_id, done, done + n) else 0
        # NOTE: admit always leaves at least the last token to compute, even when every
        # block is cached: that token's logits choose the next new token.
        cached = self.cache.admit(seq.seq_id, seq.token_ids)
        n = min(seq.num_tokens - cached, budget)
        if not self.cache.allocate(seq.seq_id, cached + n):
            self.cache.release([seq.seq_id])  # the cached blocks go back to the free queue
            return 0
        seq.num_computed_tokens = cached
        seq.num_cached_tokens += cached
        plan.num_cached_tokens += cached
        return n

    # -- changes of state ----------------------------------------------------------------------
    def _preempt_for(self, seq: SequenceState, plan: ScheduledStep, scheduled: set[int]) -> bool:
        """Preempt the most recently admitted running sequence not yet in this step's batch
        (possibly `seq` itself); True while `seq` still runs and may try again.

        NOTE: this always ends: the oldest running sequence can preempt every other one, and
        alone it fits (add_request refuses a request the whole cache could not hold).
        """
        victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
        self._preempt(victim, plan)
        return victim is not seq

    def _preempt(self, seq: SequenceState, plan: ScheduledStep) -> None:
        """Free `seq`'s device blocks (the policy may keep its tokens elsewhere) and queue
        it first.

        NOTE: the most recently admitted goes: it has done the least work (least to
        recompute), and the oldest requests, waiting longest, keep going.
        """
        self.running.remove(seq)
        seq.num_computed_tokens = self.preemption.preempt(self.cache, seq.seq_id,
                                                          seq.num_computed_tokens)
        if seq.num_computed_tokens:
            plan.swapped.append(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)  # NOTE: first back in, so it is not starved by newcomers
        plan.preempted.append(seq)

    def finish(self, seq: SequenceState, reason: str) -> None:
        """Done: free its blocks now, so the next step can use them."""
        self.running.remove(seq)
        self.cache.release([seq.seq_id])
        seq.status, seq.finish_reason = Status.FINISHED, reason
