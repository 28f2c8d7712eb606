"""kvlib.hf loads transformers' DeepSeek-V3 (dense layers) and agrees with it to 1e-4.

Each case builds a small random `DeepseekV3ForCausalLM` with transformers' own config class,
saves it with `save_pretrained` (safetensors) and loads the folder through
`kvlib.hf.load_pretrained`. Weights are redrawn at a scale where logits vary by whole units,
so a wrong head order, rotary order, norm or scale changes tokens. The cases cover the query
bottleneck on and off, interleaved and half-and-half rotary dims, several ranks and head
dims, tied embeddings, and both of kvlib's MLA computations; the latent cache (paged) gives
the same logits as recomputing.
"""

from __future__ import annotations

import json

import pytest
import torch

from kvlib import hf as kvhf
from kvlib import hf_deepseek
from kvlib.cache.paged import PagedKVCache

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, LAYERS, T = 80, 2, 24
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=LAYERS, first_k_dense_replace=LAYERS,
              intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-6,
              n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
              moe_intermediate_size=16)
CASES = {
    "q-lora-interleaved": dict(hidden_size=64, num_attention_heads=4, kv_lora_rank=32,
                               q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
                               v_head_dim=16),
    "no-q-lora-halves": dict(hidden_size=48, num_attention_heads=2, kv_lora_rank=16,
                             q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=12,
                             v_head_dim=8, rope_interleave=False),
    "wide-rope-tied-theta": dict(hidden_size=32, num_attention_heads=8, kv_lora_rank=8,
                                 q_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=4,
                                 v_head_dim=12, tie_word_embeddings=True,
                                 rope_parameters={"rope_type": "default",
                                                  "rope_theta": 500.0}),
}


def save_random(tmp_path, overrides, seed=0):
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**{**COMMON, **overrides})
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.6 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1)
    folder = tmp_path / "deepseek"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    theirs, folder = save_random(tmp_path, CASES[case])
    ours = kvhf.load_pretrained(folder)
    tokens = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(tokens).logits
        assert expected.std() > 0.5  # logits vary by whole units
        for computation in ("absorbed", "naive"):
            for layer in ours.layers:
                layer.attn.computation = computation
            got = ours(tokens)
            assert torch.allclose(got, expected, atol=1e-4, rtol=0), (
                computation, (got - expected).abs().max().item())
        cache = PagedKVCache(ours.cache_config(2, 64, block_size=4), num_blocks=32)
        ours.prefill(tokens[:, :T - 3], cache)
        steps = [ours.decode_step(tokens[:, t], cache) for t in range(T - 3, T)]
    assert torch.allclose(torch.stack(steps, 1), expected[:, T - 3:], atol=1e-4, rtol=0)
    assert kvhf.load_config(folder) == ours.config


def test_bytes_per_token_is_one_latent_row_per_layer(tmp_path):
    _, folder = save_random(tmp_path, CASES["q-lora-interleaved"])
    model = kvhf.load_pretrained(folder)
    cache = model.cache_config(1, 64)
    assert cache.bytes_per_token == LAYERS * (32 + 8) * 4  # (R + P) fp32 numbers per layer
    assert cache.num_kv_heads == 1 and cache.latent_dim == 32


def test_moe_layers_are_refused_by_name(tmp_path):
    folder = tmp_path / "moe"
    folder.mkdir()
    config = {**COMMON, **CASES["q-lora-interleaved"], "first_k_dense_replace": 1,
              "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        kvhf.load_pretrained(folder)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ({"attention_bias": True}, "attention_bias"),
    ({"architectures": ["DeepseekV2ForCausalLM"]}, "not a DeepSeek-V3"),
])
def test_what_kvlib_lacks_is_refused(change, message):
    config = {**COMMON, **CASES["q-lora-interleaved"], "model_type": "deepseek_v3", **change}
    with pytest.raises(ValueError, match=message):
        hf_deepseek.config_from_hf(config)


def test_a_weight_of_the_wrong_shape_is_refused_before_loading(tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = save_random(tmp_path, CASES["no-q-lora-halves"])
    weights = load_file(folder / "model.safetensors")
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    weights[name] = weights[name][:-1]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="kv_b_proj"):
        kvhf.load_pretrained(folder)
