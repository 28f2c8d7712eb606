"""PagedKVCache: keys and values in a pool of fixed-size blocks, mapped by block tables.

A sequence owns a `block_table`: the ids of the blocks holding its tokens, in order. Token
j of a sequence lives in block `block_table[j // BS]` at offset `j % BS`, so its slot in the
pool is `block_table[j // BS] * BS + j % BS`. Blocks are taken from an allocator only when a
sequence reaches them, so the waste is at most the unfilled tail of the last block, not the
unused room of a maximum-length reservation (chapter 3 measures both).

Worked example (BS = 16): a sequence of 45 tokens has two full blocks and 13 tokens in the
third; with block_table [7, 2, 9], token 40 is at offset 40 % 16 = 8 of block 9, slot 152.

>>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, max_batch_size=1,
...                   max_seq_len=64, block_size=16)
>>> cache = PagedKVCache(cfg, num_blocks=4)
>>> batch = cache.begin([5], [45])
>>> cache.block_table(5), batch.slot_mapping[0, 40].item()
([0, 1, 2], 40)

The cache is three parts with one job each, composed here:
- `BlockManager` (host): who holds which blocks, per cache group; prefix hashes; windows;
- `PagedStorage` (device): the pools, writes, block copies;
- `StepBuilder`: each step's positions, slots, lengths and block tables, copied once.

Cache groups. Layers that read the same keys share block tables (`kvlib.cache.groups`): a
model with windowed and global layers (Gemma-2) has two groups, and the windowed one frees
the blocks its window has passed -- their table entries become the pool's null block --
while the global one keeps everything. The windows come from the `CacheConfig`
(`model.cache_config(...)` copies the model's), and attention reads them from the views.

Sharing. `fork` gives a new sequence the same blocks (reference counts go up, nothing is
copied); the first write into a shared, partly filled last block copies that one block
(copy-on-write). `admit` finds full blocks another sequence already computed for the same
leading tokens -- even after that sequence was released, while the blocks wait in the free
queue -- so a prefill computes only the rest.

Implements the `KVCache` contract and the `KVCacheManager` protocol (kvlib.contract). Uses
`config.max_seq_len` as the longest sequence and `config.block_size`; `max_batch_size` does
not apply (the pool bounds how many sequences fit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvlib.cache.block_manager import BlockManager, SequenceBlocks
from kvlib.cache.groups import cache_groups
from kvlib.cache.step_builder import StepBuilder, StepTables
from kvlib.cache.storage import BlockData, PagedStorage
from kvlib.checks import require_ids, require_int
from kvlib.config import CacheConfig
from kvlib.contract import PagedKV, StepBatch, StepLedger, check_query_lens


@dataclass
class _Open:
    """The open step: its tables, and what `abort` must undo."""

    tables: StepTables
    entries_before: dict[int, list[int]]  # seq_id -> table entries per group before begin
    token_ids: list[list[int] | None]  # per batch row: the new tokens, if given


class PagedKVCache:
    """A pool of `num_blocks` blocks of `config.block_size` tokens per cache group."""

    def __init__(self, config: CacheConfig, num_blocks: int | Sequence[int]) -> None:
        self.config = config
        self.groups = cache_groups(config)
        self.manager = BlockManager(self.groups, num_blocks, config.block_size,
                                    config.max_seq_len)
        self.storage = PagedStorage(config, self.groups,
                                    [a.num_blocks for a in self.manager.allocators])
        self.builder = StepBuilder(self.manager, config.device)
        self._ledger = StepLedger(config.num_layers)
        self._open: _Open | None = None

    # -- views and bookkeeping -----------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def num_blocks(self) -> int:
        """Blocks in the pools, every group counted (null blocks not)."""
        return self.manager.num_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.manager.num_used_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.manager.num_free_blocks

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    def k_pool(self, layer: int) -> torch.Tensor:
        return self.storage.k_pool(self._check_layer(layer))  # (NB + 1, Hkv, BS, D)

    def v_pool(self, layer: int) -> torch.Tensor:
        return self.storage.v_pool(self._check_layer(layer))  # (NB + 1, Hkv, BS, D)

    @property
    def seq_ids(self) -> list[int]:
        """The sequences this cache holds."""
        return self.manager.seq_ids

    def block_table(self, seq_id: int, group: int = 0) -> list[int]:
        return self.manager.block_table(seq_id, group)

    def block_tables(self, seq_ids: Sequence[int], group: int = 0) -> torch.Tensor:
        """(B, max_blocks) int32 on the cache's device, padded with -1."""
        tables = [self.block_table(s, group) for s in require_ids("seq_ids", seq_ids)]
        out = torch.full((len(tables), max(1, max(map(len, tables)))), -1, dtype=torch.int32)
        for row, table in enumerate(tables):
            out[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
        return out.to(self.config.device)

    def ref_counts(self, seq_id: int, group: int = 0) -> list[int]:
        return self.manager.ref_counts(seq_id, group)

    def check_invariants(self) -> None:
        """The manager's invariants (no leaked block, ref counts that match the tables)."""
        self.manager.check_invariants()

    # -- the scheduler's protocol (KVCacheManager) ------------------------------------------
    def admit(self, seq_id: int, token_ids: Sequence[int]) -> int:
        self._ledger.require_idle("admit a sequence")
        return self.manager.admit(seq_id, token_ids)

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        self._ledger.require_idle("allocate")
        return self.manager.allocate(seq_id, num_tokens)

    def check_fits_alone(self, num_tokens: int, max_query_len: int) -> None:
        if num_tokens > self.config.max_seq_len:
            raise ValueError(f"{num_tokens} tokens exceed the cache's max_seq_len "
                             f"{self.config.max_seq_len}")
        self.manager.check_fits_alone(num_tokens, max_query_len)

    # -- the cache contract -------------------------------------------------------------------
    def lengths(self, seq_ids: Sequence[int]) -> torch.Tensor:
        ids = require_ids("seq_ids", seq_ids)
        return torch.tensor([self.manager.length(s) if self.manager.holds(s) else 0
                             for s in ids], dtype=torch.int64)  # (B,)

    def begin(self, seq_ids: Sequence[int], query_lens: Sequence[int],
              token_ids: Sequence[int] | torch.Tensor | None = None) -> StepBatch:
        ids = require_ids("seq_ids", seq_ids)
        lens = check_query_lens(query_lens, len(ids))
        self._ledger.require_idle("begin a step")
        if token_ids is not None:
            token_ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(
                token_ids)
            if len(token_ids) != sum(lens):
                raise ValueError(f"token_ids must be (N={sum(lens)},), got {len(token_ids)}")
        m = self.manager
        starts = [m.length(s) if m.holds(s) else 0 for s in ids]
        for s, start, n in zip(ids, starts, lens):
            if start + n > self.config.max_seq_len:
                raise ValueError(f"no room: sequence {s} holds {start} token(s); {n} more would "
                                 f"pass max_seq_len {self.config.max_seq_len}")
        before = {s: m.num_entries(s) for s in ids if m.holds(s)}
        items = [(s, start + n) for s, start, n in zip(ids, starts, lens)]
        if not m.allocate_many(items):
            need = sum(self.manager.blocks_needed(items))
            raise ValueError(f"out of blocks: this step needs {need} new block(s), "
                             f"{m.num_free_blocks} of {m.num_blocks} are free")
        # All checks passed; from here on nothing raises.
        self.storage.copy_blocks(m.pending_copies)
        m.pending_copies.clear()
        step = self._ledger.open()
        batch, tables = self.builder.build(ids, lens, step)
        cu = batch.query_starts
        self._open = _Open(tables, before, [
            token_ids[cu[b]:cu[b + 1]] if token_ids is not None else None
            for b in range(len(ids))])
        return batch

    def write(self, layer: int, batch: StepBatch, k: torch.Tensor,
              v: torch.Tensor | None) -> None:
        self._check_layer(layer)
        self._ledger.check(batch)
        g = self.storage.group_of(layer)
        # (N, Hkv, D) into the pool at slot_mapping: a Triton kernel on a GPU, indexing here
        self.storage.write(layer, batch.slot_mapping[g], k, v)
        self._ledger.wrote(layer)

    def read(self, layer: int, batch: StepBatch) -> PagedKV:
        self._check_layer(layer)
        self._ledger.check(batch)
        tables = self._open.tables
        return self.view(layer, tables.block_tables[self.storage.group_of(layer)],
                         tables.context_lens)

    def view(self, layer: int, block_tables: torch.Tensor, context_lens: torch.Tensor) -> PagedKV:
        """The layer's pools (and scales) read through the given (B, M) tables of its group and
        (B,) lengths, with the group's window and sinks: what `read` hands attention, for
        tables kept elsewhere (a CUDA graph's persistent buffers, kvlib.cuda_graphs)."""
        group = self.groups[self.storage.group_of(self._check_layer(layer))]
        return PagedKV(self.k_pool(layer), self.v_pool(layer), block_tables, context_lens,
                       group.window, group.sink_tokens, *self.storage.scale_pools(layer))

    def step_tables(self, batch: StepBatch) -> StepTables:
        """The open step's block tables (one (B, M) per group) and lengths, on the device."""
        self._ledger.check(batch)
        return self._open.tables

    def record_writes(self, batch: StepBatch) -> None:
        """Every layer of the open step has written it, through `storage.write` at the step's
        slots, outside `write`: a step replayed from a CUDA graph, whose Python did not run."""
        self._ledger.check(batch)
        for layer in range(self.num_layers):
            self._ledger.wrote(layer)

    def commit(self, batch: StepBatch) -> None:
        self._ledger.close(batch, complete=True)
        for s, n, new in zip(batch.seq_ids, batch.query_lens, self._open.token_ids):
            self.manager.commit(s, n, new)
        self._open = None

    def abort(self, batch: StepBatch) -> None:
        self._ledger.close(batch, complete=False)
        for s in batch.seq_ids:
            if s in self._open.entries_before:
                self.manager.truncate(s, self._open.entries_before[s])
            else:
                self.manager.release([s])
        # NOTE: a copy-on-write made by begin stays: the copy holds the same tokens.
        self._open = None

    def fork(self, src: int, dst: int) -> None:
        """`dst` shares every block of `src`; nothing is copied until one of them writes."""
        self._ledger.require_idle("fork")
        self.manager.fork(src, dst)

    def release(self, seq_ids: Sequence[int]) -> None:
        self._ledger.require_idle("release")
        self.manager.release(seq_ids)

    # -- moving a sequence out and in ----------------------------------------------------------
    def export_sequence(self, seq_id: int) -> tuple[SequenceBlocks, list[BlockData]]:
        """A sequence's blocks and, per group, a copy of their data (L_g, 2, n, Hkv, BS, D)
        (freed window blocks left out; with codes, a (codes, scales) pair): everything
        `import_sequence` needs elsewhere."""
        self._ledger.require_idle("export")
        blocks = self.manager.export(seq_id)
        data = [self.storage.read_blocks(g, [b for b in ids if b is not None])
                for g, ids in enumerate(blocks.block_ids)]
        return blocks, data

    def import_sequence(self, seq_id: int, blocks: SequenceBlocks,
                        data: Sequence[BlockData]) -> None:
        """Hold an exported sequence as `seq_id`, in fresh blocks of this cache. Raises
        ValueError, changing nothing, when it does not fit or does not match."""
        self._ledger.require_idle("import")
        self.manager.check_import(seq_id, blocks)
        if len(data) != len(self.groups):
            raise ValueError(f"{len(data)} block tensors for {len(self.groups)} cache groups")
        for g, (ids, d) in enumerate(zip(blocks.block_ids, data)):
            self.storage.check_blocks(g, sum(b is not None for b in ids), d)
        new_ids = self.manager.import_sequence(seq_id, blocks)  # raises, changing nothing
        for g, (ids, d) in enumerate(zip(new_ids, data)):
            self.storage.write_blocks(g, [b for b in ids if b is not None], d)

    def _check_layer(self, layer: int) -> int:
        return require_int("layer", layer, minimum=0, maximum=self.config.num_layers - 1)
