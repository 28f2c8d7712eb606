"""How much reserved KV memory holds tokens: preallocation against paging, simulated.

A server must reserve cache memory for a request before it knows how long the request will
get. This module draws streams of requests (prompt and output lengths) from a few length
distributions and counts, for each way of reserving memory, the share of reserved token slots
that hold a token, and how many requests fit in a fixed budget. Plain numpy, vectorised over
requests, seeded: the same arguments always give the same numbers.

Schemes (`SCHEMES`), each the token slots one request reserves once it has `n` tokens:
- `max`: preallocate the model's maximum length, whatever the request does (`max_len`).
- `pow2`: preallocate the next power of two of the final length (Orca's "Pow2" in the vLLM
  paper: at most 2x over, with the final length known in advance).
- `oracle`: preallocate exactly the final length (unreachable: nobody knows it in advance).
- `paged`: whole blocks of `block_size` slots, taken as the sequence grows:
  ceil(n / block_size) * block_size.

Two moments are measured:
- at completion: every request at its final length L (`utilization`);
- in flight: averaged over each request's decode steps, as a server in steady state sees
  its running requests (`utilization_in_flight`). Preallocating schemes hold their whole
  reservation from the first step; paging holds only the blocks written so far.

Length distributions (`DISTRIBUTIONS`; prompt and output drawn independently, then clipped so
that 1 <= prompt, 1 <= output and prompt + output <= max_len):
- `uniform`: prompt and output uniform on 1 .. max_len // 2.
- `pareto`: a long tail: Pareto (Lomax) prompt and output, shape 1.5, scale 64 and 128
  tokens (means 128 and 256 before clipping, a few requests thousands of tokens long).
- `sharegpt`: chat traffic shaped like ShareGPT as the vLLM paper reports it (Kwon et al.,
  SOSP 2023, section 6.1: mean input 161.31 tokens, mean output 337.99). The paper gives
  means and histograms only; we assume lognormal lengths with those means and a log-space
  standard deviation of 1.0 (a long right tail), before clipping.
- `alpaca`: short instruction traffic, the paper's other data set (mean input 19.31, output
  58.45 tokens), lognormal with log-space standard deviation 0.6, our assumption.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------
# Request streams
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Requests:
    """A stream of requests: prompt and output lengths, in arrival order. R requests."""

    prompt_lens: np.ndarray  # (R,) int64, >= 1
    output_lens: np.ndarray  # (R,) int64, >= 1

    def __post_init__(self) -> None:
        p, o = np.asarray(self.prompt_lens), np.asarray(self.output_lens)
        if p.ndim != 1 or p.shape != o.shape:
            raise ValueError(f"prompt_lens and output_lens must be 1-D of equal length, got "
                             f"{p.shape} and {o.shape}")
        if p.size and (p.min() < 1 or o.min() < 1):
            raise ValueError("every request needs a prompt and an output of at least 1 token")

    @property
    def total_lens(self) -> np.ndarray:
        """(R,) final lengths L = prompt + output."""
        return self.prompt_lens + self.output_lens

    def __len__(self) -> int:
        return len(self.prompt_lens)


def _lognormal_with_mean(rng: np.random.Generator, mean: float, sigma: float,
                         n: int) -> np.ndarray:
    # E[exp(N(mu, sigma^2))] = exp(mu + sigma^2 / 2), so mu = log(mean) - sigma^2 / 2.
    return rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n)


def _uniform(rng: np.random.Generator, n: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    half = max(max_len // 2, 1)
    return rng.integers(1, half + 1, n), rng.integers(1, half + 1, n)


def _pareto(rng: np.random.Generator, n: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    return 64 * rng.pareto(1.5, n) + 1, 128 * rng.pareto(1.5, n) + 1


def _sharegpt(rng: np.random.Generator, n: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    return _lognormal_with_mean(rng, 161.31, 1.0, n), _lognormal_with_mean(rng, 337.99, 1.0, n)


def _alpaca(rng: np.random.Generator, n: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    return _lognormal_with_mean(rng, 19.31, 0.6, n), _lognormal_with_mean(rng, 58.45, 0.6, n)


DISTRIBUTIONS: dict[str, Callable[[np.random.Generator, int, int],
                                  tuple[np.ndarray, np.ndarray]]] = {
    "uniform": _uniform, "pareto": _pareto, "sharegpt": _sharegpt, "alpaca": _alpaca,
}


def sample_requests(distribution: str, num_requests: int, max_len: int,
                    seed: int = 0) -> Requests:
    """`num_requests` requests drawn from `DISTRIBUTIONS[distribution]`, clipped to `max_len`.

    A prompt longer than max_len - 1 is cut to max_len - 1; an output is cut so that
    prompt + output <= max_len (a server stops generating at the model's maximum length).
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose from "
                         f"{list(DISTRIBUTIONS)}")
    if num_requests < 1 or max_len < 2:
        raise ValueError(f"need num_requests >= 1 and max_len >= 2, got {num_requests} and "
                         f"{max_len}")
    rng = np.random.default_rng(seed)
    prompt, output = DISTRIBUTIONS[distribution](rng, num_requests, max_len)
    prompt = np.clip(np.rint(prompt).astype(np.int64), 1, max_len - 1)  # (R,)
    output = np.clip(np.rint(output).astype(np.int64), 1, max_len - prompt)  # (R,)
    return Requests(prompt, output)


# ---------------------------------------------------------------------------------------------
# Reservations
# ---------------------------------------------------------------------------------------------

def paged_slots(lens: np.ndarray, block_size: int) -> np.ndarray:
    """Slots held by whole blocks of `block_size` for sequences of `lens` tokens.

    45 tokens in blocks of 16: two full blocks and 13 tokens in the third, 48 slots, 3 unused.

    >>> paged_slots(np.array([45, 48, 1]), 16).tolist()
    [48, 48, 16]
    """
    lens = np.asarray(lens, dtype=np.int64)
    return -(-lens // block_size) * block_size  # ceil(L / BS) * BS


def pow2_slots(lens: np.ndarray, max_len: int) -> np.ndarray:
    """Next power of two of each length, at most `max_len`.

    >>> pow2_slots(np.array([1, 5, 8, 900]), max_len=512).tolist()
    [1, 8, 8, 512]
    """
    lens = np.asarray(lens, dtype=np.int64)
    up = np.left_shift(1, np.ceil(np.log2(lens)).astype(np.int64))  # 2 ** ceil(log2 L)
    return np.minimum(up, max_len)


SCHEMES = ("max", "pow2", "oracle", "paged")


def reserved_slots(scheme: str, lens: np.ndarray, *, max_len: int,
                   block_size: int) -> np.ndarray:
    """(R,) token slots each sequence of final length `lens` reserves under `scheme`."""
    lens = np.asarray(lens, dtype=np.int64)
    if scheme == "max":
        return np.full_like(lens, max_len)
    if scheme == "pow2":
        return pow2_slots(lens, max_len)
    if scheme == "oracle":
        return lens.copy()
    if scheme == "paged":
        return paged_slots(lens, block_size)
    raise ValueError(f"unknown scheme {scheme!r}; choose from {SCHEMES}")


def _paged_slot_steps(n: np.ndarray, block_size: int) -> np.ndarray:
    """sum over m = 1..n of paged_slots(m): slots held, summed over a sequence's growth.

    For n = q * BS + r (0 <= r < BS): the q full groups give BS^2 * q(q+1)/2, the r lengths
    of the partial group (q+1) * BS each.

    >>> _paged_slot_steps(np.array([5]), 2).tolist()  # 2 + 2 + 4 + 4 + 6
    [18]
    """
    q, r = np.divmod(np.asarray(n, dtype=np.int64), block_size)
    return block_size * block_size * q * (q + 1) // 2 + r * (q + 1) * block_size


def in_flight_slots(scheme: str, requests: Requests, *, max_len: int,
                    block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(held, reserved), each (R,): token slots summed over each request's decode steps.

    At decode step t = 1 .. o a request holds p + t tokens. Preallocating schemes reserve
    their whole reservation at every step; paging reserves the blocks of p + t tokens.
    """
    p, o = requests.prompt_lens, requests.output_lens
    held = o * p + o * (o + 1) // 2  # sum_t (p + t)
    if scheme == "paged":
        reserved = _paged_slot_steps(p + o, block_size) - _paged_slot_steps(p, block_size)
    else:
        reserved = o * reserved_slots(scheme, p + o, max_len=max_len, block_size=block_size)
    return held, reserved


# ---------------------------------------------------------------------------------------------
# What a scheme achieves on a stream
# ---------------------------------------------------------------------------------------------

def fits(reserved: np.ndarray, budget: int) -> int:
    """How many requests, taken in arrival order, fit together in `budget` token slots.

    >>> fits(np.array([16, 32, 16, 64]), budget=64)
    3
    """
    return int(np.searchsorted(np.cumsum(reserved), budget, side="right"))


@dataclass(frozen=True)
class SchemeResult:
    """One scheme on one stream."""

    scheme: str
    utilization: float            # tokens / reserved slots, every request at its final length
    utilization_in_flight: float  # the same, averaged over decode steps
    waste_per_seq: float          # mean unused slots per request at completion
    fits: int                     # requests (a prefix of the stream) that fit in the budget

    @property
    def waste(self) -> float:
        """Share of reserved slots that hold no token, at completion."""
        return 1.0 - self.utilization

    @property
    def waste_in_flight(self) -> float:
        return 1.0 - self.utilization_in_flight


def simulate(requests: Requests, *, max_len: int, block_size: int,
             budget: int) -> dict[str, SchemeResult]:
    """Every scheme of `SCHEMES` on `requests`: scheme -> SchemeResult.

    `budget` is the cache memory in token slots (bytes / bytes per token). If `fits` equals
    len(requests) the whole stream fit and the count is a lower bound.
    """
    lens = requests.total_lens  # (R,)
    if block_size < 1 or budget < 0 or len(lens) == 0:
        raise ValueError(f"need block_size >= 1, budget >= 0 and some requests, got "
                         f"block_size={block_size}, budget={budget}, {len(lens)} requests")
    if lens.max() > max_len:
        raise ValueError(f"a request of {lens.max()} tokens exceeds max_len {max_len}")
    out = {}
    for scheme in SCHEMES:
        reserved = reserved_slots(scheme, lens, max_len=max_len, block_size=block_size)
        held_t, reserved_t = in_flight_slots(scheme, requests, max_len=max_len,
                                             block_size=block_size)
        out[scheme] = SchemeResult(
            scheme=scheme,
            utilization=float(lens.sum() / reserved.sum()),
            utilization_in_flight=float(held_t.sum() / reserved_t.sum()),
            waste_per_seq=float((reserved - lens).mean()),
            fits=fits(reserved, budget),
        )
    return out


def sweep_block_sizes(requests: Requests, block_sizes: Sequence[int], *, max_len: int,
                      budget: int) -> dict[int, dict[str, SchemeResult]]:
    """`simulate` at each block size: block_size -> scheme -> SchemeResult."""
    return {b: simulate(requests, max_len=max_len, block_size=b, budget=budget)
            for b in block_sizes}
