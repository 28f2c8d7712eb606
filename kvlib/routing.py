"""Routing requests over engine replicas: round robin, or to where their prefix is cached.

Several replicas of one model serve the same stream of requests, each with its own prefix
cache. Round robin spreads the load evenly and ignores the caches: a request whose system
prompt or document was computed on replica 2 lands on replica 3 and computes it again, and
every replica ends up caching every popular prefix, n times over. A cache-aware router
(SGLang's router, NVIDIA Dynamo's KV-aware router, llm-d) sends a request to the replica
that most likely holds the longest part of its prompt, while keeping the load balanced.

The router cannot see the replicas' caches. Like SGLang's, it keeps its own picture of them:
per replica, the prefix hashes of the blocks of the prompts it sent there (the block hashes
of `kvlib.cache.blocks`: a hash names a block *and every token before it*), forgetting the
least recently used beyond what the replica's pool can hold. A request's match on a replica
is how many of its leading full blocks that picture holds.

`PrefixAware` routes to the best match when it covers at least `min_match` of the prompt;
otherwise, or when the best-matching replica has `max_imbalance` more requests in flight
than the least loaded one, it routes to the least loaded (the balance guard: a popular
prefix must not pile every request onto one replica).

>>> r = PrefixAware(num_replicas=2, block_size=4, capacity_blocks=64)
>>> first = r.route(list(range(12)) + [90], loads=[0, 0])   # nothing cached yet: least loaded
>>> r.route(list(range(12)) + [91], loads=[1, 0]) == first  # its 3 blocks are there
True
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from kvlib.cache.blocks import hash_block_tokens
from kvlib.checks import require_int


class Router(Protocol):
    def route(self, token_ids: Sequence[int], loads: Sequence[int]) -> int:
        """The replica for a request with these prompt tokens; `loads[i]` is the number of
        requests replica i has in flight."""
        ...


class RoundRobin:
    """Replica 0, 1, ..., n-1, 0, ...: even load, no regard for what is cached where."""

    def __init__(self, num_replicas: int) -> None:
        self.num_replicas = require_int("num_replicas", num_replicas, minimum=1)
        self._next = 0

    def route(self, token_ids: Sequence[int], loads: Sequence[int]) -> int:
        choice = self._next
        self._next = (self._next + 1) % self.num_replicas
        return choice


def prefix_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (what a prefix cache looks up).

    >>> len(prefix_hashes(range(10), 4))   # 2 full blocks; the last 2 tokens are no block
    2
    """
    out, parent = [], None
    for i in range(len(token_ids) // block_size):
        parent = hash_block_tokens(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


class PrefixAware:
    """To the replica holding the longest cached prefix, within a balance guard."""

    def __init__(self, num_replicas: int, block_size: int, capacity_blocks: int, *,
                 min_match: float = 0.1, max_imbalance: int = 8) -> None:
        self.num_replicas = require_int("num_replicas", num_replicas, minimum=1)
        self.block_size = require_int("block_size", block_size, minimum=1)
        self.capacity = require_int("capacity_blocks", capacity_blocks, minimum=1)
        if not 0 <= min_match <= 1:
            raise ValueError(f"min_match must be in [0, 1], got {min_match}")
        self.min_match = min_match
        self.max_imbalance = require_int("max_imbalance", max_imbalance, minimum=0)
        # per replica: block hash -> None, least recently routed first
        self._seen: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_replicas)]

    def match(self, replica: int, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` the router believes `replica` caches."""
        seen = self._seen[replica]
        return next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))

    def route(self, token_ids: Sequence[int], loads: Sequence[int]) -> int:
        if len(loads) != self.num_replicas:
            raise ValueError(f"{len(loads)} loads for {self.num_replicas} replicas")
        hashes = prefix_hashes(token_ids, self.block_size)
        least = min(range(self.num_replicas), key=lambda i: (loads[i], i))
        matches = [self.match(i, hashes) for i in range(self.num_replicas)]
        best = max(range(self.num_replicas), key=lambda i: (matches[i], -loads[i], -i))
        covered = matches[best] * self.block_size / max(1, len(token_ids))
        balanced = loads[best] - loads[least] <= self.max_imbalance
        choice = best if covered >= self.min_match and balanced else least
        self._remember(choice, hashes)
        return choice

    def _remember(self, replica: int, hashes: Sequence[int]) -> None:
        seen = self._seen[replica]
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)
