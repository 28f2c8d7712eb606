"""The cache contract: how an attention layer, a scheduler and a kernel talk to any KV cache.

Every cache in kvlib (flat, ring, paged, quantized) implements `KVCache`, so the model runs
unchanged on any of them. Writing and attending are two acts: the cache stores new keys and
values where they belong (through a `slot_mapping`), then hands attention what it needs to
read them *in place* -- views for a flat cache, block tables for a paged one -- instead of a
padded copy of everything. This module sits below the caches, the kernels and the backends,
so each of them imports it and none imports another upward.

A forward pass over the new tokens of B sequences, packed into N = sum(query_lens) tokens:

    batch = cache.begin(seq_ids, query_lens, token_ids)  # room checked, positions, slots
    for layer in range(num_layers):
        cache.write(layer, batch, k_new, v_new)          # (N, Hkv, D) each, via slot_mapping
        kv = cache.read(layer, batch)                    # DenseKV or PagedKV, no copy
        out = backends.attend(q, kv, batch)              # (N, H, D)
    cache.commit(batch)                                  # lengths += query_lens
    # ... or, if anything failed: cache.abort(batch), and the cache is as it was

NOTE: lengths move only in `commit`, after every layer has written, so all layers of one step
write the same positions and a step that fails halfway commits nothing. Lengths are stored
by the cache, never inferred from tensor contents.

Host and device. A step's bookkeeping (`seq_ids`, `query_lens`, `context_lens`) is plain
Python ints, known on the host; what kernels need (`positions`, `slot_mapping`, the views'
`context_lens` and block tables) is tensors on the cache's device. Nothing that builds or
runs a step reads a device tensor back into Python: on a GPU each such read waits for every
queued kernel (tests/test_engine_syncs.py counts them).

Which keys a layer reads -- its sliding window W and its sink tokens -- travel in the view
(`DenseKV.window`, `PagedKV.sink_tokens`), set by the cache from its `CacheConfig`; attention
takes them from there and nowhere else, and the model refuses a cache whose windows are not its
layers' (`kvlib.cache.groups.check_cache_matches`).

Worked example: two sequences holding 5 and 2 tokens feed 1 and 3 new tokens.

>>> b = StepBatch.make([7, 9], starts=[5, 2], query_lens=[1, 3],
...                    slot_mapping=torch.tensor([[5, 18, 19, 20]]), step=0)
>>> b.positions.tolist(), b.context_lens, b.cu_query_lens.tolist()
([5, 2, 3, 4], (6, 5), [0, 1, 4])
>>> b.query_starts, b.uniform_len       # on the host: rows cu[b] .. cu[b+1]-1 are sequence b's
((0, 1, 4), None)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Protocol, runtime_checkable

import torch

from kvlib.checks import require_int
from kvlib.config import CacheConfig


@dataclass(frozen=True)
class StepBatch:
    """One forward pass's new tokens, packed: N tokens of B sequences, in order.

    A rectangular (B, T) batch is the special case where every query length is T. The
    slot mapping has one row per cache group (a paged cache keeps a block table per group of
    layers; every other cache has one group).
    """

    seq_ids: tuple[int, ...]  # (B,) the sequences, as the cache names them
    query_lens: tuple[int, ...]  # (B,) host: new tokens per sequence, each >= 1
    context_lens: tuple[int, ...]  # (B,) host: keys per sequence once this step is stored
    positions: torch.Tensor  # (N,) int64 on the device: absolute position of each new token
    slot_mapping: torch.Tensor  # (G, N) int64 on the device: where each token goes, per group
    # (< 0: not at a slot of this cache; a quantized cache keeps new tokens in its residual)
    cu_query_lens: torch.Tensor  # (B+1,) int32 on the device: sequence b is rows cu[b]..cu[b+1]-1
    step: int  # the cache's number for this step: writes and commits are checked against it

    @staticmethod
    def make(seq_ids: Sequence[int], starts: Sequence[int], query_lens: Sequence[int],
             slot_mapping: torch.Tensor, step: int) -> StepBatch:
        """Positions start[b] .. start[b] + query_lens[b] - 1 for each sequence b, built on
        the host and moved to `slot_mapping`'s device (G, N)."""
        starts, lens = [int(s) for s in starts], [int(n) for n in query_lens]
        device = slot_mapping.device
        positions = torch.tensor([s + i for s, n in zip(starts, lens) for i in range(n)],
                                 dtype=torch.int64)  # (N,)
        cu = torch.tensor([0, *accumulate(lens)], dtype=torch.int32)  # (B+1,)
        return StepBatch(tuple(seq_ids), tuple(lens), tuple(s + n for s, n in zip(starts, lens)),
                         positions.to(device), slot_mapping, cu.to(device), step)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        """N, the packed tokens (known on the host from the positions' shape)."""
        return self.positions.shape[0]

    @property
    def starts(self) -> tuple[int, ...]:
        """(B,) host: tokens each sequence held before this step (its first new position)."""
        return tuple(c - q for c, q in zip(self.context_lens, self.query_lens))

    @property
    def query_starts(self) -> tuple[int, ...]:
        """(B+1,) host copy of `cu_query_lens`."""
        return (0, *accumulate(self.query_lens))

    @property
    def token_rows(self) -> torch.Tensor:
        """(N,) int64 on the host: the batch row b of each packed token."""
        return torch.repeat_interleave(torch.arange(self.num_seqs),
                                       torch.tensor(self.query_lens))

    @property
    def uniform_len(self) -> int | None:
        """T when every sequence feeds T tokens (a (B, T) rectangle), else None."""
        first = self.query_lens[0]
        return first if all(n == first for n in self.query_lens) else None


@dataclass(frozen=True)
class DenseKV:
    """Keys and values as (B, Hkv, S, D) tensors, padded past each row's `context_lens`.

    What a flat cache hands attention: views into its storage, any strides.
    """

    k: torch.Tensor  # (B, Hkv, S, D)
    v: torch.Tensor  # (B, Hkv, S, D)
    context_lens: torch.Tensor  # (B,) int64 on k's device: valid keys per row
    window: int | None = None  # sliding window W of the layer: keys p - W or older are hidden
    sink_tokens: int = 0  # ... except the first `sink_tokens` positions, always visible
    # (B,) int64: position of key 0 per row, when the view starts past position 0 (a ring
    # buffer's oldest kept key); None: key j is position j. context_lens stay positions.
    key_start: torch.Tensor | None = None

    def dense(self, dtype: torch.dtype | None = None) -> DenseKV:
        return self


@dataclass(frozen=True)
class PagedKV:
    """One layer's block pool and the batch's block tables: attention reads blocks in place.

    Token j of row b lives in block `block_tables[b, j // BS]`, at offset `j % BS`.
    A sequence of 45 tokens in blocks of 16: two full blocks and 13 tokens in the third.
    Entries past a row's last block are -1; a windowed layer's blocks that left its window
    are the pool's null block (zeros, never written), which no query can see.

    A pool of codes (int8 or float8_e4m3fn, `CacheConfig.kv_cache_dtype`) comes with a float32
    scale per (block, head, token): the value is scale * code.
    """

    k_pool: torch.Tensor  # (NB, Hkv, BS, D): each block of one head is a contiguous tile
    v_pool: torch.Tensor  # (NB, Hkv, BS, D), or (NB, 1, BS, R) a latent cache's view of k_pool
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with -1
    context_lens: torch.Tensor  # (B,) int32 on the pool's device: valid keys per row
    window: int | None = None  # sliding window W of the layer (see DenseKV)
    sink_tokens: int = 0  # first positions always visible (see DenseKV)
    k_scale: torch.Tensor | None = None  # (NB, Hkv, BS) float32 when the pools hold codes
    v_scale: torch.Tensor | None = None

    @property
    def block_size(self) -> int:
        return self.k_pool.shape[2]

    def dense(self, dtype: torch.dtype | None = None) -> DenseKV:
        """Gather every row's blocks into contiguous (B, Hkv, M * BS, D) tensors: the
        reference path, and the copy that reading in place avoids (codes are dequantized to
        `dtype`, float32 by default). Keys past a row's `context_lens` are whatever the
        gathered blocks hold; attention masks them."""
        B, M = self.block_tables.shape
        NB, Hkv, BS, D = self.k_pool.shape
        tables = self.block_tables.long().clamp(min=0)  # (B, M): padding reads block 0, masked
        k = self.k_pool[tables]  # (B, M, Hkv, BS, D)
        v = self.v_pool[tables]  # (B, M, Hkv, BS, Dv): Dv = D, or a latent's R < D
        if self.k_scale is not None:  # scale * code, row by row
            out = dtype or torch.float32
            k = (k.float() * self.k_scale[tables][..., None]).to(out)  # (B, M, Hkv, BS, D)
            v = (v.float() * self.v_scale[tables][..., None]).to(out)  # (B, M, Hkv, BS, D)
        k = k.permute(0, 2, 1, 3, 4).reshape(B, Hkv, M * BS, D)  # (B, Hkv, S, D)
        v = v.permute(0, 2, 1, 3, 4).reshape(B, Hkv, M * BS, -1)  # (B, Hkv, S, Dv)
        return DenseKV(k, v, self.context_lens.long(), self.window, self.sink_tokens)


KVView = DenseKV | PagedKV


@runtime_checkable
class KVCache(Protocol):
    """What the model needs from a KV cache."""

    @property
    def config(self) -> CacheConfig:
        """The cache's shape: layers, KV heads, head dim, dtype, device, each layer's window."""
        ...

    @property
    def num_layers(self) -> int:
        """Layers this cache stores keys and values for."""
        ...

    def lengths(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """(B,) int64 on the CPU: tokens committed for each sequence (0 if not held)."""
        ...

    def begin(self, seq_ids: Sequence[int], query_lens: Sequence[int],
              token_ids: torch.Tensor | None = None) -> StepBatch:
        """Make room for `query_lens[b]` new tokens after each sequence's committed ones.

        `token_ids` (N,), when given, lets a cache remember what its blocks hold (prefix
        caching). Raises, changing nothing, when there is no room."""
        ...

    def write(self, layer: int, batch: StepBatch, k: torch.Tensor,
              v: torch.Tensor | None) -> None:
        """Store this layer's new keys and values, (N, Hkv, D) each, at `batch.slot_mapping`;
        under latent attention (`config.latent_dim` > 0) the one row per token as `k`
        (N, 1, R + P) and `v` None."""
        ...

    def read(self, layer: int, batch: StepBatch) -> KVView:
        """What attention reads for this layer: every key of the batch's sequences, new
        ones included, in place."""
        ...

    def commit(self, batch: StepBatch) -> None:
        """Lengths += query_lens, once every layer has written this step."""
        ...

    def abort(self, batch: StepBatch) -> None:
        """Undo `begin`: the cache is as it was before it."""
        ...

    def fork(self, src: int, dst: int) -> None:
        """Make `dst` a sequence with the same contents as `src` (which must be idle)."""
        ...

    def release(self, seq_ids: Sequence[int]) -> None:
        """Forget these sequences; their room becomes free for new ones."""
        ...


@runtime_checkable
class KVCacheManager(Protocol):
    """What a scheduler needs from a cache it serves requests from: room, in blocks.

    A paged cache implements it (and a quantized cache over a paged one passes it through),
    so the scheduler never sees block tables, allocators or pools, and keeps no copy of the
    room arithmetic: it asks `allocate` and takes the answer.
    """

    @property
    def block_size(self) -> int:
        ...

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by some sequence, every group counted."""
        ...

    def admit(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Start holding a new sequence, with the cached blocks its tokens begin with
        (prefix caching); returns how many of its tokens are already stored (a multiple of
        the block size, never all of them: the last token is always left to compute)."""
        ...

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Room for sequence `seq_id`'s first `num_tokens` tokens, in every group, in one
        call: True if it is now held, False -- and nothing changed -- if it does not fit."""
        ...

    def release(self, seq_ids: Sequence[int]) -> None:
        """Free the sequences' blocks (those shared with others stay)."""
        ...

    def check_fits_alone(self, num_tokens: int, max_query_len: int) -> None:
        """Raise ValueError unless one sequence of `num_tokens` tokens, fed at most
        `max_query_len` a step, fits in an otherwise empty cache."""
        ...


class StepLedger:
    """The bookkeeping of one open step, shared by every cache: which layers have written.

    NOTE: one step is open at a time, and commit checks that every layer wrote it; a cache
    that let a second `begin` in, or committed with a layer missing, would store keys of
    different steps at the same positions.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.open_step: int | None = None
        self._next_step = 0
        self._written: set[int] = set()

    def open(self) -> int:
        """Open a new step and return its number; raises if one is already open."""
        if self.open_step is not None:
            raise ValueError(f"step {self.open_step} is still open: commit or abort it before "
                             f"beginning another")
        self.open_step, self._written = self._next_step, set()
        self._next_step += 1
        return self.open_step

    def check(self, batch: StepBatch) -> None:
        """`batch` must be the open step."""
        if self.open_step is None or batch.step != self.open_step:
            raise ValueError(f"batch of step {batch.step} is not the open step "
                             f"({self.open_step}): begin a step before writing, and use its batch")

    def wrote(self, layer: int) -> None:
        self._written.add(layer)

    def has_written(self, layer: int) -> bool:
        """Whether `layer` has written the open step."""
        return layer in self._written

    def close(self, batch: StepBatch, *, complete: bool) -> None:
        """End the open step; with `complete`, first check that every layer wrote it."""
        self.check(batch)
        missing = sorted(set(range(self.num_layers)) - self._written)
        if complete and missing:
            raise ValueError(f"cannot commit step {batch.step}: layers {missing} have not "
                             f"written it; call write on every layer first")
        self.open_step, self._written = None, set()

    def require_idle(self, what: str) -> None:
        if self.open_step is not None:
            raise ValueError(f"cannot {what} while step {self.open_step} is open")


def check_new_kv(k: torch.Tensor, v: torch.Tensor, num_tokens: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """New keys and values must be (N, Hkv, D) in the cache's dtype, on its device."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a (N, Hkv, D) tensor, got {type(t).__name__}")
        if tuple(t.shape) != (num_tokens, num_kv_heads, head_dim):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected (N={num_tokens}, "
                             f"Hkv={num_kv_heads}, D={head_dim})")
        if t.dtype != dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, the cache stores {dtype}")
        if not same_device(t.device, device):
            raise ValueError(f"{name} is on {t.device}, the cache is on {device}")


def check_new_rows(config: CacheConfig, k: torch.Tensor, v: torch.Tensor | None,
                   num_tokens: int) -> None:
    """A write's new rows fit `config`: keys and values (N, Hkv, D), or, for a latent cache,
    one row per token as `k` (N, 1, R + P) and `v` None (nothing is stored twice)."""
    if config.latent_dim:
        if v is not None:
            raise ValueError(f"a latent cache (latent_dim {config.latent_dim}) stores one row "
                             f"per token: pass it as k, with v=None")
        check_new_kv(k, k, num_tokens, config.num_kv_heads, config.head_dim, config.dtype,
                     config.device)
        return
    if v is None:
        raise ValueError("v is None, but this cache stores keys and values (latent_dim 0)")
    check_new_kv(k, v, num_tokens, config.num_kv_heads, config.head_dim, config.dtype,
                 config.device)


def check_query_lens(query_lens: Sequence[int], num_seqs: int) -> list[int]:
    lens = list(query_lens)
    if len(lens) != num_seqs:
        raise ValueError(f"{len(lens)} query_lens for {num_seqs} sequences")
    return [require_int("each query length", n, minimum=1) for n in lens]


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 name the same device when the current device is 0."""
    if a.type != b.type:
        return False
    index = torch.cuda.current_device() if a.type == "cuda" else 0
    return (a.index if a.index is not None else index) == (b.index if b.index is not None
                                                          else index)


def append(cache: KVCache, seq_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
    """Store T new tokens per sequence in every layer in one step: k, v (L, B, Hkv, T, D).

    What a forward pass does through the cache, without a model: tests, experiments and
    chapters use it to fill a cache with known keys and values.
    """
    if k.dim() != 5 or k.shape != v.shape or k.shape[0] != cache.num_layers:
        raise ValueError(f"k and v must be (L={cache.num_layers}, B, Hkv, T, D) of equal shape, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    L, B, Hkv, T, D = k.shape
    batch = cache.begin(seq_ids, [T] * B)
    try:
        for layer in range(L):
            cache.write(layer, batch, k[layer].transpose(1, 2).reshape(B * T, Hkv, D),
                        v[layer].transpose(1, 2).reshape(B * T, Hkv, D))  # (N, Hkv, D)
        cache.commit(batch)
    except BaseException:
        cache.abort(batch)
        raise
