"""The engine end to end on a GPU: kvlib against transformers, and each decode step against its floor.

    python bench/gpu_engine.py [--requests 256] [--out FILE]       # on a GPU
    python bench/gpu_engine.py --quick                             # a tiny model, on the CPU

A model of Llama-3.2-1B's shape with random bf16 weights (`--quick`: a tiny fp32 model), one
set of requests of mixed prompt and output lengths (log-uniform), greedy, through:
    engine           kvlib's BatchedInferenceEngine, its default (fastest exact) backend
    static           kvlib.static_batching, batches of `--batch`, each run to its longest
    transformers     LlamaForCausalLM.generate, the same weights, batches of `--batch`,
                     left-padded, each run to its longest output
    transformers_cb  transformers' continuous batching (ContinuousBatchingManager, paged cache
                     with as many blocks as the engine's, per-request lengths)
each after an untimed warm-up, all on one device in one run. Throughput counts the tokens each
request asked for. Greedy outputs are compared with the engine's (in bf16 a different batch
rounds differently, so runs part at near-ties: the count says how many agree whole).
Then the decode step at batch 1, 16, 64 and 256 (`--batch-sizes`) over `--context` tokens,
against its floor (weights and KV read once at the copy bandwidth measured here), and the
host synchronisations each decode step makes (torch.cuda.set_sync_debug_mode), with decode
steps replayed from CUDA graphs on a GPU (as in the throughput run), and the same step eager
and with graphs side by side, their greedy outputs compared (off a GPU the "graphs" are the
stand-in that re-runs the step on the same buffers, kvlib.cuda_graphs: timed, not a graph).
Prints a table and, as its last line, a JSON object with `engine_tok_s`, `transformers_tok_s`,
`transformers_cb_tok_s`, `static_tok_s`, `step_over_floor` (by batch size) and
`syncs_per_decode_step`, and `eager_step_ms`, `graph_step_ms`, `graphs_speedup` and
`graphs_outputs_equal` (by batch size); `--out` writes it to a file too.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvlib.bench import device_name
from kvlib.engine import BatchedInferenceEngine
from kvlib.experiments.batching import hf_continuous, hf_generate, request_set, to_huggingface
from kvlib.experiments.gpu_engine import (
    LLAMA_3_2_1B,
    TINY,
    copy_bandwidth,
    decode_step,
    random_model,
)
from kvlib.static_batching import static_generate


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="static and padded batch size")
    parser.add_argument("--prompt-lens", type=int, nargs=2, default=[16, 1024])
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[16, 256])
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="a tiny model on the CPU (tests)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"  # kvlib's engine replays its decode steps from CUDA graphs
    config, dtype = (LLAMA_3_2_1B, torch.bfloat16) if device == "cuda" else (TINY, torch.float32)
    if args.quick:
        config, dtype = TINY, torch.float32
        args.requests, args.batch, args.token_budget = 12, 4, 256
        args.prompt_lens, args.new_tokens = [4, 24], [2, 12]
        args.batch_sizes, args.context = [1, 4], 32
    model = random_model(config, device, dtype)
    hf = to_huggingface(model).to(device)
    reqs = request_set(args.requests, config.vocab_size, tuple(args.prompt_lens),
                       tuple(args.new_tokens), seed=1)
    BS = 16
    longest = max(map(len, reqs.prompts)) + max(reqs.max_new_tokens)
    num_blocks = args.requests * -(-longest // BS)  # room for every request at once
    warm = type(reqs)(reqs.prompts[:2], [2, 2])

    def new_engine():
        e = BatchedInferenceEngine(model, num_blocks, BS, args.token_budget,
                                   max_num_seqs=args.requests, cuda_graphs=on_gpu)
        if e.graphs is not None:
            e.graphs.capture_all()  # start-up, as a server does before taking requests
        return e

    ready = {}

    def engine(r):
        e = ready.pop("engine", None) or new_engine()
        return [o.token_ids for o in e.generate(r.prompts, max_new_tokens=r.max_new_tokens,
                                                show_progress=False).outputs]

    def static(r):
        result = static_generate(model, r.prompts, max_new_tokens=r.max_new_tokens,
                                 batch_size=args.batch, block_size=BS, show_progress=False)
        return [o.token_ids for o in result.outputs]

    runs = {"engine": engine, "static": static,
            "transformers": lambda r: hf_generate(hf, r, args.batch),
            "transformers_cb": lambda r: hf_continuous(hf, r, num_blocks=num_blocks,
                                                       block_size=BS,
                                                       max_batch_tokens=args.token_budget)}
    outputs, tok_s = {}, {}
    for name, fn in runs.items():
        fn(warm)  # untimed: compilation, autotuning, first allocations
        if name == "engine":
            ready["engine"] = new_engine()  # its graphs captured untimed
        outputs[name], seconds = timed(lambda fn=fn: fn(reqs))
        tok_s[name] = reqs.num_new_tokens / seconds
        print(f"{name:>16}: {seconds:8.2f} s, {tok_s[name]:9.1f} tok/s")
    agree = {name: sum(a == b for a, b in zip(outputs["engine"], out))
             for name, out in outputs.items() if name != "engine"}
    print(f"greedy outputs equal to the engine's: {agree} of {args.requests}")
    bandwidth = copy_bandwidth(device, nbytes=(1 << 30) if device == "cuda" else (1 << 24))
    eager = [decode_step(model, B, args.context, bandwidth=bandwidth, cuda_graphs=False)
             for B in args.batch_sizes]
    graphs = [decode_step(model, B, args.context, bandwidth=bandwidth, cuda_graphs=True)
              for B in args.batch_sizes]
    # The floor and the syncs: with graphs on a GPU (as the throughput run), eager elsewhere.
    steps = graphs if on_gpu else eager
    for s in steps:
        print(f"decode, batch {s.batch_size:>3} x {s.context_len} tokens: "
              f"{1000 * s.step_s:8.3f} ms, floor {1000 * s.floor_s:8.3f} ms "
              f"({s.over_floor:5.2f}x), host syncs per step: {s.syncs_per_step}")
    for e, g in zip(eager, graphs):
        print(f"decode, batch {e.batch_size:>3}: eager {1000 * e.step_s:8.3f} ms, graphs "
              f"{1000 * g.step_s:8.3f} ms ({e.step_s / g.step_s:5.2f}x), outputs equal: "
              f"{e.token_ids == g.token_ids}")
    syncs = [s.syncs_per_step for s in steps if s.syncs_per_step is not None]
    result = {
        "engine_tok_s": round(tok_s["engine"], 1),
        "static_tok_s": round(tok_s["static"], 1),
        "transformers_tok_s": round(tok_s["transformers"], 1),
        "transformers_cb_tok_s": round(tok_s["transformers_cb"], 1),
        "engine_over_transformers": round(tok_s["engine"] / tok_s["transformers"], 2),
        "engine_over_transformers_cb": round(tok_s["engine"] / tok_s["transformers_cb"], 2),
        "step_over_floor": {str(s.batch_size): round(s.over_floor, 2) for s in steps},
        "step_ms": {str(s.batch_size): float(f"{1000 * s.step_s:.4g}") for s in steps},
        "floor_ms": {str(s.batch_size): float(f"{1000 * s.floor_s:.4g}") for s in steps},
        "syncs_per_decode_step": max(syncs) if syncs else None,
        "decode_step_cuda_graphs": steps[0].cuda_graphs,
        "eager_step_ms": {str(s.batch_size): float(f"{1000 * s.step_s:.4g}") for s in eager},
        "graph_step_ms": {str(s.batch_size): float(f"{1000 * s.step_s:.4g}") for s in graphs},
        "graphs_speedup": {str(e.batch_size): round(e.step_s / g.step_s, 2)
                           for e, g in zip(eager, graphs)},
        "graphs_outputs_equal": {str(e.batch_size): e.token_ids == g.token_ids
                                 for e, g in zip(eager, graphs)},
        "graphs_real": on_gpu,
        "greedy_equal_to_engine": agree, "requests": args.requests,
        "new_tokens": reqs.num_new_tokens, "context": args.context,
        "copy_TBps": round(bandwidth / 1e12, 3), "model": config.name, "dtype": str(dtype),
        "attention": model.attention, "device": device_name(device),
        "versions": {"torch": torch.__version__},
    }
    line = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
