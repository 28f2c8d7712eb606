"""Continuous batching against static batching and Hugging Face transformers, padded and continuous.

    python bench/engine.py [--requests 64] [--repeats 3] [--quick]

One set of requests of mixed lengths (log-uniform prompt and output lengths, so most are
short and a few long), greedy, through three schedules of one random Llama-style model
(~10M parameters, fp32, CPU), all given the same KV memory (what a static batch of
`--batch` requests must reserve for its worst case):
    continuous   kvlib's BatchedInferenceEngine: paged cache, token budget, chunked prefill
    static       kvlib.static_batching: batches of `--batch`, each run to its longest output
    transformers LlamaForCausalLM.generate with the same weights, batches of `--batch`,
                 left-padded, each run to its longest output
    transformers_cb  transformers' own continuous batching (ContinuousBatchingManager: paged
                 cache with as many blocks as kvlib's, the same token budget, per-request
                 lengths, SDPA attention)
kvlib's model runs its default attention backend (the fastest exact one for the device).
Throughput counts only the tokens each request asked for (padding is not output). The greedy
outputs of all three are compared token for token. Prints a table and, as its last line, a
JSON object with `continuous_tok_s`, `static_tok_s`, `transformers_tok_s`,
`transformers_cb_tok_s` and the ratios.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvlib.bench import device_name, measure
from kvlib.engine import BatchedInferenceEngine
from kvlib.experiments.batching import (
    bench_config,
    bench_model,
    hf_continuous,
    hf_generate,
    request_set,
    to_huggingface,
)
from kvlib.static_batching import static_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="static batch size")
    parser.add_argument("--prompt-lens", type=int, nargs=2, default=[8, 256])
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[8, 128])
    parser.add_argument("--token-budget", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    args = parser.parse_args()
    overrides = {}
    if args.quick:
        args.requests, args.batch, args.repeats = 8, 4, 1
        args.prompt_lens, args.new_tokens = [2, 12], [2, 12]
        overrides = dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                         vocab_size=512)
    cfg = bench_config(**overrides)
    model = bench_model(cfg)  # its default attention: the fastest exact backend here
    hf = to_huggingface(model)
    reqs = request_set(args.requests, cfg.vocab_size, tuple(args.prompt_lens),
                       tuple(args.new_tokens), seed=1)
    BS = 16
    longest = max(map(len, reqs.prompts)) + max(reqs.max_new_tokens)
    num_blocks = args.batch * -(-longest // BS)  # the static batch's worst-case reservation
    runs: dict[str, object] = {}

    def continuous():
        engine = BatchedInferenceEngine(model, num_blocks, BS, args.token_budget)
        runs["continuous"] = engine.generate(reqs.prompts, max_new_tokens=reqs.max_new_tokens,
                                             show_progress=False)

    def static():
        runs["static"] = static_generate(model, reqs.prompts, max_new_tokens=reqs.max_new_tokens,
                                         batch_size=args.batch, block_size=BS,
                                         show_progress=False)

    def transformers():
        runs["transformers"] = hf_generate(hf, reqs, args.batch)

    def transformers_cb():
        runs["transformers_cb"] = hf_continuous(hf, reqs, num_blocks=num_blocks, block_size=BS,
                                                max_batch_tokens=args.token_budget)

    times = {name: measure(fn, warmup=1, repeats=args.repeats)
             for name, fn in (("continuous", continuous), ("static", static),
                              ("transformers", transformers),
                              ("transformers_cb", transformers_cb))}
    ours = [o.token_ids for o in runs["continuous"].outputs]
    agree_static = sum(a == o.token_ids for a, o in zip(ours, runs["static"].outputs))
    agree_hf = sum(a == b for a, b in zip(ours, runs["transformers"]))
    agree_cb = sum(a == b for a, b in zip(ours, runs["transformers_cb"]))
    tok_s = {name: reqs.num_new_tokens / t.median_s for name, t in times.items()}
    m = runs["continuous"].metrics
    print(f"{args.requests} requests, prompts {args.prompt_lens}, outputs {args.new_tokens} "
          f"({reqs.num_new_tokens} new tokens), {sum(p.numel() for p in model.parameters()):,} "
          f"params fp32, {device_name('cpu')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    for name, t in times.items():
        print(f"{name:>13} {t}  {tok_s[name]:8.1f} tok/s")
    print(f"continuous: {len(m.steps)} steps, {m.mean_seqs_per_step:.1f} seqs/step, "
          f"{m.num_preemptions} preemptions; greedy outputs equal to static "
          f"{agree_static}/{args.requests}, to transformers {agree_hf}/{args.requests}, to "
          f"transformers' continuous batching {agree_cb}/{args.requests}")
    print(json.dumps({
        "continuous_tok_s": round(tok_s["continuous"], 1),
        "static_tok_s": round(tok_s["static"], 1),
        "transformers_tok_s": round(tok_s["transformers"], 1),
        "transformers_cb_tok_s": round(tok_s["transformers_cb"], 1),
        "continuous_over_static": round(tok_s["continuous"] / tok_s["static"], 2),
        "continuous_over_transformers": round(tok_s["continuous"] / tok_s["transformers"], 2),
        "continuous_over_transformers_cb": round(tok_s["continuous"] / tok_s["transformers_cb"],
                                                 2),
        "greedy_equal_static": agree_static, "greedy_equal_transformers": agree_hf,
        "greedy_equal_transformers_cb": agree_cb, "attention": model.attention,
        "requests": args.requests, "new_tokens": reqs.num_new_tokens,
        "static_batch": args.batch, "num_blocks": num_blocks, "token_budget": args.token_budget,
        "continuous_steps": len(m.steps), "preemptions": m.num_preemptions,
        "threads": torch.get_num_threads(), "device": device_name("cpu"),
    }))


if __name__ == "__main__":
    main()
