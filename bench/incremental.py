"""Per-token decode time with and without a KV cache, by context length.

    python bench/incremental.py [--lengths 128 256 ...] [--repeats 5] [--device cuda]

Prints a table, then, as its last line, one JSON object:
    {"speedup_by_len": {"128": ..., ...}, "cached_ms": {...}, "uncached_ms": {...},
     "flop_speedup_by_len": {...}, "device": "...", "model": "..."}
Both variants run in the same process, one length after the other, so each ratio compares
times taken on the same machine at the same moment.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvlib import analysis
from kvlib.bench import device_name
from kvlib.experiments import DEMO_CONFIG, decode_timings, demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model = demo_model(device=args.device)
    timings = decode_timings(model, args.lengths, warmup=args.warmup, repeats=args.repeats)
    speedups = timings.speedup_by_len
    flops = {s: analysis.flop_speedup(DEMO_CONFIG, s) for s in args.lengths}
    print(f"model {DEMO_CONFIG.name}: {analysis.param_count(DEMO_CONFIG):,} parameters, "
          f"device {device_name(args.device)}")
    print(f"{'context':>8} {'cached ms':>10} {'uncached ms':>12} {'speedup':>8} "
          f"{'FLOP ratio':>10} {'claim (S)':>9}")
    for s in args.lengths:
        print(f"{s:>8} {timings.cached[s].median_ms:>10.2f} {timings.uncached[s].median_ms:>12.2f}"
              f" {speedups[s]:>8.1f} {flops[s]:>10.1f} {s:>9}")
    print(json.dumps({
        "speedup_by_len": {str(s): round(x, 2) for s, x in speedups.items()},
        "cached_ms": {str(s): round(t.median_ms, 3) for s, t in timings.cached.items()},
        "uncached_ms": {str(s): round(t.median_ms, 3) for s, t in timings.uncached.items()},
        "flop_speedup_by_len": {str(s): round(x, 1) for s, x in flops.items()},
        "device": device_name(args.device),
        "model": DEMO_CONFIG.name,
    }))


if __name__ == "__main__":
    main()
