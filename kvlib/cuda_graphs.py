"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, on persistent buffers.

An eager decode step launches a few kernels per layer, each paid for in Python and in launch
time; at small batches that host time, not the GPU, sets the step's length. A CUDA graph
records every launch of one step once and replays them all with one call. A graph replays
*the same launches on the same addresses*, so everything a step reads must sit in buffers
that outlive it, at fixed shapes, and nothing the host computes per step may be baked in:

    persistent buffers (device)        filled each step by copies, then the graph replays
    token_ids      (Bmax,)             the token each sequence feeds
    positions      (Bmax,)             its position
    slot_mapping   (G, Bmax)           where its key and value go, per cache group
    context_lens   (Bmax,) int32       keys it will hold
    block_tables   (G, Bmax, M) int32  M = the cache's most blocks per sequence, whatever
                                       the step's longest sequence: a fixed width per graph

A step of B sequences runs in the smallest bucket b >= B (1, 2, 4, 8, ... up to the largest
batch the engine can run); rows B..b-1 are padding: slot -1 (their keys and values are not
stored), length 1, reading the group's null block, and their logits are ignored. Only pure
decode steps (one new token per sequence) go through graphs; steps with prompt chunks run
eagerly, as do batches larger than the largest bucket.

What is frozen into a graph, and is therefore per bucket: the batch size b, the table width M,
the split plan of the decode kernel (computed from b and M alone, never from the lengths),
each layer's window and sinks. What varies per step comes from the buffers above. The model's
attention reads its views through `PagedKVCache.view` over those buffers instead of the open
step's tables, and writes through the cache's storage; after a replay the engine tells the
cache that every layer wrote (`record_writes`) and commits as usual.

Where it runs. On a CUDA device the graph is a `torch.cuda.CUDAGraph`, captured on a side
stream after one warm-up run (Triton compiles, cuBLAS picks its kernels), all buckets sharing
one memory pool. Anywhere else `Replay` stands in: "capturing" keeps the step function and
"replaying" runs it again on the same buffers, so the static-shape discipline -- padding,
buckets, buffer reuse, the fixed table width -- is exercised and tested on a CPU, while the
real capture is tested only where a GPU is (tests/test_cuda_graphs.py).

Worked example of the buckets: an engine of up to 20 sequences has buckets 1, 2, 4, 8, 16 and
32 (the first power of two that holds 20); a step of 5 decodes runs padded to 8.

>>> buckets(20)
(1, 2, 4, 8, 16, 32)
>>> bucket_for(5, buckets(20)), bucket_for(33, buckets(20))
(8, None)

Legend: B sequences in the step, b its bucket, G cache groups, M blocks per table, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvlib.cache.paged import PagedKVCache
from kvlib.contract import PagedKV, StepBatch
from kvlib.model import TransformerLM

GRAPH_BACKENDS = ("fast", "triton")  # on CUDA: the Triton kernels, which read no host values


def buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two from 1 up to the first that holds `max_batch`."""
    out = [1]
    while out[-1] < max_batch:
        out.append(out[-1] * 2)
    return tuple(out)


def bucket_for(num_seqs: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `num_seqs` rows, or None when none does."""
    return next((b for b in sizes if b >= num_seqs), None)


def _not_paged(cache: object) -> str | None:
    """Why `cache` cannot be replayed over (any device), or None for a PagedKVCache."""
    if isinstance(cache, PagedKVCache):
        return None
    return f"a {type(cache).__name__} (graphs replay steps over a PagedKVCache's blocks)"


def graphs_supported(model: TransformerLM, cache: object) -> str | None:
    """None when decode steps of `model` over `cache` can be captured on a GPU, else why not."""
    if (why := _not_paged(cache)) is not None:
        return why
    if model.attention not in GRAPH_BACKENDS:
        return f"attention {model.attention!r} (graphs take one of {GRAPH_BACKENDS})"
    from kvlib.kernels.common import supports_block_size, triton

    if triton is None or not supports_block_size(cache.block_size):
        return "no Triton, or a block size its kernels do not take"
    return None


class Replay:
    """What stands in for a CUDA graph off the GPU: capture keeps the function, replay runs it
    again on the same buffers and keeps its output where the graph's output would be."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self.fn = fn
        self.output = fn()

    def replay(self) -> None:
        self.output = self.fn()


class CudaGraph:
    """One step captured as a `torch.cuda.CUDAGraph` (warmed up once on a side stream)."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm-up: Triton compiles, cuBLAS chooses, outside the capture
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn()  # recorded, not run: its memory is the graph's, reused by replay
        self.graph.replay()

    def replay(self) -> None:
        self.graph.replay()


@dataclass
class _Buffers:
    """The persistent inputs of every bucket's graph (rows [:b] of each are bucket b's)."""

    token_ids: torch.Tensor  # (Bmax,) int64
    positions: torch.Tensor  # (Bmax,) int64
    slot_mapping: torch.Tensor  # (G, Bmax) int64
    cu_query_lens: torch.Tensor  # (Bmax + 1,) int32: 0, 1, 2, ...: one token per row
    context_lens: torch.Tensor  # (Bmax,) int32
    block_tables: torch.Tensor  # (G, Bmax, M) int32


class _GraphCache:
    """What attention writes to and reads from inside a captured step: the cache's storage,
    through the persistent tables (the subset of `KVCache` that `TransformerLM` calls)."""

    def __init__(self, cache: PagedKVCache, tables: torch.Tensor, context_lens: torch.Tensor):
        self.cache, self.tables, self.context_lens = cache, tables, context_lens

    def write(self, layer: int, batch: StepBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        g = self.cache.storage.group_of(layer)
        self.cache.storage.write(layer, batch.slot_mapping[g], k, v)  # slot -1: skipped

    def read(self, layer: int, batch: StepBatch) -> PagedKV:
        g = self.cache.storage.group_of(layer)
        return self.cache.view(layer, self.tables[g], self.context_lens)


class DecodeGraphs:
    """Decode steps of one model over one paged cache, replayed per bucket.

    Args:
        model: the TransformerLM (its weights are read in place by every replay).
        cache: the PagedKVCache the engine serves from.
        max_batch: the most sequences a step runs (the largest bucket holds it).
        use_cuda_graphs: capture real CUDA graphs (the cache must be on a CUDA device);
            False: `Replay` re-runs the step function on the buffers (any device).
    """

    def __init__(self, model: TransformerLM, cache: PagedKVCache, max_batch: int, *,
                 use_cuda_graphs: bool) -> None:
        why = graphs_supported(model, cache) if use_cuda_graphs else _not_paged(cache)
        if why is not None:
            raise ValueError(f"decode steps cannot be replayed from graphs over {why}")
        if use_cuda_graphs and torch.device(cache.config.device).type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the cache is on "
                             f"{cache.config.device}")
        self.model, self.cache, self.use_cuda_graphs = model, cache, use_cuda_graphs
        self.sizes = buckets(max_batch)
        device, G, Bmax = cache.config.device, len(cache.groups), self.sizes[-1]
        BS = cache.block_size
        M = -(-cache.config.max_seq_len // BS)  # the widest table any sequence can have
        self.buffers = _Buffers(
            torch.zeros(Bmax, dtype=torch.int64, device=device),  # (Bmax,)
            torch.zeros(Bmax, dtype=torch.int64, device=device),  # (Bmax,)
            torch.full((G, Bmax), -1, dtype=torch.int64, device=device),  # (G, Bmax)
            torch.arange(Bmax + 1, dtype=torch.int32, device=device),  # (Bmax + 1,)
            torch.ones(Bmax, dtype=torch.int32, device=device),  # (Bmax,)
            torch.full((G, Bmax, M), -1, dtype=torch.int32, device=device))  # (G, Bmax, M)
        # Padding rows read block 0 of their table: each group's null block (zeros).
        self._null = torch.tensor([pool.shape[2] - 1 for pool in cache.storage.pools],
                                  dtype=torch.int32)[:, None].to(device)  # (G, 1)
        self.graphs: dict[int, Replay | CudaGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if use_cuda_graphs else None
        self.num_replays = 0

    def accepts(self, batch: StepBatch) -> bool:
        """Whether this step can replay: pure decode, and a bucket holds it (host values)."""
        return batch.uniform_len == 1 and bucket_for(batch.num_seqs, self.sizes) is not None

    def run(self, token_ids: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """The step's (B, V) float32 logits, one row per sequence, from the bucket's graph.

        The cache's open step is `batch`; its keys and values are stored by the replay, and
        the cache is told so (`record_writes`): the caller commits or aborts as usual."""
        B, b = batch.num_seqs, bucket_for(batch.num_seqs, self.sizes)
        if batch.uniform_len != 1 or b is None:
            raise ValueError(f"graphs replay pure decode steps of at most {self.sizes[-1]} "
                             f"sequences; got query lengths {batch.query_lens}")
        self._fill(token_ids, batch, B, b)
        if b not in self.graphs:
            self._capture(b)  # captured on this step's buffers (and run once)
        else:
            self.graphs[b].replay()
        self.num_replays += 1
        self.cache.record_writes(batch)
        return self.graphs[b].output[:B]  # (B, V)

    def capture_all(self) -> None:
        """Capture every bucket not captured yet, largest first (the smaller ones then reuse
        its memory), on rows that are all padding: nothing is stored. What a server does
        before taking requests, so no step pays for a capture."""
        for b in reversed(self.sizes):
            if b not in self.graphs:
                self._pad(0, b)
                self._capture(b)

    def _capture(self, b: int) -> None:
        fn = self._step_fn(b)
        self.graphs[b] = CudaGraph(fn, self._pool) if self.use_cuda_graphs else Replay(fn)

    def _fill(self, token_ids: torch.Tensor, batch: StepBatch, B: int, b: int) -> None:
        """Copy the step into rows [:B] of the buffers; rows [B:b] become padding."""
        buf, tables = self.buffers, self.cache.step_tables(batch)
        width = tables.block_tables[0].shape[1]  # (B, width): the step's own tables
        buf.token_ids[:B].copy_(token_ids)
        buf.positions[:B].copy_(batch.positions)
        buf.slot_mapping[:, :B].copy_(batch.slot_mapping)  # (G, B)
        buf.context_lens[:B].copy_(tables.context_lens)
        for g, t in enumerate(tables.block_tables):
            buf.block_tables[g, :B, :width].copy_(t)  # (B, width)
        buf.block_tables[:, :B, width:] = -1  # what an earlier, longer step left there
        self._pad(B, b)

    def _pad(self, B: int, b: int) -> None:
        """Rows [B:b] become padding: nothing stored, one key of the null block read."""
        buf = self.buffers
        if b > B:
            buf.token_ids[B:b] = 0
            buf.positions[B:b] = 0
            buf.slot_mapping[:, B:b] = -1
            buf.context_lens[B:b] = 1
            buf.block_tables[:, B:b] = -1
            buf.block_tables[:, B:b, 0] = self._null  # (G, b - B) from (G, 1)

    def _step_fn(self, b: int) -> Callable[[], torch.Tensor]:
        """The step of bucket b over the buffers: (b, V) float32 logits."""
        buf = self.buffers
        positions = buf.positions[:b]  # (b,) views: the same memory every replay
        batch = StepBatch(tuple(range(b)), (1,) * b, (self.cache.config.max_seq_len,) * b,
                          positions, buf.slot_mapping[:, :b],  # (G, b)
                          buf.cu_query_lens[:b + 1], step=-1)
        # NOTE: the host context_lens above are a bound, not the lengths: decode attention
        # reads the device ones (`uniform_len == 1`), and a host value would be frozen here.
        view = _GraphCache(self.cache, buf.block_tables[:, :b], buf.context_lens[:b])
        tokens, model = buf.token_ids[:b], self.model

        @torch.no_grad()
        def step() -> torch.Tensor:
            hidden = model.forward_batch(tokens, batch, view)  # (b, d)
            return model.lm_head(hidden).float()  # (b, V)
        return step
