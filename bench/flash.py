"""Peak memory and time of causal attention: naive (whole score matrix), chunked, torch SDPA.

    python bench/flash.py [--lengths 512 1024 ...] [--repeats 3] [--threads 1] [--quick]

One sequence, 4 query heads sharing 1 KV head (GQA 4:1), head dim 64, fp32, tiles of
256 x 256: modest heads so that the naive path's scores at 8,192 tokens (1 GiB per copy)
fit and the whole run takes a few minutes on 2 cores. Peak bytes are measured from the
allocator's records (`kvlib.experiments.flash.peak_bytes`), not computed.

Prints a table, then, as its last line, one JSON object:
    {"seq_lens": [...], "peak_bytes_naive": [...], "peak_bytes_chunked": [...],
     "peak_bytes_sdpa": [...], "ms_naive": [...], "ms_chunked": [...], "ms_sdpa": [...],
     "device": "...", ...}
with one value per length. Timings run on `--threads` intra-op threads (1 by default: on a
shared machine two threads mostly time contention); memory does not depend on it.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvlib.bench import device_name
from kvlib.experiments import flash as fx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny lengths and tiles (a test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    lengths, tiles = args.lengths, dict(fx.TILES)
    if args.quick:
        lengths, tiles, args.repeats = [64, 128, 256], {"q_tile": 32, "kv_tile": 32}, 1

    memory = fx.measure_attention_memory(lengths, num_threads=args.threads, **tiles)
    times = fx.time_attention(lengths, warmup=args.warmup, repeats=args.repeats,
                              device=args.device, num_threads=args.threads, **tiles)
    ms = {p: [round(times[p][T].median_ms, 3) for T in lengths] for p in fx.PATHS}

    print(f"causal attention, 1 sequence, {fx.SHAPE}, tiles {tiles}, fp32; timings on "
          f"{device_name(args.device)}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'T':>6} {'naive MiB':>10} {'chunked MiB':>12} {'sdpa MiB':>9} {'naive/chunk':>11}"
          f" {'naive ms':>9} {'chunked ms':>11} {'sdpa ms':>8}")
    for i, T in enumerate(lengths):
        mib = [memory.peak_bytes[p][i] / 2**20 for p in fx.PATHS]
        print(f"{T:>6} {mib[0]:>10.1f} {mib[1]:>12.2f} {mib[2]:>9.2f} "
              f"{memory.ratio('naive', 'chunked')[i]:>10.0f}x {ms['naive'][i]:>9.1f} "
              f"{ms['chunked'][i]:>11.1f} {ms['sdpa'][i]:>8.1f}")
    print("log-log slope of peak bytes over the two longest lengths: "
          + ", ".join(f"{p} {memory.slope(p):.2f}" for p in fx.PATHS))
    print(json.dumps({
        "seq_lens": lengths,
        **{f"peak_bytes_{p}": list(memory.peak_bytes[p]) for p in fx.PATHS},
        **{f"ms_{p}": ms[p] for p in fx.PATHS},
        "device": device_name(args.device),
        "memory_measured_on": "cpu (torch.profiler allocation events)",
        "threads": args.threads,
        "shape": {**fx.SHAPE, "batch_size": 1, "dtype": "float32"},
        "tiles": tiles,
    }))


if __name__ == "__main__":
    main()
