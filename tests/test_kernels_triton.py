"""Triton kernels against their references: on a GPU, and on the CPU under the interpreter.

Triton decides when a kernel module is imported whether it runs compiled (GPU) or
interpreted (`TRITON_INTERPRET=1`, any device). So that no other test inherits that setting,
the CPU checks run in a child process: in a normal CPU run the kernel tests here skip and
`test_kernels_under_the_interpreter` runs this file again with the variable set. With a GPU
the same tests run on CUDA tensors in this process too. The interpreter is slow: shapes here
are small (head dim 16-32, a few sequences of tens of tokens).

Every case scatters its blocks in the pool and points the table entries of blocks no query
sees at a block of NaNs (`kernel_cases`): a kernel that reads one returns NaN.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from kernel_cases import paged_case  # noqa: E402

from kvlib.cache.paged import PagedKVCache  # noqa: E402
from kvlib.config import CacheConfig, ModelConfig  # noqa: E402
from kvlib.experiments import demo_model  # noqa: E402
from kvlib.kernels.common import INTERPRETED, interpreter_runs_kernels  # noqa: E402
from kvlib.kernels.paged_decode import (  # noqa: E402
    DecodeLaunch,
    paged_decode_triton,
    split_plan,
)
from kvlib.kernels.paged_decode_int8 import (  # noqa: E402
    INT8_LAUNCH,
    VARIANTS,
    paged_decode_quantized,
    paged_decode_quantized_ref,
)
from kvlib.kernels.paged_prefill import PrefillLaunch, paged_prefill_triton  # noqa: E402
from kvlib.kernels.quant import quantize_kv  # noqa: E402
from kvlib.kernels.reference import paged_attention_ref, paged_decode_ref  # noqa: E402
from kvlib.kernels.store_kv import (  # noqa: E402
    store_kv,
    store_kv_quantized,
    store_kv_quantized_ref,
    store_kv_ref,
)

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cpu" if INTERPRETED else "cuda"
runs_kernels = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="needs a GPU; on the CPU, test_kernels_under_the_interpreter runs these")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
FP8 = torch.float8_e4m3fn


def decode_case(seed, dtype, lens, *, heads=8, kv_heads=2, dim=16, block_size=16, window=None,
                sink_tokens=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q, k_pool, v_pool, tables, lens_t, _ = paged_case(
        gen, lens, [1] * len(lens), heads=heads, kv_heads=kv_heads, dim=dim,
        block_size=block_size, dtype=dtype, window=window, sink_tokens=sink_tokens,
        device=device)
    return q, k_pool, v_pool, tables, lens_t


def nan_free(*pools):
    """The pools with the NaN block zeroed, for quantizing (the kernels never read it)."""
    return [torch.nan_to_num(p) for p in pools]


# ---------------------------------------------------------------------------------------------
# Decode, float
# ---------------------------------------------------------------------------------------------

@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("block_size", "window", "sink_tokens"),
                         [(16, None, 0), (32, 20, 4), (16, 1, 0)])
def test_paged_decode_equals_reference(block_size, window, sink_tokens, dtype):
    q, k_pool, v_pool, tables, lens = decode_case(1, dtype, [1, 17, 70], block_size=block_size,
                                                  window=window, sink_tokens=sink_tokens)
    ref = paged_decode_ref(q.float(), k_pool.float(), v_pool.float(), tables, lens, window,
                           sink_tokens)
    out = paged_decode_triton(q, k_pool, v_pool, tables, lens, window=window,
                              sink_tokens=sink_tokens, launch=DecodeLaunch(tile_n=16))
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@runs_kernels
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 1), (2, 2), (6, 2)])
def test_decode_mqa_mha_and_odd_groups_with_sinks_past_the_window(heads, kv_heads):
    q, k_pool, v_pool, tables, lens = decode_case(2, torch.float32, [40, 90], heads=heads,
                                                  kv_heads=kv_heads, window=9, sink_tokens=5)
    ref = paged_decode_ref(q, k_pool, v_pool, tables, lens, 9, 5)
    out = paged_decode_triton(q, k_pool, v_pool, tables, lens, window=9, sink_tokens=5,
                              launch=DecodeLaunch(tile_n=16, num_splits=2))
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@runs_kernels
@pytest.mark.parametrize("num_splits", [1, 3, 50])
def test_any_number_of_splits_merges_to_the_same_result(num_splits):
    q, k_pool, v_pool, tables, lens = decode_case(7, torch.float32, [5, 64, 33])
    ref = paged_decode_ref(q, k_pool, v_pool, tables, lens)
    out = paged_decode_triton(q, k_pool, v_pool, tables, lens,
                              launch=DecodeLaunch(tile_n=16, num_splits=num_splits))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@runs_kernels
@pytest.mark.parametrize(("tile_n", "num_warps", "num_stages"), [(32, 8, 2), (128, 4, 3)])
def test_launch_options_change_speed_not_results(tile_n, num_warps, num_stages):
    """What bench/gpu_decode.py sweeps (tile, warps, pipelining depth) leaves the output
    equal to the reference, for the float and the INT8 kernel."""
    q, k_pool, v_pool, tables, lens = decode_case(5, torch.bfloat16, [3, 50])
    launch = DecodeLaunch(tile_n=tile_n, num_warps=num_warps, num_stages=num_stages,
                          num_splits=3)
    ref = paged_decode_ref(q.float(), k_pool.float(), v_pool.float(), tables, lens)
    out = paged_decode_triton(q, k_pool, v_pool, tables, lens, launch=launch)
    torch.testing.assert_close(out.float(), ref, **TOL[torch.bfloat16])
    k_pool, v_pool = nan_free(k_pool, v_pool)
    (k8, k_scale), (v8, v_scale) = quantize_kv(k_pool), quantize_kv(v_pool)
    ref8 = paged_decode_quantized_ref(q, k8, v8, k_scale, v_scale, tables, lens)
    out8 = paged_decode_quantized(q, k8, v8, k_scale, v_scale, tables, lens, launch=launch)
    torch.testing.assert_close(out8.float(), ref8.float(), **TOL[torch.bfloat16])


# ---------------------------------------------------------------------------------------------
# Decode, INT8 and FP8
# ---------------------------------------------------------------------------------------------

QUANT_CASES = [(torch.int8, v) for v in VARIANTS] + [(FP8, v) for v in VARIANTS
                                                     if v != "i8dot"]
# Against the reference (which dequantizes in fp32), fp32 queries: dot16 and i8dot round p
# to fp16 (11 bits) and i8dot q to two int8 digits, within a few thousandths of outputs of
# about 1.
QUANT_TOL = {"dot": dict(atol=1e-4, rtol=1e-4), "fma": dict(atol=1e-4, rtol=1e-4),
             "dot16": dict(atol=3e-3, rtol=3e-3), "i8dot": dict(atol=3e-3, rtol=3e-3)}


@runs_kernels
@pytest.mark.parametrize(("codes", "variant"), QUANT_CASES, ids=lambda x: str(x).split(".")[-1])
def test_quantized_decode_equals_its_reference(codes, variant):
    q, k_pool, v_pool, tables, lens = decode_case(10, torch.float32, [2, 45, 77], dim=32,
                                                  window=24, sink_tokens=3)
    k_pool, v_pool = nan_free(k_pool, v_pool)
    (kq, k_scale), (vq, v_scale) = quantize_kv(k_pool, codes), quantize_kv(v_pool, codes)
    ref = paged_decode_quantized_ref(q, kq, vq, k_scale, v_scale, tables, lens, 24, 3)
    launch = INT8_LAUNCH.with_(variant=variant, tile_n=16, num_splits=2)
    out = paged_decode_quantized(q, kq, vq, k_scale, v_scale, tables, lens, window=24,
                                 sink_tokens=3, launch=launch)
    torch.testing.assert_close(out, ref, **QUANT_TOL[variant])
    # and the codes stay close to the unquantized answer (their error, not the kernel's)
    exact = paged_decode_ref(q, k_pool, v_pool, tables, lens, 24, 3)
    assert (out - exact).abs().max() < (0.05 if codes == torch.int8 else 0.2)


@runs_kernels
@pytest.mark.parametrize("variant", ["dot", "dot16"])
def test_quantized_decode_in_half_precision(variant):
    q, k_pool, v_pool, tables, lens = decode_case(11, torch.bfloat16, [30, 64])
    k_pool, v_pool = nan_free(k_pool, v_pool)
    (k8, k_scale), (v8, v_scale) = quantize_kv(k_pool), quantize_kv(v_pool)
    ref = paged_decode_quantized_ref(q, k8, v8, k_scale, v_scale, tables, lens)
    out = paged_decode_quantized(q, k8, v8, k_scale, v_scale, tables, lens,
                                 launch=INT8_LAUNCH.with_(variant=variant, tile_n=16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.bfloat16])


# ---------------------------------------------------------------------------------------------
# Prefill: packed chunks of a mixed step
# ---------------------------------------------------------------------------------------------

# (dtype, block size, H, Hkv, context_lens, query_lens, window, sinks, block_m): ragged mixes
# of decodes (1 query), chunks and whole prompts, GQA, MQA and MHA.
PREFILL_CASES = {
    "gqa-fp32-bs16": (torch.float32, 16, 8, 2, [20, 60, 5, 33], [1, 37, 5, 1], None, 0, 16),
    "mqa-bf16-bs32-window-sinks": (torch.bfloat16, 32, 4, 1, [70, 9, 40], [30, 1, 40], 24, 4,
                                   32),
    "mha-fp16-bs16-window": (torch.float16, 16, 2, 2, [50, 18], [1, 18], 7, 0, 16),
    "gqa-fp32-bs32-sinks-only-chunk": (torch.float32, 32, 4, 2, [64, 3], [21, 2], 10, 3, 64),
    "groups-of-3-fp32": (torch.float32, 16, 6, 2, [19, 40], [19, 1], None, 0, 16),
    # a window wide against the tiles: whole tiles inside it skip the mask
    "gqa-fp32-bs16-wide-window": (torch.float32, 16, 8, 2, [90, 7], [30, 1], 48, 2, 16),
}


@runs_kernels
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_paged_prefill_equals_reference(name):
    dtype, BS, H, Hkv, lens, qlens, window, sinks, block_m = PREFILL_CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    q, k_pool, v_pool, tables, lens_t, cu = paged_case(
        gen, lens, qlens, heads=H, kv_heads=Hkv, dim=16, block_size=BS, dtype=dtype,
        window=window, sink_tokens=sinks, device=DEVICE)
    ref = paged_attention_ref(q.float(), k_pool.float(), v_pool.float(), tables, lens_t, cu,
                              window, sinks)
    out = paged_prefill_triton(q, k_pool, v_pool, tables, lens_t, cu, window=window,
                               sink_tokens=sinks,
                               launch=PrefillLaunch(block_m=block_m, tile_n=16))
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@runs_kernels
def test_paged_prefill_over_int8_codes():
    gen = torch.Generator().manual_seed(3)
    q, k_pool, v_pool, tables, lens, cu = paged_case(
        gen, [33, 12], [17, 1], heads=4, kv_heads=2, dim=16, block_size=16,
        dtype=torch.float16, window=12, sink_tokens=2, device=DEVICE)
    k_pool, v_pool = nan_free(k_pool, v_pool)
    (k8, k_scale), (v8, v_scale) = quantize_kv(k_pool), quantize_kv(v_pool)
    ref = paged_attention_ref(q, k8, v8, tables, lens, cu, 12, 2, k_scale, v_scale)
    out = paged_prefill_triton(q, k8, v8, tables, lens, cu, window=12, sink_tokens=2,
                               k_scale=k_scale, v_scale=v_scale,
                               launch=PrefillLaunch(block_m=16, tile_n=16))
    torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.float16])


@runs_kernels
def test_wide_groups_raise_the_rows_per_program_and_empty_steps_return_empty():
    """32 query heads on one KV head need 32 rows a program (block_m 16 is raised); a step
    of no sequences (or no tokens) launches nothing."""
    gen = torch.Generator().manual_seed(5)
    q, k_pool, v_pool, tables, lens, cu = paged_case(
        gen, [20, 9], [5, 1], heads=32, kv_heads=1, dim=16, block_size=16,
        dtype=torch.float32, device=DEVICE)
    ref = paged_attention_ref(q, k_pool, v_pool, tables, lens, cu)
    out = paged_prefill_triton(q, k_pool, v_pool, tables, lens, cu,
                               launch=PrefillLaunch(block_m=16, tile_n=16))
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    none = paged_decode_triton(q[:0], k_pool, v_pool, tables[:0], lens[:0])
    assert none.shape == (0, 32, 16)
    cu0 = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    assert paged_prefill_triton(q[:0], k_pool, v_pool, tables[:0], lens[:0], cu0).shape[0] == 0


@runs_kernels
def test_prefill_of_decodes_equals_the_decode_kernel():
    q, k_pool, v_pool, tables, lens = decode_case(4, torch.float32, [3, 40, 21])
    cu = torch.arange(4, dtype=torch.int32, device=DEVICE)  # (B+1,): one query each
    decode = paged_decode_triton(q, k_pool, v_pool, tables, lens,
                                 launch=DecodeLaunch(tile_n=16))
    prefill = paged_prefill_triton(q, k_pool, v_pool, tables, lens, cu,
                                   launch=PrefillLaunch(block_m=16, tile_n=16))
    torch.testing.assert_close(prefill, decode, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Storing
# ---------------------------------------------------------------------------------------------

@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_equals_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    NB, Hkv, BS, D, N = 6, 2, 4, 16, 9
    pools = torch.randn(2, NB, Hkv, BS, D, generator=gen).to(DEVICE, dtype)
    k, v = torch.randn(2, N, Hkv, D, generator=gen).to(DEVICE, dtype)  # (N, Hkv, D) each
    slots = torch.randperm(NB * BS, generator=gen)[:N]  # (N,) distinct slots
    slots[3] = -1  # a padding token: not stored
    slots = slots.to(DEVICE)
    got, want = pools.clone(), pools.clone()
    store_kv(k, v, got[0], got[1], slots)
    store_kv_ref(k, v, want[0], want[1], slots)
    assert torch.equal(got, want)
    # a strided pool: layer 1 of a (L, 2, NB, Hkv, BS, D) tensor
    big = torch.zeros(2, 2, NB, Hkv, BS, D, device=DEVICE, dtype=dtype)
    store_kv(k, v, big[1, 0], big[1, 1], slots)
    kept = slots[slots >= 0]
    assert torch.equal(big[1, 0][kept // BS, :, kept % BS], k[slots >= 0])
    assert int(big[0].count_nonzero()) == 0  # the other layer is untouched


@runs_kernels
@pytest.mark.parametrize("codes", [torch.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_quantized_writes_the_references_bits(codes, dtype):
    """Codes and scales bit for bit as `kvlib.kernels.quant` makes them, into strided pools;
    a zero row gets scale 1, a padding slot is not written."""
    if codes == FP8 and INTERPRETED:
        pytest.skip("Triton 3.9's interpreter rounds fp32 to e4m3 without carrying into the "
                    "exponent (125.0 becomes 64, not 128); a GPU converts in hardware")
    gen = torch.Generator().manual_seed(1)
    NB, Hkv, BS, D, N = 5, 2, 4, 24, 11
    k, v = (torch.randn(2, N, Hkv, D, generator=gen) * 3).to(DEVICE, dtype)  # (N, Hkv, D)
    k[2, 1] = 0.0  # an all-zero row
    k[4, 0, :3] = torch.tensor([0.5, -1.0, 127.0]) / 127  # exact halves: ties to even
    slots = torch.randperm(NB * BS, generator=gen)[:N]
    slots[6] = -1
    slots = slots.to(DEVICE)
    got = torch.zeros(2, 2, NB, Hkv, BS, D, device=DEVICE).to(codes)  # (L, 2, ...) strided
    got_s = torch.zeros(2, 2, NB, Hkv, BS, device=DEVICE)  # (L, 2, NB, Hkv, BS)
    want, want_s = got[1].clone(), got_s[1].clone()
    store_kv_quantized(k, v, got[1, 0], got[1, 1], got_s[1, 0], got_s[1, 1], slots)
    store_kv_quantized_ref(k, v, want[0], want[1], want_s[0], want_s[1], slots)
    assert torch.equal(got[1].view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(got_s[1], want_s)
    assert int(got[0].view(torch.uint8).count_nonzero()) == 0  # the other layer untouched
    zero_slot = int(slots[2])
    assert float(got_s[1, 0][zero_slot // BS, 1, zero_slot % BS]) == 1.0


# ---------------------------------------------------------------------------------------------
# The model, and what only a GPU can check
# ---------------------------------------------------------------------------------------------

@runs_kernels
def test_model_on_the_triton_backend_matches_reference():
    cfg = ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=64, name="tiny")
    model = demo_model(cfg, seed=1).to(DEVICE)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    runs = {}
    for backend in ("reference", "triton"):
        cache = PagedKVCache(CacheConfig.for_model(cfg, max_batch_size=2, max_seq_len=64,
                                                   block_size=4, device=DEVICE), num_blocks=16)
        model.attention = backend
        runs[backend] = model.generate(prompt.to(DEVICE), 6, cache=cache)
    assert torch.equal(runs["triton"].tokens, runs["reference"].tokens)
    torch.testing.assert_close(runs["triton"].logits, runs["reference"].logits,
                               atol=1e-4, rtol=1e-4)


@runs_kernels
def test_engine_on_the_triton_backend_equals_generating_alone():
    """Mixed steps (prompt chunks beside decodes) through the paged prefill kernel, decode
    steps through the split decode kernel, on a model with windowed and global layers and
    sink tokens (two cache groups), preempting: every output equals the request alone."""
    from kvlib.engine import BatchedInferenceEngine

    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=64, sliding_window=6, sliding_layers=(0,), sink_tokens=2)
    model = demo_model(cfg, seed=1).to(DEVICE)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (9, 3, 14, 5)]
    model.attention = "reference"
    alone = [model.generate(torch.tensor([p], device=DEVICE), 8).tokens[0].tolist()
             for p in prompts]
    model.attention = "triton"
    engine = BatchedInferenceEngine(model, num_blocks=10, block_size=4,
                                    max_num_batched_tokens=8)
    out = engine.generate(prompts, max_new_tokens=8, show_progress=False)
    assert [o.token_ids for o in out.outputs] == alone
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in out.metrics.steps)
    assert out.metrics.num_preemptions > 0
    engine.cache.check_invariants()


@runs_kernels
def test_engine_over_int8_codes_reads_them_in_the_kernels():
    """kv_cache_dtype="int8": the store kernel quantizes as it writes, the quantized decode
    and prefill kernels read codes and scales in place; the outputs equal generating alone
    through the same cache of codes (the reference backend dequantizes the gathered rows)."""
    from kvlib.engine import BatchedInferenceEngine

    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=64)
    model = demo_model(cfg, seed=2).to(DEVICE)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (7, 12, 3)]
    model.attention = "reference"
    alone = []
    for p in prompts:
        cache = PagedKVCache(model.cache_config(1, 64, block_size=4, kv_cache_dtype="int8"),
                             num_blocks=8)
        alone.append(model.generate(torch.tensor([p], device=DEVICE), 6,
                                    cache=cache).tokens[0].tolist())
    model.attention = "triton"
    engine = BatchedInferenceEngine(model, num_blocks=24, block_size=4,
                                    max_num_batched_tokens=8, kv_cache_dtype="int8")
    out = engine.generate(prompts, max_new_tokens=6, show_progress=False)
    assert [o.token_ids for o in out.outputs] == alone
    (pool,) = engine.cache.storage.pools
    assert pool.dtype == torch.int8 and engine.cache.storage.scales[0].dtype == torch.float32



@runs_kernels
def test_engine_with_decode_graphs_on_the_triton_backend_equals_eager():
    """Decode steps over the persistent buffers (kvlib.cuda_graphs): padded to buckets 1, 2,
    4 and 8, tables at the cache's widest width, two cache groups and sinks, greedy and seeded.
    On a GPU real CUDA graphs are captured and replayed; under the interpreter the stand-in
    runs the same Triton kernels again on the same buffers."""
    from kvlib.engine import BatchedInferenceEngine
    from kvlib.sampling import SamplingParams

    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=64, sliding_window=6, sliding_layers=(0,), sink_tokens=2)
    model = demo_model(cfg, seed=1).to(DEVICE)
    model.attention = "triton"
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (9, 3, 14, 5, 7)]
    samplings = [SamplingParams(), SamplingParams(temperature=1.0, seed=4)] * 2 + [
        SamplingParams()]
    outputs = {}
    for graphs in (False, True):
        engine = BatchedInferenceEngine(model, num_blocks=40, block_size=4, max_num_seqs=8,
                                        cuda_graphs=graphs)
        out = engine.generate(prompts, samplings, [6, 2, 5, 4, 3], show_progress=False)
        outputs[graphs] = [o.token_ids for o in out.outputs]
    assert outputs[True] == outputs[False]
    assert engine.graphs.num_replays > 0
    assert engine.graphs.use_cuda_graphs == (DEVICE == "cuda")


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def llama_case(dtype, window=None):
    """32 query heads, 8 KV heads of 128, blocks of 16, rows of 1 to 3,200 tokens."""
    gen = torch.Generator().manual_seed(0)
    return paged_case(gen, [1, 17, 1000, 3200], [1, 1, 1, 1], heads=32, kv_heads=8, dim=128,
                      block_size=16, dtype=dtype, window=window, sink_tokens=4, device="cuda")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 512])
def test_llama_shape_on_gpu(dtype, window):
    """The default tile and split plan, float and every INT8 variant, at the Llama shape."""
    q, k_pool, v_pool, tables, lens, _ = llama_case(dtype, window)
    sinks = 0 if window is None else 4
    ref = paged_decode_ref(q.float(), k_pool.float(), v_pool.float(), tables, lens, window,
                           sinks)
    out = paged_decode_triton(q, k_pool, v_pool, tables, lens, window=window, sink_tokens=sinks)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    k_pool, v_pool = nan_free(k_pool, v_pool)
    (k8, ks), (v8, vs) = quantize_kv(k_pool), quantize_kv(v_pool)
    ref8 = paged_decode_quantized_ref(q, k8, v8, ks, vs, tables, lens, window, sinks).float()
    for variant in VARIANTS:
        tile = 32 if variant == "fma" else 64
        out8 = paged_decode_quantized(q, k8, v8, ks, vs, tables, lens, window=window,
                                      sink_tokens=sinks,
                                      launch=INT8_LAUNCH.with_(variant=variant, tile_n=tile))
        torch.testing.assert_close(out8.float(), ref8, **TOL[torch.bfloat16], msg=variant)


@needs_gpu
def test_wrappers_never_synchronise_and_replay_from_a_cuda_graph():
    """No host read of a device tensor in any wrapper (sync debug mode raises on one), and a
    decode captured in a CUDA graph follows new lengths written into its input tensor."""
    q, k_pool, v_pool, tables, lens, _ = llama_case(torch.bfloat16)
    cu = torch.arange(5, dtype=torch.int32, device="cuda")
    k_pool, v_pool = nan_free(k_pool, v_pool)
    (k8, ks), (v8, vs) = quantize_kv(k_pool), quantize_kv(v_pool)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        paged_decode_triton(q, k_pool, v_pool, tables, lens, window=64, sink_tokens=4)
        paged_decode_quantized(q, k8, v8, ks, vs, tables, lens)
        paged_prefill_triton(q, k_pool, v_pool, tables, lens, cu)
        store_kv_quantized(q[:, :8], q[:, :8], k8, v8, ks, vs, lens.long())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static_lens = lens.clone()
    graph = torch.cuda.CUDAGraph()
    paged_decode_triton(q, k_pool, v_pool, tables, static_lens)  # compile before capture
    with torch.cuda.graph(graph):
        out = paged_decode_triton(q, k_pool, v_pool, tables, static_lens)
    static_lens.copy_(torch.tensor([5, 100, 7, 2000], device="cuda"))
    graph.replay()
    want = paged_decode_triton(q, k_pool, v_pool, tables, static_lens)
    torch.testing.assert_close(out, want)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_runs_on_gpu_in_half_precision(dtype):
    """The model, a paged cache and the fast backend (Triton) on CUDA in bf16 and fp16."""
    cfg = ModelConfig(vocab_size=256, d_model=256, num_layers=2, num_heads=8, num_kv_heads=2,
                      max_seq_len=128, name="tiny")
    model = demo_model(cfg, seed=1, device="cuda", dtype=dtype)
    prompt = torch.randint(0, 256, (3, 20), device="cuda")
    logits = {}
    for backend in ("reference", "fast"):
        cache = PagedKVCache(CacheConfig.for_model(cfg, max_batch_size=3, max_seq_len=128,
                                                   block_size=16, dtype=dtype, device="cuda"),
                             num_blocks=32)
        model.attention = backend
        logits[backend] = model.generate(prompt, 8, cache=cache).logits[:, :2]  # (B, 2, V)
    torch.testing.assert_close(logits["fast"], logits["reference"], atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------------------------
# Plans and refusals (no kernel runs)
# ---------------------------------------------------------------------------------------------

def test_split_plan_fills_the_gpu_and_covers_every_token():
    for max_len in (1, 17, 4096, 32768):
        for programs in (8, 256, 1024):
            splits, split_len = split_plan(max_len, programs, 64, 528)
            assert split_len % 64 == 0 and splits * split_len >= max_len
            assert (splits - 1) * split_len < max_len  # no empty split for the longest row


def test_refuses_what_it_cannot_do():
    q, k_pool, v_pool, tables, lens = decode_case(0, torch.float32, [5, 9], device="cpu")
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_triton(q, k_pool, v_pool, tables, torch.zeros_like(lens))
    with pytest.raises(ValueError, match="int8 or float8"):
        paged_decode_quantized(q, k_pool, v_pool, k_pool[..., 0], v_pool[..., 0], tables, lens)
    with pytest.raises(ValueError, match="window"):
        paged_decode_triton(q, k_pool, v_pool, tables, lens, window=0)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)  # 3 queries, but q has 2 rows
    with pytest.raises(ValueError, match="cu_query_lens"):
        paged_prefill_triton(q, k_pool, v_pool, tables, lens, cu)
    (k8, ks), (v8, vs) = quantize_kv(k_pool.nan_to_num()), quantize_kv(v_pool.nan_to_num())
    with pytest.raises(ValueError, match="float32"):
        paged_decode_quantized(q, k8, v8, ks.half(), vs, tables, lens)


@pytest.mark.skipif(INTERPRETED, reason="already running under the interpreter")
@pytest.mark.skipif(not interpreter_runs_kernels(), reason="this Triton's interpreter cannot "
                    "run loops with run-time bounds (Triton >= 3.9 can; requirements.txt pins it)")
def test_kernels_under_the_interpreter():
    """This file's kernel tests, and the benchmark script's plumbing, under TRITON_INTERPRET."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "no:xdist", __file__], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "passed" in run.stdout.strip().splitlines()[-1]
    bench = subprocess.run([sys.executable, "bench/gpu_decode.py", "--interpret-smoke"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
    result = json.loads(bench.stdout.strip().splitlines()[-1])
    row = result["rows"][0]
    assert row["paged_max_err"] < 2e-2 and row["int8_max_err"] < 5e-2  # bf16 outputs
    assert all(row[f"{p}_max_err"] < 0.1 for p in result["quant_paths"])  # fp8 included
    for kernel in ("paged", "int8", "fp8"):  # swept, the best timed again, a default named
        assert row[f"{kernel}_best_ms"] > 0 and kernel in result["suggested_defaults"]
    mixed = result["prefill"][0]
    assert mixed["prefill_max_err"] < 2e-2 and mixed["two_launch_max_err"] < 2e-2
    assert mixed["sweep"]["ms"] and result["window"]["window_max_err"] < 2e-2
    assert set(result["targets"]) == {"paged_over_sdpa_at_0.5GB+", "paged_over_gather",
                                      "int8_over_sdpa_largest",
                                      "int8_fastest_variant_over_sdpa_largest"}


def _bench_module():
    spec = importlib.util.spec_from_file_location("gpu_decode", ROOT / "bench/gpu_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_targets_and_suggested_defaults_from_rows():
    """The bars take each row's worst case; the suggested default is the config with the best
    geometric mean over the swept rows, compared with the current default."""
    bench = _bench_module()
    rows = [{"kv_GB": 0.13, "sdpa_ms": 1.0, "gather_ms": 9.0, "paged_ms": 1.2, "int8_ms": 1.0,
             "paged_over_sdpa": 0.83, "int8_over_sdpa": 1.0},
            {"kv_GB": 2.1, "sdpa_ms": 2.0, "gather_ms": 20.0, "paged_ms": 1.9, "int8_ms": 1.0,
             "paged_over_sdpa": 1.05, "int8_over_sdpa": 2.0,
             "sweep": {"paged": {"ms": {"a": 2.0, bench.DEFAULTS["paged"].key: 3.0}}}},
            {"kv_GB": 0.6, "sdpa_ms": 1.0, "gather_ms": 2.0, "paged_ms": 1.0, "int8_ms": 1.0,
             "paged_over_sdpa": 1.0, "int8_over_sdpa": 1.0,
             "sweep": {"paged": {"ms": {"a": 1.0, bench.DEFAULTS["paged"].key: 0.75}}}}]
    got = bench.targets(rows)
    assert got["paged_over_sdpa_at_0.5GB+"] == {"worst": 1.0, "bar": 1.0, "met": True}
    assert got["paged_over_gather"]["worst"] == 2.0 and not got["paged_over_gather"]["met"]
    assert got["int8_over_sdpa_largest"] == {"worst": 2.0, "bar": 1.6, "met": True}
    rows[1]["int8_fma_over_sdpa"] = 2.5  # a faster variant
    assert bench.targets(rows)["int8_fastest_variant_over_sdpa_largest"]["worst"] == 2.5
    suggested = bench.suggested_defaults(rows, {"paged": [], "int8": []})
    assert suggested["paged"]["config"] == "a" and suggested["paged"]["rows"] == 2
    assert suggested["paged"]["default_over_best"] == pytest.approx(1.061, abs=1e-3)
    assert "int8" not in suggested  # never swept


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(),
                    reason="checked once, in the parent run on a CPU-only machine")
def test_gpu_script_says_why_it_cannot_run_on_a_cpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "bench/gpu_decode.py"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2 and "needs a CUDA GPU" in run.stderr
