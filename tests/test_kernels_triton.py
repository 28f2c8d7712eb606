"""Triton kernels against their references: on a GPU, and on the CPU under the interpreter.

Triton decides when a kernel module is imported whether it runs compiled (GPU) or
interpreted (`TRITON_INTERPRET=1`, any device). So that no other test inherits that setting,
the CPU checks run in a child process: in a normal CPU run the kernel tests here skip and
`test_kernels_under_the_interpreter` runs this file again with the variable set. With a GPU
the same tests run on CUDA tensors in this process too.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from kvlib.cache.paged import PagedKVCache  # noqa: E402
from kvlib.config import CacheConfig, ModelConfig  # noqa: E402
from kvlib.experiments import demo_model  # noqa: E402
from kvlib.kernels.paged_decode import (  # noqa: E402
    interpreter_runs_kernels,
    paged_decode_attention,
    split_plan,
)
from kvlib.kernels.paged_decode_cpu import paged_decode_attention_ref  # noqa: E402
from kvlib.kernels.paged_decode_int8 import (  # noqa: E402
    paged_decode_attention_int8,
    paged_decode_attention_int8_ref,
    quantize_int8,
)
from kvlib.kernels.store_kv import INTERPRETED, store_kv, store_kv_ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cpu" if INTERPRETED else "cuda"
runs_kernels = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="needs a GPU; on the CPU, test_kernels_under_the_interpreter runs these")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def paged_case(seed: int, dtype: torch.dtype, *, dim: int = 16, device: str = DEVICE):
    """Random pools, block tables (shuffled blocks, -1 padding) and lengths for one test."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    BS = rnd.choice([1, 2, 4, 8, 16, 32, 64, 128])
    Hkv = rnd.choice([1, 2])
    G = rnd.choice([1, 2, 4, 8])
    B = rnd.randint(1, 3)
    lens = [rnd.randint(1, 100) for _ in range(B)]
    M = max(-(-n // BS) for n in lens)
    NB = B * M + 2
    order = torch.randperm(NB, generator=gen).to(torch.int32)  # blocks scattered in the pool
    tables = torch.full((B, M), -1, dtype=torch.int32)  # (B, M)
    for b, n in enumerate(lens):
        tables[b, :-(-n // BS)] = order[b * M:b * M + -(-n // BS)]
    q = torch.randn(B, Hkv * G, dim, generator=gen)  # (B, H, D)
    pools = torch.randn(2, NB, Hkv, BS, dim, generator=gen)  # (2, NB, Hkv, BS, D)
    to = dict(device=device, dtype=dtype)
    return (q.to(**to), pools[0].to(**to), pools[1].to(**to), tables.to(device),
            torch.tensor(lens, dtype=torch.int32, device=device))


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(3))
def test_paged_decode_equals_reference(seed, dtype):
    q, k_pool, v_pool, tables, lens = paged_case(seed, dtype)
    ref = paged_decode_attention_ref(q.float(), k_pool.float(), v_pool.float(), tables, lens)
    out = paged_decode_attention(q, k_pool, v_pool, tables, lens, tile_n=16)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@runs_kernels
@pytest.mark.parametrize("num_splits", [1, 3, 50])
def test_any_number_of_splits_merges_to_the_same_result(num_splits):
    q, k_pool, v_pool, tables, lens = paged_case(7, torch.float32)
    ref = paged_decode_attention_ref(q, k_pool, v_pool, tables, lens)
    out = paged_decode_attention(q, k_pool, v_pool, tables, lens, num_splits=num_splits,
                                 tile_n=16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@runs_kernels
@pytest.mark.parametrize(("tile_n", "num_warps", "num_stages"), [(32, 8, 2), (128, 4, 3)])
def test_launch_options_change_speed_not_results(tile_n, num_warps, num_stages):
    """What bench/gpu_decode.py sweeps (tile, warps, pipelining depth) leaves the output
    equal to the reference, for the float and the INT8 kernel."""
    q, k_pool, v_pool, tables, lens = paged_case(5, torch.bfloat16)
    opts = dict(tile_n=tile_n, num_warps=num_warps, num_stages=num_stages, num_splits=3)
    ref = paged_decode_attention_ref(q.float(), k_pool.float(), v_pool.float(), tables, lens)
    out = paged_decode_attention(q, k_pool, v_pool, tables, lens, **opts)
    torch.testing.assert_close(out.float(), ref, **TOL[torch.bfloat16])
    (k8, k_scale), (v8, v_scale) = quantize_int8(k_pool), quantize_int8(v_pool)
    ref8 = paged_decode_attention_int8_ref(q, k8, v8, k_scale, v_scale, tables, lens)
    out8 = paged_decode_attention_int8(q, k8, v8, k_scale, v_scale, tables, lens, **opts)
    torch.testing.assert_close(out8.float(), ref8.float(), atol=1e-2, rtol=1e-2)


@runs_kernels
@pytest.mark.parametrize("seed", range(2))
def test_int8_decode_equals_its_reference(seed):
    q, k_pool, v_pool, tables, lens = paged_case(10 + seed, torch.bfloat16)
    (k8, k_scale), (v8, v_scale) = quantize_int8(k_pool), quantize_int8(v_pool, torch.float16)
    ref = paged_decode_attention_int8_ref(q, k8, v8, k_scale, v_scale, tables, lens)
    out = paged_decode_attention_int8(q, k8, v8, k_scale, v_scale, tables, lens, tile_n=16)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    # and INT8 stays close to the unquantized answer (its error, not the kernel's)
    exact = paged_decode_attention_ref(q.float(), k_pool.float(), v_pool.float(), tables, lens)
    assert (out.float() - exact).abs().max() < 0.05


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


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_llama_shape_on_gpu(dtype):
    """32 query heads, 8 KV heads of 128, blocks of 16, the default tile and split plan."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, H, Hkv, D, BS, M = 4, 32, 8, 128, 16, 200
    lens = torch.tensor([1, 17, 1000, 3200], dtype=torch.int32, device="cuda")
    tables = torch.randperm(B * M, device="cuda", generator=gen).view(B, M).to(torch.int32)
    q = torch.randn(B, H, D, device="cuda", generator=gen).to(dtype)
    k_pool, v_pool = torch.randn(2, B * M, Hkv, BS, D, device="cuda", generator=gen).to(dtype)
    ref = paged_decode_attention_ref(q.float(), k_pool.float(), v_pool.float(), tables, lens)
    out = paged_decode_attention(q, k_pool, v_pool, tables, lens)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


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


def test_split_plan_fills_the_gpu_and_covers_every_token():
    for max_len in (1, 17, 4096, 32768):
        for programs in (8, 256, 1024):
            splits, split_len = split_plan(max_len, programs, 64, 528)
            assert split_len % 64 == 0 and splits * split_len >= max_len
            assert (splits - 1) * split_len < max_len  # no empty split for the longest row


def test_refuses_what_it_cannot_do():
    q, k_pool, v_pool, tables, lens = paged_case(0, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(q, k_pool, v_pool, tables, torch.zeros_like(lens))
    with pytest.raises(ValueError, match="int8"):
        paged_decode_attention_int8(q, k_pool, v_pool, k_pool[..., 0], v_pool[..., 0], tables,
                                    lens)


@pytest.mark.skipif(INTERPRETED, reason="already running under the interpreter")
@pytest.mark.skipif(not interpreter_runs_kernels(), reason="this Triton's interpreter cannot "
                    "run loops with run-time bounds (Triton >= 3.9 can; requirements.txt pins it)")
def test_kernels_under_the_interpreter():
    """This file's kernel tests, and the benchmark script's plumbing, under TRITON_INTERPRET."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "no:xdist", __file__], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "passed" in run.stdout.strip().splitlines()[-1]
    bench = subprocess.run([sys.executable, "bench/gpu_decode.py", "--interpret-smoke"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
    result = json.loads(bench.stdout.strip().splitlines()[-1])
    assert result["rows"] and result["rows"][0]["paged_max_err"] < 1e-2


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(),
                    reason="checked once, in the parent run on a CPU-only machine")
def test_gpu_script_says_why_it_cannot_run_on_a_cpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "bench/gpu_decode.py"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2 and "needs a CUDA GPU" in run.stderr
