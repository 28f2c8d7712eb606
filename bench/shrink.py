"""Shrinking the cache on the book's trained model: quality against budget for every policy.

    python bench/shrink.py [--tokens 2048] [--files 4] [--probes 6] [--checkpoint PATH] [--quick]

Reads held-out files and copying probes (`kvlib.experiments.budget_sweep`) through every
policy of `kvlib.experiments.shrink.POLICIES` (window, sinks + window with either positions,
H2O, SnapKV per head and in whole blocks, an INT4 rest), in both regimes (the cache cut once
after the prompt, or held to the budget while decoding), at budgets of 5% to 100% of the full
cache's bytes. One line per point: held-out bits per byte, agreement with the full cache's
greedy tokens, far copying, probe recall, bytes per token (logical and what a paged cache of
16-token blocks still holds). The last line printed is one JSON object: every point, the
summary (the smallest budget within 1% of the full cache's bits per byte, and where copying
holds), the MLA decode costs of DeepSeek-V3's shape, and the device.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvlib.bench import device_name
from kvlib.config import ModelConfig
from kvlib.experiments import budget_sweep, held_out
from kvlib.mla import decode_cost

DEEPSEEK_V3 = ModelConfig(vocab_size=129280, d_model=7168, num_layers=61, num_heads=128,
                          num_kv_heads=128, kv_lora_rank=512, qk_rope_head_dim=64,
                          qk_nope_head_dim=128, v_head_dim=128, q_lora_rank=1536,
                          ffn_dim=18432, name="deepseek-v3")


def mla_costs(context: int = 4096) -> dict:
    """Bytes and FLOPs of one decode step of one layer, per computation (bf16)."""
    out = {}
    for computation in ("expanded", "naive", "absorbed"):
        c = decode_cost(DEEPSEEK_V3, context, computation)
        out[computation] = {"cache_bytes": c.cache_bytes, "weight_bytes": c.weight_bytes,
                            "flops": c.flops,
                            "flops_per_cache_byte": round(c.flops_per_cache_byte, 1)}
    return {"model": DEEPSEEK_V3.name, "context": context, "per_layer": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--probes", type=int, default=6)
    parser.add_argument("--checkpoint", default=str(held_out.CHECKPOINT))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    args = parser.parse_args()
    tokens, files, probes = (256, 1, 1) if args.quick else (args.tokens, args.files, args.probes)
    budgets = (0.2, 1.0) if args.quick else budget_sweep.BUDGETS
    torch.set_num_threads(min(2, torch.get_num_threads()))

    book = held_out.load(args.checkpoint)
    data = budget_sweep.texts(book, tokens, files, probes)
    print(f"{book.record.get('name', args.checkpoint)}: {files} held-out files and {probes} "
          f"probes of {tokens} tokens, device {device_name()}")
    print(f"{'policy':>34} {'regime':>6} {'budget':>6} {'bpb':>7} {'agree':>6} {'far':>6} "
          f"{'recall':>6} {'B/tok':>7} {'paged':>7}")
    start = time.perf_counter()
    records = []
    for r in budget_sweep.each_point(book, data, budgets=budgets):
        records.append(r)
        print(f"{r['policy']:>34} {r['regime']:>6} {r['fraction']:>6.0%} {r['bpb']:>7.4f} "
              f"{r['agreement']:>6.3f} {r['far_copy']:>6.3f} {r['recall']:>6.2f} "
              f"{r['bytes_per_token']:>7.0f} {r['paged_bytes_per_token']:>7.0f}", flush=True)
    print(json.dumps({
        "model": book.record.get("name", "?"), "checkpoint_metrics": {
            k: book.record.get("metrics", {}).get(k) for k in ("bits_per_byte", "top1_accuracy")},
        "tokens": tokens, "files": list(data.files), "probes": [p.name for p in data.probes],
        "far_positions": sum(len(v) for v in data.far.values()),
        "records": records, "summary": budget_sweep.summary(records),
        "mla": mla_costs(), "seconds": round(time.perf_counter() - start),
        "device": device_name()}))


if __name__ == "__main__":
    main()
