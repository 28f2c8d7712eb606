"""Paged attention kernels on a GPU, in one unattended run: decode (float, INT8, FP8) and mixed steps.

    python bench/gpu_decode.py [--out PATH] [--rows 1x32768,8x4096] [--rounds N]
                               [--sweep compact|none] [--budget-s S] [--graphs]
                               [--interpret-smoke]

One layer, bf16, 32 query heads, 8 KV heads of 128 (Llama-3-8B's attention), block size 16.

1. Decode at (batch, tokens) = (1, 32768), (8, 4096), (32, 4096), (64, 4096), (32, 16384),
   (128, 1024): the largest error of every path against the fp32 reference, and the median
   time (`triton.testing.do_bench`, `--rounds` interleaved rounds) of every path of
   `kvlib.experiments.gpu.PATHS`: paged (kvlib's float kernel, blocks in place), sdpa
   (contiguous cache), gather (copy, then sdpa), int8 (the quantized kernel's default
   variant) and int8_<variant> / fp8_<variant> (the others; FP8 where the GPU has it).
2. Mixed steps (`kvlib.experiments.gpu_mixed.MIXED_ROWS`): prompt chunks beside decodes,
   kvlib's paged prefill kernel (one launch, and chunks + split decode in two) against SDPA
   on contiguous tensors.
3. A sliding window: the largest decode row with a 4,096-token window and 4 sinks, to show
   that the kernel reads only what the window keeps.
4. `--sweep compact` (the default): each kernel under other launch options (`SWEEP`: tile,
   warps, stages, variant; then the best one's split policy), the largest rows first, until
   `--budget-s` seconds have passed since the start; the fastest per row is timed again like
   the others (`<kernel>_best_ms`, `<kernel>_best_config`). `suggested_defaults` names, per
   kernel, the config with the best geometric mean over the swept rows.

Bandwidth counts the bytes of bf16 K and V (kv_GB) for every path, the quantized ones
included (their "effective" rate). Prints a table and, as its last line, the JSON object
{"device", "copy_TBps", "rows": [...], "prefill": [...], "window": {...}, "targets": {...},
"targets_best_config": {...}, "suggested_defaults": {...}, "date", "versions", ...}; writes
it to --out, or to $OUT/gpu_decode_<device>.json when $OUT is set. About 3 minutes on an H100
or H200 (a third of it compiling the swept kernels).

Without a GPU it exits with status 2 and says so. `--interpret-smoke` instead runs tiny
shapes on the CPU under TRITON_INTERPRET=1 (set it in the environment), so a test can check
the plumbing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from kvlib.bench import device_name
from kvlib.experiments.gpu import (
    PATHS,
    QUANT_PATHS,
    ROWS,
    copy_bandwidth,
    decode_paths,
    has_fp8,
    make_case,
    median,
    sweep_kernel,
    time_decode_row,
    time_ms,
)
from kvlib.experiments.gpu_mixed import MIXED_ROWS, sweep_prefill, time_mixed_row
from kvlib.kernels.paged_decode import DecodeLaunch
from kvlib.kernels.paged_decode_int8 import INT8_LAUNCH
from kvlib.kernels.paged_prefill import PrefillLaunch

# Launch options swept per kernel (the split policy, programs per SM, comes after: the best
# of these is also timed at 1 and 4 programs per SM). The float kernel: tile, warps, stages.
# The quantized one: each variant with its plausible tiles (fma keeps (rows, tile, D)
# products in registers, so small tiles).
_DOT = ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2))
_FMA = ((16, 4, 3), (32, 4, 3), (32, 8, 3), (16, 4, 4))
SWEEP = {
    "paged": [DecodeLaunch(t, w, s) for t, w, s in
              ((64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (64, 8, 3))],
    "int8": [DecodeLaunch(t, w, s, variant=v) for v in ("dot", "dot16", "i8dot")
             for t, w, s in _DOT] + [DecodeLaunch(t, w, s, variant="fma") for t, w, s in _FMA],
    "fp8": [DecodeLaunch(t, w, s, variant=v) for v in ("dot", "dot16")
            for t, w, s in _DOT[::2]] + [DecodeLaunch(t, w, s, variant="fma")
                                         for t, w, s in _FMA[:2]],
}
PREFILL_SWEEP = [PrefillLaunch(m, t, w, s) for m, t, w, s in
                 ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 4, 2),
                  (64, 32, 4, 3), (128, 64, 4, 3))]
DEFAULTS = {"paged": DecodeLaunch(), "int8": INT8_LAUNCH, "fp8": INT8_LAUNCH}
WINDOW, SINKS = 4096, 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to write the JSON object")
    parser.add_argument("--rows", help="BxS,BxS,... instead of the six decode rows")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved timings of every path per row (median reported)")
    parser.add_argument("--sweep", choices=("compact", "none"), default="compact",
                        help="other launch options to time the kernels under")
    parser.add_argument("--budget-s", type=float, default=170.0,
                        help="no new sweep starts after this many seconds from the start")
    parser.add_argument("--graphs", action="store_true",
                        help="also time every decode path replayed from a CUDA graph")
    parser.add_argument("--interpret-smoke", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1 (for tests)")
    args = parser.parse_args()
    start = time.monotonic()
    rows = ROWS if args.rows is None else [tuple(int(x) for x in r.split("x"))
                                           for r in args.rows.split(",")]
    mixed, sweep, prefill_sweep = MIXED_ROWS, SWEEP, PREFILL_SWEEP
    if args.interpret_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--interpret-smoke needs TRITON_INTERPRET=1 in the environment")
        device, shape, rows, rounds = "cpu", dict(H=4, Hkv=2, D=16, BS=4), [(2, 32)], 1
        mixed = [{"chunks": ((8, 16),), "decodes": 2, "decode_len": 12}]
        sweep = {"paged": [DecodeLaunch(16, 4, 2, num_splits=1)],
                 "int8": [DecodeLaunch(16, variant="dot16"), DecodeLaunch(16, variant="fma")],
                 "fp8": [DecodeLaunch(16, variant="fma")]}
        prefill_sweep = [PrefillLaunch(16, 16)]
        window = 8
    elif not torch.cuda.is_available():
        print("bench/gpu_decode.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "the recorded results are in bench/results/. On a CPU, run "
              "`TRITON_INTERPRET=1 python bench/gpu_decode.py --interpret-smoke` to check the "
              "kernels' plumbing.", file=sys.stderr)
        sys.exit(2)
    else:
        device, shape, rounds, window = "cuda", {}, args.rounds, WINDOW
    if args.sweep == "none":
        sweep, prefill_sweep = {}, []
    paths = tuple(p for p in PATHS if p not in QUANT_PATHS or QUANT_PATHS[p][0] != "fp8"
                  or has_fp8(device))
    if not has_fp8(device):
        sweep = {k: v for k, v in sweep.items() if k != "fp8"}
    small = dict(rep_ms=5) if device == "cpu" else {}

    copy = copy_bandwidth(device, gigabytes=2.0 if device == "cuda" else 0.001)
    print(f"{device_name(device)}: device-to-device copy {copy:.2f} TB/s (read + write)")

    # -- 1. decode rows, every path at its defaults --
    results = []
    for B, S in rows:
        row = time_decode_row(B, S, paths=paths, rounds=rounds, graphs=args.graphs,
                              device=device, **shape)
        add_ratios(row, copy, paths)
        results.append(row)
        print_row(row, paths, elapsed(start))

    # -- 2. mixed steps: the prefill kernel against SDPA --
    prefill = []
    for spec in mixed:
        row = guarded(time_mixed_row, spec, rounds=rounds, device=device, **shape)
        prefill.append(row)
        if "error" in row:
            print(f"mixed {spec}: failed: {row['error']}", flush=True)
            continue
        print(f"mixed {row['chunks']} + {row['decodes']} decodes @ {row['decode_len']}: "
              f"prefill {row['prefill_ms']:.3f} ms ({row['prefill_TFLOPs']} TFLOP/s), two "
              f"launches {row['two_launch_ms']:.3f}, sdpa {row['sdpa_ms']:.3f} -> "
              f"{row['prefill_over_sdpa']:.2f}x sdpa  [{elapsed(start)}]", flush=True)

    # -- 3. a sliding window over the largest row: only the window's blocks are read --
    window_row = guarded(time_window, max(rows, key=lambda r: r[0] * r[1]), window, device,
                         shape)
    if "error" not in window_row:
            print(f"window {window} + {SINKS} sinks over {window_row['B']} x {window_row['S']}: "
              f"{window_row['paged_window_ms']:.3f} ms against {window_row['paged_ms']:.3f} "
              f"without ({window_row['window_over_full']:.2f} of the time, "
              f"{window_row['visible_fraction']:.2f} of the keys)  [{elapsed(start)}]",
              flush=True)

    # -- 4. sweeps, largest rows first, within the budget --
    budget = {"budget_s": args.budget_s, "skipped": []}
    for row in sorted(results, key=lambda r: -r["kv_GB"]):
        for kernel, launches in sweep.items():
            if time.monotonic() - start > args.budget_s:
                budget["skipped"].append(f"{kernel} at {row['B']}x{row['S']}")
                continue
            failed = guarded(sweep_row, row, kernel, launches, rounds, device, shape, small,
                             copy)
            if failed:
                row.setdefault("sweep", {})[kernel] = failed
            print(f"  {row['B']}x{row['S']} {kernel}: best {row.get(f'{kernel}_best_config')} "
                  f"{row.get(f'{kernel}_best_ms')} ms {failed or ''} [{elapsed(start)}]",
                  flush=True)
    if prefill_sweep and time.monotonic() - start <= args.budget_s:
        prefill[0]["sweep"] = guarded(sweep_prefill, mixed[0], prefill_sweep, device=device,
                                      **shape, **small)
    elif prefill_sweep:
        budget["skipped"].append("prefill")

    result = {
        "device": device_name(device),
        "copy_TBps": round(copy, 3),
        "rows": results,
        "prefill": prefill,
        "window": window_row,
        "targets": targets(results),
        "targets_best_config": targets(results, best=True) if sweep else None,
        "suggested_defaults": suggested_defaults(results, sweep),
        "default_config": {k: v.key for k, v in DEFAULTS.items()},
        "quant_paths": {k: f"{pool}: {launch.key}" for k, (pool, launch) in
                        QUANT_PATHS.items() if k in paths},
        "rounds": rounds,
        "graphs": args.graphs,
        "budget": {**budget, "elapsed_s": round(time.monotonic() - start, 1)},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "shape": {"dtype": "bfloat16", "H": 32, "Hkv": 8, "D": 128, "BS": 16, **shape},
    }
    print("ms: median time; ratios: throughput (time of the other over time of the first); "
          f"total {elapsed(start)}")
    out = args.out
    if out is None and os.environ.get("OUT") and not args.interpret_smoke:
        slug = result["device"].lower().replace(" ", "-")
        out = Path(os.environ["OUT"]) / f"gpu_decode_{slug}.json"
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def guarded(fn, *args, **kwargs) -> dict:
    """fn's result ({} for None), or {"error": ...} if it raised: in an unattended run one
    failing measurement must not cost the others."""
    try:
        return fn(*args, **kwargs) or {}
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, see the docstring
        return {"error": f"{type(exc).__name__}: {exc}"[:400]}


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.0f} s"


def add_ratios(row: dict, copy: float, paths: tuple[str, ...]) -> None:
    """TB/s of bf16 K and V, % of the copy, and throughput against sdpa and gather."""
    for name in paths:
        if f"{name}_ms" not in row:  # it raised: `<name>_error` says why
            continue
        ms = row[f"{name}_ms"]
        row[f"{name}_TBps"] = round(row["kv_GB"] / 1e3 / (ms * 1e-3), 3)
        row[f"{name}_pct_copy"] = round(100 * row[f"{name}_TBps"] / copy, 1)
        if name not in ("sdpa", "gather"):
            row[f"{name}_over_sdpa"] = round(row["sdpa_ms"] / ms, 3)
    if "paged_ms" in row:
        row["paged_over_gather"] = round(row["gather_ms"] / row["paged_ms"], 3)


def print_row(row: dict, paths: tuple[str, ...], when: str) -> None:
    cells = ", ".join(f"{p} {row[f'{p}_ms']:.4f}" if f"{p}_ms" in row else f"{p} failed"
                      for p in paths)
    print(f"{row['B']:>4} x {row['S']:>6} ({row['kv_GB']:.3f} GB): {cells} ms | paged/sdpa "
          f"{row.get('paged_over_sdpa')}, paged/gather {row.get('paged_over_gather')}, "
          f"int8/sdpa {row.get('int8_over_sdpa')}, fastest quantized "
          f"{fastest_quantized(row, paths)}  [{when}]", flush=True)
    for p in paths:
        if f"{p}_error" in row:
            print(f"{'':>8}{p} failed: {row[f'{p}_error']}", flush=True)


def fastest_quantized(row: dict, paths: tuple[str, ...]) -> str:
    quant = [p for p in paths if p in QUANT_PATHS and f"{p}_ms" in row]
    if not quant:
        return "none ran"
    best = min(quant, key=lambda p: row[f"{p}_ms"])
    return f"{best} {row['sdpa_ms'] / row[f'{best}_ms']:.3f}x sdpa"


def time_window(rc: tuple[int, int], window: int, device: str, shape: dict) -> dict:
    """The float kernel over one row with and without a window of `window` + SINKS sinks."""
    B, S = rc
    case = make_case(B, S, device=device, quantized=(), **shape)
    dev = torch.device(device)
    full = decode_paths(case, paths=("paged",))["paged"]
    from kvlib.kernels.paged_decode import paged_decode_triton
    from kvlib.kernels.reference import paged_decode_ref

    def windowed():
        return paged_decode_triton(case.q, case.k_pool, case.v_pool, case.block_tables,
                                   case.context_lens, window=window, sink_tokens=SINKS)

    ref = paged_decode_ref(case.q[:1].float(), case.k_pool.float(), case.v_pool.float(),
                           case.block_tables[:1], case.context_lens[:1], window, SINKS)
    err = float((windowed()[:1].float() - ref).abs().max())
    full_ms, win_ms = time_ms(full, dev), time_ms(windowed, dev)
    return {"B": B, "S": S, "window": window, "sink_tokens": SINKS, "paged_ms": round(full_ms, 4),
            "paged_window_ms": round(win_ms, 4), "window_max_err": round(err, 5),
            "window_over_full": round(win_ms / full_ms, 3),
            "visible_fraction": round(min(S, window + SINKS) / S, 3)}


def sweep_row(row: dict, kernel: str, launches: list[DecodeLaunch], rounds: int, device: str,
              shape: dict, small: dict, copy: float) -> None:
    """Sweep one kernel on one row, refine the best one's split policy, time the best again."""
    B, S = row["B"], row["S"]
    path = "paged" if kernel == "paged" else kernel  # int8 / fp8: the variant is in the launch
    pools = () if kernel == "paged" else (kernel,)
    case = make_case(B, S, device=device, quantized=pools, **shape)
    found = sweep_kernel(case, path, launches, device, **small)
    if found["ms"]:
        best = min(found["ms"], key=found["ms"].get)
        launch = next(x for x in launches if x.key == best)
        more = sweep_kernel(case, path, [launch.with_(programs_per_sm=p) for p in (1, 4)],
                            device, **small)
        found["ms"].update(more["ms"])
        found["errors"].update(more["errors"])
        found["max_diff_from_default"] = max(found["max_diff_from_default"],
                                             more["max_diff_from_default"])
        launches = [*launches, *(launch.with_(programs_per_sm=p) for p in (1, 4))]
        best = min(found["ms"], key=found["ms"].get)
        launch = next(x for x in launches if x.key == best)
        fn = decode_paths(case, {path: launch}, paths=(path,))[path]
        ms = median([time_ms(fn, torch.device(device)) for _ in range(rounds)])
        row[f"{kernel}_best_ms"] = round(ms, 4)
        row[f"{kernel}_best_config"] = best
        row[f"{kernel}_best_over_sdpa"] = round(row["sdpa_ms"] / ms, 3)
        row[f"{kernel}_best_pct_copy"] = round(100 * row["kv_GB"] / 1e3 / (ms * 1e-3) / copy, 1)
    row.setdefault("sweep", {})[kernel] = found


def targets(rows: list[dict], best: bool = False) -> dict:
    """The bars, each with the worst row: paged >= 1.0x sdpa where KV >= 0.5 GB, paged >= 3x
    gather everywhere, int8 >= 1.6x sdpa at the largest KV (its default variant, and the
    fastest variant). With `best`, each row's fastest swept config instead of the default
    launch options (rows not swept are left out)."""
    big = [r for r in rows if r["kv_GB"] >= 0.5] or rows
    largest = max(r["kv_GB"] for r in rows)
    paged, int8 = ("paged_best", "int8_best") if best else ("paged", "int8")
    checks = {
        "paged_over_sdpa_at_0.5GB+": ([r.get(f"{paged}_over_sdpa") for r in big], 1.0),
        "paged_over_gather": ([r["gather_ms"] / r[f"{paged}_ms"] for r in rows
                               if f"{paged}_ms" in r], 3.0),
        "int8_over_sdpa_largest": ([r.get(f"{int8}_over_sdpa") for r in rows
                                    if r["kv_GB"] == largest], 1.6),
    }
    if not best:  # every INT8 variant at its default launch, timed like the others
        checks["int8_fastest_variant_over_sdpa_largest"] = (
            [max((v for k, v in r.items() if k.startswith("int8") and k.endswith("_over_sdpa")
                  and "best" not in k), default=None) for r in rows if r["kv_GB"] == largest],
            1.6)
    out = {}
    for name, (values, bar) in checks.items():
        values = [v for v in values if v is not None]
        worst = round(min(values), 3) if values else None
        out[name] = {"worst": worst, "bar": bar, "met": worst is not None and worst >= bar}
    return out


def suggested_defaults(rows: list[dict], sweep: dict) -> dict:
    """Per kernel, the config with the best geometric mean of its time over the swept rows
    (only configs timed on every one of them), with its mean ratio to the current default."""
    out = {}
    for kernel in sweep:
        swept = [r["sweep"][kernel]["ms"] for r in rows
                 if r.get("sweep", {}).get(kernel, {}).get("ms")]
        if not swept:
            continue
        common = set.intersection(*(set(ms) for ms in swept))
        if not common:
            continue

        means = {key: math.exp(sum(math.log(ms[key]) for ms in swept) / len(swept))
                 for key in common}
        best = min(means, key=means.get)
        default = DEFAULTS[kernel].key
        out[kernel] = {"config": best, "rows": len(swept), "default": default,
                       "default_over_best": round(means[default] / means[best], 3)
                       if default in means else None}
    return out


def versions() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


if __name__ == "__main__":
    main()
