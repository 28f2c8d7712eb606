"""Which tokens a shrunken cache keeps: windows, sinks, and eviction by attention score.

A cache that may hold only B tokens per layer and KV head must choose which. The choices in
use, and the names they go by:

    window        the last B tokens (a sliding window: Mistral's layers, vLLM, transformers)
    sinks         the first k tokens and the last B - k (StreamingLLM's attention sinks)
    h2o           the last B/2 tokens, plus the B/2 earlier ones with the most attention
                  accumulated over every query so far, chosen per KV head (H2O, "heavy
                  hitters")
    snapkv        the last w prompt tokens (the observation window), plus the earlier ones
                  those w queries attend to most, smoothed by max-pooling over neighbours,
                  chosen per KV head (SnapKV)

and two moments to choose: once, when the prompt is in ("prompt": the cache of a P-token
prompt is cut to B tokens; what is generated after is all kept), or at every step ("decode":
the cache never holds more than B, so each new token pushes one out).

The functions here decide, for one layer, what each query sees: `visible[h, t, j]` is True
when key j is in KV head h's cache as query t attends (the query's own key included). The
model-level experiment (`kvlib.experiments.shrink`) runs a whole model with these masks;
for sinks plus a window the result equals kvlib's paged cache with that window and those
sinks, which really frees the blocks (tests/test_eviction.py).

Paging. A paged cache frees memory a whole block at a time, and a block holds every KV head's
keys of the same BS tokens. A choice made per head frees a block only if every head of every
layer sharing the block table dropped all of its tokens: `freeable_blocks` counts them.
`shared_blocks` makes one choice of whole blocks for every head and layer instead.

Worked example: B = 4 with k = 1 sink: query 5 sees the sink and the last 3 keys.

>>> sinks_and_window(6, budget=4, sink_tokens=1)[5].int().tolist()
[1, 0, 0, 1, 1, 1]

Legend: Hkv KV heads, G query heads per KV head, S tokens, P prompt tokens, L layers,
BS block size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from kvlib.checks import require_int

try:
    import numba
except ImportError:  # pragma: no cover - a dependency; this keeps kvlib importable without it
    numba = None

SCORERS = ("h2o", "snapkv")


def sinks_and_window(num_tokens: int, budget: int, sink_tokens: int = 0,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """(S, S) bool: query t sees keys j <= t that are among the first `sink_tokens` or the
    last `budget - sink_tokens` (the query's own included); every key while t < budget."""
    require_int("budget", budget, minimum=1)
    require_int("sink_tokens", sink_tokens, minimum=0, maximum=budget - 1)
    t = torch.arange(num_tokens, device=device)[:, None]  # (S, 1)
    j = torch.arange(num_tokens, device=device)[None, :]  # (1, S)
    recent = j > t - (budget - sink_tokens)  # (S, S)
    return (j <= t) & (recent | (j < sink_tokens))


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max over each position's `kernel` neighbours (SnapKV's pooling: a token next to an
    important one is kept with it, so kept spans are whole phrases, not single tokens).

    >>> pool_scores(torch.tensor([[0., 0., 5., 0., 0., 0.]]), 3).tolist()
    [[0.0, 5.0, 5.0, 5.0, 0.0, 0.0]]
    """
    if kernel <= 1:
        return scores
    return F.max_pool1d(scores[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]  # (Hkv, S)


def _keep_top(scores: torch.Tensor, num: int, protected: torch.Tensor) -> torch.Tensor:
    """(Hkv, S) bool: the protected positions plus the `num` best-scored others, per head."""
    free = scores.masked_fill(protected, float("-inf"))  # (Hkv, S)
    keep = protected.expand_as(scores).clone()  # (Hkv, S)
    num = min(num, scores.shape[-1] - int(protected.sum()))  # no more than there are
    if num > 0:
        keep.scatter_(1, free.topk(num, dim=1).indices, True)
    return keep


def prompt_scores(probs: torch.Tensor, scorer: str, observation: int = 32) -> torch.Tensor:
    """(Hkv, P) how much the prompt's queries attend to each prompt token, summed over each
    KV head's G query heads: every query (h2o) or the last `observation` (snapkv).

    probs: (Hkv, G, P, P) a layer's attention probabilities over the prompt.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    rows = probs if scorer == "h2o" else probs[:, :, -observation:]  # (Hkv, G, n, P)
    return rows.sum(dim=(1, 2))  # (Hkv, P)


def compress_prompt(probs: torch.Tensor, budget: int, scorer: str, observation: int = 32,
                    pool: int = 7) -> torch.Tensor:
    """(Hkv, P) bool: the B prompt tokens each KV head keeps, chosen from the prompt's own
    attention `probs` (Hkv, G, P, P). h2o protects the last B/2 tokens, snapkv its
    observation window (pooling its scores); the rest of B go to the best-scored tokens."""
    Hkv, _, P, _ = probs.shape
    require_int("budget", budget, minimum=1)
    if budget >= P:
        return torch.ones(Hkv, P, dtype=torch.bool, device=probs.device)
    scores = prompt_scores(probs, scorer, observation)  # (Hkv, P)
    if scorer == "snapkv":
        scores, recent = pool_scores(scores, pool), min(observation, budget)
    else:
        recent = budget // 2
    protected = torch.arange(P, device=probs.device) >= P - recent  # (P,)
    return _keep_top(scores, budget - recent, protected)


def shared_blocks(scores: torch.Tensor, budget: int, block_size: int,
                  recent: int = 0) -> torch.Tensor:
    """(P,) bool: whole blocks kept for every layer and head, so a paged cache frees the
    rest: the blocks holding the last `recent` tokens, then the blocks with the most score
    (summed over layers, heads and the block's tokens) while B tokens' worth of blocks last.

    scores: (L, Hkv, P) per-head token scores (e.g. `prompt_scores` of each layer).

    >>> s = torch.tensor([[[0., 9., 0., 0., 1., 1., 0., 0.]]])
    >>> shared_blocks(s, budget=4, block_size=2, recent=2).int().tolist()
    [1, 1, 0, 0, 0, 0, 1, 1]
    """
    P = scores.shape[-1]
    num_blocks = -(-P // block_size)
    token_scores = scores.sum(dim=(0, 1))  # (P,)
    padded = F.pad(token_scores, (0, num_blocks * block_size - P))  # (NBp * BS,)
    block_scores = padded.view(num_blocks, block_size).sum(1)  # (NBp,)
    allowed = min(budget // block_size, num_blocks)
    first_recent = max(P - recent, 0) // block_size  # blocks from here on hold recent tokens
    first_recent = max(first_recent, num_blocks - allowed)  # no more than the budget allows
    protected = torch.arange(num_blocks, device=scores.device) >= first_recent
    kept = _keep_top(block_scores[None], allowed - int(protected.sum()), protected)[0]
    return kept.repeat_interleave(block_size)[:P]  # (P,)


def evict_while_decoding(logits: torch.Tensor, budget: int, scorer: str,
                         observation: int = 32, pool: int = 7) -> torch.Tensor:
    """(Hkv, S, S) bool: what each query sees when every step evicts one token per KV head
    once the cache holds B (the query's own included), by attention score.

    h2o: score = attention accumulated over every query since the token arrived; the last
    B/2 tokens are never evicted. snapkv: score = attention from the last `observation`
    queries, max-pooled; the last `observation` tokens are never evicted. What each query
    attends to depends on what earlier steps kept, so this runs step by step: compiled
    (numba, `_evict_compiled`) where it can, else `evict_while_decoding_reference`; the two
    agree (tests/test_eviction.py).

    logits: (Hkv, G, S, S) one layer's scaled scores q.k / sqrt(D) (future keys ignored).
    """
    recent = _check_decoding(logits, budget, scorer, observation)
    if numba is None:
        return evict_while_decoding_reference(logits, budget, scorer, observation, pool)
    dtype = np.float64 if logits.dtype == torch.float64 else np.float32
    visible = _evict_compiled(logits.detach().cpu().numpy().astype(dtype, copy=False), budget,
                              recent, observation, pool, scorer == "snapkv")
    return torch.from_numpy(visible).to(logits.device)  # (Hkv, S, S)


def _check_decoding(logits: torch.Tensor, budget: int, scorer: str, observation: int) -> int:
    """Check the arguments; the number of most recent tokens that are never evicted."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    require_int("budget", budget, minimum=2)
    require_int("observation", observation, minimum=1)
    if logits.dim() != 4 or logits.shape[2] != logits.shape[3]:
        raise ValueError(f"logits must be (Hkv, G, S, S), got {tuple(logits.shape)}")
    return budget // 2 if scorer == "h2o" else min(observation, budget - 1)


def evict_while_decoding_reference(logits: torch.Tensor, budget: int, scorer: str,
                                   observation: int = 32, pool: int = 7) -> torch.Tensor:
    """`evict_while_decoding` step by step in plain torch: the definition."""
    recent = _check_decoding(logits, budget, scorer, observation)
    Hkv, G, S, _ = logits.shape
    visible = torch.zeros(Hkv, S, S, dtype=torch.bool, device=logits.device)
    kept = torch.zeros(Hkv, S, dtype=torch.bool, device=logits.device)  # (Hkv, S)
    total = torch.zeros(Hkv, S, dtype=logits.dtype, device=logits.device)  # h2o's sums
    rows = torch.zeros(Hkv, S, S, dtype=logits.dtype, device=logits.device)  # snapkv's rows
    for t in range(S):
        kept[:, t] = True
        visible[:, t] = kept
        n = t + 1
        probs = logits[:, :, t, :n].masked_fill(~kept[:, None, :n], float("-inf"))
        attn = probs.softmax(-1).sum(1)  # (Hkv, n): this query's attention, summed over G
        if scorer == "h2o":
            total[:, :n] += attn
            scores = total[:, :n]
        else:
            rows[:, t, :n] = attn
            scores = pool_scores(rows[:, max(0, n - observation):n, :n].sum(1), pool)  # (Hkv, n)
        if int(kept[0].sum()) < budget:  # every head holds the same count
            continue
        # NOTE: the cache is full (B tokens with this query): drop one so the next query's
        # own key fits. Candidates are kept and older than the protected recent tokens.
        candidates = kept[:, :n].clone()
        candidates[:, max(0, n - recent):] = False
        worst = scores.masked_fill(~candidates, float("inf")).argmin(1)  # (Hkv,)
        kept[torch.arange(Hkv, device=logits.device), worst] = False
    return visible


if numba is not None:

    @numba.njit(cache=True, parallel=True)
    def _evict_compiled(logits, budget, recent, observation, pool, windowed):  # pragma: no cover
        # The reference's loop, one KV head per thread (heads choose independently).
        Hkv, G, S = logits.shape[0], logits.shape[1], logits.shape[2]
        visible = np.zeros((Hkv, S, S), np.bool_)
        half = pool // 2 if pool > 1 else 0
        for h in numba.prange(Hkv):
            kept = np.zeros(S, np.bool_)
            total = np.zeros(S)  # h2o: accumulated attention; snapkv: the window's sum
            rows = np.zeros((observation, S))  # snapkv: the last `observation` rows, a ring
            attn, e, scores = np.zeros(S), np.zeros(S), np.zeros(S)
            count = 0
            for t in range(S):
                # -- step 1: the new key joins; this query sees what is kept --
                kept[t] = True
                count += 1
                n = t + 1
                visible[h, t, :n] = kept[:n]
                # -- step 2: its attention over what is kept, summed over the group --
                attn[:n] = 0.0
                for g in range(G):
                    m = -np.inf
                    for j in range(n):
                        if kept[j] and logits[h, g, t, j] > m:
                            m = logits[h, g, t, j]
                    z = 0.0
                    for j in range(n):
                        e[j] = math.exp(logits[h, g, t, j] - m) if kept[j] else 0.0
                        z += e[j]
                    for j in range(n):
                        attn[j] += e[j] / z
                # -- step 3: scores (h2o: every query so far; snapkv: the last few, pooled) --
                if windowed:
                    slot = t % observation
                    for j in range(n):
                        total[j] += attn[j] - rows[slot, j]  # the row leaving the window out
                        rows[slot, j] = attn[j]
                    for j in range(n):
                        best = -np.inf
                        for i in range(max(0, j - half), min(n, j + half + 1)):
                            best = max(best, total[i])
                        scores[j] = best
                else:
                    for j in range(n):
                        total[j] += attn[j]
                        scores[j] = total[j]
                # -- step 4: a full cache drops its lowest-scored candidate --
                if count < budget:
                    continue
                worst, low = -1, np.inf
                for j in range(max(0, n - recent)):
                    if kept[j] and scores[j] < low:
                        worst, low = j, scores[j]
                kept[worst] = False
                count -= 1
        return visible


def freeable_blocks(kept: torch.Tensor, block_size: int) -> float:
    """The share of a paged sequence's blocks that can be freed when each head keeps its own
    tokens: a block goes only if no layer and no head keeps any of its tokens.

    kept: (L, Hkv, P) bool, True where a layer's head keeps the token.

    Two heads keeping different halves of 4 tokens, blocks of 2: nothing can be freed,
    though half of each head's keys are gone.

    >>> freeable_blocks(torch.tensor([[[1, 1, 0, 0], [0, 0, 1, 1]]], dtype=torch.bool), 2)
    0.0
    """
    P = kept.shape[-1]
    used = kept.any(dim=0).any(dim=0)  # (P,) kept by someone
    num_blocks = -(-P // block_size)
    padded = F.pad(used, (0, num_blocks * block_size - P))  # (NBp * BS,)
    return float((~padded.view(num_blocks, block_size).any(1)).float().mean())
