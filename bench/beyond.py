"""Moving a cache: swap against recompute, and a disaggregated transfer, beside the cost model.

    python bench/beyond.py [--lengths 64 256 1024] [--repeats 5] [--quick]

On the bench model of chapter 4 (~10.5M parameters, fp32, 8 layers, 4 KV heads of 32):

  swap        per preempted sequence of each length: its blocks swapped to the host tier and
              back (OffloadingKVCache), against prefilling it again; beside what the cost
              model predicts from this machine's copy bandwidth and matmul FLOP/s, measured
              apart (bytes over bandwidth, FLOPs over FLOP/s)
  transfer    two processes (gloo): a prefill engine hands requests of each length to a
              decode engine (kvlib.distributed.disaggregation); bytes and seconds per
              request (data sent to import done), and whether every output equals one
              engine's; then gloo alone: one tensor of 64 KiB to 64 MiB and an answer
  model       the same trade for Llama-3-8B (bf16) on an H100, over PCIe 5, a 400 Gb/s
              network and NVLink 4: a prompt's cache over the link against its prefill

The last line printed is one JSON object with all of it.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from kvlib import links
from kvlib.analysis import GPUS, PRESETS
from kvlib.bench import device_name
from kvlib.distributed import disaggregation as dg
from kvlib.distributed.launch import run_ranks
from kvlib.experiments import batching as bxp
from kvlib.experiments import beyond as bx
from kvlib.scheduler import Request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    args = parser.parse_args()
    lengths, repeats = ([32, 128], 1) if args.quick else (args.lengths, args.repeats)
    torch.set_num_threads(1)
    config = bxp.bench_config(num_layers=2 if args.quick else 8, max_seq_len=2048)
    model = bxp.bench_model(config)

    # 1. swap against recompute, measured and predicted
    rates = bx.cpu_rates(model, repeats=repeats)
    rows = bx.time_swap_vs_recompute(model, lengths, repeats=repeats)
    swap = {}
    print(f"{model.config.name}, {device_name()}: copy {rates['copy_bytes_per_s'] / 1e9:.2f} "
          f"GB/s, matmul {rates['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(f"{'tokens':>7} {'MiB':>6} {'swap ms':>8} {'pred':>7} {'recomp ms':>10} {'pred':>8} "
          f"{'recomp/swap':>11}")
    for r in rows:
        p_swap, p_again = bx.predicted_swap_vs_recompute(model, r.tokens, rates)
        swap[str(r.tokens)] = {
            "bytes_each_way": r.bytes_each_way, "swap_ms": round(1e3 * r.swap_s, 3),
            "predicted_swap_ms": round(1e3 * p_swap, 3),
            "recompute_ms": round(1e3 * r.recompute_s, 2),
            "predicted_recompute_ms": round(1e3 * p_again, 2),
            "recompute_over_swap": round(r.recompute_s / r.swap_s, 1)}
        print(f"{r.tokens:>7} {r.bytes_each_way / 2**20:>6.2f} {1e3 * r.swap_s:>8.2f} "
              f"{1e3 * p_swap:>7.2f} {1e3 * r.recompute_s:>10.1f} {1e3 * p_again:>8.1f} "
              f"{r.recompute_s / r.swap_s:>11.0f}")

    # 2. a disaggregated transfer between two processes
    per_length = 2
    requests = [Request([(7 * i + 3 * j) % config.vocab_size for j in range(n)],
                        max_new_tokens=4) for n in lengths for i in range(per_length)]
    spec = dg.EngineSpec(num_blocks=8 * -(-max(lengths) // 16) + 8)
    results = run_ranks(dg.serve, 2, (model, requests, spec, spec), timeout_s=600)
    outputs = dg.merged_outputs(results, len(requests))
    engine = spec.build(model)
    alone = engine.generate([r.prompt_ids for r in requests], max_new_tokens=4,
                            show_progress=False)
    equal = sum(o == a.token_ids for o, a in zip(outputs, alone.outputs))
    transfers = {}
    moved = results[0]["transfers"]
    print(f"disaggregated: {equal} of {len(requests)} outputs equal one engine's")
    print(f"{'tokens':>7} {'MiB':>6} {'ms':>7} {'GB/s':>6}")
    for n in lengths:
        ts = [t for t in moved if t.prompt_len == n and t.accepted]
        s = statistics.median(t.seconds for t in ts)
        transfers[str(n)] = {"data_bytes": ts[0].data_bytes, "total_bytes": ts[0].total_bytes,
                             "ms": round(1e3 * s, 2),
                             "GB_per_s": round(ts[0].data_bytes / s / 1e9, 3)}
        print(f"{n:>7} {ts[0].data_bytes / 2**20:>6.2f} {1e3 * s:>7.2f} "
              f"{ts[0].data_bytes / s / 1e9:>6.2f}")

    # 3. what gloo itself moves between two processes, by size
    sizes = [2**16, 2**20, 2**24] if args.quick else [2**16, 2**20, 2**24, 2**26]
    link = run_ranks(bx.time_transfer_ranks, 2, (sizes, repeats), timeout_s=600)[0]
    gloo = {str(r["bytes"]): round(r["bytes"] / r["seconds"] / 1e9, 3) for r in link}
    print("gloo, one send + an answer: " + ", ".join(
        f"{int(k) / 2**20:g} MiB {v:.2f} GB/s" for k, v in gloo.items()))

    # 4. the cost model at GPU scale
    llama, h100 = PRESETS["llama-3-8b"], GPUS["H100-SXM"]
    model_rows = {}
    for n in (512, 2048, 8192):
        prefill = links.compute_seconds(llama, n, h100)
        row = {"prefill_ms": round(1e3 * prefill, 2)}
        for name in ("PCIe 5 x16", "400 Gb/s network", "NVLink 4"):
            move = links.transfer_seconds(n * links.token_bytes(llama), links.LINKS[name])
            row[f"{name} ms"] = round(1e3 * move, 2)
        model_rows[str(n)] = row
        print(f"llama-3-8b, {n} tokens on {h100.name}: " + ", ".join(
            f"{k} {v}" for k, v in row.items()))

    print(json.dumps({
        "device": device_name(), "model": model.config.name, "threads": 1,
        "copy_GB_per_s": round(rates["copy_bytes_per_s"] / 1e9, 3),
        "matmul_GFLOP_per_s": round(rates["matmul_flops_per_s"] / 1e9, 2),
        "swap_vs_recompute": swap, "transfer": transfers, "gloo_GB_per_s": gloo,
        "disaggregated_equal": equal, "requests": len(requests),
        "llama_3_8b_h100": model_rows}))


if __name__ == "__main__":
    main()
