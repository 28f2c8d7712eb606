"""Cached against uncached greedy generation, in bf16 and fp32, on one device.

    python bench/bf16_divergence.py [--prompts 8] [--new-tokens 64] [--device cuda]

The demo model (kvlib.experiments.DEMO_CONFIG, seeded random weights) generates from the same
prompts with and without a KV cache. Both compute the same function; they differ only in the
order the numbers are added. Prints, per dtype, the largest logit difference over the steps
both runs reached with the same tokens, and how many of the prompts led to different tokens
(and at which step); then, as its last line, one JSON object:
    {"device": "...", "prompts": 8, "new_tokens": 64,
     "bfloat16": {"max_logit_gap": ..., "logit_spread": ..., "diverged_at": [...]},
     "float32": {...}}
"""

from __future__ import annotations

import argparse
import json

import torch

from kvlib.bench import device_name
from kvlib.experiments import DEMO_CONFIG, cached_vs_uncached, demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, DEMO_CONFIG.vocab_size, (args.prompts, args.prompt_len),
                            generator=gen).to(args.device)  # (B, P)
    record = {"device": device_name(args.device), "model": DEMO_CONFIG.name,
              "prompts": args.prompts, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "torch": torch.__version__}
    for dtype in (torch.bfloat16, torch.float32):
        model = demo_model(device=args.device, dtype=dtype)
        result = cached_vs_uncached(model, prompts, args.new_tokens)
        diverged = [d for d in result.diverged_at if d is not None]
        print(f"{str(dtype):>15} on {record['device']}: largest |cached - uncached| logit "
              f"{result.max_logit_gap:.2e} (logits spread over {result.logit_spread:.1f}); "
              f"{len(diverged)} of {args.prompts} prompts gave different tokens"
              + (f", first at steps {diverged}" if diverged else ""))
        record[str(dtype).split(".")[1]] = {
            "max_logit_gap": result.max_logit_gap, "logit_spread": result.logit_spread,
            "diverged_at": list(result.diverged_at)}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
