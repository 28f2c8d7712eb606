"""`python -m kvlib`: a short demo that measures, then prints, what the book is about.

Every number it prints is computed or timed on this machine as the demo runs (well under a
minute on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import time

import torch

from kvlib import analysis
from kvlib.bench import device_name
from kvlib.cache.paged import PagedKVCache
from kvlib.config import CacheConfig, Layout
from kvlib.experiments import DEMO_CONFIG, decode_timings, demo_model, time_decode_attention
from kvlib.experiments.paged import time_decode_paths


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kvlib", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    device = args.device

    cfg = DEMO_CONFIG
    print(f"kvlib demo on {device_name(device)}")
    print(f"model: {cfg.name}, random weights, {analysis.param_count(cfg):,} parameters "
          f"({cfg.num_layers} layers, {cfg.num_heads} query heads, {cfg.num_kv_heads} KV heads)")

    print(f"\n1. Generation with and without a KV cache ({args.new_tokens} new tokens, greedy)")
    model = demo_model(device=device)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16),
                           generator=torch.Generator().manual_seed(0)).to(device)
    n = args.new_tokens
    plain, t_plain = _timed(lambda: model.generate(prompt, n))
    cache = model.new_cache(1, prompt.shape[1] + n)
    cached, t_cached = _timed(lambda: model.generate(prompt, n, cache=cache))
    same = bool((plain.tokens == cached.tokens).all())
    diff = (plain.logits - cached.logits).abs().max().item()
    print(f"   identical tokens: {same}; largest logit difference: {diff:.1e}")
    print(f"   without cache {t_plain:.2f} s, with cache {t_cached:.2f} s "
          f"({t_plain / t_cached:.1f}x faster)")

    print("\n2. One decode step by context length S (median times)")
    lengths = [128, 512, 2048]
    timings = decode_timings(model, lengths, repeats=3, show_progress=False)
    print(f"   {'S':>6} {'cached':>10} {'uncached':>11} {'speedup':>8} {'FLOP ratio':>11}"
          f" {'claimed (S)':>12}")
    for s in lengths:
        print(f"   {s:>6} {timings.cached[s].median_ms:>8.2f}ms "
              f"{timings.uncached[s].median_ms:>9.2f}ms {timings.speedup_by_len[s]:>7.1f}x "
              f"{analysis.flop_speedup(cfg, s):>10.0f}x {s:>11}x")

    print("\n3. KV cache of real models (bf16, one sequence)")
    print(f"   {'model':<14} {'per token':>10} {'at 8,192 tokens':>16}")
    for name, preset in analysis.PRESETS.items():
        per_token = analysis.kv_bytes_per_token(preset, "bf16")
        total = analysis.kv_cache_bytes(preset, 8192, 1, "bf16")
        print(f"   {name:<14} {per_token / 1024:>7.0f} KiB {total / 2**30:>12.2f} GiB")

    print("\n4. Decode attention over each flat layout's views, 1,024 tokens, batch 4")
    print("   (torch.matmul copies seq_major's K and V first; chapter 2 shows where)")
    times = {lay: time_decode_attention(lay, context_len=1024, device=device) for lay in Layout}
    for lay, t in times.items():
        print(f"   {lay.value:<11} {t.median_ms:8.2f} ms")
    ratio = times[Layout.SEQ_MAJOR].median_s / times[Layout.HEAD_MAJOR].median_s
    print(f"   seq_major / head_major: {ratio:.1f}x")

    print("\n5. Paging: 4 samples of one 40-token prompt, blocks of 16 tokens")
    paged = PagedKVCache(CacheConfig.for_model(cfg, max_batch_size=1, max_seq_len=256,
                                               dtype=model.embed.weight.dtype, device=device),
                         num_blocks=64)
    model.prefill((torch.arange(40) % cfg.vocab_size)[None].to(device), paged, [0])
    for child in (1, 2, 3):
        paged.fork(0, child)
    model.decode_step(torch.tensor([1, 2, 3, 4], device=device), paged, [0, 1, 2, 3])
    print(f"   blocks in use: {paged.num_used_blocks}; 4 separate sequences of 41 "
          f"tokens would take {4 * -(-41 // 16)} (the 2 full prompt blocks are shared, each "
          f"sample copied only the partly filled third)")
    print("   decode attention, batch 4 x 1,024 tokens (median of 5, round-robin):")
    paths = time_decode_paths(4, 1024, repeats=5)
    for name in ("paged", "gather", "flat", "sdpa"):
        print(f"   {name:<7} {getattr(paths, name).median_ms:8.2f} ms")
    print("   " + ", ".join(f"{k} {v:.2f}" for k, v in paths.ratios().items()))


if __name__ == "__main__":
    main()
