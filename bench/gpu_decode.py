"""Paged decode attention on a GPU: kvlib's Triton kernel against SDPA, gather-then-SDPA, INT8.

    python bench/gpu_decode.py [--out PATH] [--rows 1x32768,8x4096] [--rounds N]
                               [--sweep full|candidates|none] [--interpret-smoke]

One layer, bf16, 32 query heads, 8 KV heads of 128 (Llama-3-8B's attention), block size 16,
at (batch, tokens) = (1, 32768), (8, 4096), (32, 4096), (64, 4096), (32, 16384), (128, 1024).
For each row: the largest error of every path against the fp32 reference, and the median time
(`triton.testing.do_bench`) of
    paged   kvlib.kernels.paged_decode, blocks read in place, default launch options
    sdpa    torch's scaled_dot_product_attention(enable_gqa=True) on a contiguous cache
    gather  the blocks gathered into a contiguous copy, then sdpa
    int8    kvlib.kernels.paged_decode_int8 on an INT8 pool (fp16 scale per token per head)
and a device-to-device copy's bandwidth, measured in the same run. Bandwidth counts the bytes
of bf16 K and V (kv_GB) for every path, the INT8 one included (its "effective" rate).
Every path is timed `--rounds` times (default 5), interleaved; the median round is reported
with the spread. Both kernels are also timed under other launch options (`--sweep`: `full` is
`kvlib.experiments.gpu.SWEEP`, 36 configs of tile, warps, stages and splits, which chose the
defaults; `candidates`, the default, is the runners-up); the fastest config per row is timed
again and reported beside the default (`*_best_ms`).

Prints a table and, as its last line, the JSON object
{"device", "copy_TBps", "rows": [{"B", "S", "kv_GB", "paged_ms", "sdpa_ms", "gather_ms",
"int8_ms", ...}], "targets": {...}, "date", "versions"}; writes the same object to --out,
or to $OUT/gpu_decode_<device>.json when $OUT is set. Fits in a few minutes on an H100.

Without a GPU it exits with status 2 and says so. `--interpret-smoke` instead runs one tiny
row on the CPU under TRITON_INTERPRET=1 (set it in the environment), so a test can check
the plumbing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

from kvlib.bench import device_name
from kvlib.experiments.gpu import (
    CANDIDATES,
    ROWS,
    SWEEP,
    KernelConfig,
    copy_bandwidth,
    time_decode_row,
)
from kvlib.kernels.paged_decode_int8 import INT8_NUM_STAGES

PATHS = ("paged", "paged_best", "sdpa", "gather", "int8", "int8_best")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to write the JSON object")
    parser.add_argument("--rows", help="BxS,BxS,... instead of the issue's six rows")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved timings of every path per row (median reported)")
    parser.add_argument("--sweep", choices=("full", "candidates", "none"), default="candidates",
                        help="other launch options to time the kernels under")
    parser.add_argument("--graphs", action="store_true",
                        help="also time every path replayed from a CUDA graph (no launch cost)")
    parser.add_argument("--interpret-smoke", action="store_true",
                        help="one tiny row on the CPU under TRITON_INTERPRET=1 (for tests)")
    args = parser.parse_args()
    rows = ROWS if args.rows is None else [tuple(int(x) for x in r.split("x"))
                                           for r in args.rows.split(",")]
    if args.interpret_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--interpret-smoke needs TRITON_INTERPRET=1 in the environment")
        device, shape, rows, rounds = "cpu", dict(H=4, Hkv=2, D=16, BS=4), [(2, 32)], 1
        sweep = (KernelConfig(16, 4, 2, 1), KernelConfig(32, 4, 3, 2))
    elif not torch.cuda.is_available():
        print("bench/gpu_decode.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "the recorded results are in bench/results/. On a CPU, run "
              "`TRITON_INTERPRET=1 python bench/gpu_decode.py --interpret-smoke` to check the "
              "kernels' plumbing.", file=sys.stderr)
        sys.exit(2)
    else:
        device, shape, rounds = "cuda", {}, args.rounds
        sweep = {"full": SWEEP, "candidates": CANDIDATES, "none": ()}[args.sweep]

    copy = copy_bandwidth(device, gigabytes=2.0 if device == "cuda" else 0.001)
    print(f"{device_name(device)}: device-to-device copy {copy:.2f} TB/s (read + write)")
    paths = PATHS if sweep else tuple(p for p in PATHS if not p.endswith("_best"))
    header = (f"{'B':>4} {'S':>6} {'KV GB':>6} | " + " ".join(f"{n:>21}" for n in paths)
              + f" | {'paged/sdpa':>10} {'paged/gath':>10} {'int8/sdpa':>9}")
    print(header + "\n" + "-" * len(header))
    results = []
    for B, S in rows:
        row = time_decode_row(B, S, sweep=sweep, rounds=rounds, graphs=args.graphs,
                              device=device, **shape)
        for name in paths:
            row[f"{name}_TBps"] = round(row["kv_GB"] / 1e3 / (row[f"{name}_ms"] * 1e-3), 3)
            row[f"{name}_pct_copy"] = round(100 * row[f"{name}_TBps"] / copy, 1)
        for kernel in paths:  # throughput ratios: time of the other over the kernel's time
            if kernel.startswith(("paged", "int8")):
                row[f"{kernel}_over_sdpa"] = round(row["sdpa_ms"] / row[f"{kernel}_ms"], 3)
            if kernel.startswith("paged"):
                row[f"{kernel}_over_gather"] = round(row["gather_ms"] / row[f"{kernel}_ms"], 3)
        results.append(row)
        cells = " ".join(f"{row[f'{n}_ms']:8.3f}ms {row[f'{n}_TBps']:4.2f}T "
                         f"{row[f'{n}_pct_copy']:3.0f}%" for n in paths)
        print(f"{B:>4} {S:>6} {row['kv_GB']:6.3f} | {cells} | {row['paged_over_sdpa']:10.2f} "
              f"{row['paged_over_gather']:10.2f} {row['int8_over_sdpa']:9.2f}", flush=True)
        if args.graphs:
            print(f"{'':>18} CUDA graph: " + ", ".join(
                f"{n} {row.get(f'{n}_graph_ms')} ms" for n in ("paged", "sdpa", "gather",
                                                               "int8")), flush=True)
        if sweep:
            print(f"{'':>18} best configs: paged {row['paged_best_config']}, int8 "
                  f"{row['int8_best_config']}", flush=True)
    print("ms: median time; T: TB/s of bf16 K and V; %: of the copy's TB/s; ratios: throughput "
          "(time of the other over time of the first), default launch options")

    result = {
        "device": device_name(device),
        "copy_TBps": round(copy, 3),
        "rows": results,
        "targets": targets(results),
        "targets_best_config": targets(results, best=True) if sweep else None,
        "default_config": {"paged": KernelConfig().key,
                           "int8": KernelConfig(num_stages=INT8_NUM_STAGES).key},
        "rounds": rounds,
        "graphs": args.graphs,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "shape": {"dtype": "bfloat16", "H": 32, "Hkv": 8, "D": 128, "BS": 16, **shape},
    }
    out = args.out
    if out is None and os.environ.get("OUT") and not args.interpret_smoke:
        slug = result["device"].lower().replace(" ", "-")
        out = Path(os.environ["OUT"]) / f"gpu_decode_{slug}.json"
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def targets(rows: list[dict], best: bool = False) -> dict:
    """The issue's bars, each with the worst row: paged >= 0.9x sdpa where KV >= 0.5 GB,
    paged >= 3x gather everywhere, int8 >= 1.6x sdpa at the largest KV. With `best`, each
    row's fastest swept config instead of the default launch options."""
    big = [r for r in rows if r["kv_GB"] >= 0.5] or rows
    largest = max(r["kv_GB"] for r in rows)
    paged, int8 = ("paged_best", "int8_best") if best else ("paged", "int8")
    checks = {
        "paged_over_sdpa_at_0.5GB+": (min(r[f"{paged}_over_sdpa"] for r in big), 0.9),
        "paged_over_gather": (min(r[f"{paged}_over_gather"] for r in rows), 3.0),
        "int8_over_sdpa_largest": (min(r[f"{int8}_over_sdpa"] for r in rows
                                       if r["kv_GB"] == largest), 1.6),
    }
    return {k: {"worst": v, "bar": bar, "met": v >= bar} for k, (v, bar) in checks.items()}


def versions() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


if __name__ == "__main__":
    main()
