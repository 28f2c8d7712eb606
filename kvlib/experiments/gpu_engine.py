"""Measurements for the engine on a GPU: throughput against transformers, the decode step
against its floor, and the host synchronisations a step makes.

The floor of a decode step: every weight is read once, and every sequence's keys and values
once, so no step can be faster than (weight bytes + KV bytes) / the copy bandwidth measured on
the same device in the same run. `step_over_floor` is the measured step time over that floor.

Host synchronisations: on CUDA, `torch.cuda.set_sync_debug_mode("warn")` makes every
operation that waits for the device (a read into Python, a copy to the host, `nonzero`) warn;
the warnings during a decode step are counted. Elsewhere the count is None (the CPU test of the
same reads is tests/test_engine_syncs.py).

Legend: B sequences in a decode step, S tokens each holds, P parameters.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from kvlib import analysis
from kvlib.bench import measure
from kvlib.config import ModelConfig
from kvlib.engine import BatchedInferenceEngine
from kvlib.model import TransformerLM

# Llama-3.2-1B's shape (its config.json): 16 layers of 2,048, 32 query and 8 KV heads of 64,
# a SwiGLU MLP of 8,192, a tied vocabulary of 128,256, RoPE theta 500,000.
LLAMA_3_2_1B = ModelConfig(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32,
                           num_kv_heads=8, head_dim=64, ffn_dim=8192, rope_theta=500000.0,
                           norm_eps=1e-5, max_seq_len=4096, tie_embeddings=True,
                           name="llama-3.2-1b-shape")
TINY = ModelConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   ffn_dim=128, max_seq_len=512, tie_embeddings=True, name="tiny")


def random_model(config: ModelConfig, device: str, dtype: torch.dtype, seed: int = 0,
                 ) -> TransformerLM:
    """Random weights (std 0.02) in `dtype` on `device`; the default attention backend."""
    torch.manual_seed(seed)
    return TransformerLM(config).to(device=device, dtype=dtype).eval().requires_grad_(False)


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Bytes per second a device-to-device copy moves (read + write), median of 5."""
    n = nbytes // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = measure(lambda: b.copy_(a), warmup=2, repeats=5)
    return 2 * a.nbytes / t.median_s


def weight_bytes(model: TransformerLM) -> int:
    """Bytes of weights a decode step reads (a tied embedding counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.nbytes
    return total


@dataclass(frozen=True)
class DecodeStep:
    """One batch size's decode step: measured against its floor."""

    batch_size: int
    context_len: int
    step_s: float  # median time of one engine step (all decodes)
    floor_s: float  # (weight bytes + KV bytes) / copy bandwidth
    syncs_per_step: float | None  # CUDA: host synchronisations warned per step
    cuda_graphs: bool  # decode steps replayed from graphs (kvlib.cuda_graphs)
    token_ids: tuple[tuple[int, ...], ...]  # every sequence's greedy output, run to the end

    @property
    def over_floor(self) -> float:
        return self.step_s / self.floor_s


def _count_syncs(fn) -> int | None:
    """How many times `fn` made the host wait for the device (CUDA only, else None)."""
    if not torch.cuda.is_available():
        fn()
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def decode_step(model: TransformerLM, batch_size: int, context_len: int, *,
                bandwidth: float, steps: int = 8, block_size: int = 16,
                cuda_graphs: bool = False) -> DecodeStep:
    """Time engine steps in which `batch_size` sequences of `context_len` tokens each decode
    one token; count their host synchronisations. `cuda_graphs` as the engine takes it; a
    graph is captured by the untimed first decode step (every timed step has `batch_size`
    sequences: one bucket)."""
    device = model.embed.weight.device
    per_seq = -(-(context_len + steps + 6) // block_size)
    engine = BatchedInferenceEngine(model, num_blocks=batch_size * per_seq,
                                    block_size=block_size, max_num_seqs=batch_size,
                                    max_num_batched_tokens=max(batch_size,
                                                               min(8192, batch_size * context_len)),
                                    cuda_graphs=cuda_graphs)
    gen = torch.Generator().manual_seed(batch_size)
    ids = []
    for _ in range(batch_size):
        prompt = torch.randint(0, model.config.vocab_size, (context_len,), generator=gen)
        ids.append(engine.add_request(prompt.tolist(), max_new_tokens=steps + 6))
    while engine.metrics.steps == [] or engine.metrics.steps[-1].num_prefill_tokens:
        engine.step()  # prefill every prompt (in as many steps as the budget takes)
    engine.step()  # one decode step untimed: first-call costs
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    syncs = [_count_syncs(engine.step) for _ in range(2)]  # apart: the debug mode costs time
    assert engine.metrics.steps[-1].num_decode_tokens == batch_size, "not a decode step"
    kv = batch_size * (context_len + steps) * engine.cache.config.bytes_per_token
    floor = (weight_bytes(model) + kv) / bandwidth
    counted = [s for s in syncs if s is not None]
    engine.run(show_progress=False)
    return DecodeStep(batch_size, context_len, statistics.median(times), floor,
                      statistics.mean(counted) if counted else None, engine.graphs is not None,
                      tuple(tuple(engine.output(i).token_ids) for i in ids))


def floor_s(config: ModelConfig, batch_size: int, context_len: int, bandwidth: float,
            dtype: str = "bf16") -> float:
    """The floor of a decode step of `config` from its shape alone (no model built): every
    weight and every sequence's keys and values read once, at `bandwidth` bytes per second."""
    kv = analysis.kv_cache_bytes(config, context_len, batch_size, dtype)
    return (analysis.weight_bytes(config, dtype) + kv) / bandwidth


@dataclass(frozen=True)
class HostCost:
    """Engine decode steps of models too small to compute anything: the time is the host's,
    fitted as `per_step_s + per_layer_s * L` over models of L layers."""

    layers: tuple[int, ...]
    step_s: tuple[float, ...]  # median decode step time for each L
    per_step_s: float
    per_layer_s: float


def time_host_steps(layers: tuple[int, ...] = (1, 4, 16), batch_size: int = 16,
              context_len: int = 32) -> HostCost:
    """Time decode steps of tiny models (width 32, 2 heads) of each depth on this device's
    host, and fit the time per step and per layer by least squares."""
    times = []
    for L in layers:
        config = ModelConfig(vocab_size=64, d_model=32, num_layers=L, num_heads=2,
                             num_kv_heads=2, ffn_dim=64, max_seq_len=128, name=f"tiny-{L}")
        model = random_model(config, "cpu", torch.float32)
        times.append(decode_step(model, batch_size, context_len, bandwidth=1.0).step_s)
    return HostCost(tuple(layers), tuple(times), *fit_line(layers, times))


def fit_line(xs, ys) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs.

    >>> fit_line([1, 2, 4], [3.0, 5.0, 9.0])
    (1.0, 2.0)
    """
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"fit_line needs as many ys as xs and two distinct xs; got {xs}, {ys}")
    x = torch.tensor(xs, dtype=torch.float64)  # (n,)
    y = torch.tensor(ys, dtype=torch.float64)  # (n,)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return round(float(y.mean()) - slope * float(x.mean()), 12), round(slope, 12)
