"""Figures quoted from elsewhere, kept apart from kvlib's own measurements.

Nothing here was measured by kvlib's scripts, and nothing here feeds a measured result: each
set of figures carries where it comes from, and chapter 7 draws it labelled as quoted, beside
the runs that `bench/gpu_decode.py` recorded in `bench/results/` (never mixed into them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuotedFigures:
    """(low, high) ranges by what was measured, the unit they share, and their source."""

    source: str
    unit: str
    ranges: dict[str, tuple[float, float]]


# One layer's decode attention, 32 query / 8 KV heads of 128 in bf16, the shapes of
# kvlib.experiments.gpu.ROWS: TB/s of K and V bytes over each path's whole time (for
# "gather + sdpa", the gather and the attention together), and a device-to-device copy
# counting its reads and writes. Another gather implementation than kvlib's.
H200_DECODE = QuotedFigures(
    source="quoted: an H200 run of 2026-11-26, not made with kvlib's scripts",
    unit="TB/s of bf16 K and V read per step",
    ranges={"copy": (4.27, 4.27), "sdpa, 0.13 GB of KV": (2.7, 2.7),
            "sdpa, 0.5-2.1 GB": (3.9, 4.4), "gather + sdpa": (1.1, 1.3)},
)
