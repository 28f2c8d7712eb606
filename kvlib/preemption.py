"""Preemption policies: what becomes of a running sequence when the cache has no room for it.

The scheduler (kvlib.scheduler) decides *who* is preempted (the most recently admitted); a
policy decides *how*, in two calls:

- `preempt(cache, seq_id, num_computed_tokens)`: free the sequence's blocks on the device and
  return how many of its computed tokens are still stored somewhere (0: they are gone);
- `resume(cache, seq_id, num_computed_tokens, num_tokens)`: bring those tokens back, with room
  for its first `num_tokens` tokens, in one act: True, or False and nothing changed.

Three policies:

- `Recompute` (the default, vLLM V1's and nano-vllm's only one): drop the blocks; when the
  sequence is admitted again its prompt and the tokens it generated are prefilled again.
- `Swap` (vLLM V0's `PreemptionMode.SWAP`): copy its blocks to host memory and back
  (`kvlib.cache.offload.OffloadingKVCache`); recompute only when the host tier is full.
- `SwapLongerThan(min_tokens)`: swap sequences holding at least `min_tokens` tokens,
  recompute shorter ones. The threshold comes from the cost model (`kvlib.links`): a copy
  costs bytes over the link, a recomputation costs the prefill's FLOPs, and a short prefill
  rides nearly free in a step the decodes already pay for.

The cache must answer `SwapSpace` for the two swapping policies; `check(cache)` says so when the
scheduler is built, not at the first preemption.

>>> SwapLongerThan(512).swaps(600), SwapLongerThan(512).swaps(100)
(True, False)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from kvlib.checks import require_int
from kvlib.contract import KVCacheManager


@runtime_checkable
class SwapSpace(Protocol):
    """A cache with a second tier a sequence's blocks can move to and back from."""

    def can_swap_out(self, seq_id: int) -> bool:
        """Whether the second tier has room for all of the sequence's blocks now."""
        ...

    def swap_out(self, seq_id: int) -> int:
        """Move the sequence's blocks out of the device pool; returns the bytes copied.
        Raises ValueError, changing nothing, when they do not fit."""
        ...

    def swap_in(self, seq_id: int, num_tokens: int) -> bool:
        """Move a swapped-out sequence back, with room for its first `num_tokens` tokens:
        True, or False and nothing changed when the device pool has no room."""
        ...


class PreemptionPolicy(Protocol):
    def check(self, cache: KVCacheManager) -> None:
        """Raise ValueError if this policy cannot work with `cache`."""
        ...

    def preempt(self, cache: KVCacheManager, seq_id: int, num_computed_tokens: int) -> int:
        """Free the sequence's device blocks; the tokens still stored elsewhere (0: none)."""
        ...

    def resume(self, cache: KVCacheManager, seq_id: int, num_computed_tokens: int,
               num_tokens: int) -> bool:
        """Bring back what `preempt` kept, with room for `num_tokens` tokens; False and
        nothing changed if the cache cannot hold them now."""
        ...


class Recompute:
    """Free the blocks; the sequence is prefilled again (prompt and generated tokens)."""

    def check(self, cache: KVCacheManager) -> None:
        pass

    def preempt(self, cache: KVCacheManager, seq_id: int, num_computed_tokens: int) -> int:
        cache.release([seq_id])
        return 0

    def resume(self, cache: KVCacheManager, seq_id: int, num_computed_tokens: int,
               num_tokens: int) -> bool:
        raise ValueError(f"sequence {seq_id}: recomputation keeps no tokens to resume from")


class SwapLongerThan:
    """Swap a sequence holding at least `min_tokens` tokens to host memory, recompute a
    shorter one; recompute too when the host tier has no room."""

    def __init__(self, min_tokens: int) -> None:
        self.min_tokens = require_int("min_tokens", min_tokens, minimum=0)

    def swaps(self, num_computed_tokens: int) -> bool:
        return num_computed_tokens >= self.min_tokens

    def check(self, cache: KVCacheManager) -> None:
        if not isinstance(cache, SwapSpace):
            raise ValueError(f"swapping needs a cache with a host tier (OffloadingKVCache), "
                             f"got {type(cache).__name__}")

    def preempt(self, cache: KVCacheManager, seq_id: int, num_computed_tokens: int) -> int:
        if num_computed_tokens > 0 and self.swaps(num_computed_tokens) and (
                cache.can_swap_out(seq_id)):
            cache.swap_out(seq_id)
            return num_computed_tokens
        cache.release([seq_id])
        return 0

    def resume(self, cache: KVCacheManager, seq_id: int, num_computed_tokens: int,
               num_tokens: int) -> bool:
        return cache.swap_in(seq_id, num_tokens)


class Swap(SwapLongerThan):
    """Swap every preempted sequence to host memory (recompute only when it is full)."""

    def __init__(self) -> None:
        super().__init__(min_tokens=0)
