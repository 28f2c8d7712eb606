"""The step builder: one step's index tensors, built on the host and copied to the device once.

A paged step needs, on the device: each new token's position and slot (one slot row per cache
group), where each sequence's tokens start in the packed batch (`cu_query_lens`), the keys
each sequence will hold (`context_lens`), and its block tables. All of it follows from what
the host already knows -- the manager's tables and the step's query lengths -- so it is
computed there with numpy, packed into one int64 buffer, and sent in ONE host-to-device copy
(from pinned memory, without waiting, on a GPU). Nothing is read back from the device.

On a GPU the device side is persistent: the same buffers are reused every step (grown only
when a step is larger than any before), so their addresses stay fixed, which replaying a step
from a CUDA graph requires. On the CPU the host buffer itself is the step's tensors. The manager keeps each sequence's block table as a host array that it
updates in place when a block is added or freed, so building a step copies table rows, it
does not rebuild them.

Worked example (blocks of 4): a sequence holding 5 tokens in blocks [7, 2] feeds 2 more, so
its positions are 5 and 6, both in its second block: slots 2 * 4 + 1 and 2 * 4 + 2.

>>> import numpy as np
>>> slots(np.array([[7, 2]]), rows=np.array([0, 0]), positions=np.array([5, 6]),
...       block_size=4).tolist()
[9, 10]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvlib.cache.block_manager import BlockManager
from kvlib.contract import StepBatch


def slots(tables: np.ndarray, rows: np.ndarray, positions: np.ndarray,
          block_size: int) -> np.ndarray:
    """(N,) slot of each token: its block's id * block_size + its offset in the block."""
    return tables[rows, positions // block_size].astype(np.int64) * block_size + (
        positions % block_size)


@dataclass(frozen=True)
class StepTables:
    """What the views of one step read, on the device, beside its `StepBatch`."""

    block_tables: tuple[torch.Tensor, ...]  # per group (B, M_g) int32, padded with -1
    context_lens: torch.Tensor  # (B,) int32


class StepBuilder:
    """Builds `StepBatch` + `StepTables` for a `BlockManager`, on `device`."""

    def __init__(self, manager: BlockManager, device: torch.device) -> None:
        self.manager, self.device = manager, torch.device(device)
        self._device_buf = torch.empty(0, dtype=torch.int64, device=self.device)
        self._int32_buf = torch.empty(0, dtype=torch.int32, device=self.device)
        # On a GPU: two pinned host buffers used in turn, each with the event of its last
        # copy, so the host never overwrites a buffer a copy is still reading.
        self._pinned: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def build(self, seq_ids: Sequence[int], query_lens: Sequence[int],
              step: int) -> tuple[StepBatch, StepTables]:
        m, BS = self.manager, self.manager.block_size
        B, G = len(seq_ids), len(m.groups)
        lens = np.asarray(query_lens, dtype=np.int64)  # (B,)
        starts = np.asarray([m.length(s) for s in seq_ids], dtype=np.int64)  # (B,)
        context = starts + lens  # (B,)
        cu = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])  # (B+1,)
        N = int(cu[-1])
        rows = np.repeat(np.arange(B), lens)  # (N,) batch row of each token
        positions = starts[rows] + np.arange(N) - cu[:-1][rows]  # (N,)
        M = int(-(-context.max() // BS))  # table width: blocks of the longest sequence
        tables = np.full((G, B, M), -1, dtype=np.int64)  # (G, B, M)
        for g in range(G):
            for b, s in enumerate(seq_ids):
                row = m.table(s, g)[:M]
                tables[g, b, :len(row)] = row
        slot_mapping = np.stack([slots(tables[g], rows, positions, BS) for g in range(G)])
        host = np.concatenate([positions, slot_mapping.ravel(), cu, context, tables.ravel()])
        dev = self._to_device(host)  # one copy; views below
        ends = np.cumsum([N, G * N, B + 1, B, G * B * M])
        small = self._as_int32(dev[ends[1]:ends[4]])  # cu, context, tables as int32
        batch = StepBatch(tuple(seq_ids), tuple(int(n) for n in lens),
                          tuple(int(c) for c in context), dev[:ends[0]],
                          dev[ends[0]:ends[1]].view(G, N), small[:B + 1], step)
        block_tables = small[2 * B + 1:].view(G, B, M)  # (G, B, M)
        return batch, StepTables(tuple(block_tables.unbind(0)), small[B + 1:2 * B + 1])

    def _to_device(self, host: np.ndarray) -> torch.Tensor:
        """`host` int64 on the device, in one copy into the persistent device buffer."""
        if self.device.type == "cpu":
            return torch.from_numpy(host)  # already where it is used: no copy, fresh per step
        size = host.shape[0]
        if self._device_buf.shape[0] < size:
            self._device_buf = torch.empty(max(size, 2 * self._device_buf.shape[0]),
                                           dtype=torch.int64, device=self.device)
        src = torch.from_numpy(host)
        if self.device.type == "cuda":
            src = self._pin(src)
        self._device_buf[:size].copy_(src, non_blocking=True)  # the builder's one copy
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._copied[self._turn] = event
            self._turn ^= 1
        return self._device_buf[:size]

    def _pin(self, src: torch.Tensor) -> torch.Tensor:
        size = src.shape[0]
        if not self._pinned or self._pinned[0].shape[0] < size:
            self._pinned = [torch.empty(max(size, 1024), dtype=torch.int64, pin_memory=True)
                            for _ in range(2)]
            self._copied = [None, None]
        event = self._copied[self._turn]
        if event is not None:
            event.synchronize()  # the copy from this buffer two steps ago: long done
        buf = self._pinned[self._turn][:size]
        buf.copy_(src)
        return buf

    def _as_int32(self, x: torch.Tensor) -> torch.Tensor:
        """The int32 the kernels take, in a persistent buffer (a copy on the device)."""
        if self.device.type == "cpu":
            return x.to(torch.int32)
        if self._int32_buf.shape[0] < x.shape[0]:
            self._int32_buf = torch.empty(max(x.shape[0], 2 * self._int32_buf.shape[0]),
                                          dtype=torch.int32, device=self.device)
        out = self._int32_buf[:x.shape[0]]
        out.copy_(x)
        return out
