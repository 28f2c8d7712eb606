"""Widgets for chapter 3: step through a paged cache's life; explore the fragmentation simulator.

Both are built on `kvlib.widgets.live.live`: every state is drawn when the cell runs and the
controls pick among them in the browser, so they move in the HTML book without a kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import ipywidgets as W
import matplotlib.pyplot as plt
import torch

from kvlib.cache.paged import PagedKVCache
from kvlib.config import CacheConfig
from kvlib.experiments import fragmentation as fr
from kvlib.viz import paging as pviz
from kvlib.widgets.live import live

# The scenario: (caption, what happens). Block size 4, a pool of 10 blocks, token ids small
# ints; seq 0's prompt is 1..6, and seqs 1 and 3 start with seq 0's first 8 tokens.
SCENARIO_NUM_BLOCKS, SCENARIO_BLOCK_SIZE = 10, 4
_SHARED_PREFIX = list(range(1, 9))
SCENARIO: list[tuple[str, Callable[[PagedKVCache], object]]] = [
    ("0. an empty pool", lambda c: None),
    ("1. seq 0 arrives with a 6-token prompt: 2 blocks (4 + 2)",
     lambda c: feed(c, 0, range(1, 7))),
    ("2. seq 0 decodes 3 tokens: its 2nd block fills, a 3rd takes the 9th token",
     lambda c: [feed(c, 0, [t]) for t in (7, 8, 9)]),
    ("3. seq 1's prompt starts with seq 0's 8 tokens: 2 blocks shared, 3 new tokens",
     lambda c: admit_with_prefix(c, 1, _SHARED_PREFIX + [20, 21, 22])),
    ("4. fork seq 0 into seq 2 (parallel sampling): every block shared, nothing copied",
     lambda c: c.fork(0, 2)),
    ("5. seq 2 writes into a shared, partly filled block: copy-on-write, then write",
     lambda c: feed(c, 2, [30])),
    ("6. seq 0 writes into its last block, now its own: in place",
     lambda c: feed(c, 0, [10])),
    ("7. release seq 0: its last block is free; the shared ones stay in use",
     lambda c: c.release([0])),
    ("8. release seqs 1, 2: all free; the full blocks keep their hashes (cached)",
     lambda c: c.release([1, 2])),
    ("9. seq 3 starts with the same 8 tokens: the cached blocks come back, no prefill for them",
     lambda c: admit_with_prefix(c, 3, _SHARED_PREFIX + [40, 41, 42])),
]


def feed(cache: PagedKVCache, seq_id: int, token_ids: Iterable[int]) -> None:
    """One step of `token_ids` for `seq_id` in every layer; each token's key and value are
    its id (so what a sequence reads back names the tokens it holds)."""
    ids = torch.tensor(list(token_ids), dtype=torch.int64)  # (N,)
    cfg = cache.config
    batch = cache.begin([seq_id], [len(ids)], ids)
    kv = ids.to(cfg.dtype)[:, None, None].repeat(1, cfg.num_kv_heads, cfg.head_dim)  # (N, Hkv, D)
    for layer in range(cache.num_layers):
        cache.write(layer, batch, kv, kv)
    cache.commit(batch)


def admit_with_prefix(cache: PagedKVCache, seq_id: int, prompt: Sequence[int]) -> int:
    """Admit `seq_id` reusing the cached blocks its prompt starts with, feed the rest;
    return how many prompt tokens were reused."""
    reused = cache.admit(seq_id, prompt)
    feed(cache, seq_id, prompt[reused:])
    return reused


def cache_snapshot(cache: PagedKVCache, caption: str = "",
                   before: dict[int, list[int]] | None = None) -> pviz.PoolSnapshot:
    """A real cache as drawn: its block tables, lengths, and the allocator's reference counts
    and cached free blocks. Blocks that replaced another at the same place of a table since
    `before` (seq_id -> block table) are marked as copied on write."""
    (allocator,) = cache.manager.allocators  # one cache group: every layer alike
    blocks = allocator.blocks
    tables = {s: cache.block_table(s) for s in cache.seq_ids}
    lengths = {s: int(cache.lengths([s])[0]) for s in cache.seq_ids}
    copied = [b for s, t in tables.items() if before and s in before
              for j, b in enumerate(t) if j < len(before[s]) and before[s][j] != b]
    cached = [b.block_id for b in blocks if b.ref_count == 0 and b.block_hash is not None]
    return pviz.snapshot(cache.num_blocks, cache.block_size, tables, lengths,
                         ref_counts=[b.ref_count for b in blocks], cached=cached,
                         caption=caption, copied=copied)


def paged_scenario() -> tuple[list[pviz.PoolSnapshot], PagedKVCache]:
    """Run `SCENARIO` on a real `PagedKVCache`; its snapshot after each step, and the cache."""
    cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, max_batch_size=1,
                      max_seq_len=64, block_size=SCENARIO_BLOCK_SIZE)
    cache = PagedKVCache(cfg, num_blocks=SCENARIO_NUM_BLOCKS)
    snaps = []
    for caption, act in SCENARIO:
        before = {s: cache.block_table(s) for s in cache.seq_ids}
        act(cache)
        snaps.append(cache_snapshot(cache, caption, before))
    return snaps, cache


def scenario_widget(snapshots: Sequence[pviz.PoolSnapshot], width: float = 7.0) -> W.VBox:
    """A step slider over `snapshots`, each state the pool and block tables at that step,
    every one drawn at the size of the step with the most sequences."""
    if not snapshots:
        raise ValueError("scenario_widget needs at least one snapshot")
    rows = max(len(s.block_tables) for s in snapshots)
    return live(lambda step: pviz.pool_figure(snapshots[step], width=width, max_rows=rows),
                step=list(range(len(snapshots))))


def simulator_figure(distribution: str, max_len: int, block_size: int, *,
                     num_requests: int = 20_000, budget: int = 200_000,
                     seed: int = 0) -> plt.Figure:
    """One simulator state: utilization per scheme, and requests fitting in `budget` slots."""
    requests = fr.sample_requests(distribution, num_requests, max_len, seed=seed)
    results = fr.simulate(requests, max_len=max_len, block_size=block_size, budget=budget)
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.0, 3.2),
                                      gridspec_kw={"width_ratios": [3, 2]})
    pviz.plot_scheme_bars(left, results)
    pviz.plot_fits(right, results, budget)
    lens = requests.total_lens
    fig.suptitle(f"{distribution}: mean {lens.mean():.0f} tokens (prompt + output), max_len "
                 f"{max_len:,}, paged blocks of {block_size}")
    return fig


def simulator_html(distribution: str, max_len: int, block_size: int, *,
                   num_requests: int = 20_000, budget: int = 200_000, seed: int = 0) -> str:
    """The numbers of `simulator_figure` as an HTML table with bars (what the widget shows)."""
    requests = fr.sample_requests(distribution, num_requests, max_len, seed=seed)
    results = fr.simulate(requests, max_len=max_len, block_size=block_size, budget=budget)
    title = (f"{distribution}: {num_requests:,} requests, mean {requests.total_lens.mean():.0f} "
             f"tokens, max_len {max_len:,}, paged blocks of {block_size}")
    return pviz.scheme_table_html(results, budget, title)


def simulator_widget(*, distributions: Sequence[str] = ("uniform", "pareto", "sharegpt",
                                                        "alpaca"),
                     max_lens: Sequence[int] = (512, 2048, 8192),
                     block_sizes: Sequence[int] = (4, 16, 64), num_requests: int = 20_000,
                     budget: int = 200_000) -> W.VBox:
    """Distribution, max_len and block size controls over `simulator_html` (HTML states keep
    the page light: 36 states of a few kB each)."""
    def render(distribution: str, max_len: int, block_size: int) -> str:
        return simulator_html(distribution, max_len, block_size, num_requests=num_requests,
                              budget=budget)

    return live(render, distribution=list(distributions), max_len=list(max_lens),
                block_size=list(block_sizes),
                defaults={"distribution": "sharegpt" if "sharegpt" in distributions
                          else distributions[0],
                          "max_len": 2048 if 2048 in max_lens else max_lens[0],
                          "block_size": 16 if 16 in block_sizes else block_sizes[0]})
