"""Chapter 10's measurements: swap against recompute, the cost of a transfer, tensor-parallel
ranks checked against one process.

The multi-process functions here are `run_ranks` workers (module-level, so spawned processes
import them): `tp_check` builds a rank's shard of a model and compares it with the whole
model in the same process; `chapter_ranks` runs the chapter's two-process demos in one group
(a disaggregated run, then tensor parallelism), so the chapter starts processes once.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvlib import analysis
from kvlib.bench import measure
from kvlib.cache.offload import OffloadingKVCache
from kvlib.cache.paged import PagedKVCache
from kvlib.distributed import disaggregation as dg
from kvlib.distributed.tensor_parallel import ShardPlan, shard_model
from kvlib.engine import BatchedInferenceEngine, EngineMetrics
from kvlib.experiments import cluster as cl
from kvlib.model import TransformerLM
from kvlib.routing import RoundRobin
from kvlib.scheduler import Request


# -- tensor parallelism ----------------------------------------------------------------------
@torch.no_grad()
def tp_check(rank: int, world_size: int, model: TransformerLM, requests: Sequence[Request],
             num_blocks: int = 64, block_size: int = 4) -> dict[str, Any]:
    """On one rank: the shard's logits against the whole model's (same prompts, no cache),
    and the shard served by the engine over a paged cache of its KV heads only, against
    generating each request alone with the whole model."""
    local = shard_model(model, rank, world_size)
    cfg = model.config
    plan = ShardPlan.make(cfg.num_heads, cfg.num_kv_heads, cfg.ffn_dim, rank, world_size)
    prompt = torch.tensor([list(requests[0].prompt_ids)])  # (1, P)
    full_logits = model(prompt)  # (1, P, V)
    shard_logits = local(prompt)  # (1, P, V): every rank ends with the whole logits
    engine = BatchedInferenceEngine(local, num_blocks, block_size)
    outputs = engine.generate([r.prompt_ids for r in requests],
                              [r.sampling for r in requests],
                              [r.max_new_tokens for r in requests], show_progress=False)
    alone = [model.generate(torch.tensor([r.prompt_ids]), r.max_new_tokens,
                            sampling=r.sampling).tokens[0].tolist() for r in requests]
    return {
        "rank": rank, "heads": list(plan.heads), "kv_heads": list(plan.kv_heads),
        "replication": plan.replication,
        "max_logit_diff": float((full_logits - shard_logits).abs().max()),
        "outputs_equal": [o.token_ids == a for o, a in zip(outputs.outputs, alone)],
        "cache_bytes_per_token": engine.cache.config.bytes_per_token,
        "whole_cache_bytes_per_token": model.cache_config(1, 8).bytes_per_token,
    }


def chapter_ranks(rank: int, world_size: int, model: TransformerLM,
                  requests: Sequence[Request], prefill: dg.EngineSpec, decode: dg.EngineSpec,
                  tp_models: Sequence[TransformerLM],
                  tp_requests: Sequence[Request]) -> dict[str, Any]:
    """The chapter's two-process run: disaggregated serving, then tensor parallelism over
    each of `tp_models`."""
    served = dg.serve(rank, world_size, model, requests, prefill, decode)
    return {"served": served, "tp": [tp_check(rank, world_size, m, tp_requests)
                                     for m in tp_models]}


# -- swap against recompute -------------------------------------------------------------------
@dataclass(frozen=True)
class SwapVsRecompute:
    """Per preempted sequence of `tokens` tokens: the round trip of its blocks to the host
    tier and back, against prefilling it again; bytes each way."""

    tokens: int
    swap_s: float
    recompute_s: float
    bytes_each_way: int


def _round_trip(cache: OffloadingKVCache, num_tokens: int, moved: list[int]) -> None:
    moved.append(cache.swap_out(0))
    assert cache.swap_in(0, num_tokens), "the device pool was sized for the sequence"


def _recompute(model: TransformerLM, tokens: torch.Tensor, cache: PagedKVCache) -> None:
    model.prefill(tokens, cache)
    cache.release([0])


@torch.no_grad()
def time_swap_vs_recompute(model: TransformerLM, lengths: Sequence[int], *,
                           block_size: int = 16, repeats: int = 5,
                           seed: int = 0) -> list[SwapVsRecompute]:
    """Median times, per length, of swapping a sequence out and in (OffloadingKVCache) and
    of recomputing it (one prefill of all its tokens into a paged cache, then release)."""
    out = []
    gen = torch.Generator().manual_seed(seed)
    for n in lengths:
        tokens = torch.randint(0, model.config.vocab_size, (1, n), generator=gen)  # (1, n)
        blocks = -(-n // block_size) + 1
        config = model.cache_config(1, model.config.max_seq_len, block_size=block_size)
        tiered = OffloadingKVCache(config, num_blocks=blocks, num_host_blocks=blocks)
        model.prefill(tokens, tiered)
        moved: list[int] = []
        swap = measure(functools.partial(_round_trip, tiered, n, moved), warmup=1,
                       repeats=repeats)
        paged = PagedKVCache(config, num_blocks=blocks)
        again = measure(functools.partial(_recompute, model, tokens, paged), warmup=1,
                        repeats=repeats)
        out.append(SwapVsRecompute(n, swap.median_s, again.median_s, moved[0]))
    return out


def measured_rates(rows: Sequence[SwapVsRecompute], model: TransformerLM) -> dict[str, float]:
    """What this machine did: bytes/s of a swap (both ways) and FLOP/s of a recompute, from
    the longest length measured (the least dominated by fixed costs)."""
    last = max(rows, key=lambda r: r.tokens)
    flops = analysis.prefill_cost(model.config, last.tokens).total_flops
    return {"copy_bytes_per_s": 2 * last.bytes_each_way / last.swap_s,
            "prefill_flops_per_s": flops / last.recompute_s}


def time_transfer_ranks(rank: int, world_size: int, sizes: Sequence[int],
                        repeats: int = 3) -> list[dict[str, float]]:
    """`run_ranks` worker: rank 0 sends rank 1 `sizes` bytes (one tensor each), rank 1
    answers with one number; the median seconds of each round trip, on both ranks."""
    import torch.distributed as dist

    out = []
    for nbytes in sizes:
        data = torch.zeros(nbytes, dtype=torch.uint8)  # (nbytes,)
        ack = torch.zeros(1)
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                dist.send(data, 1)
                dist.recv(ack, 1)
            else:
                dist.recv(data, 0)
                dist.send(ack, 0)
            times.append(time.perf_counter() - start)
        out.append({"bytes": nbytes, "seconds": statistics.median(times[1:])})
    return out


# -- the cost model on this machine --------------------------------------------------------------
@torch.no_grad()
def cpu_rates(model: TransformerLM, repeats: int = 5) -> dict[str, float]:
    """This machine's two rates the cost model needs, measured apart from any cache: bytes
    per second of a large copy (what a swap does), FLOP/s of the model's own MLP matmul on
    512 tokens (what a prefill mostly does)."""
    src = torch.zeros(8 * 2**20)  # (8M,) float32: 32 MiB
    dst = torch.empty_like(src)
    copy = measure(functools.partial(dst.copy_, src), warmup=1, repeats=repeats)
    cfg = model.config
    x = torch.randn(512, cfg.d_model)  # (T, d)
    w = model.layers[0].mlp.up_proj.weight  # (F, d)
    mm = measure(functools.partial(torch.matmul, x, w.T), warmup=1, repeats=repeats)
    return {"copy_bytes_per_s": src.nbytes / copy.median_s,
            "matmul_flops_per_s": 2 * 512 * cfg.d_model * cfg.ffn_dim / mm.median_s}


def predicted_swap_vs_recompute(model: TransformerLM, tokens: int,
                                rates: dict[str, float]) -> tuple[float, float]:
    """(swap seconds, recompute seconds) the cost model predicts: the sequence's cache
    bytes copied out and back, against its prefill's FLOPs."""
    nbytes = tokens * model.cache_config(1, 8).bytes_per_token
    flops = analysis.prefill_cost(model.config, tokens).total_flops
    return 2 * nbytes / rates["copy_bytes_per_s"], flops / rates["matmul_flops_per_s"]


# -- preemption and the second-level cache, run ----------------------------------------------------
@dataclass(frozen=True)
class PreemptionRun:
    outputs: list[list[int]]
    num_preemptions: int
    num_swaps: int
    prefill_tokens: int  # tokens the steps prefilled: prompts, plus every recomputation
    wall_s: float


@torch.no_grad()
def run_preemption(model: TransformerLM, requests: Sequence[Request], policy: Any, *,
                   num_blocks: int, num_host_blocks: int, block_size: int = 16,
                   max_num_batched_tokens: int = 256) -> PreemptionRun:
    """The requests through an engine whose pool preempts, the preempted ones swapped or
    recomputed as `policy` says (a host tier is there either way)."""
    cache = OffloadingKVCache(model.cache_config(1, model.config.max_seq_len,
                                                 block_size=block_size),
                              num_blocks, num_host_blocks)
    engine = BatchedInferenceEngine(model, cache=cache, preemption=policy,
                                    max_num_batched_tokens=max_num_batched_tokens)
    result = engine.generate([r.prompt_ids for r in requests], [r.sampling for r in requests],
                             [r.max_new_tokens for r in requests], show_progress=False)
    m = result.metrics
    return PreemptionRun([o.token_ids for o in result.outputs], m.num_preemptions, m.num_swaps,
                         sum(s.num_prefill_tokens for s in m.steps), m.wall_s)


@torch.no_grad()
def prefix_hits(model: TransformerLM, prompts: Sequence[Sequence[int]], *, num_blocks: int,
                num_host_blocks: int | None, block_size: int = 16,
                max_new_tokens: int = 4) -> tuple[int, list[list[int]]]:
    """Prompt tokens found cached, and the outputs, when `prompts` come one at a time to an
    engine with a small device pool: a plain paged cache (`num_host_blocks=None`) or one
    with a host tier under it."""
    config = model.cache_config(1, model.config.max_seq_len, block_size=block_size)
    cache = (PagedKVCache(config, num_blocks) if num_host_blocks is None
             else OffloadingKVCache(config, num_blocks, num_host_blocks))
    engine = BatchedInferenceEngine(model, cache=cache)
    outputs = [engine.generate([p], max_new_tokens=max_new_tokens,
                               show_progress=False).outputs[0].token_ids for p in prompts]
    return engine.metrics.num_prefix_hit_tokens, outputs


# -- what the transfers of a disaggregated run cost -------------------------------------------------
def time_per_transfer(transfers: Sequence[dg.Transfer]) -> dict[str, float]:
    """Summary of a disaggregated run's transfers: bytes and seconds per request, and the
    rate the link (here: gloo between two processes) reached."""
    moved = [t for t in transfers if t.accepted]
    data = sum(t.data_bytes for t in moved)
    seconds = sum(t.seconds for t in moved)
    return {"requests": len(moved), "bytes_per_request": data / max(1, len(moved)),
            "seconds_per_request": seconds / max(1, len(moved)),
            "bytes_per_s": data / seconds if seconds else 0.0}


# -- step costs measured here, for the simulator -------------------------------------------------
@torch.no_grad()
def time_engine_steps(model: TransformerLM, prompts: Sequence[Sequence[int]],
                      max_new_tokens: Sequence[int], *, num_blocks: int, block_size: int = 16,
                      max_num_batched_tokens: int = 128) -> EngineMetrics:
    """One engine run, all requests at once, after an untimed warm-up; its steps carry their
    measured durations (what `cluster.fit_step_costs` fits)."""
    def engine() -> BatchedInferenceEngine:
        return BatchedInferenceEngine(model, num_blocks, block_size, max_num_batched_tokens)

    engine().generate([list(p) for p in prompts[:2]], max_new_tokens=2, show_progress=False)
    return engine().generate([list(p) for p in prompts], max_new_tokens=list(max_new_tokens),
                             show_progress=False).metrics


def simulated_makespan(costs: cl.StepCosts, prompts: Sequence[Sequence[int]],
                       max_new_tokens: Sequence[int], *, num_blocks: int, block_size: int = 16,
                       max_num_batched_tokens: int = 128) -> float:
    """The same run simulated: seconds from the first step to the last, all requests at
    once, on one replica with the engine's settings."""
    trace = [cl.TimedRequest(0.0, Request(p, max_new_tokens=m))
             for p, m in zip(prompts, max_new_tokens)]
    replica = cl.SimReplica(costs, num_blocks, block_size, max_num_batched_tokens)
    return cl.serve_colocated(trace, [replica], RoundRobin(1)).makespan_s
