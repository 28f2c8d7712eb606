"""kvlib.analysis: every figure checked against arithmetic written out by hand."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvlib import analysis
from kvlib.analysis import (
    PRESETS,
    StepCost,
    decode_step_cost,
    dtype_bytes,
    flop_speedup,
    generation_cost,
    kv_bytes_per_token,
    kv_cache_bytes,
    naive_attention_count,
    param_count,
    prefill_cost,
    weight_bytes,
)
from kvlib.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# Presets: KV bytes and parameter counts
# ---------------------------------------------------------------------------------------------

# 2 (K and V) x layers x KV heads x head_dim elements per token, then x bytes per element.
KV_ELEMENTS_PER_TOKEN = {
    "gpt2": 2 * 12 * 12 * 64,  # 18,432
    "smollm2-135m": 2 * 30 * 3 * 64,  # 11,520
    "llama-3-8b": 2 * 32 * 8 * 128,  # 65,536
    "llama-3-70b": 2 * 80 * 8 * 128,  # 163,840
    "mistral-7b-v0.2": 2 * 32 * 8 * 128,  # 65,536
    "llama-3.1-8b": 2 * 32 * 8 * 128,  # 65,536: Llama 3's shapes, a longer context
    "llama-3.1-70b": 2 * 80 * 8 * 128,  # 163,840
    "qwen3-8b": 2 * 36 * 8 * 128,  # 73,728
}


def test_presets_are_the_named_models():
    assert set(PRESETS) == set(KV_ELEMENTS_PER_TOKEN)
    for key, cfg in PRESETS.items():
        assert cfg.name == key


@pytest.mark.parametrize("name", sorted(KV_ELEMENTS_PER_TOKEN))
def test_kv_bytes_per_token_bf16_and_fp32(name):
    cfg = PRESETS[name]
    assert kv_bytes_per_token(cfg, "bf16") == KV_ELEMENTS_PER_TOKEN[name] * 2
    assert kv_bytes_per_token(cfg, torch.float32) == KV_ELEMENTS_PER_TOKEN[name] * 4
    # The cache's own figure agrees with the formula.
    assert kv_bytes_per_token(cfg, torch.float32) == _cache_bytes_per_token(cfg)


def _cache_bytes_per_token(cfg):
    from kvlib.config import CacheConfig

    cache = CacheConfig.for_model(cfg, max_batch_size=1, max_seq_len=1, dtype=torch.float32)
    return cache.bytes_per_token


def test_kv_bytes_per_token_spelled_out():
    assert kv_bytes_per_token(PRESETS["gpt2"], "fp16") == 36864  # 2*12*12*64*2
    assert kv_bytes_per_token(PRESETS["smollm2-135m"], "bf16") == 23040  # 2*30*3*64*2
    assert kv_bytes_per_token(PRESETS["llama-3-8b"], "bf16") == 131072  # 128 KiB
    assert kv_bytes_per_token(PRESETS["llama-3-70b"], "bf16") == 327680  # 2*80*8*128*2
    assert kv_bytes_per_token(PRESETS["mistral-7b-v0.2"], "bf16") == 131072
    assert kv_bytes_per_token(PRESETS["llama-3-8b"], "fp8") == 65536


def test_llama_3_8b_8192_tokens_is_one_gib_in_bf16():
    assert kv_cache_bytes(PRESETS["llama-3-8b"], 8192, dtype="bf16") == 2**30


# Llama-style count: embed V*d; per layer q d*H*Dh, k and v d*Hkv*Dh each, o H*Dh*d,
# MLP 3*d*F, two norms 2*d; final norm d; lm_head V*d unless tied.
def test_param_count_llama_3_8b_is_the_published_8030261248():
    embed = 128256 * 4096  # 525,336,576
    per_layer = (4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096  # 41,943,040
                 + 3 * 4096 * 14336  # 176,160,768
                 + 2 * 4096)
    assert per_layer == 218_112_000
    assert embed + 32 * per_layer + 4096 + embed == 8_030_261_248
    assert param_count(PRESETS["llama-3-8b"]) == 8_030_261_248
    assert weight_bytes(PRESETS["llama-3-8b"], "bf16") == 2 * 8_030_261_248


def test_param_count_smollm2_is_the_published_134515008_with_tied_embeddings():
    embed = 49152 * 576  # 28,311,552, shared with the lm_head
    per_layer = 576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536 + 2 * 576  # 3,540,096
    assert embed + 30 * per_layer + 576 == 134_515_008
    assert param_count(PRESETS["smollm2-135m"]) == 134_515_008


def test_param_count_llama_3_70b_and_mistral_7b():
    # Llama-3-70B: published as 70.6B.
    per_layer_70b = (8192 * 8192 + 2 * 8192 * 1024 + 8192 * 8192 + 3 * 8192 * 28672
                     + 2 * 8192)  # 855,654,400
    expected_70b = 2 * 128256 * 8192 + 80 * per_layer_70b + 8192
    assert expected_70b == 70_553_706_496
    assert param_count(PRESETS["llama-3-70b"]) == expected_70b
    # Mistral-7B: published as 7.24B; Llama-3-8B's layers with a 32,000-token vocabulary.
    expected_mistral = 2 * 32000 * 4096 + 32 * 218_112_000 + 4096
    assert expected_mistral == 7_241_732_096
    assert param_count(PRESETS["mistral-7b-v0.2"]) == expected_mistral


def test_param_count_gpt2_is_the_llama_style_count_not_gpt2s():
    # GPT-2's real 124,439,808 includes learned positions, biases and a 2-matrix MLP; kvlib
    # counts a Llama-style model of the same shape (3-matrix MLP, no biases, RMSNorm).
    per_layer = 4 * 768 * 768 + 3 * 768 * 3072 + 2 * 768  # 9,438,720
    assert param_count(PRESETS["gpt2"]) == 50257 * 768 + 12 * per_layer + 768 == 151_862_784


# ---------------------------------------------------------------------------------------------
# dtype and argument errors
# ---------------------------------------------------------------------------------------------

def test_dtype_bytes_names_and_torch_dtypes():
    assert [dtype_bytes(n) for n in ("fp32", "fp16", "bf16", "fp8", "int8")] == [4, 2, 2, 1, 1]
    assert dtype_bytes(torch.float16) == dtype_bytes(torch.bfloat16) == 2
    assert dtype_bytes(torch.float8_e4m3fn) == dtype_bytes(torch.int8) == 1


@pytest.mark.parametrize("bad", ["int4", "float32", "BF16", 2, None])
def test_bad_dtype_raises_naming_the_choices(bad):
    with pytest.raises(ValueError, match="dtype must be a torch.dtype or one of"):
        dtype_bytes(bad)
    with pytest.raises(ValueError, match="dtype"):
        kv_cache_bytes(PRESETS["gpt2"], 10, dtype=bad)


def test_bad_lengths_raise():
    cfg = PRESETS["gpt2"]
    with pytest.raises(ValueError, match="seq_len must be an int >= 0, got -1"):
        kv_cache_bytes(cfg, -1)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        kv_cache_bytes(cfg, 8, batch_size=0)
    with pytest.raises(ValueError, match="context_len"):
        decode_step_cost(cfg, -1, cached=True)
    with pytest.raises(ValueError, match="prompt_len"):
        generation_cost(cfg, 0, 5, cached=True)
    with pytest.raises(ValueError, match="new_tokens"):
        generation_cost(cfg, 5, 0, cached=False)


# ---------------------------------------------------------------------------------------------
# Step costs on a config small enough to check by hand
# ---------------------------------------------------------------------------------------------

# d_model 4, 1 layer, H=2 query heads, Hkv=1, head_dim 2: q width H*Dh = 4, k/v width 2.
TINY = ModelConfig(vocab_size=10, d_model=4, num_layers=1, num_heads=2, num_kv_heads=1,
                   head_dim=2, ffn_dim=8)
# Params: embed 10*4=40; q 16 + k 8 + v 8 + o 16 = 48; MLP 3*4*8 = 96; norms 8;
# final norm 4; lm_head 40 -> 236. KV per token in bf16: 2*1*1*2*2 = 8 bytes.
TINY_WEIGHT_BYTES_BF16 = 236 * 2
# What a step over n tokens reads: all but the embedding table (40), plus n rows of 4.
TINY_STEP_BYTES_BF16 = {1: (196 + 4) * 2, 4: (196 + 16) * 2, 5: (196 + 20) * 2}  # 400, 424, 432


def test_tiny_weights_and_kv():
    assert param_count(TINY) == 236
    assert kv_bytes_per_token(TINY, "bf16") == 8


def test_tiny_cached_step_at_context_3():
    cost = decode_step_cost(TINY, 3, cached=True, dtype="bf16")
    assert cost == StepCost(
        projection_flops=2 * 4 * (4 + 2 * 2) + 2 * 4 * 4,  # 64 + 32 = 96
        attention_flops=2 * 2 * 2 * 2 * 4,  # QK^T and AV, 2 heads, dim 2, 4 keys = 64
        mlp_flops=2 * 3 * 4 * 8,  # 192
        lm_head_flops=2 * 4 * 10,  # 80
        bytes_moved=400 + 3 * 8 + 8,  # weights read + read 3 tokens + write 1 = 432
    )
    assert cost.total_flops == 432
    assert cost.arithmetic_intensity == pytest.approx(432 / 432)


def test_tiny_uncached_step_at_context_3():
    cost = decode_step_cost(TINY, 3, cached=False, dtype="bf16")
    assert cost.projection_flops == 4 * 96  # all 4 tokens
    assert cost.attention_flops == 16 * (1 + 2 + 3 + 4)  # query i sees i + 1 keys: 160
    assert cost.mlp_flops == 4 * 192
    assert cost.lm_head_flops == 80  # the last position only
    assert cost.bytes_moved == TINY_STEP_BYTES_BF16[4]  # 4 embedding rows; no cache traffic
    assert cost.total_flops == 1392


def test_tiny_fp32_bytes():
    cost = decode_step_cost(TINY, 3, cached=True, dtype=torch.float32)
    assert cost.bytes_moved == 200 * 4 + 4 * 16


def test_at_context_0_both_paths_do_the_same_flops():
    for cfg in (TINY, *PRESETS.values()):
        cached = decode_step_cost(cfg, 0, cached=True)
        uncached = decode_step_cost(cfg, 0, cached=False)
        assert cached.projection_flops == uncached.projection_flops
        assert cached.total_flops == uncached.total_flops
        assert flop_speedup(cfg, 0) == 1.0


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("context_len", [1, 100, 4095])
def test_cached_is_cheaper_for_positive_context(name, context_len):
    cfg = PRESETS[name]
    cached = decode_step_cost(cfg, context_len, cached=True)
    uncached = decode_step_cost(cfg, context_len, cached=False)
    assert cached.total_flops < uncached.total_flops
    assert cached.bytes_moved > uncached.bytes_moved  # the price: reading the cache
    assert 1 < flop_speedup(cfg, context_len) < context_len + 1


def test_generation_cost_tiny_by_hand():
    # prompt 4, 2 new tokens. Cached: prefill 4 tokens (= the uncached step at S=3, 1392
    # FLOPs; bytes 424 + 4 writes of 8) then a cached step at S=4 (96 + 16*5 + 192 + 80).
    cached = generation_cost(TINY, 4, 2, cached=True)
    assert prefill_cost(TINY, 4).total_flops == 1392
    assert prefill_cost(TINY, 4).bytes_moved == 424 + 4 * 8
    assert cached.total_flops == 1392 + 448
    assert cached.bytes_moved == (424 + 32) + (400 + 5 * 8)
    # Uncached: the S=3 step (1392) then the S=4 step (5*96 + 16*15 + 5*192 + 80 = 1760).
    uncached = generation_cost(TINY, 4, 2, cached=False)
    assert uncached.total_flops == 1392 + 1760
    assert uncached.bytes_moved == 424 + 432


def test_naive_attention_count_is_the_original_tables_figure():
    assert naive_attention_count(4096) == 16_777_216  # S*S scores, one layer, one head
    assert naive_attention_count(4096) // 4096 == 4096  # vs S for one cached query
    assert flop_speedup(PRESETS["llama-3-8b"], 4095) < 4096


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

configs = st.builds(
    lambda kv, group, half_dim, d, ffn, vocab, layers: ModelConfig(
        vocab_size=vocab, d_model=d, num_layers=layers, num_heads=kv * group,
        num_kv_heads=kv, head_dim=2 * half_dim, ffn_dim=ffn),
    st.integers(1, 4), st.integers(1, 4), st.integers(1, 8), st.integers(1, 64),
    st.integers(1, 64), st.integers(1, 100), st.integers(1, 4))


@given(cfg=configs, s1=st.integers(0, 10_000), s2=st.integers(0, 10_000),
       batch=st.integers(1, 64))
def test_kv_cache_bytes_is_linear_in_seq_len_and_batch(cfg, s1, s2, batch):
    per_token = kv_bytes_per_token(cfg, "bf16")
    assert kv_cache_bytes(cfg, s1, batch) == batch * s1 * per_token
    assert kv_cache_bytes(cfg, s1 + s2, batch) == (kv_cache_bytes(cfg, s1, batch)
                                                   + kv_cache_bytes(cfg, s2, batch))
    assert kv_cache_bytes(cfg, s1, batch, dtype="fp32") == 2 * kv_cache_bytes(cfg, s1, batch)


@given(cfg=configs, s=st.integers(0, 2_000))
def test_uncached_minus_cached_grows_with_context(cfg, s):
    def gap(context_len):
        return (decode_step_cost(cfg, context_len, cached=False).total_flops
                - decode_step_cost(cfg, context_len, cached=True).total_flops)

    assert gap(s + 1) > gap(s) >= 0
    assert 1 <= flop_speedup(cfg, s) <= s + 1


@given(cfg=configs, prompt_len=st.integers(1, 50), new_tokens=st.integers(1, 20))
def test_generation_with_a_cache_never_costs_more_flops(cfg, prompt_len, new_tokens):
    cached = generation_cost(cfg, prompt_len, new_tokens, cached=True)
    uncached = generation_cost(cfg, prompt_len, new_tokens, cached=False)
    if new_tokens == 1:
        assert cached.total_flops == uncached.total_flops
    else:
        assert cached.total_flops < uncached.total_flops


# ---------------------------------------------------------------------------------------------
# Roofline
# ---------------------------------------------------------------------------------------------

def test_roofline_takes_the_slower_of_compute_and_memory():
    hw = analysis.Hardware("toy", peak_flops=1000.0, bandwidth=10.0)  # ridge at 100 FLOP/B
    assert hw.ridge_point == 100.0
    memory_bound = analysis.StepCost(100, 0, 0, 0, bytes_moved=50)  # 0.1 s vs 5 s
    compute_bound = analysis.StepCost(0, 0, 8000, 0, bytes_moved=20)  # 8 s vs 2 s
    assert analysis.roofline_seconds(memory_bound, hw) == 5.0
    assert analysis.roofline_seconds(compute_bound, hw) == 8.0


def test_cached_llama_step_is_memory_bound_and_long_recompute_is_not():
    llama = analysis.PRESETS["llama-3-8b"]
    h100 = analysis.GPUS["H100-SXM"]
    cached = analysis.decode_step_cost(llama, 4095, cached=True)
    uncached = analysis.decode_step_cost(llama, 4095, cached=False)
    assert cached.arithmetic_intensity < 2 < h100.ridge_point < uncached.arithmetic_intensity
    # Weights read (15.01 GB) + 4,096 tokens x 128 KiB of cache, streamed at 3.35 TB/s.
    expected = (analysis.step_weight_bytes(llama) + 4096 * 131072) / 3.35e12
    assert analysis.roofline_seconds(cached, h100) == pytest.approx(expected)
    ratio = analysis.roofline_seconds(uncached, h100) / analysis.roofline_seconds(cached, h100)
    assert 4096 / h100.ridge_point / 2 < ratio < 4096 / h100.ridge_point * 2

    # Issue 12: intensity about 1.10 FLOP/byte, not 1.03; the H100 time ratio about 13.4x.
    assert cached.arithmetic_intensity == pytest.approx(1.10, abs=0.005)
    assert ratio == pytest.approx(13.4, abs=0.05)


# ---------------------------------------------------------------------------------------------
# Bytes a step reads, and the roofline per operation
# ---------------------------------------------------------------------------------------------

def test_a_step_reads_the_weights_but_not_the_embedding_table():
    llama = PRESETS["llama-3-8b"]
    table = 128_256 * 4096 * 2  # 1.05 GB, of which a lookup reads one 8 KiB row per token
    assert analysis.step_weight_bytes(llama) == weight_bytes(llama) - table + 4096 * 2
    assert analysis.step_weight_bytes(llama) / 1e9 == pytest.approx(15.01, abs=0.005)
    assert analysis.step_weight_bytes(llama, 3) == analysis.step_weight_bytes(llama) + 2 * 8192
    # Never more rows than the table has.
    assert analysis.step_weight_bytes(TINY, 1000) == TINY_WEIGHT_BYTES_BF16 - 40 * 2 + 40 * 2
    assert analysis.step_weight_bytes(TINY, 1) == TINY_STEP_BYTES_BF16[1]
    # Tied embeddings: the LM head reads the whole table anyway.
    for name in ("gpt2", "smollm2-135m"):
        assert analysis.step_weight_bytes(PRESETS[name], 1) == weight_bytes(PRESETS[name])
    with pytest.raises(ValueError, match="num_tokens"):
        analysis.step_weight_bytes(llama, 0)


def test_cache_bytes_equal_weight_bytes_near_114k_tokens():
    llama = PRESETS["llama-3-8b"]
    tokens = analysis.step_weight_bytes(llama) / kv_bytes_per_token(llama)
    assert 114_000 < tokens < 115_000


def test_batched_step_per_operation_on_an_h100():
    """Issue 12, point 1: B = 471, S = 128. Pooled: about 7.2 ms; per operation: 9.5 ms."""
    llama, h100 = PRESETS["llama-3-8b"], analysis.GPUS["H100-SXM"]
    matmuls, attention = analysis.decode_step_operations(llama, 128, batch_size=471)
    per_token = decode_step_cost(llama, 128, cached=True)
    assert matmuls.flops == 471 * (per_token.total_flops - per_token.attention_flops)
    assert matmuls.bytes_moved == analysis.step_weight_bytes(llama, 471)
    assert attention.flops == 471 * per_token.attention_flops
    assert attention.bytes_moved == 471 * 129 * 131072
    assert matmuls.compute_bound(h100) and not attention.compute_bound(h100)
    by_op = analysis.roofline_seconds_by_operation((matmuls, attention), h100)
    assert by_op == pytest.approx(9.5e-3, abs=0.05e-3)
    pooled = StepCost(0, 0, matmuls.flops + attention.flops, 0,
                      matmuls.bytes_moved + attention.bytes_moved)
    assert analysis.roofline_seconds(pooled, h100) == pytest.approx(7.2e-3, abs=0.05e-3)
    assert by_op > analysis.roofline_seconds(pooled, h100)


@given(context_len=st.integers(0, 200_000), batch=st.integers(1, 4096),
       name=st.sampled_from(sorted(PRESETS)))
def test_decode_attention_intensity_is_the_group_size_at_any_batch_and_context(
        context_len, batch, name):
    cfg = PRESETS[name]
    _, attention = analysis.decode_step_operations(cfg, context_len, batch_size=batch)
    assert attention.arithmetic_intensity == pytest.approx(cfg.num_heads / cfg.num_kv_heads)
    for hw in analysis.GPUS.values():
        assert not attention.compute_bound(hw)


@pytest.mark.parametrize("context_len", [0, 128, 32_768])
def test_weight_matmuls_turn_compute_bound_near_the_ridge_point_whatever_the_context(
        context_len):
    llama, h100 = PRESETS["llama-3-8b"], analysis.GPUS["H100-SXM"]

    def first_compute_bound_batch():
        lo, hi = 1, 10_000  # bisect: intensity grows with the batch
        while lo < hi:
            mid = (lo + hi) // 2
            matmuls, _ = analysis.decode_step_operations(llama, context_len, batch_size=mid)
            lo, hi = (lo, mid) if matmuls.compute_bound(h100) else (mid + 1, hi)
        return lo

    assert 290 <= first_compute_bound_batch() <= 320  # ridge point 295; ~1 FLOP/byte/token


def test_decode_step_operations_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_size"):
        analysis.decode_step_operations(TINY, 3, batch_size=0)
    with pytest.raises(ValueError, match="context_len"):
        analysis.decode_step_operations(TINY, -1)


def test_gpus_hold_llama_3_8b_in_bf16():
    names = {hw.name for hw in analysis.GPUS.values()}
    assert "NVIDIA T4" not in names  # no bf16 tensor cores, and 16 GB is too small
    assert analysis.GPUS["L4"].ridge_point == pytest.approx(121e12 / 300e9)
