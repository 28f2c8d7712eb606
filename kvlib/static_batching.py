"""Static batching, the baseline continuous batching replaced: fixed batches, run to the end.

Requests are cut into batches of `batch_size` in arrival order. A batch prefills all its
prompts in one step, then decodes every member for as many steps as its *longest* request
needs; a member that is done keeps being fed (its outputs thrown away) because the batch is a
fixed rectangle, and the next batch starts only when the whole batch is done. Its cache is
reserved up front for the worst case of every member (longest prompt + longest output), as a
rectangular cache must be. It serves what the engine serves: every request whose prompt and
output fit the model's context (prompt + max_new_tokens - 1 positions); a finished member's
padding stops at the end of the context instead of running past it.

NOTE: kept generous on purpose: prompts are packed, not padded to the longest (the model's
packed path needs no padding), and decodes read the same paged cache with the same kernels as
the engine. What it loses is only what static batching loses: steps spent on finished
members, and requests waiting for a batch to drain. Hugging Face's `generate` on a padded
batch (bench/engine.py) is the same schedule with padding too.

Outputs and metrics have the engine's types (kvlib.engine), so the chapter draws both alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from kvlib.bench import progress
from kvlib.cache.paged import PagedKVCache
from kvlib.checks import require_int
from kvlib.config import CacheConfig
from kvlib.model import TransformerLM
from kvlib.outputs import EngineMetrics, GenerateResult, RequestOutput, StepRecord
from kvlib.sampling import SamplingBatch, SamplingParams, sample


@torch.no_grad()
def static_generate(model: TransformerLM, prompts: Sequence[Sequence[int]],
                    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                    max_new_tokens: int | Sequence[int] = 16, *, batch_size: int = 8,
                    block_size: int = 16, stop_token_ids: Sequence[int] = (),
                    show_progress: bool = True) -> GenerateResult:
    """Generate for every prompt in static batches of `batch_size`; one output per prompt.

    Every request is checked before anything runs (token ids, lengths, sampling parameters,
    room in the model's context), so a call that fails has generated nothing.
    """
    require_int("batch_size", batch_size, minimum=1)
    require_int("block_size", block_size, minimum=1)
    n = len(prompts)
    prompts = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    samplings = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
    if isinstance(max_new_tokens, Sequence) and not isinstance(max_new_tokens, str):
        lengths = list(max_new_tokens)
    else:  # one for every request (checked below: an int, not a bool)
        lengths = [max_new_tokens] * n
    if n == 0 or len(samplings) != n or len(lengths) != n or min(map(len, prompts)) < 1:
        raise ValueError(f"need >= 1 non-empty prompts with one sampling and max_new_tokens "
                         f"each; got {n} prompts, {len(samplings)} sampling params, "
                         f"{len(lengths)} max_new_tokens")
    _check_requests(model, prompts, samplings, lengths, stop_token_ids)
    weight = model.embed.weight
    longest = max(map(len, prompts)) + max(lengths)
    cache = PagedKVCache(CacheConfig.for_model(
        model.config, max_batch_size=batch_size, max_seq_len=model.config.max_seq_len,
        dtype=weight.dtype, device=weight.device, block_size=block_size),
        num_blocks=batch_size * -(-longest // block_size))  # the worst-case reservation
    metrics = EngineMetrics()
    outputs: list[RequestOutput | None] = [None] * n
    start = time.perf_counter()  # every request arrives at once
    starts = range(0, n, batch_size)
    for b0 in progress(starts, desc="static batches", enabled=show_progress, total=len(starts)):
        members = list(range(b0, min(n, b0 + batch_size)))
        _run_batch(model, cache, prompts, samplings, lengths, set(stop_token_ids), members,
                   start, metrics, outputs)
    metrics.wall_s = time.perf_counter() - start
    return GenerateResult([o for o in outputs if o is not None], metrics)


def _check_requests(model: TransformerLM, prompts: list[list[int]],
                    samplings: list[SamplingParams], lengths: list[int],
                    stop_token_ids: Sequence[int]) -> None:
    vocab, context = model.config.vocab_size, model.config.max_seq_len
    for i, (prompt, params, n) in enumerate(zip(prompts, samplings, lengths)):
        for t in prompt:
            require_int(f"prompt {i}'s token ids", t, minimum=0, maximum=vocab - 1)
        require_int(f"max_new_tokens of request {i}", n, minimum=1)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling of request {i} must be SamplingParams, got {params!r}")
        if len(prompt) + n - 1 > context:  # the last new token is never fed back
            raise ValueError(f"request {i}: a {len(prompt)}-token prompt plus {n} new tokens "
                             f"needs {len(prompt) + n - 1} positions; the model has {context}")
    for t in stop_token_ids:
        require_int("each stop token id", t, minimum=0, maximum=vocab - 1)


def _run_batch(model, cache, prompts, samplings, lengths, stops, members, t0, metrics,
               outputs) -> None:
    device = model.embed.weight.device
    out: list[list[int]] = [[] for _ in members]
    done = [False] * len(members)
    reasons = ["length"] * len(members)
    first_token_s = [0.0] * len(members)
    batch_start = time.perf_counter()
    num_steps = max(lengths[i] for i in members)  # NOTE: the longest member sets the pace
    ids = list(range(len(members)))
    context = model.config.max_seq_len
    for step in range(num_steps):
        step_start = time.perf_counter()
        if step == 0:
            fed = ids
            lens = [len(prompts[i]) for i in members]
            token_ids = torch.tensor([t for i in members for t in prompts[i]], device=device)
        else:
            # Finished members are fed too (the batch is a rectangle), but only while the
            # token fed, at position len(prompt) + step - 1, stays inside the context.
            fed = [j for j in ids if not done[j] or len(prompts[members[j]]) + step <= context]
            lens = [1] * len(fed)
            token_ids = torch.tensor([out[j][-1] for j in fed], device=device)  # (B',)
        hidden = model.packed_hidden_states(token_ids, lens, cache, fed)  # (N, d)
        last = torch.tensor(lens).cumsum(0) - 1  # (B',) row of each member's last token
        logits = model.lm_head(hidden[last.to(device)]).float()  # (B', V)
        rows = SamplingBatch.make([samplings[members[j]] for j in fed], [len(out[j]) for j in fed],
                                  logits.shape[-1], device)
        picked = sample(logits, rows).tolist()  # (B',) one read; finished members' ignored
        now = time.perf_counter()
        events = []
        for row, j in enumerate(fed):
            i = members[j]
            if done[j]:
                out[j].append(out[j][-1])  # padding, thrown away below
                events.append((i, "pad", 1))
                continue
            token = picked[row]
            out[j].append(token)
            metrics.num_generated_tokens += 1
            if step == 0:
                first_token_s[j] = now
            events.append((i, "prefill" if step == 0 else "decode", lens[row]))
            if token in stops or len(out[j]) >= lengths[i]:
                done[j] = True
                reasons[j] = "stop" if token in stops else "length"
                events.append((i, "finish", len(out[j])))
        metrics.steps.append(StepRecord(
            len(metrics.steps), sum(lens), len(fed), 0 if step == 0 else len(fed),
            sum(lens) if step == 0 else 0, cache.num_used_blocks, 0,
            now - step_start, tuple(events)))
    cache.release(ids)
    end = time.perf_counter()
    for j, i in enumerate(members):
        toks = out[j][:next(t + 1 for t in range(len(out[j])) if out[j][t] in stops
                            or t + 1 >= lengths[i])]  # (padding dropped)
        outputs[i] = RequestOutput(
            i, tuple(prompts[i]), toks, reasons[j],
            batch_start - t0, first_token_s[j] - t0,
            (end - first_token_s[j]) / (len(toks) - 1) if len(toks) > 1 else 0.0,
            end - t0, 0, 0)  # NOTE: the answer leaves only when the whole batch is done
