"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

>>> logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
>>> sample_next(logits, SamplingParams()).tolist()          # temperature 0: greedy
[0]
>>> filter_logits(logits, SamplingParams(temperature=1.0, top_k=2)).isinf().tolist()
[[False, False, True, True]]
"""

from __future__ import annotations

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
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
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
