"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

Two ways to draw. `sample_next` samples a few rows that share one `SamplingParams` with
`torch.multinomial` and a `torch.Generator` (the plain way, for experiments). `sample` draws a
whole batch of rows with their own parameters in one set of launches, its random numbers
hashed from each request's seed and position (counter-based, below): what the engine,
static batching and `TransformerLM.generate` use, so a request draws the same tokens in any
batch, after a preemption, or in another engine.

>>> logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
>>> sample_next(logits, SamplingParams()).tolist()          # temperature 0: greedy
[0]
>>> filter_logits(logits, SamplingParams(temperature=1.0, top_k=2)).isinf().tolist()
[[False, False, True, True]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvlib.checks import require_int, require_number


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` means greedy (argmax), and then top_k, top_p
    and seed have no effect. `top_k=None` and `top_p=1.0` keep every token."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # NOTE: bools are refused as ints (top_k=True is not "keep 1 token") and every
        # number must be finite: temperature=inf would divide every logit into zeros.
        require_number("SamplingParams.temperature", self.temperature, minimum=0)
        if self.top_k is not None:
            require_int("SamplingParams.top_k (or None)", self.top_k, minimum=1)
        require_number("SamplingParams.top_p", self.top_p, above=0, maximum=1)
        if self.seed is not None:  # torch seeds are unsigned 64-bit numbers
            require_int("SamplingParams.seed (or None)", self.seed, minimum=0, maximum=2**64 - 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str = "cpu",
                  stream: int = 0) -> torch.Generator | None:
        """A seeded random generator for this request, or None to use torch's global one.
        `stream` b gives row b of a batch its own generator (seed + b)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed + stream)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, V) logits scaled by temperature, with tokens outside top-k / top-p set to -inf.

    Computed in float32, or in the logits' own dtype where it is wider (float64)."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(wide) / params.temperature  # (B, V)
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        # Stable: among equal logits the lower id ranks first, as in filter_batch.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
        # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the
        # mass strictly before it already reaches top_p. The top token is always kept.
        before = torch.cumsum(probs, dim=-1) - probs  # (B, V)
        drop_sorted = before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, V)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) next token ids."""
    if logits.dim() != 2:
        raise ValueError(f"sample_next expects logits (B, V), got {tuple(logits.shape)}")
    if params.greedy:
        return logits.argmax(dim=-1)  # (B,)
    probs = torch.softmax(filter_logits(logits, params), dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


# -- a whole batch at once: counter-based noise -------------------------------------------------
# The engine samples every row of a step in one set of launches, and a row's draw must not
# depend on the batch it happens to be in: no generator object per request, no state. Each draw
# is a pure function of (the request's seed, how many tokens it generated before this one, the
# vocabulary entry): a hash of those three numbers gives 32 random bits, hence a uniform u in
# (0, 1) and Gumbel noise g = -log(-log u), and argmax(filtered logits + g) is a draw from
# softmax(filtered logits) -- the Gumbel-max trick. Recomputing a preempted request, moving it
# to another engine or batching it differently draws the same numbers again.

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9  # 2^32 / golden ratio: a start that is not zero


def mul32(x, c: int):
    """x * c mod 2^32 for x in [0, 2^32) (an int, or an int64 tensor) and a 32-bit constant c.

    Computed in two 16-bit halves of c so no product passes 2^48: torch's int64 would wrap
    silently past 2^63, and this never gets there.

    >>> mul32(0xFFFFFFFF, 0x846CA68B) == (0xFFFFFFFF * 0x846CA68B) % 2**32
    True
    """
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    """A 32-bit integer hash (Wellons' lowbias32): a bijection of [0, 2^32) whose output bits
    each flip with probability about 1/2 when any input bit flips. Ints or int64 tensors.

    >>> [mix32(0), mix32(1), mix32(2)]
    [0, 1753845952, 3507691905]
    """
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(seed: int, position: int) -> int:
    """The 32-bit key of one draw of a request: its seed (64 bits) and `position`, the number
    of tokens it generated before this one (0 for its first). Computed on the host, exactly.

    >>> stream_key(seed=7, position=0), stream_key(seed=7, position=1)
    (3475429279, 4241213211)
    """
    h = mix32((seed & MASK32) ^ GOLDEN32)
    h = mix32(h ^ (seed >> 32 & MASK32))
    return mix32(h ^ (position & MASK32))


def uniform(keys: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(K,) int64 keys -> (K, V) uniforms in (0, 1): entry v of row k hashes keys[k] with v.

    The top 24 bits of mix32(key ^ mix32(v)) make u = (bits + 1/2) / 2^24, exact in float32,
    never 0 or 1 (so the Gumbel noise is finite).

    >>> u = uniform(torch.tensor([stream_key(7, 0)]), 4, torch.float32)  # (1, 4)
    >>> u.shape, bool((u > 0).all() and (u < 1).all())
    (torch.Size([1, 4]), True)
    """
    vocab = mix32(torch.arange(vocab_size, device=keys.device))  # (V,)
    bits = mix32(keys[:, None] ^ vocab[None, :])  # (K, V) in [0, 2^32)
    return ((bits >> 8).to(dtype) + 0.5) * 2.0 ** -24  # (K, V)


@dataclass(frozen=True)
class SamplingBatch:
    """The sampling parameters of K rows, on the device: what `sample` reads.

    Made once per step from every row's `SamplingParams`, its seed and its position, in one
    host-to-device copy; which rows are greedy or unseeded is known on the host too, so
    nothing is read back."""

    temperature: torch.Tensor  # (K,) float64; 1 on greedy rows (which take the argmax)
    top_k: torch.Tensor  # (K,) int64; V where top_k is off
    top_p: torch.Tensor  # (K,) float64
    keys: torch.Tensor  # (K,) int64: stream_key(seed, position); 0 on unseeded rows
    greedy_rows: torch.Tensor  # (K,) bool
    seeded_rows: torch.Tensor  # (K,) bool
    greedy: tuple[bool, ...]  # (K,) host copies of the two above
    seeded: tuple[bool, ...]

    @staticmethod
    def make(params: Sequence[SamplingParams], positions: Sequence[int], vocab_size: int,
             device: torch.device | str, seeds: Sequence[int | None] | None = None,
             ) -> SamplingBatch:
        """Row k samples with `params[k]`, keyed by `seeds[k]` (default: `params[k].seed`;
        None draws from torch's global generator) and `positions[k]` (tokens it generated
        before this one)."""
        seeds = [p.seed for p in params] if seeds is None else list(seeds)
        if not len(params) == len(positions) == len(seeds):
            raise ValueError(f"{len(params)} params, {len(positions)} positions and "
                             f"{len(seeds)} seeds: one of each per row")
        greedy = tuple(p.greedy for p in params)
        host = torch.tensor([  # exact in float64: keys < 2^32, top_k <= V
            [1.0 if g else p.temperature for p, g in zip(params, greedy)],
            [min(p.top_k or vocab_size, vocab_size) for p in params],
            [p.top_p for p in params],
            [0 if s is None else stream_key(s, n) for s, n in zip(seeds, positions)],
            greedy, [s is not None for s in seeds],
        ], dtype=torch.float64)  # (6, K)
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        dev = host.to(device, non_blocking=True)  # (6, K), the one copy
        return SamplingBatch(dev[0], dev[1].long(), dev[2], dev[3].long(), dev[4] > 0,
                             dev[5] > 0, greedy, tuple(s is not None for s in seeds))


def filter_batch(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """`filter_logits` for K rows with their own temperature, top-k and top-p, with one sort:
    (K, V) logits -> (K, V) scaled, the dropped entries -inf."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    scaled = logits.to(wide) / batch.temperature.to(wide)[:, None]  # (K, V)
    ranked, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # (K, V)
    kth = ranked.gather(-1, batch.top_k[:, None] - 1)  # (K, 1) the k-th largest
    out_of_k = ranked < kth  # (K, V) ties with the k-th value stay, as in filter_logits
    probs = torch.softmax(ranked.masked_fill(out_of_k, float("-inf")), dim=-1)  # (K, V)
    before = torch.cumsum(probs, dim=-1) - probs  # (K, V) mass strictly before each token
    top_p = batch.top_p.to(wide)[:, None]  # (K, 1)
    drop_sorted = out_of_k | ((before >= top_p) & (top_p < 1))  # (K, V)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (K, V)
    return scaled.masked_fill(drop, float("-inf"))  # (K, V)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """(K, V) logits -> (K,) token ids on the device, every row in the same few launches:
    greedy rows take the argmax; the others argmax(filtered logits + Gumbel noise), the noise
    hashed from the row's key (seeded) or drawn from torch's global generator (unseeded)."""
    if logits.dim() != 2 or logits.shape[0] != len(batch.greedy):
        raise ValueError(f"sample expects logits (K={len(batch.greedy)}, V), got "
                         f"{tuple(logits.shape)}")
    best = logits.argmax(dim=-1)  # (K,)
    if all(batch.greedy):
        return best
    filtered = filter_batch(logits, batch)  # (K, V)
    u = uniform(batch.keys, logits.shape[-1], filtered.dtype)  # (K, V)
    if not all(batch.seeded):
        fresh = torch.rand(u.shape, dtype=u.dtype, device=u.device).clamp_(min=2.0 ** -60)
        u = torch.where(batch.seeded_rows[:, None], u, fresh)  # (K, V)
    drawn = (filtered - torch.log(-torch.log(u))).argmax(dim=-1)  # (K,) Gumbel-max
    return torch.where(batch.greedy_rows, best, drawn)  # (K,)
