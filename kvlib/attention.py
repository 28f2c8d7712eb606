"""Reference attention: causal masking, grouped-query heads, decoding over a cache.

These are the plain paths every fast kernel in the book is checked against. They favour
clarity over speed: the score matrix is materialised, and the mask is built explicitly.

Shapes (legend): B batch, H query heads, Hkv KV heads, G = H // Hkv query heads per KV head,
T new tokens (queries), S keys (cached + new), D head dim.

Masking rule. Query t of sequence b sits at absolute position `q_positions[b, t]`; key j of
that sequence is visible when `j <= q_positions[b, t]` (causal) and `j < kv_lens[b]` (the key
exists; rows of a batch have different lengths and the key tensor is padded to the longest).
A sliding window W (Mistral, Gemma-2) also hides keys W or more positions back: `j > p - W`,
so a query sees at most W keys, its own included. Sink tokens k (StreamingLLM) stay
visible besides the window: key j is also visible when `j < k`.

>>> q_positions = torch.tensor([[3]])   # one new token at position 3...
>>> kv_lens = torch.tensor([4])          # ...over a cache holding positions 0..3
>>> attention_mask(q_positions, kv_lens, num_keys=6).int().tolist()
[[[1, 1, 1, 1, 0, 0]]]
>>> attention_mask(q_positions, kv_lens, num_keys=6, window=2).int().tolist()
[[[0, 0, 1, 1, 0, 0]]]
>>> attention_mask(q_positions, kv_lens, num_keys=6, window=2, sink_tokens=1).int().tolist()
[[[1, 0, 1, 1, 0, 0]]]

A ring buffer hands over only its last keys: with `key_start`, key j of row b is at position
`key_start[b] + j` (here keys 2..3 of the same sequence, as two keys):

>>> attention_mask(q_positions, kv_lens, num_keys=2, window=2,
...                key_start=torch.tensor([2])).int().tolist()
[[[1, 1]]]
"""

from __future__ import annotations

import math

import torch


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores and softmax are computed in: float32, or the input's where it is wider.

    fp16 and bf16 inputs get float32 scores (their own precision is too coarse for a sum of
    exponentials); float64 keeps float64, so a float64 check stays exact to ~1e-15.

    >>> softmax_dtype(torch.bfloat16), softmax_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def attention_mask(q_positions: torch.Tensor, kv_lens: torch.Tensor, num_keys: int,
                   window: int | None = None,
                   key_start: torch.Tensor | None = None, sink_tokens: int = 0) -> torch.Tensor:
    """Boolean mask (B, T, S): True where query t of row b may attend to key j.

    Key j of row b sits at position j, or `key_start[b] + j` when `key_start` (B,) is given.
    """
    keys = torch.arange(num_keys, device=q_positions.device)[None, None, :]  # (1, 1, S)
    if key_start is not None:
        keys = keys + key_start.to(q_positions.device)[:, None, None]  # (B, 1, S)
    causal = keys <= q_positions[:, :, None]  # (B, T, S)
    exists = keys < kv_lens.to(q_positions.device)[:, None, None]  # (B, 1, S)
    if window is not None:
        recent = keys > q_positions[:, :, None] - window  # (B, T, S)
        causal = causal & (recent | (keys < sink_tokens))
    return causal & exists


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    # NOTE: values may be narrower than keys (Dv != D): latent attention's values are the
    # first R numbers of each cached row (kvlib.mla)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            "expected q (B, H, T, D), k (B, Hkv, S, D) and v (B, Hkv, S, Dv), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    (B, H, _, D), (Bk, Hkv, _, Dk) = q.shape, k.shape
    if B != Bk or D != Dk:
        raise ValueError(
            f"q and k disagree on batch or head dim: q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({Hkv})")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    kv_lens: torch.Tensor,
    window: int | None = None,
    key_start: torch.Tensor | None = None,
    sink_tokens: int = 0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v with grouped-query heads.

    Args:
        q: (B, H, T, D) queries.
        k, v: (B, Hkv, S, D) keys and (B, Hkv, S, Dv) values (Dv = D but for latent
            attention); any strides (a view into a cache is fine).
        q_positions: (B, T) absolute position of each query.
        kv_lens: (B,) number of valid keys per row; keys at j >= kv_lens[b] are padding.
        window: a sliding window W, or None: keys more than W - 1 positions back are hidden.
        key_start: (B,) position of key 0 per row (a ring buffer's oldest key), or None: 0.
        sink_tokens: with a window, the first positions that stay visible (StreamingLLM).

    Returns:
        (B, H, T, Dv) attention output, in q's dtype.
    """
    _check_qkv(q, k, v)
    B, H, T, D = q.shape
    if q_positions.shape != (B, T) or kv_lens.shape != (B,):
        raise ValueError(f"expected q_positions (B, T) = {(B, T)} and kv_lens (B,) = {(B,)}, "
                         f"got {tuple(q_positions.shape)} and {tuple(kv_lens.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    # Query head h uses KV head h // G. Stacking each group's G query heads as extra rows
    # lets one (G*T, D) x (D, S) product per KV head serve them all, without repeating K or
    # V per query head. (With SEQ_MAJOR cache views, matmul still copies K and V to fold
    # (B, Hkv) into one batch dimension: chapter 2 measures that copy.)
    qg = q.reshape(B, Hkv, G * T, D)  # (B, Hkv, G*T, D)
    scores = torch.matmul(qg, k.transpose(-1, -2))  # (B, Hkv, G*T, S)
    scores = scores.to(softmax_dtype(scores.dtype))  # float32, or float64 for float64
    scores = scores.view(B, Hkv, G, T, S) / math.sqrt(D)  # (B, Hkv, G, T, S)
    mask = attention_mask(q_positions, kv_lens, S, window, key_start, sink_tokens)  # (B, T, S)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)  # (B, Hkv, G, T, S)
    out = torch.matmul(probs.view(B, Hkv, G * T, S), v)  # (B, Hkv, G*T, Dv)
    return out.reshape(B, H, T, v.shape[-1])  # (B, H, T, Dv)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal self-attention over T tokens: q (B, H, T, D), k, v (B, Hkv, T, D)."""
    _check_qkv(q, k, v)
    B, _, T, _ = q.shape
    if k.shape[2] != T:
        raise ValueError(f"causal_attention needs as many keys as queries, got q {tuple(q.shape)}"
                         f" and k {tuple(k.shape)}")
    positions = torch.arange(T, device=q.device).expand(B, T)  # (B, T)
    kv_lens = torch.full((B,), T, device=q.device)  # (B,)
    return attention(q, k, v, positions, kv_lens)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens: torch.Tensor
) -> torch.Tensor:
    """One new token per sequence attending to everything cached for it.

    Args:
        q: (B, H, D) the new token's queries.
        k, v: (B, Hkv, S, D) cached keys and values (new token included), padded past
            `context_lens[b]`; any strides, so both flat cache layouts can be passed as views.
        context_lens: (B,) keys per sequence, the new token included.

    Returns:
        (B, H, D).
    """
    if q.dim() != 3:
        raise ValueError(f"decode_attention expects q (B, H, D), got {tuple(q.shape)}")
    if context_lens.shape != (q.shape[0],):
        raise ValueError(f"context_lens must be (B,) = ({q.shape[0]},), got "
                         f"{tuple(context_lens.shape)}")
    if bool((context_lens < 1).any()):
        raise ValueError(f"context_lens {context_lens.tolist()} must be >= 1: the new token's "
                         f"own key is always there")
    if k.dim() == 4 and bool((context_lens > k.shape[2]).any()):
        raise ValueError(f"context_lens {context_lens.tolist()} exceed the {k.shape[2]} keys given")
    positions = (context_lens - 1).to(q.device)[:, None]  # (B, 1): the new token is the last
    return attention(q.unsqueeze(2), k, v, positions, context_lens).squeeze(2)  # (B, H, D)
