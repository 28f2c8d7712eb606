"""Random paged cases for the kernel tests: pools, shuffled block tables, ragged chunks.

Blocks no query of a row sees (outside its window and sinks) get the id of a block full of
NaNs in the table: a kernel that reads one returns NaN. Table entries past a row's length
are -1. Imported by the kernel test modules as `from kernel_cases import ...`.
"""

from __future__ import annotations

import torch

from kvlib.kernels.common import visible_ranges


def poison_unseen(tables: torch.Tensor, context_lens: list[int], query_lens: list[int],
                  block_size: int, window: int | None, sink_tokens: int, poison: int) -> None:
    """Point every table entry of a block no query of its row sees at block `poison`."""
    for b, (S, T) in enumerate(zip(context_lens, query_lens)):
        seen = set()
        for p in range(S - T, S):
            for lo, hi in visible_ranges(p, window, sink_tokens):
                seen.update(range(lo // block_size, -(-hi // block_size)))
        for j in range(-(-S // block_size)):
            if j not in seen:
                tables[b, j] = poison


def paged_case(gen: torch.Generator, context_lens: list[int], query_lens: list[int], *,
               heads: int, kv_heads: int, dim: int, block_size: int, dtype: torch.dtype,
               window: int | None = None, sink_tokens: int = 0, device: str = "cpu"):
    """(q (N, H, D), k_pool, v_pool (NB, Hkv, BS, D), tables (B, M), lens (B,), cu (B+1,)).

    Blocks are scattered in the pool; block 0 is the NaN block no kernel may read.
    """
    B, BS = len(context_lens), block_size
    M = max(-(-n // BS) for n in context_lens)
    NB = B * M + 1
    order = torch.randperm(NB - 1, generator=gen) + 1  # (NB-1,) every block but 0
    tables = torch.full((B, M), -1, dtype=torch.int32)  # (B, M)
    for b, n in enumerate(context_lens):
        tables[b, :-(-n // BS)] = order[b * M:b * M + -(-n // BS)]
    poison_unseen(tables, context_lens, query_lens, BS, window, sink_tokens, poison=0)
    N = sum(query_lens)
    q = torch.randn(N, heads, dim, generator=gen)  # (N, H, D)
    pools = torch.randn(2, NB, kv_heads, BS, dim, generator=gen)  # (2, NB, Hkv, BS, D)
    pools[:, 0] = float("nan")
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    to = dict(device=device, dtype=dtype)
    return (q.to(**to), pools[0].to(**to), pools[1].to(**to), tables.to(device),
            torch.tensor(context_lens, dtype=torch.int32, device=device), cu.to(device))
