"""Links, and what moving a cache over them costs against computing it again.

Every idea of chapter 10 trades bytes moved for compute saved: a preempted sequence is
swapped to host memory (PCIe) instead of prefilled again; a prefill machine sends the cache
it computed to a decode machine (NVLink inside a node, the network between nodes); a router
sends a request to where its prefix is cached. One ratio decides each of them:

    time to move a token's cache    kv_bytes_per_token / link_bandwidth
    ----------------------------- = -------------------------------------------
    time to compute it again        prefill FLOPs per token / achieved FLOP/s

and, for swapping, the move happens twice (out and back). Both are proportional to the
number of tokens (attention adds a term that grows with the length to the prefill's side),
so the ratio hardly depends on the sequence: it is a property of the model (bytes per token
against parameters), of the GPU and of the link. Grouped-query attention shrinks the bytes
and so favours moving; so does a longer context.

Worked example, Llama-3-8B in bf16 on an H100 (989 TFLOP/s dense, half of it reached in a
long prefill) over PCIe 5 (64 GB/s each way): a token's cache is 128 KiB, 2.0 us to move;
its prefill is about 14.5 GFLOP, 29 us to compute. Swapping a 2,048-token sequence out and
back costs 0.14 of recomputing it: 7x cheaper.

>>> llama = PRESETS["llama-3-8b"]
>>> h100 = GPUS["H100-SXM"]
>>> round(1e6 * token_bytes(llama) / LINKS["PCIe 5 x16"].bandwidth, 2)
2.05
>>> round(move_over_compute(llama, 2048, h100, LINKS["PCIe 5 x16"], trips=2), 2)
0.14
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlib.analysis import GPUS, PRESETS, Hardware, kv_bytes_per_token, prefill_cost
from kvlib.config import ModelConfig

__all__ = ["GPUS", "LINKS", "Link", "PRESETS", "compute_seconds", "move_over_compute",
           "token_bytes", "transfer_seconds"]

MFU = 0.5  # share of peak FLOP/s a long prefill reaches (large matmuls: 40-60% is typical)


@dataclass(frozen=True)
class Link:
    """A link's bandwidth in one direction (bytes/s) and the fixed latency of one transfer."""

    name: str
    bandwidth: float
    latency_s: float = 0.0


# Peak figures, one direction. PCIe 5 x16 and NVLink 4 from the H100's datasheet (128 GB/s
# and 900 GB/s, both directions together); 400 Gb/s and 100 Gb/s are NICs' line rates.
LINKS: dict[str, Link] = {
    "100 Gb/s Ethernet": Link("100 Gb/s Ethernet", 12.5e9, 10e-6),
    "400 Gb/s network": Link("400 Gb/s network", 50e9, 5e-6),
    "PCIe 5 x16": Link("PCIe 5 x16", 64e9, 2e-6),
    "NVLink 4": Link("NVLink 4", 450e9, 1e-6),
}


def token_bytes(cfg: ModelConfig, dtype: torch.dtype | str = "bf16") -> int:
    """Cache bytes of one token, every layer, K and V (`analysis.kv_bytes_per_token`)."""
    return kv_bytes_per_token(cfg, dtype)


def transfer_seconds(nbytes: float, link: Link) -> float:
    """One transfer of `nbytes` over `link`: its latency plus bytes over bandwidth."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return link.latency_s + nbytes / link.bandwidth


def compute_seconds(cfg: ModelConfig, num_tokens: int, hw: Hardware, mfu: float = MFU) -> float:
    """A prefill of `num_tokens` tokens at `mfu` of the GPU's peak FLOP/s."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    return prefill_cost(cfg, num_tokens).total_flops / (hw.peak_flops * mfu)


def move_over_compute(cfg: ModelConfig, num_tokens: int, hw: Hardware, link: Link, *,
                      trips: int = 1, dtype: torch.dtype | str = "bf16",
                      mfu: float = MFU) -> float:
    """Seconds to move a sequence's cache `trips` times (2 for a swap: out and back) over
    seconds to prefill it again: below 1, moving pays."""
    nbytes = num_tokens * token_bytes(cfg, dtype)
    move = trips * transfer_seconds(nbytes, link)
    return move / compute_seconds(cfg, num_tokens, hw, mfu)
