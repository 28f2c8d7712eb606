"""Multi-head latent attention (kvlib.mla): one latent row per token in any cache, the naive
and absorbed computations equal, their cost formulas checked against counted FLOPs, and the
bytes per token of DeepSeek-V3's shape equal to real_models' figure."""

from __future__ import annotations

import pytest
import torch
from conftest import unit_scale_model
from torch.utils.flop_counter import FlopCounterMode

from kvlib import real_models
from kvlib.cache.flat import FlatKVCache
from kvlib.cache.paged import PagedKVCache
from kvlib.cache.quant_memory import KVQuantConfig
from kvlib.cache.quantize import QuantScheme
from kvlib.cache.quantized import QuantizedKVCache
from kvlib.cache.ring import RingKVCache
from kvlib.config import CacheConfig, ModelConfig
from kvlib.contract import StepBatch
from kvlib.mla import COMPUTATIONS, MultiHeadLatentAttention, decode_cost

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = dict(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
              kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5,
              max_seq_len=64)


def model(**changes):
    return unit_scale_model(3, random_norms=True, **{**LATENT, **changes}).double()


def set_computation(m, name):
    for layer in m.layers:
        layer.attn.computation = name


@pytest.mark.parametrize("fields", [{}, {"q_lora_rank": 10},
                                    {"sliding_window": 5, "sink_tokens": 2}],
                         ids=["plain", "q-lora", "sinks-window"])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "fast"])
def test_naive_and_absorbed_agree_with_and_without_a_cache(fields, backend):
    m = model(**fields)
    m.attention = backend
    tokens = torch.randint(0, 40, (2, 17), generator=torch.Generator().manual_seed(0))
    set_computation(m, "naive")
    expected = m(tokens)  # no cache: the whole sequence at once
    assert expected.std() > 1.0
    for computation in ("naive", "absorbed"):
        set_computation(m, computation)
        assert torch.allclose(m(tokens), expected, atol=1e-5)  # reference: fp32 scores
        for cache in (PagedKVCache(m.cache_config(2, 64, block_size=4), num_blocks=24),
                      FlatKVCache(m.cache_config(2, 64))):
            steps = [m.prefill(tokens[:, :9], cache)]
            steps += [m.decode_step(tokens[:, t], cache) for t in range(9, 17)]
            assert torch.allclose(torch.stack(steps[1:], 1), expected[:, 9:].float(),
                                  atol=1e-5), (computation, type(cache).__name__)


def test_the_cache_holds_one_row_of_latent_and_rotary_key_per_token_and_layer():
    m = model()
    config = m.cache_config(1, 64, block_size=4)
    assert (config.num_kv_heads, config.head_dim, config.latent_dim) == (1, 12 + 4, 12)
    cache = PagedKVCache(config, num_blocks=8)
    assert cache.storage.pools[0].shape == (2, 1, 9, 1, 4, 16)  # one part, not K and V
    assert config.bytes_per_token == 2 * 16 * 8  # layers x (R + P) x float64
    m.prefill(torch.arange(6)[None], cache)
    # the value pool is a view of the rows: the latent is stored once
    assert cache.v_pool(0).data_ptr() == cache.k_pool(0).data_ptr()
    assert cache.v_pool(0).shape[-1] == 12
    # the row is the normed latent, then the rotated key: a prefix of it is the value
    attn = m.layers[0].attn
    h = m.layers[0].attn_norm(m.embed(torch.arange(6)))  # (6, d)
    batch = StepBatch.make([0], [0], [6], torch.zeros(1, 6, dtype=torch.int64), step=-1)
    rows = attn.latent_rows(h, batch)[:, 0]  # (6, R + P)
    table = cache.block_table(0)
    stored = cache.k_pool(0)[table].reshape(-1, 16)[:6]  # (6, R + P), blocks of 4 tokens
    assert torch.allclose(stored, rows)


def test_deepseek_v3_shape_caches_what_real_models_says():
    cfg = ModelConfig(vocab_size=129280, d_model=7168, num_layers=61, num_heads=128,
                      num_kv_heads=128, kv_lora_rank=512, qk_rope_head_dim=64,
                      qk_nope_head_dim=128, v_head_dim=128, q_lora_rank=1536, ffn_dim=18432)
    cache = CacheConfig.for_model(cfg, max_batch_size=1, max_seq_len=8, dtype=torch.bfloat16)
    assert cache.bytes_per_token == real_models.token_bytes(real_models.REAL_MODELS["deepseek-v3"])
    assert cache.bytes_per_token == 70272  # 61 x (512 + 64) x 2 bytes
    # the same model with its keys and values expanded per head would cache 71x more
    expanded = 61 * 128 * (128 + 64 + 128) * 2
    assert round(expanded / cache.bytes_per_token) == 71


@pytest.mark.parametrize("computation", ["naive", "absorbed"])
def test_decode_cost_counts_the_flops_torch_counts(computation):
    """One decode step's attention over S = 20 cached rows, through the reference backend
    (plain matmuls FlopCounterMode sees), against `decode_cost`'s formula."""
    m = model()
    cache = PagedKVCache(m.cache_config(1, 64, block_size=4), num_blocks=16)
    m.prefill(torch.arange(19)[None], cache)
    attn: MultiHeadLatentAttention = m.layers[0].attn
    x = torch.randn(1, 32, dtype=torch.float64)
    batch = cache.begin([0], [1])
    q_nope, q_rope = attn.queries(x, batch)
    for layer in range(2):
        cache.write(layer, batch, attn.latent_rows(x, batch), None)
    kv = cache.read(0, batch)
    with FlopCounterMode(display=False) as counter:
        COMPUTATIONS[computation](attn, q_nope, q_rope, kv, batch, "reference")
    cache.abort(batch)
    assert counter.get_total_flops() == decode_cost(m.config, 20, computation).flops


def test_decode_cost_bytes():
    cfg = model().config
    naive, absorbed = decode_cost(cfg, 100, "naive"), decode_cost(cfg, 100, "absorbed")
    assert naive.cache_bytes == absorbed.cache_bytes == 100 * (12 + 4) * 2
    assert naive.weight_bytes == absorbed.weight_bytes == 12 * 4 * (6 + 5) * 2
    assert decode_cost(cfg, 100, "expanded").cache_bytes == 100 * 4 * (6 + 4 + 5) * 2
    with pytest.raises(ValueError, match="computation"):
        decode_cost(cfg, 100, "fused")


@pytest.mark.parametrize("fields, message", [
    (dict(kv_lora_rank=8, qk_rope_head_dim=3, qk_nope_head_dim=4, v_head_dim=4), "even"),
    (dict(kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=0, v_head_dim=4), "qk_nope"),
    (dict(qk_rope_head_dim=4), "give kv_lora_rank"),
    (dict(kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4,
          num_kv_heads=2), "num_kv_heads must equal"),
])
def test_latent_fields_are_checked(fields, message):
    base = dict(vocab_size=10, d_model=16, num_layers=1, num_heads=4, num_kv_heads=4)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**base, **fields})


def test_caches_that_cannot_hold_latent_rows_say_so():
    m = model()
    config = m.cache_config(1, 64)
    with pytest.raises(ValueError, match="ring"):
        RingKVCache(config)
    quant = KVQuantConfig(QuantScheme("int8", "token"), QuantScheme("int8", "token"), residual=0)
    with pytest.raises(ValueError, match="latent"):
        QuantizedKVCache(config, quant)
    with pytest.raises(ValueError, match="codes only keys and values"):
        m.cache_config(1, 64, kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="num_kv_heads must be 1"):
        CacheConfig(num_layers=1, num_kv_heads=2, head_dim=8, max_batch_size=1,
                    max_seq_len=8, latent_dim=4)
    with pytest.raises(ValueError, match="latent_dim"):
        model(num_kv_heads=4).check_cache(FlatKVCache(
            CacheConfig(num_layers=2, num_kv_heads=1, head_dim=16, max_batch_size=1,
                        max_seq_len=8, dtype=torch.float64)))


def test_a_latent_cache_refuses_a_separate_value():
    cache = PagedKVCache(model().cache_config(1, 64, block_size=4), num_blocks=8)
    batch = cache.begin([0], [2])
    row = torch.zeros(2, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="v=None"):
        cache.write(0, batch, row, row)
    cache.abort(batch)


def test_chunked_attention_refuses_narrow_values():
    m = model()
    m.attention = "chunked"
    with pytest.raises(ValueError, match="as wide as keys"):
        m(torch.arange(5)[None])


@pytest.mark.parametrize("computation", ["naive", "absorbed"])
def test_the_chapters_flop_count_matches_the_formula(computation):
    from kvlib.experiments import mla as mexp

    m = model()  # blocks of 16: a context of 64 gathers no padding
    assert mexp.counted_flops(m, 64, computation) == decode_cost(m.config, 64, computation).flops
