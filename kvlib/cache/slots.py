"""Slots: how a preallocated cache names its sequences, stores their lengths and steps.

`FlatKVCache` and `RingKVCache` both give each sequence a batch slot 0..max_batch_size-1
with room reserved up front. What they share -- checking slot ids, the stored lengths, the
open step, admitting a step's tokens, commit, abort, release, and the checks of a fork --
lives here once; each cache keeps only how it stores and reads keys.

Slot mapping: token at position p of slot r goes to r * max_seq_len + p.

>>> slots = SlotTable(max_batch_size=4, max_seq_len=10, num_layers=1)
>>> slots.begin([2], [3], torch.device("cpu")).slot_mapping.tolist()  # slot 2, positions 0..2
[[20, 21, 22]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvlib.checks import require_ids, require_int
from kvlib.config import CacheConfig
from kvlib.contract import StepBatch, StepLedger, check_new_rows, check_query_lens


class SlotTable:
    """Lengths and the open step of `max_batch_size` slots of `max_seq_len` positions."""

    def __init__(self, max_batch_size: int, max_seq_len: int, num_layers: int) -> None:
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        # NOTE: lengths are host ints, so checks need no device read; they are the only
        # truth about how much of a slot is in use (zeros are valid keys).
        self.lengths = [0] * max_batch_size
        self.ledger = StepLedger(num_layers)
        # The open step on the device, made once in `begin` for every layer's read:
        self.rows: torch.Tensor | None = None  # (B,) int64: the batch's slots
        self.context_lens: torch.Tensor | None = None  # (B,) int64: keys per row

    def row_ids(self, seq_ids: Sequence[int]) -> list[int]:
        """The slots named, checked: distinct ints in [0, max_batch_size)."""
        rows = require_ids("seq_ids", seq_ids)
        B = self.max_batch_size
        bad = [s for s in rows if s >= B]
        if bad:
            raise ValueError(f"batch slot(s) {bad} out of range for a cache with "
                             f"max_batch_size {B} (valid: 0..{B - 1})")
        return rows

    def begin(self, seq_ids: Sequence[int], query_lens: Sequence[int],
              device: torch.device) -> StepBatch:
        """Open a step for `query_lens[b]` new tokens per slot, if they fit."""
        rows = self.row_ids(seq_ids)
        lens = check_query_lens(query_lens, len(rows))
        starts = [self.lengths[r] for r in rows]
        S = self.max_seq_len
        full = [r for r, start, n in zip(rows, starts, lens) if start + n > S]
        if full:
            raise ValueError(f"no room: slot(s) {full} (lengths "
                             f"{[self.lengths[r] for r in full]}) cannot take {lens} more "
                             f"token(s) within max_seq_len {S}")
        step = self.ledger.open()
        slots = torch.tensor([r * S + start + i for r, start, n in zip(rows, starts, lens)
                              for i in range(n)])  # (N,)
        self.rows = torch.tensor(rows, device=device)  # (B,)
        self.context_lens = torch.tensor([a + n for a, n in zip(starts, lens)], device=device)
        return StepBatch.make(rows, starts, lens, slots.to(device)[None], step)  # (1, N)

    def check_write(self, config: CacheConfig, layer: int, batch: StepBatch, k: torch.Tensor,
                    v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Check a write of the open step (v is None for a latent cache); (rows, positions),
        each (N,), of its new tokens."""
        self.check_read(config, layer, batch)
        check_new_rows(config, k, v, batch.num_tokens)
        slots = batch.slot_mapping[0]  # (N,)
        return slots // self.max_seq_len, slots % self.max_seq_len

    def check_read(self, config: CacheConfig, layer: int, batch: StepBatch) -> None:
        require_int("layer", layer, minimum=0, maximum=config.num_layers - 1)
        self.ledger.check(batch)

    def commit(self, batch: StepBatch) -> None:
        self.ledger.close(batch, complete=True)
        for r, n in zip(batch.seq_ids, batch.context_lens):
            self.lengths[r] = n

    def abort(self, batch: StepBatch) -> None:
        # Nothing to undo in the storage: writes past a slot's length are not part of it.
        self.ledger.close(batch, complete=False)

    def fork_rows(self, src: int, dst: int) -> tuple[int, int]:
        """Check a fork of slot `src` into the empty slot `dst`; the caller copies the data,
        then sets `lengths[dst]`."""
        self.ledger.require_idle("fork")
        src_row, dst_row = self.row_ids([src, dst])
        if self.lengths[dst_row]:
            raise ValueError(f"cannot fork into slot {dst}: it holds "
                             f"{self.lengths[dst_row]} token(s); release it first")
        return src_row, dst_row

    def release(self, seq_ids: Sequence[int]) -> None:
        rows = self.row_ids(seq_ids)
        self.ledger.require_idle("release")
        for r in rows:
            self.lengths[r] = 0
