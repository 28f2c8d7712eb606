"""PagedKVCache: keys and values in a pool of fixed-size blocks, mapped by block tables.

A sequence owns a `block_table`: the ids of the blocks holding its tokens, in order. Token
j of a sequence lives in block `block_table[j // BS]` at offset `j % BS`, so its slot in the
pool is `block_table[j // BS] * BS + j % BS`. Blocks are taken from a `BlockAllocator` only
when a sequence reaches them, so the waste is at most the unfilled tail of the last block,
not the unused room of a maximum-length reservation (chapter 3 measures both).

Pool layout, per layer: K and V each `(NB, Hkv, BS, D)`, all of it one tensor
`(L, 2, NB, Hkv, BS, D)`. Within a block, each head's keys are one contiguous `(BS, D)` tile:
the head-major order chapter 2 found cheapest to read, and the tile a decode kernel loads.

Worked example (BS = 16): a sequence of 45 tokens has two full blocks and 13 tokens in the
third; with block_table [7, 2, 9], token 40 is at offset 40 % 16 = 8 of block 9, slot 152.

>>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, max_batch_size=1,
...                   max_seq_len=64, block_size=16)
>>> cache = PagedKVCache(cfg, num_blocks=4)
>>> batch = cache.begin([5], [45])
>>> cache.block_table(5), batch.slot_mapping[40].item()
([0, 1, 2], 40)

Sharing. `fork` gives a new sequence the same blocks (reference counts go up, nothing is
copied); the first write into a shared, partly filled last block copies that one block
(copy-on-write). `reuse_prefix` finds full blocks another sequence already computed for the
same leading tokens -- even after that sequence was released, while the blocks wait in the
free queue -- so a prefill computes only the rest.

Sliding windows. With `window=W` (a model whose every layer has window W, Mistral-7B v0.1),
a block whose tokens are all older than the next query's window (positions < length - W + 1)
is freed at commit; its place in the table becomes -1, so the table still maps position j
to entry j // BS. A sequence then holds about W / BS + 1 blocks however long it grows.
(Models that mix windowed and global layers, Gemma-2, would need a table per kind of layer.)

Implements the `KVCache` contract (kvlib.cache.contract). Uses `config.max_seq_len` as the
longest sequence and `config.block_size`; `max_batch_size` does not apply (the pool bounds
how many sequences fit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from kvlib.cache.blocks import BlockAllocator, KVCacheBlock, hash_block_tokens
from kvlib.cache.contract import (
    PagedKV,
    StepBatch,
    StepLedger,
    check_new_kv,
    check_query_lens,
)
from kvlib.checks import require_ids, require_int
from kvlib.config import CacheConfig
from kvlib.kernels.store_kv import store_kv


@dataclass
class _Sequence:
    blocks: list[KVCacheBlock | None] = field(default_factory=list)  # None: out of the window
    length: int = 0  # committed tokens
    # Known token ids (for prefix hashes); None once a step came without them.
    tokens: list[int] | None = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # of its first len(hashes) full blocks


@dataclass
class _Pending:
    """What `begin` changed, so `abort` can undo it."""

    admitted: list[int]
    appended: dict[int, int]  # seq_id -> blocks added at the end of its table
    token_ids: list[list[int] | None]  # per batch row: the new tokens, if given


class PagedKVCache:
    """A pool of `num_blocks` blocks of `config.block_size` tokens, for every layer."""

    def __init__(self, config: CacheConfig, num_blocks: int, window: int | None = None) -> None:
        require_int("num_blocks", num_blocks, minimum=1)
        self.window = None if window is None else require_int("window", window, minimum=1)
        self.config = config
        self.block_size = config.block_size
        self.allocator = BlockAllocator(num_blocks)
        L, Hkv, BS, D = config.num_layers, config.num_kv_heads, config.block_size, config.head_dim
        self.data = torch.zeros(L, 2, num_blocks, Hkv, BS, D, dtype=config.dtype,
                                device=config.device)  # (L, 2, NB, Hkv, BS, D)
        self.max_blocks_per_seq = -(-config.max_seq_len // BS)
        self._seqs: dict[int, _Sequence] = {}
        self._ledger = StepLedger(L)
        self._pending: _Pending | None = None
        self._step_tables: torch.Tensor | None = None  # (B, max_blocks) of the open step

    # -- views and bookkeeping -----------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def k_pool(self, layer: int) -> torch.Tensor:
        return self.data[layer, 0]  # (NB, Hkv, BS, D)

    def v_pool(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]  # (NB, Hkv, BS, D)

    @property
    def seq_ids(self) -> list[int]:
        """The sequences this cache holds."""
        return list(self._seqs)

    def block_table(self, seq_id: int) -> list[int]:
        return [-1 if b is None else b.block_id for b in self._held(seq_id).blocks]

    def block_tables(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """(B, max_blocks) int32 on the cache's device, padded with -1."""
        tables = [self.block_table(s) for s in require_ids("seq_ids", seq_ids)]
        width = max(1, max(len(t) for t in tables))
        out = torch.full((len(tables), width), -1, dtype=torch.int32)
        for row, table in enumerate(tables):
            out[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
        return out.to(self.config.device)

    def ref_counts(self, seq_id: int) -> list[int]:
        return [0 if b is None else b.ref_count for b in self._held(seq_id).blocks]

    # -- the cache contract -------------------------------------------------------------------
    def lengths(self, seq_ids: Sequence[int]) -> torch.Tensor:
        ids = require_ids("seq_ids", seq_ids)
        return torch.tensor([self._seqs[s].length if s in self._seqs else 0 for s in ids],
                            dtype=torch.int64)  # (B,)

    def begin(self, seq_ids: Sequence[int], query_lens: Sequence[int],
              token_ids: torch.Tensor | None = None) -> StepBatch:
        ids = require_ids("seq_ids", seq_ids)
        lens = check_query_lens(query_lens, len(ids))
        self._ledger.require_idle("begin a step")
        if token_ids is not None and tuple(token_ids.shape) != (sum(lens),):
            raise ValueError(f"token_ids must be (N={sum(lens)},), got {tuple(token_ids.shape)}")
        BS = self.block_size
        starts = [self._seqs[s].length if s in self._seqs else 0 for s in ids]
        need = 0
        sharers: dict[int, int] = {}  # block id -> sharers in this step that write into it
        for s, start, n in zip(ids, starts, lens):
            if start + n > self.config.max_seq_len:
                raise ValueError(f"no room: sequence {s} holds {start} token(s); {n} more would "
                                 f"pass max_seq_len {self.config.max_seq_len}")
            held = len(self._seqs[s].blocks) if s in self._seqs else 0
            need += -(-(start + n) // BS) - held
            if self._needs_copy(s, start):
                # NOTE: each copy drops the shared block's ref count, so of the sharers that
                # write in this step only the first ref_count - 1 copy; the last one keeps it.
                last = self._seqs[s].blocks[-1]
                sharers[last.block_id] = sharers.get(last.block_id, 0) + 1
                need += sharers[last.block_id] < last.ref_count
        if need > self.allocator.num_free_blocks:
            raise ValueError(f"out of blocks: this step needs {need} new block(s), "
                             f"{self.allocator.num_free_blocks} of {self.num_blocks} are free")
        # All checks passed; from here on nothing raises.
        step = self._ledger.open()
        pending = _Pending([], {}, [])
        new_ids = token_ids.tolist() if token_ids is not None else None
        cu = 0
        for s, start, n in zip(ids, starts, lens):
            if s not in self._seqs:
                self._seqs[s] = _Sequence()
                pending.admitted.append(s)
            seq = self._seqs[s]
            if self._needs_copy(s, start):
                self._copy_on_write(seq, start % BS)
            grow = -(-(start + n) // BS) - len(seq.blocks)
            if grow > 0:
                seq.blocks += self.allocator.allocate(grow)
            pending.appended[s] = max(grow, 0)
            pending.token_ids.append(new_ids[cu:cu + n] if new_ids is not None else None)
            cu += n
        self._pending = pending
        batch = StepBatch.make(ids, starts, lens, torch.empty(0, dtype=torch.int64), step)
        self._step_tables = self.block_tables(ids)  # (B, max_blocks)
        tables = self._step_tables.cpu().long()
        rows, pos = batch.token_rows, batch.positions  # (N,), (N,)
        slots = tables[rows, pos // BS] * BS + pos % BS  # (N,)
        return replace(batch, positions=pos.to(self.config.device),
                       slot_mapping=slots.to(self.config.device))

    def write(self, layer: int, batch: StepBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        self._check_layer(layer)
        self._ledger.check(batch)
        cfg = self.config
        check_new_kv(k, v, batch.num_tokens, cfg.num_kv_heads, cfg.head_dim, cfg.dtype,
                     cfg.device)
        # (N, Hkv, D) into the pool at slot_mapping: a Triton kernel on a GPU, indexing here
        store_kv(k.detach(), v.detach(), self.k_pool(layer), self.v_pool(layer),
                 batch.slot_mapping)
        self._ledger.wrote(layer)

    def read(self, layer: int, batch: StepBatch) -> PagedKV:
        self._check_layer(layer)
        self._ledger.check(batch)
        assert self._step_tables is not None
        lens = batch.context_lens.to(device=self.config.device, dtype=torch.int32)  # (B,)
        return PagedKV(self.k_pool(layer), self.v_pool(layer), self._step_tables, lens)

    def commit(self, batch: StepBatch) -> None:
        self._ledger.close(batch, complete=True)
        assert self._pending is not None
        for s, n, new in zip(batch.seq_ids, batch.query_lens.tolist(),
                             self._pending.token_ids):
            seq = self._seqs[s]
            seq.length += n
            if seq.tokens is not None and new is not None:
                seq.tokens += new
                self._hash_full_blocks(seq)
            else:
                seq.tokens = None  # contents unknown from here: no more prefix hashes
            self._free_out_of_window(seq)
        self._pending = self._step_tables = None

    def abort(self, batch: StepBatch) -> None:
        self._ledger.close(batch, complete=False)
        assert self._pending is not None
        for s, grow in self._pending.appended.items():
            seq = self._seqs[s]
            if grow:
                added = seq.blocks[len(seq.blocks) - grow:]
                del seq.blocks[len(seq.blocks) - grow:]
                self.allocator.free(added[::-1])
        for s in self._pending.admitted:
            del self._seqs[s]
        # NOTE: a copy-on-write made by begin stays: the copy holds the same tokens.
        self._pending = self._step_tables = None

    def fork(self, src: int, dst: int) -> None:
        """`dst` shares every block of `src`; nothing is copied until one of them writes."""
        self._ledger.require_idle("fork")
        parent = self._held(src)
        require_int("dst", dst, minimum=0)
        if dst in self._seqs:
            raise ValueError(f"cannot fork into sequence {dst}: it already exists")
        for block in parent.blocks:
            if block is not None:
                self.allocator.share(block)
        self._seqs[dst] = _Sequence(list(parent.blocks), parent.length,
                                    None if parent.tokens is None else list(parent.tokens),
                                    list(parent.hashes))

    def release(self, seq_ids: Sequence[int]) -> None:
        ids = require_ids("seq_ids", seq_ids)
        self._ledger.require_idle("release")
        for s in ids:
            self._held(s)
        for s in ids:
            blocks = self._seqs.pop(s).blocks[::-1]  # tail first: see free()
            self.allocator.free([b for b in blocks if b is not None])

    # -- prefix caching ------------------------------------------------------------------------
    def reuse_prefix(self, seq_id: int, prompt_ids: Sequence[int]) -> int:
        """Admit a new sequence with the cached full blocks its prompt starts with.

        Returns how many tokens it now holds (a multiple of the block size); the caller
        prefills only `prompt_ids[returned:]`. NOTE: the last prompt token is always left to
        compute, even when every block is cached: its logits choose the first new token.
        """
        self._ledger.require_idle("reuse a prefix")
        require_int("seq_id", seq_id, minimum=0)
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already exists: reuse_prefix admits new ones")
        tokens = [int(t) for t in prompt_ids]
        BS, blocks, hashes = self.block_size, [], []
        parent = None
        for i in range((len(tokens) - 1) // BS):
            parent = hash_block_tokens(parent, tokens[i * BS:(i + 1) * BS])
            block = self.allocator.lookup(parent)
            if block is None:
                break
            blocks.append(block)
            hashes.append(parent)
        for block in blocks:
            self.allocator.share(block)
        n = len(blocks) * BS
        self._seqs[seq_id] = _Sequence(blocks, n, tokens[:n], hashes)
        return n

    # -- internals -----------------------------------------------------------------------------
    def _needs_copy(self, seq_id: int, start: int) -> int:
        """1 if the next write lands in a partly filled block another sequence shares."""
        seq = self._seqs.get(seq_id)
        return int(seq is not None and start % self.block_size != 0
                   and seq.blocks[-1].ref_count > 1)

    def _copy_on_write(self, seq: _Sequence, filled: int) -> None:
        old = seq.blocks[-1]
        (new,) = self.allocator.allocate(1)
        self.data[:, :, new.block_id, :, :filled] = self.data[:, :, old.block_id, :, :filled]
        self.allocator.free([old])
        seq.blocks[-1] = new

    def _free_out_of_window(self, seq: _Sequence) -> None:
        """Free the blocks no query reads again: all positions < length - W + 1.

        >>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, max_batch_size=1,
        ...                   max_seq_len=64, block_size=4)
        >>> cache = PagedKVCache(cfg, num_blocks=8, window=6)
        >>> batch = cache.begin([0], [13])   # 13 tokens: the next query (13) reads 8..13
        >>> for layer in range(1):
        ...     cache.write(layer, batch, torch.zeros(13, 1, 2), torch.zeros(13, 1, 2))
        >>> cache.commit(batch)
        >>> cache.block_table(0)             # blocks 0 and 1 (positions 0..7) freed
        [-1, -1, 2, 3]
        """
        if self.window is None:
            return
        first_needed = seq.length - self.window + 1  # the next query's oldest key
        for i in range(max(first_needed, 0) // self.block_size):
            if seq.blocks[i] is not None:
                self.allocator.free([seq.blocks[i]])
                seq.blocks[i] = None

    def _hash_full_blocks(self, seq: _Sequence) -> None:
        BS = self.block_size
        assert seq.tokens is not None
        for i in range(len(seq.hashes), seq.length // BS):
            parent = seq.hashes[-1] if seq.hashes else None
            block_hash = hash_block_tokens(parent, seq.tokens[i * BS:(i + 1) * BS])
            self.allocator.cache_block(seq.blocks[i], block_hash)
            seq.hashes.append(block_hash)

    def _held(self, seq_id: int) -> _Sequence:
        require_int("seq_id", seq_id, minimum=0)
        if seq_id not in self._seqs:
            raise ValueError(f"unknown sequence {seq_id}: this cache holds {sorted(self._seqs)}")
        return self._seqs[seq_id]

    def _check_layer(self, layer: int) -> None:
        require_int("layer", layer, minimum=0, maximum=self.config.num_layers - 1)
