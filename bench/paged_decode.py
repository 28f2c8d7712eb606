"""Decode attention over a paged cache, read in place, against flat caches and torch's SDPA.

    python bench/paged_decode.py [--batch 8] [--context 4096] [--repeats 9] [--quick]

One layer, 32 query heads, 8 KV heads of 128, fp32, block size 16 (Llama-3-8B's attention
shape), the same keys and values in a paged cache (blocks spread over the pool), a
head-major flat cache, and contiguous tensors. Times, round-robin in one run:
    paged   kvlib's fast path: the blocks read where they lie (kvlib.kernels.paged_decode_cpu)
    gather  the reference: blocks gathered into a contiguous copy, then attention
    flat    kvlib's fast path on the flat cache (SDPA over its views)
    sdpa    torch.nn.functional.scaled_dot_product_attention(enable_gqa=True), contiguous
Prints a table and, as its last line, a JSON object with `paged_over_flat`,
`paged_over_sdpa` and `gather_over_sdpa` (ratios of medians) and the times in ms.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvlib.bench import device_name
from kvlib.experiments.paged import time_decode_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    args = parser.parse_args()
    shape = {}
    if args.quick:
        args.batch, args.context, args.repeats = 2, 100, 3
        shape = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16}

    t = time_decode_paths(args.batch, args.context, repeats=args.repeats, **shape)
    print(f"decode attention, batch {args.batch} x {args.context} tokens, fp32, "
          f"{device_name('cpu')}, torch {torch.__version__}")
    for name in ("paged", "gather", "flat", "sdpa"):
        print(f"{name:>7} {getattr(t, name)}")
    ratios = t.ratios()
    for name, value in ratios.items():
        print(f"{name:>17} {value:.2f}")
    print(json.dumps({
        **{k: round(v, 3) for k, v in ratios.items()},
        **{f"{name}_ms": float(f"{getattr(t, name).median_ms:.4g}")
           for name in ("paged", "gather", "flat", "sdpa")},
        "batch": args.batch, "context": args.context, "device": device_name("cpu"),
    }))


if __name__ == "__main__":
    main()
