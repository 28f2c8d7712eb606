"""Chunked (flash-style) attention with online softmax, and split-KV decoding, in plain torch.

The reference `kvlib.attention.attention` builds every score of a head at once: a (T, S)
matrix per query head, quadratic in the sequence length. Here keys and values arrive a tile
at a time and a query tile keeps only a few numbers per row (Triton tutorial names):

    m_i   running max of the scores seen so far                    (one per query row)
    l_i   running sum of exp(score - m_i)                          (one per query row)
    acc   running sum of exp(score - m_i) * v                      (D per query row)

A new tile of scores s_j: m_new = max(m_i, max_j s_j); alpha = exp(m_i - m_new) rescales
what was summed under the old max; l_i = alpha l_i + sum_j exp(s_j - m_new); acc likewise
with v_j. After the last tile, out = acc / l_i, and m_i + log(l_i) is the row's log-sum-exp.
Two partial results over disjoint keys merge by the same rule, with their log-sum-exps as
weights: that is split-KV (Flash-Decoding) attention for one new token over a long cache.

>>> s = torch.tensor([1.0, 3.0, 2.0, 0.0])             # one row's scores, in two halves
>>> lse = torch.stack([s[:2].logsumexp(0), s[2:].logsumexp(0)])
>>> bool(torch.isclose(lse.logsumexp(0), s.logsumexp(0)))
True

Tiles are half-open ranges; the last one is short when the length is not a multiple:

>>> tiles(10, 4)
[(0, 4), (4, 8), (8, 10)]

Every function here equals a reference in `kvlib.attention` (tests/test_flash.py):
`chunked_attention` = `attention`, `split_kv_decode` = `decode_attention`, and the paged
ones equal the same references on `PagedKV.dense()`. Legend: B batch, H query heads,
Hkv KV heads, G = H // Hkv, T queries, S keys, D head dim, tq / tk query / key tile, C chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kvlib.attention import _check_qkv, softmax_dtype
from kvlib.checks import require_int
from kvlib.contract import DenseKV, KVView, PagedKV, StepBatch

Q_TILE = 64  # default query rows per tile
KV_TILE = 128  # default keys per tile
KV_CHUNK = 256  # default keys per split in split-KV decoding

# (start, end) -> k, v (B, Hkv, end - start, D): one tile of keys and values, read where
# they lie (a view of dense tensors, or the few blocks of a pool that hold them).
TileLoader = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def tiles(length: int, size: int) -> list[tuple[int, int]]:
    """Half-open ranges of `size` covering 0..length-1, the last one possibly shorter."""
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def dense_loader(k: torch.Tensor, v: torch.Tensor) -> TileLoader:
    """Tiles of (B, Hkv, S, D) tensors: views, no copy."""
    return lambda start, end: (k[:, :, start:end], v[:, :, start:end])


def paged_loader(kv: PagedKV) -> TileLoader:
    """Tiles of a block pool: only the block-table columns that hold the tile are read.

    Keys start..end-1 live in columns start // BS .. (end - 1) // BS; with BS = 16, keys
    20..35 are columns 1 and 2, from offset 4 of the first. With BS = 2, block b holding
    the values 2b and 2b + 1, and a table [2, 0, 3]: keys 1..3 are columns 0 and 1 from
    offset 1, that is block 2's second slot and block 0's two.

    >>> pool = torch.arange(8.0).view(4, 1, 2, 1)  # (NB=4, Hkv=1, BS=2, D=1)
    >>> kv = PagedKV(pool, pool, torch.tensor([[2, 0, 3, -1]], dtype=torch.int32),
    ...              torch.tensor([5], dtype=torch.int32))
    >>> paged_loader(kv)(1, 4)[0].flatten().tolist()
    [5.0, 0.0, 1.0]
    """
    BS = kv.block_size
    B = kv.block_tables.shape[0]
    _, Hkv, _, D = kv.k_pool.shape

    def load(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        first, last = start // BS, (end - 1) // BS + 1
        # Padding (-1) reads block 0; those keys lie past context_lens and are masked.
        ids = kv.block_tables[:, first:last].long().clamp(min=0)  # (B, nb)
        lo, hi = start - first * BS, end - first * BS
        k = kv.k_pool[ids].permute(0, 2, 1, 3, 4).reshape(B, Hkv, -1, D)  # (B, Hkv, nb*BS, D)
        v = kv.v_pool[ids].permute(0, 2, 1, 3, 4).reshape(B, Hkv, -1, D)
        return k[:, :, lo:hi], v[:, :, lo:hi]  # (B, Hkv, end - start, D)

    return load


# ---------------------------------------------------------------------------------------------
# Prefill: query tiles x key tiles, online softmax           reference: attention.attention
# ---------------------------------------------------------------------------------------------

def _check_positions(q_positions: torch.Tensor, kv_lens: torch.Tensor, B: int, T: int) -> None:
    if q_positions.shape != (B, T) or kv_lens.shape != (B,):
        raise ValueError(f"expected q_positions (B, T) = {(B, T)} and kv_lens (B,) = {(B,)}, "
                         f"got {tuple(q_positions.shape)} and {tuple(kv_lens.shape)}")
    # NOTE: with every position >= 0 and every kv_len >= 1, key 0 is visible to every query,
    # so the first key tile makes each m_i finite and no row divides by an empty sum.
    if q_positions.numel() and int(q_positions.min()) < 0:
        raise ValueError(f"q_positions must be >= 0, got min {int(q_positions.min())}")
    if kv_lens.numel() and int(kv_lens.min()) < 1:
        raise ValueError(f"kv_lens must be >= 1 (each query sees at least key 0), got "
                         f"{kv_lens.tolist()}")


def _chunked(q: torch.Tensor, load: TileLoader, num_kv_heads: int, num_keys: int,
             q_positions: torch.Tensor, kv_lens: torch.Tensor, q_tile: int,
             kv_tile: int) -> torch.Tensor:
    """The tiled loop over checked inputs: q (B, H, T, D) -> (B, H, T, D)."""
    B, H, T, D = q.shape
    Hkv, G = num_kv_heads, H // num_kv_heads
    scale = 1.0 / math.sqrt(D)
    wide = softmax_dtype(q.dtype)  # the softmax state: float32, or float64 for float64 input
    kv_lens = kv_lens.to(q.device)
    qg = q.reshape(B, Hkv, G, T, D)  # (B, Hkv, G, T, D): the G heads of a KV group together
    out = torch.empty(B, Hkv, G, T, D, dtype=q.dtype, device=q.device)
    last_key = min(num_keys, int(kv_lens.max()))  # no row has keys past this
    for q_start, q_end in tiles(T, q_tile):
        tq = q_end - q_start
        q_blk = qg[:, :, :, q_start:q_end].reshape(B, Hkv, G * tq, D)  # (B, Hkv, G*tq, D)
        pos = q_positions[:, q_start:q_end].to(q.device)  # (B, tq)
        # -- state of the online softmax, one row per (query head of the group, query)
        m_i = torch.full((B, Hkv, G * tq), float("-inf"), dtype=wide, device=q.device)  # max
        l_i = torch.zeros(B, Hkv, G * tq, dtype=wide, device=q.device)  # running sum of exp
        acc = torch.zeros(B, Hkv, G * tq, D, dtype=wide, device=q.device)  # sum of exp * v
        # -- causal skip: no query of this tile sees a key past its largest position
        for k_start, k_end in tiles(min(last_key, int(pos.max()) + 1), kv_tile):
            k_blk, v_blk = load(k_start, k_end)  # (B, Hkv, tk, D)
            tk = k_end - k_start
            # -- scores of this tile, masked: causal and past each row's length
            s = torch.matmul(q_blk, k_blk.transpose(-1, -2)).to(wide) * scale  # (B,Hkv,G*tq,tk)
            keys = torch.arange(k_start, k_end, device=q.device)  # (tk,)
            visible = (keys <= pos[:, :, None]) & (keys < kv_lens[:, None, None])  # (B, tq, tk)
            s.view(B, Hkv, G, tq, tk).masked_fill_(~visible[:, None, None], float("-inf"))
            # -- online softmax: new max, rescale the old sums, add this tile's
            m_new = torch.maximum(m_i, s.amax(-1))  # (B, Hkv, G*tq)
            alpha = torch.exp(m_i - m_new)  # (B, Hkv, G*tq); 0 on the first tile
            p = torch.exp(s - m_new[..., None])  # (B, Hkv, G*tq, tk)
            l_i = alpha * l_i + p.sum(-1)
            acc = alpha[..., None] * acc + torch.matmul(p.to(v_blk.dtype), v_blk).to(wide)
            m_i = m_new
        # -- normalise once, at the end of the row
        out[:, :, :, q_start:q_end] = (acc / l_i[..., None]).view(B, Hkv, G, tq, D)
    return out.view(B, H, T, D)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      q_positions: torch.Tensor, kv_lens: torch.Tensor, *,
                      q_tile: int = Q_TILE, kv_tile: int = KV_TILE) -> torch.Tensor:
    """`attention.attention` computed tile by tile; never holds more than a (tq, tk) tile of
    scores per query head.

    Args:
        q: (B, H, T, D) queries; query t of row b sits at position `q_positions[b, t]` (a
            chunk of a prompt after cached tokens: positions need not start at 0).
        k, v: (B, Hkv, S, D) keys and values, any strides; H a multiple of Hkv.
        q_positions: (B, T) absolute positions, >= 0; a query at p sees keys 0..p.
        kv_lens: (B,) valid keys per row, >= 1; keys at j >= kv_lens[b] are padding.
        q_tile, kv_tile: queries and keys per tile, >= 1 (need not divide T or S).

    Returns:
        (B, H, T, D), in q's dtype.
    """
    require_int("q_tile", q_tile, minimum=1)
    require_int("kv_tile", kv_tile, minimum=1)
    _check_qkv(q, k, v)
    _check_positions(q_positions, kv_lens, q.shape[0], q.shape[2])
    return _chunked(q, dense_loader(k, v), k.shape[1], k.shape[2], q_positions, kv_lens,
                    q_tile, kv_tile)


def paged_chunked_attention(q: torch.Tensor, kv: PagedKV, q_positions: torch.Tensor, *,
                            q_tile: int = Q_TILE, kv_tile: int = KV_TILE) -> torch.Tensor:
    """`chunked_attention` over a block pool, each key tile read from the blocks holding it.

    q (B, H, T, D), q_positions (B, T); keys per row: `kv.context_lens`. -> (B, H, T, D).
    """
    require_int("q_tile", q_tile, minimum=1)
    require_int("kv_tile", kv_tile, minimum=1)
    _check_paged(q, kv, q_dims=4)
    _check_positions(q_positions, kv.context_lens, q.shape[0], q.shape[2])
    num_keys = kv.block_tables.shape[1] * kv.block_size
    return _chunked(q, paged_loader(kv), kv.k_pool.shape[1], num_keys, q_positions,
                    kv.context_lens, q_tile, kv_tile)


def _check_paged(q: torch.Tensor, kv: PagedKV, q_dims: int) -> None:
    want = "(B, H, T, D)" if q_dims == 4 else "(B, H, D)"
    if q.dim() != q_dims:
        raise ValueError(f"q must be {want}, got {tuple(q.shape)}")
    NB, Hkv, BS, D = kv.k_pool.shape
    B, H = q.shape[0], q.shape[1]
    if kv.v_pool.shape != kv.k_pool.shape or q.shape[-1] != D or H % Hkv:
        raise ValueError(f"q {want} = {tuple(q.shape)} does not fit pools k "
                         f"{tuple(kv.k_pool.shape)}, v {tuple(kv.v_pool.shape)} (NB, Hkv, BS, D)")
    if kv.block_tables.dim() != 2 or kv.block_tables.shape[0] != B or kv.context_lens.shape != (B,):
        raise ValueError(f"block_tables must be (B={B}, max_blocks) and context_lens (B,), got "
                         f"{tuple(kv.block_tables.shape)} and {tuple(kv.context_lens.shape)}")
    if bool((kv.context_lens > kv.block_tables.shape[1] * BS).any()):
        raise ValueError(f"context_lens {kv.context_lens.tolist()} exceed the "
                         f"{kv.block_tables.shape[1]} blocks of {BS} in block_tables")


# ---------------------------------------------------------------------------------------------
# Decode: split the cache into chunks, attend to each, merge     reference: decode_attention
# ---------------------------------------------------------------------------------------------

def merge_partials(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge C partial attentions over disjoint keys into one.

    out (..., C, D) each chunk's softmax-weighted values; lse (..., C) each chunk's
    log-sum-exp of scores (-inf for a chunk with no keys). Each chunk counts in proportion
    to exp(lse): out = sum_c exp(lse_c - lse) out_c, lse = log sum_c exp(lse_c).
    Returns (out (..., D), lse (...,)).
    """
    total = torch.logsumexp(lse, dim=-1)  # (...,)
    weights = torch.exp(lse - total[..., None])  # (..., C), sums to 1
    return (weights[..., None] * out).sum(-2), total


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: q (B, Hkv, G, D), k, v (B, Hkv, tk, D), valid (B, tk)
    -> (out (B, Hkv, G, D), lse (B, Hkv, G); -inf and 0 where no key is valid), in float32
    (float64 for float64 input)."""
    wide = softmax_dtype(q.dtype)
    s = torch.matmul(q, k.transpose(-1, -2)).to(wide) / math.sqrt(q.shape[-1])  # (B,Hkv,G,tk)
    s = s.masked_fill(~valid[:, None, None], float("-inf"))
    m = s.amax(-1)  # (B, Hkv, G)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # an empty chunk: any finite shift
    p = torch.exp(s - m[..., None])  # (B, Hkv, G, tk)
    l = p.sum(-1)  # (B, Hkv, G)
    out = torch.matmul(p.to(v.dtype), v).to(wide) / l.clamp(min=1e-30)[..., None]
    return out, m + torch.log(l)  # log(0) = -inf: the merge gives an empty chunk no weight


def decode_partials(q: torch.Tensor, load: TileLoader, num_kv_heads: int,
                    context_lens: torch.Tensor,
                    kv_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, D) over keys 0..context_lens[b]-1, a chunk of `kv_chunk` keys at a time
    -> (out (B, H, C, D), lse (B, H, C)), C = ceil(max(context_lens) / kv_chunk).

    The chunks are independent: on a GPU each is its own block of threads, which is what
    keeps a GPU busy when the batch is small and the context long.
    """
    B, H, D = q.shape
    Hkv = num_kv_heads
    lens = context_lens.to(q.device)
    qg = q.view(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D)
    outs, lses = [], []
    for start, end in tiles(int(lens.max()), kv_chunk):
        k, v = load(start, end)  # (B, Hkv, tk, D)
        valid = torch.arange(start, end, device=q.device) < lens[:, None]  # (B, tk)
        out, lse = _partial(qg, k, v, valid)
        outs.append(out.reshape(B, H, D))
        lses.append(lse.reshape(B, H))
    return torch.stack(outs, dim=2), torch.stack(lses, dim=2)  # (B, H, C, D), (B, H, C)


def _check_decode(q: torch.Tensor, context_lens: torch.Tensor, num_keys: int) -> None:
    if context_lens.shape != (q.shape[0],):
        raise ValueError(f"context_lens must be (B,) = ({q.shape[0]},), got "
                         f"{tuple(context_lens.shape)}")
    if bool((context_lens < 1).any()) or bool((context_lens > num_keys).any()):
        raise ValueError(f"context_lens {context_lens.tolist()} must be in 1..{num_keys}")


def split_kv_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    context_lens: torch.Tensor, *, kv_chunk: int = KV_CHUNK) -> torch.Tensor:
    """`attention.decode_attention` as partials over chunks of the cache, then their merge.

    q (B, H, D) one new token per row; k, v (B, Hkv, S, D); context_lens (B,) in 1..S.
    -> (B, H, D) in q's dtype.
    """
    require_int("kv_chunk", kv_chunk, minimum=1)
    if q.dim() != 3:
        raise ValueError(f"q must be (B, H, D), got {tuple(q.shape)}")
    _check_qkv(q[:, :, None], k, v)
    _check_decode(q, context_lens, k.shape[2])
    out, lse = decode_partials(q, dense_loader(k, v), k.shape[1], context_lens, kv_chunk)
    return merge_partials(out, lse)[0].to(q.dtype)


def paged_split_kv_decode(q: torch.Tensor, kv: PagedKV, *,
                          kv_chunk: int = KV_CHUNK) -> torch.Tensor:
    """`split_kv_decode` over a block pool: each chunk reads only its own blocks.

    q (B, H, D); keys per row: `kv.context_lens`. -> (B, H, D). A chunk that is a multiple of
    the block size reads whole blocks, as a decode kernel does.
    """
    require_int("kv_chunk", kv_chunk, minimum=1)
    _check_paged(q, kv, q_dims=3)
    _check_decode(q, kv.context_lens, kv.block_tables.shape[1] * kv.block_size)
    out, lse = decode_partials(q, paged_loader(kv), kv.k_pool.shape[1], kv.context_lens,
                               kv_chunk)
    return merge_partials(out, lse)[0].to(q.dtype)


# ---------------------------------------------------------------------------------------------
# The backend: `model.attention = "chunked"`                    reference: backends.reference
# ---------------------------------------------------------------------------------------------

def _row(kv: KVView, b: int) -> KVView:
    """Row b of a view, as a view of one row (no copy)."""
    if isinstance(kv, PagedKV):
        return PagedKV(kv.k_pool, kv.v_pool, kv.block_tables[b:b + 1], kv.context_lens[b:b + 1])
    return DenseKV(kv.k[b:b + 1], kv.v[b:b + 1], kv.context_lens[b:b + 1])


def _attend(q: torch.Tensor, kv: KVView, positions: torch.Tensor, q_tile: int, kv_tile: int,
            kv_chunk: int) -> torch.Tensor:
    """q (B, H, T, D) at positions (B, T) over a dense or paged view -> (B, H, T, D)."""
    if q.shape[2] == 1:  # decode: one token per row sees its whole cache
        if isinstance(kv, PagedKV):
            return paged_split_kv_decode(q[:, :, 0], kv, kv_chunk=kv_chunk)[:, :, None]
        return split_kv_decode(q[:, :, 0], kv.k, kv.v, kv.context_lens,
                               kv_chunk=kv_chunk)[:, :, None]
    if isinstance(kv, PagedKV):
        return paged_chunked_attention(q, kv, positions, q_tile=q_tile, kv_tile=kv_tile)
    return chunked_attention(q, kv.k, kv.v, positions, kv.context_lens, q_tile=q_tile,
                             kv_tile=kv_tile)


def make_backend(q_tile: int = Q_TILE, kv_tile: int = KV_TILE, kv_chunk: int = KV_CHUNK,
                 ) -> Callable[[torch.Tensor, KVView, StepBatch], torch.Tensor]:
    """A backend `fn(q (N, H, D), kv, batch) -> (N, H, D)` with these tile sizes.

    Decode steps (one token per sequence) split the cache into chunks of `kv_chunk` keys;
    longer queries are tiled `q_tile` x `kv_tile`. A (B, T) batch is one call; a ragged
    batch, one call per sequence.
    """
    require_int("q_tile", q_tile, minimum=1)
    require_int("kv_tile", kv_tile, minimum=1)
    require_int("kv_chunk", kv_chunk, minimum=1)

    def backend(q: torch.Tensor, kv: KVView, batch: StepBatch) -> torch.Tensor:
        N, H, D = q.shape
        if isinstance(kv, PagedKV) and kv.k_scale is not None:
            kv = kv.dense(q.dtype)  # codes: dequantized once, then the dense tiles
        T = batch.uniform_len
        if T is not None:
            B = batch.num_seqs
            qb = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            out = _attend(qb, kv, batch.positions.view(B, T), q_tile, kv_tile, kv_chunk)
            return out.transpose(1, 2).reshape(N, H, D)
        cu = batch.query_starts
        outs = []
        for b in range(batch.num_seqs):
            qb = q[cu[b]:cu[b + 1]].transpose(0, 1)[None]  # (1, H, T_b, D)
            out = _attend(qb, _row(kv, b), batch.positions[cu[b]:cu[b + 1]][None], q_tile,
                          kv_tile, kv_chunk)
            outs.append(out[0].transpose(0, 1))  # (T_b, H, D)
        return torch.cat(outs)  # (N, H, D)

    return backend


chunked = make_backend()  # what `model.attention = "chunked"` runs
