"""Chapter 9's measurements: a trained model reading held-out text through a shrunken cache.

`run` passes a whole token sequence through a Llama-style `TransformerLM` with every layer's
attention restricted to what a cache policy (`kvlib.eviction`) keeps: query t of KV head h
sees key j only if `visible[h, t, j]`. That is what decoding the sequence one token at a
time through an evicting cache computes (teacher-forced), in one pass per layer instead of S
steps; for a static policy (sinks plus a window) tests/test_shrink.py checks it against
kvlib's paged cache with that window and those sinks, and with nothing evicted against the
model itself.

Two variations a policy may ask for:
- cache positions (StreamingLLM): keys rotated at their slot in the cache instead of their
  position in the text. With sinks plus a window only the sinks' distances change: query t
  sits at slot n - 1 (n keys visible), a sink j at slot j.
- a quantized rest: what the policy would evict is kept quantized (`rest`), not dropped.

Two readings of the full cache's attention, head by head: the attention sink
(`first_token_attention`) and the heads that copy (`copying_heads`).

Legend: S tokens, P prompt tokens, L layers, H heads, Hkv KV heads, G = H / Hkv, D head
dim, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvlib import eviction
from kvlib.cache.quantize import QuantScheme, bits_per_value, fake_quantize
from kvlib.model import TransformerLM, apply_rotary, rotary_cos_sin

REGIMES = ("decode", "prompt")
KEEPS = ("window", "h2o", "snapkv")
BLOCK_SIZE = 16  # kvlib's default block: the unit a paged cache frees
OBSERVATION = 32  # SnapKV's observation window (the last 32 prompt tokens vote)


@dataclass(frozen=True)
class Policy:
    """What a shrunken cache keeps (`keep`: "window", "h2o" or "snapkv") and how.

    `sink_tokens` with "window" is StreamingLLM; `cache_positions` rotates keys at their slot
    in the cache; `shared_blocks` chooses whole blocks for every head and layer (the prompt
    regime); `rest` keeps what would be evicted in that quantized format instead.
    """

    name: str
    keep: str
    sink_tokens: int = 0
    cache_positions: bool = False
    shared_blocks: bool = False
    rest: QuantScheme | None = None

    def __post_init__(self) -> None:
        if self.keep not in KEEPS:
            raise ValueError(f"Policy.keep must be one of {KEEPS}, got {self.keep!r}")
        if (self.sink_tokens or self.cache_positions) and self.keep != "window":
            raise ValueError(f"{self.name}: sinks and cache positions go with keep='window'")
        if self.shared_blocks and self.keep == "window":
            raise ValueError(f"{self.name}: shared blocks are chosen by score (h2o, snapkv)")

    def bytes_ratio(self, head_dim: int) -> float:
        """Bytes of a token kept the `rest` way against one kept in full (0: evicted)."""
        return 0.0 if self.rest is None else bits_per_value(self.rest, head_dim) / 16


# The rest kept in INT4 (asymmetric, a scale and a zero point per 32 channels): KIVI's and
# MiKV's kind of format, 5 bits per value against fp16's 16.
INT4_G32 = QuantScheme("int4", "token", group_size=32, symmetric=False)
POLICIES = {p.name: p for p in [
    Policy("window", "window"),
    Policy("sinks + window", "window", sink_tokens=4),
    Policy("sinks + window, cache positions", "window", sink_tokens=4, cache_positions=True),
    Policy("H2O", "h2o"),
    Policy("SnapKV", "snapkv"),
    Policy("SnapKV, whole blocks", "snapkv", shared_blocks=True),
    Policy("sinks + window, INT4 rest", "window", sink_tokens=4, rest=INT4_G32),
]}


def full_budget(policy: Policy, fraction: float, num_tokens: int, head_dim: int) -> int | None:
    """Tokens kept in full precision so that the cache's bytes are `fraction` of keeping all
    `num_tokens` in full; None when the policy cannot get that small (a quantized rest of
    ratio r costs at least r). Evicting policies: round(fraction * num_tokens); never fewer
    than the sinks and two more."""
    r = policy.bytes_ratio(head_dim)
    if fraction < r - 1e-9:
        return None
    tokens = round(num_tokens * (fraction - r) / (1 - r))
    return max(policy.sink_tokens + 2, min(num_tokens, tokens))


@dataclass(frozen=True)
class Run:
    """A sequence read through a policy: logits, and what each layer's heads kept."""

    logits: torch.Tensor  # (S, V) float32 (float64 for a float64 model): after each token
    kept: torch.Tensor  # (L, Hkv, S) bool: what each layer's heads hold after the last token


def _visible(policy: Policy, logits: torch.Tensor, budget: int, regime: str, prompt_len: int,
             shared: torch.Tensor | None) -> torch.Tensor:
    """(Hkv, S, S) bool: what each query of one layer sees in full precision."""
    Hkv, _, S, _ = logits.shape
    causal = torch.ones(S, S, dtype=torch.bool, device=logits.device).tril()  # (S, S)
    if regime == "decode":
        if policy.keep == "window":
            return eviction.sinks_and_window(S, budget, policy.sink_tokens,
                                             logits.device).expand(Hkv, S, S)
        return eviction.evict_while_decoding(logits, budget, policy.keep)
    P = prompt_len
    if shared is not None:
        kept = shared.expand(Hkv, P)  # (Hkv, P)
    elif policy.keep == "window":
        kept = eviction.sinks_and_window(P, min(budget, P), policy.sink_tokens,
                                         logits.device)[-1].expand(Hkv, P)  # (Hkv, P)
    else:
        probs = logits[:, :, :P, :P].masked_fill(~causal[:P, :P], float("-inf")).softmax(-1)
        kept = eviction.compress_prompt(probs, budget, policy.keep)  # (Hkv, P)
    after = torch.ones(Hkv, S, dtype=torch.bool, device=logits.device)  # (Hkv, S)
    after[:, :P] = kept
    rows_after = (torch.arange(S, device=logits.device) >= P)[None, :, None]  # (1, S, 1)
    # NOTE: the prompt's own queries ran before the cut (prefill sees the whole prompt)
    return causal & torch.where(rows_after, after[:, None, :], True)


def _sinks_at_cache_positions(scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              visible: torch.Tensor, sink_tokens: int, theta: float) -> None:
    """Rewrite, in place, the sink columns of `scores` (Hkv, G, S, S) for queries that sit at
    a cache slot below their position: query t at slot n_t - 1 (n_t keys visible), with the
    sinks' keys at their own slots. q (H, S, D), k (Hkv, S, D) are NOT yet rotated."""
    Hkv, G, S, _ = scores.shape
    D = q.shape[-1]
    slot = visible[0].sum(-1) - 1  # (S,) the query's slot: every head sees as many keys
    moved = slot < torch.arange(S, device=q.device)  # (S,) queries whose slot moved
    if not bool(moved.any()):
        return
    cos, sin = rotary_cos_sin(slot, D, theta, q.dtype)  # (S, D)
    q_slot = apply_rotary(q, cos, sin).view(Hkv, G, S, D)  # (Hkv, G, S, D)
    pos = torch.arange(sink_tokens, device=q.device)
    cos, sin = rotary_cos_sin(pos, D, theta, k.dtype)  # (k, D)
    k_sink = apply_rotary(k[:, :sink_tokens], cos, sin)  # (Hkv, k, D)
    sink_scores = torch.einsum("hgsd,hkd->hgsk", q_slot, k_sink).to(scores.dtype) / math.sqrt(D)
    scores[:, :, moved, :sink_tokens] = sink_scores[:, :, moved]


@dataclass(frozen=True)
class LayerQKV:
    """One layer's attention inputs over the sequence, as `_forward` hands them out."""

    q: torch.Tensor  # (H, S, D) not rotated
    k: torch.Tensor  # (Hkv, S, D) not rotated
    v: torch.Tensor  # (Hkv, S, D)
    qr: torch.Tensor  # (H, S, D) rotated at the tokens' positions
    kr: torch.Tensor  # (Hkv, S, D) rotated: what a cache holds
    scores: torch.Tensor  # (Hkv, G, S, S) float32 q.k / sqrt(D), future keys included


def _score_dtype(x: torch.Tensor) -> torch.dtype:
    """Scores in float32, or float64 for a float64 model (tests compare to 1e-12)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward(model: TransformerLM, ids: torch.Tensor,
             attend: Callable[[int, LayerQKV], torch.Tensor]) -> torch.Tensor:
    """The model's layers over ids (S,), each layer's attention output (Hkv, G, S, D) from
    `attend(layer, qkv)`; returns the final hidden states (S, d)."""
    cfg = model.config
    S, H, Hkv, D = ids.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos, sin = rotary_cos_sin(torch.arange(S, device=ids.device), D, cfg.rope_theta,
                              model.embed.weight.dtype)  # (S, D)
    x = model.embed(ids)  # (S, d)
    for i, block in enumerate(model.layers):
        a, h = block.attn, block.attn_norm(x)  # (S, d)
        q = a.q_proj(h).view(S, H, D).transpose(0, 1)  # (H, S, D)
        k = a.k_proj(h).view(S, Hkv, D).transpose(0, 1)  # (Hkv, S, D)
        v = a.v_proj(h).view(S, Hkv, D).transpose(0, 1)  # (Hkv, S, D)
        qr, kr = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scores = torch.einsum("hgsd,htd->hgst", qr.view(Hkv, H // Hkv, S, D),
                              kr).to(_score_dtype(q)) / math.sqrt(D)  # (Hkv, G, S, S)
        out = attend(i, LayerQKV(q, k, v, qr, kr, scores))  # (Hkv, G, S, D)
        x = x + a.o_proj(out.reshape(H, S, D).transpose(0, 1).reshape(S, H * D))  # (S, d)
        x = x + block.mlp(block.mlp_norm(x))
    return model.norm(x)  # (S, d)


def _check(model: TransformerLM, ids, regime: str, prompt_len: int | None) -> torch.Tensor:
    if model.config.is_latent:
        raise ValueError("shrink.run drives grouped-query attention layers, not latent ones")
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    ids = torch.as_tensor(ids, dtype=torch.int64, device=model.embed.weight.device)  # (S,)
    S = ids.shape[0]
    if regime == "prompt" and not (isinstance(prompt_len, int) and 0 < prompt_len <= S):
        raise ValueError(f"the prompt regime needs 0 < prompt_len <= {S}, got {prompt_len!r}")
    return ids


@torch.no_grad()
def run(model: TransformerLM, ids: Sequence[int] | torch.Tensor, policy: Policy, budget: int,
        regime: str = "decode", prompt_len: int | None = None) -> Run:
    """Read `ids` (S,) through `model` with each layer's cache kept by `policy`.

    decode: the cache never holds more than `budget` tokens per layer and KV head (the
    query's own included). prompt: the first `prompt_len` tokens are cut to `budget` once
    they are all in; every later token is kept.
    """
    ids = _check(model, ids, regime, prompt_len)
    if policy.shared_blocks and regime != "prompt":
        raise ValueError(f"{policy.name} chooses blocks once, for a prompt: regime='prompt'")
    shared = None
    if policy.shared_blocks:
        scores = prompt_scores(model, ids[:prompt_len], policy.keep)  # (L, Hkv, P)
        shared = eviction.shared_blocks(scores, budget, BLOCK_SIZE, recent=OBSERVATION)
    kept = []

    def attend(layer: int, t: LayerQKV) -> torch.Tensor:
        visible = _visible(policy, t.scores, budget, regime, prompt_len, shared)  # (Hkv, S, S)
        kept.append(visible[:, -1])  # (Hkv, S): the cache as the last query reads it
        if policy.cache_positions and policy.sink_tokens:
            _sinks_at_cache_positions(t.scores, t.q, t.k, visible, policy.sink_tokens,
                                      model.config.rope_theta)
        if policy.rest is None:
            return _attend(t.scores, visible, t.v)  # (Hkv, G, S, D)
        return _attend_with_rest(t.scores, visible, t.qr, t.kr, t.v, policy.rest)

    hidden = _forward(model, ids, attend)  # (S, d)
    return Run(model.lm_head(hidden).to(_score_dtype(hidden)), torch.stack(kept))


@torch.no_grad()
def prompt_scores(model: TransformerLM, prompt: torch.Tensor, keep: str) -> torch.Tensor:
    """(L, Hkv, P) every layer's `eviction.prompt_scores` over a prompt read in full."""
    causal = torch.ones(prompt.shape[0], prompt.shape[0], dtype=torch.bool,
                        device=prompt.device).tril()  # (P, P)
    scores = []

    def attend(layer: int, t: LayerQKV) -> torch.Tensor:
        probs = t.scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (Hkv, G, P, P)
        scores.append(eviction.prompt_scores(probs, keep, OBSERVATION))
        return torch.einsum("hgst,htd->hgsd", probs.to(t.v.dtype), t.v)

    _forward(model, prompt, attend)
    return torch.stack(scores)  # (L, Hkv, P)


def _attend(scores: torch.Tensor, visible: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax over what each query sees, then the values: (Hkv, G, S, D)."""
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return torch.einsum("hgst,htd->hgsd", probs.to(v.dtype), v)


def _attend_with_rest(scores: torch.Tensor, visible: torch.Tensor, q: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor, rest: QuantScheme) -> torch.Tensor:
    """Every earlier key is read: the visible ones exact, the others quantized (`rest`).
    One softmax over both kinds, split: out = P_exact V + P_rest V_q, (Hkv, G, S, D).
    q (H, S, D) and k (Hkv, S, D) rotated, as the cache holds them."""
    Hkv, G, S, D = *scores.shape[:3], v.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool, device=scores.device).tril()  # (S, S)
    low = causal & ~visible  # (Hkv, S, S): read quantized
    kq, vq = fake_quantize(k, rest), fake_quantize(v, rest)  # (Hkv, S, D)
    low_scores = torch.einsum("hgsd,htd->hgst", q.view(Hkv, G, S, D),
                              kq).to(scores.dtype) / math.sqrt(D)  # (Hkv, G, S, S)
    both = torch.where(visible[:, None], scores, low_scores).masked_fill(
        ~causal, float("-inf")).softmax(-1)  # (Hkv, G, S, S)
    exact = both.masked_fill(~visible[:, None], 0.0).to(v.dtype)
    quant = both.masked_fill(~low[:, None], 0.0).to(v.dtype)
    return torch.einsum("hgst,htd->hgsd", exact, v) + torch.einsum("hgst,htd->hgsd", quant, vq)


@torch.no_grad()
def first_token_attention(model: TransformerLM, ids: Sequence[int] | torch.Tensor,
                          start: int = 16) -> torch.Tensor:
    """(L, H) the mean attention each head pays to the first token, over the queries from
    `start` on (the full cache): StreamingLLM's "attention sink" measured."""
    ids = _check(model, ids, "decode", None)
    S = ids.shape[0]
    causal = torch.ones(S, S, dtype=torch.bool, device=ids.device).tril()  # (S, S)
    shares = []

    def attend(layer: int, t: LayerQKV) -> torch.Tensor:
        probs = t.scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (Hkv, G, S, S)
        shares.append(probs[:, :, start:, 0].mean(-1).flatten())  # (H,)
        return torch.einsum("hgst,htd->hgsd", probs.to(t.v.dtype), t.v)

    _forward(model, ids, attend)
    return torch.stack(shares)  # (L, H)


@dataclass(frozen=True)
class CopyingHeads:
    """Per layer and head (L, H), on `length` random tokens read twice: the mean attention a
    token pays to the token just before it (previous-token heads), and the mean attention a
    token of the second reading pays to the token that followed its twin in the first
    (induction heads, which copy: Olsson et al., 2022). An even spread gives about 1/position."""

    previous: torch.Tensor  # (L, H)
    induction: torch.Tensor  # (L, H)


@torch.no_grad()
def copying_heads(model: TransformerLM, length: int = 64, seed: int = 0) -> CopyingHeads:
    """Feed [token 0] + R + R, R `length` ids drawn (seeded) from the top seven eighths of
    the vocabulary (nothing but the first reading predicts the second), and read every
    head's attention."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    R = torch.randint(V // 8, V, (length,), generator=g)  # (length,)
    ids = _check(model, torch.cat([torch.zeros(1, dtype=torch.int64), R, R]), "decode", None)
    S = ids.shape[0]
    causal = torch.ones(S, S, dtype=torch.bool, device=ids.device).tril()  # (S, S)
    t = torch.arange(length + 2, S, device=ids.device)  # second reading, from its 2nd token
    prev, induction = [], []

    def attend(layer: int, qkv: LayerQKV) -> torch.Tensor:
        probs = qkv.scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (Hkv, G, S, S)
        q = torch.arange(1, S, device=ids.device)
        prev.append(probs[:, :, q, q - 1].mean(-1).flatten())  # (H,)
        induction.append(probs[:, :, t, t - length + 1].mean(-1).flatten())  # (H,)
        return torch.einsum("hgst,htd->hgsd", probs.to(qkv.v.dtype), qkv.v)

    _forward(model, ids, attend)
    return CopyingHeads(torch.stack(prev).cpu(), torch.stack(induction).cpu())


def uniform_first_token_share(num_tokens: int, start: int = 16) -> float:
    """The mean attention on token 0 over queries `start`..S-1 if each spread its attention
    evenly over its keys (query t: 1 / (t + 1)): what `first_token_attention` compares with.

    >>> round(uniform_first_token_share(4, start=1), 4)  # (1/2 + 1/3 + 1/4) / 3
    0.3611
    """
    return sum(1 / (t + 1) for t in range(start, num_tokens)) / (num_tokens - start)


# ---------------------------------------------------------------------------------------------
# What a run costs in quality
# ---------------------------------------------------------------------------------------------

def token_nats(logits: torch.Tensor, ids: Sequence[int] | torch.Tensor,
               start: int) -> torch.Tensor:
    """(S - 1 - start,) -log p of each token after position `start`, from the logits before it."""
    ids = torch.as_tensor(ids, dtype=torch.int64, device=logits.device)  # (S,)
    logp = logits[start:-1].log_softmax(-1)  # (n, V)
    return -logp.gather(1, ids[start + 1:, None])[:, 0]  # (n,)


def bits_per_byte(logits: torch.Tensor, ids: Sequence[int], num_bytes: int, start: int) -> float:
    """Bits per byte of the text the tokens after `start` spell (`num_bytes` UTF-8 bytes)."""
    return float(token_nats(logits, ids, start).sum()) / math.log(2) / num_bytes


def agreement(logits: torch.Tensor, full_logits: torch.Tensor, start: int) -> float:
    """Share of positions from `start` on whose greedy next token is the full cache's."""
    return float((logits[start:-1].argmax(-1) == full_logits[start:-1].argmax(-1)).float().mean())
