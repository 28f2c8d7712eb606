"""Quantized KV caches: real bytes per token, attention error, and decode-attention time.

    python bench/quantized.py [--context 2048] [--repeats 7] [--quick]

For every preset of `kvlib.cache.quant_memory.PRESETS` (plain INT8/INT4/FP8 per token, and
the configurations of vLLM, llama.cpp, Hugging Face and KIVI):
  bytes_per_token      all of it: codes, scales, zero points, the full-precision residual,
                       for Llama-3-8B's KV shape (32 layers, 8 KV heads, head dim 128)
  ratio_vs_fp16        an fp16 cache's bytes / these, next to the naive 16 / bits
  attn_rel_err         a decode step's attention output read through the cache, against
                       exact K and V, on keys with outlier channels (relative L2 error)
  time_vs_unquantized  that step's time (read + attend, one layer) / the flat cache's,
                       measured in this run on this device
The last line printed is one JSON object {"schemes": {name: {...}}, ...}.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvlib.analysis import PRESETS as MODELS
from kvlib.bench import device_name
from kvlib.cache.quant_memory import PRESETS, memory
from kvlib.experiments.quantization import (
    cache_attention_error,
    outlier_keys,
    time_quantized_attention,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    args = parser.parse_args()
    context, repeats = (256, 2) if args.quick else (args.context, args.repeats)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    llama = MODELS["llama-3-8b"]
    k, v, _ = outlier_keys(context, 128, 8, num_outliers=4, strength=10.0)
    q = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))  # (H, D)
    flat = time_quantized_attention(None, context, repeats=repeats)
    schemes = {}
    print(f"context {context}, memory for {llama.name}, device {device_name()}")
    print(f"{'scheme':>16} {'B/token':>9} {'ratio':>6} {'naive':>6} {'attn err':>9} "
          f"{'time x':>7}")
    for name, quant in PRESETS.items():
        mem = memory(quant, llama.num_layers, llama.num_kv_heads, llama.head_dim, context)
        err = cache_attention_error(quant, k, v, q)
        t = time_quantized_attention(quant, context, repeats=repeats)
        schemes[name] = {
            "bytes_per_token": round(mem.bytes_per_token, 1),
            "ratio_vs_fp16": round(mem.ratio_vs_fp16, 3),
            "naive_ratio": mem.naive_ratio,
            "attn_rel_err": float(f"{err:.3g}"),
            "time_vs_unquantized": round(t.median_s / flat.median_s, 2),
        }
        row = schemes[name]
        print(f"{name:>16} {row['bytes_per_token']:>9,.0f} {row['ratio_vs_fp16']:>6.2f} "
              f"{row['naive_ratio']:>6.1f} {row['attn_rel_err']:>9.2e} "
              f"{row['time_vs_unquantized']:>7.2f}")
    fp16 = memory(PRESETS["int8-token"], llama.num_layers, llama.num_kv_heads, llama.head_dim,
                  context).fp16 / context
    print(json.dumps({"schemes": schemes, "fp16_bytes_per_token": fp16, "context": context,
                      "memory_model": llama.name, "flat_ms": round(flat.median_ms, 3),
                      "device": device_name()}))


if __name__ == "__main__":
    main()
