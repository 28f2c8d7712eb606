"""What the engine reports: a record per step, an output per request, and their metrics.

`BatchedInferenceEngine` (kvlib.engine) and the static baseline (kvlib.static_batching) fill
the same records, so chapters and benchmarks compare the two schedules field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EngineMetrics", "GenerateResult", "RequestOutput", "StepRecord"]


@dataclass(frozen=True)
class StepRecord:
    """What one step did; `events` are (request_id, kind, tokens) with kind one of
    'admit' (tokens: found in the prefix cache, or kept by a swap), 'prefill' (a chunk),
    'decode', 'preempt' (tokens: kept in host memory, 0 when dropped), 'first_token',
    'finish' (tokens: generated in all)."""

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
    num_swaps: int = 0  # preemptions that kept the tokens in host memory (not recomputed)
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
