"""Widgets for chapter 3: step through a paged cache's life; explore the fragmentation simulator.

Both are built on `kvlib.widgets.live.live`: every state is drawn when the cell runs and the
controls pick among them in the browser, so they move in the HTML book without a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as W
import matplotlib.pyplot as plt

from kvlib.experiments import fragmentation as fr
from kvlib.viz import paging as pviz
from kvlib.widgets.live import live


def scripted_scenario() -> list[pviz.PoolSnapshot]:
    """Allocation, appends, a prefix hit, a fork and a copy-on-write in a pool of 10 blocks of 4.

    Written out by hand as block tables and lengths, in the order an allocator taking the
    lowest free block would produce them.
    """
    nb, bs = 10, 4

    def snap(tables, lengths, caption, cached=(), copied=()):
        return pviz.snapshot(nb, bs, tables, lengths, cached=cached, caption=caption,
                             copied=copied)

    return [
        snap({}, {}, "0. an empty pool"),
        snap({0: [0, 1]}, {0: 6}, "1. seq 0 arrives with a 6-token prompt: blocks #0, #1 (4 + 2)"),
        snap({0: [0, 1, 2]}, {0: 9}, "2. seq 0 decodes 3 tokens: #1 fills, #2 takes the 9th"),
        snap({0: [0, 1, 2], 1: [0, 1, 3]}, {0: 9, 1: 11},
             "3. seq 1's prompt starts with seq 0's first 8 tokens: #0, #1 shared, 3 new in #3"),
        snap({0: [0, 1, 2], 1: [0, 1, 3], 2: [0, 1, 2]}, {0: 9, 1: 11, 2: 9},
             "4. fork seq 0 into seq 2 (parallel sampling): every block shared, nothing copied"),
        snap({0: [0, 1, 2], 1: [0, 1, 3], 2: [0, 1, 4]}, {0: 9, 1: 11, 2: 10},
             "5. seq 2 writes into shared #2: copy-on-write into #4, then write", copied=[4]),
        snap({0: [0, 1, 2], 1: [0, 1, 3], 2: [0, 1, 4]}, {0: 10, 1: 11, 2: 10},
             "6. seq 0 writes into #2, now its own: in place"),
        snap({1: [0, 1, 3], 2: [0, 1, 4]}, {1: 11, 2: 10},
             "7. release seq 0: #2 is free; #0, #1 still in use"),
        snap({}, {}, "8. release seqs 1, 2: all free; full #0, #1 keep their hashes (cached)",
             cached=[0, 1]),
        snap({3: [0, 1, 5]}, {3: 11},
             "9. seq 3 starts with the same 8 tokens: cached #0, #1 reused, no prefill for them"),
    ]


def scenario_widget(snapshots: Sequence[pviz.PoolSnapshot], width: float = 9.0) -> W.VBox:
    """A step slider over `snapshots`, each state the pool and block tables at that step."""
    if not snapshots:
        raise ValueError("scenario_widget needs at least one snapshot")
    return live(lambda step: pviz.pool_figure(snapshots[step], width=width),
                step=list(range(len(snapshots))))


def simulator_figure(distribution: str, max_len: int, block_size: int, *,
                     num_requests: int = 20_000, budget: int = 200_000,
                     seed: int = 0) -> plt.Figure:
    """One simulator state: utilization per scheme, and requests fitting in `budget` slots."""
    requests = fr.sample_requests(distribution, num_requests, max_len, seed=seed)
    results = fr.simulate(requests, max_len=max_len, block_size=block_size, budget=budget)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 2.6),
                                      gridspec_kw={"width_ratios": [3, 2]})
    pviz.plot_scheme_bars(left, results)
    pviz.plot_fits(right, results, budget)
    lens = requests.total_lens
    fig.suptitle(f"{distribution}: mean {lens.mean():.0f} tokens (prompt + output), max_len "
                 f"{max_len:,}, paged blocks of {block_size}", fontsize=9)
    fig.tight_layout()
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
