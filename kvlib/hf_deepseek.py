"""Loading transformers' DeepSeek-V3 checkpoints (multi-head latent attention) into kvlib.

`kvlib.hf.load_pretrained` hands a folder whose config.json says `"model_type":
"deepseek_v3"` to this module. The attention is kvlib's `MultiHeadLatentAttention`
(`kvlib.mla`); the MLP must be dense in every layer: DeepSeek-V3 replaces it with a mixture
of experts from layer `first_k_dense_replace` on, which kvlib does not implement, so a
config with MoE layers is refused (and so is any checkpoint holding `mlp.experts` or
`mlp.gate` weights). Small DeepSeek-V3-shaped models with `first_k_dense_replace =
num_hidden_layers` load, and their logits match transformers' (tests/test_hf_deepseek.py).

The same rules as `kvlib.hf`: safetensors only, never `trust_remote_code`, every name and
shape checked against config.json before any tensor is read. Multi-token-prediction layers
(`model.layers.{num_hidden_layers}.*`, DeepSeek-V3's layer 61) are not part of the decoder
and are skipped by name, as transformers skips them.

Rotary dimensions. DeepSeek stores each rotary pair side by side, (x0, x1), (x2, x3), ...
(`rope_interleave`, true by default); kvlib rotates half against half, (x_i, x_{i + P/2}).
Reordering the rotary rows of the two projections that make rotary parts (the query's, and
kv_a_proj's last P rows) to evens-then-odds makes kvlib's rotation give transformers' rotated
vectors exactly, so nothing at run time needs to know:

>>> rotary_order(6).tolist()
[0, 2, 4, 1, 3, 5]
>>> kvlib_name("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
'layers.0.attn.kv_a_proj.weight'
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from kvlib import hf
from kvlib.config import ModelConfig
from kvlib.model import TransformerLM

ARCHITECTURE = "DeepseekV3ForCausalLM"
_RENAMES = [(".q_a_layernorm.", ".q_a_norm."), (".kv_a_layernorm.", ".kv_a_norm."),
            (".kv_a_proj_with_mqa.", ".kv_a_proj.")]


def kvlib_name(hf_name: str) -> str:
    """The kvlib parameter name of a DeepSeek-V3 weight name (Llama's renames, then MLA's)."""
    name = hf.kvlib_name(hf_name)
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name


def rotary_order(P: int) -> torch.Tensor:
    """(P,) the interleaved rotary dims in kvlib's half-and-half order: evens, then odds."""
    return torch.cat([torch.arange(0, P, 2), torch.arange(1, P, 2)])


def config_from_hf(hf_config: dict[str, Any], name: str = "hf") -> ModelConfig:
    """A latent-attention `ModelConfig` from a DeepSeek-V3 config.json; refuses MoE layers,
    RoPE scaling (YaRN), biases and quantized checkpoints."""
    c = hf_config
    archs = c.get("architectures") or [ARCHITECTURE]
    if c.get("model_type") != "deepseek_v3" or archs != [ARCHITECTURE]:
        raise ValueError(f"not a DeepSeek-V3 config: model_type {c.get('model_type')!r}, "
                         f"architectures {archs}")
    layers = c["num_hidden_layers"]
    dense = c.get("first_k_dense_replace", 3)
    if dense is None or dense < layers:
        raise ValueError(f"layers {dense}..{layers - 1} are mixture-of-experts "
                         f"(first_k_dense_replace={dense} < num_hidden_layers={layers}): kvlib's "
                         f"MLP is dense; set first_k_dense_replace to {layers}")
    if c.get("attention_bias"):
        raise ValueError("unsupported attention_bias=True: kvlib's latent attention has no biases")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {c['hidden_act']!r}: kvlib's MLP is SwiGLU")
    if c.get("quantization_config"):
        raise ValueError("unsupported quantized checkpoint: kvlib loads float weights only")
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"unsupported RoPE scaling {rope_type!r} (DeepSeek-V3 itself uses "
                         f"'yarn'): kvlib implements plain rotary embeddings only")
    heads = c["num_attention_heads"]
    return ModelConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], num_layers=layers,
        num_heads=heads, num_kv_heads=heads, ffn_dim=c["intermediate_size"],
        rope_theta=float(params.get("rope_theta", c.get("rope_theta", 10_000.0))),
        norm_eps=c.get("rms_norm_eps", 1e-6), max_seq_len=c.get("max_position_embeddings", 4096),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        kv_lora_rank=c["kv_lora_rank"], qk_rope_head_dim=c["qk_rope_head_dim"],
        qk_nope_head_dim=c["qk_nope_head_dim"], v_head_dim=c["v_head_dim"],
        q_lora_rank=c.get("q_lora_rank") or 0, name=name)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face weight name -> shape, for every weight a DeepSeek-V3 checkpoint of `cfg`
    (dense layers) must hold."""
    d, H, R, P = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    Dn, Dv, F, Rq = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.ffn_dim, cfg.q_lora_rank
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        a, p = f"model.layers.{i}.self_attn.", f"model.layers.{i}."
        if Rq:
            shapes |= {a + "q_a_proj.weight": (Rq, d), a + "q_a_layernorm.weight": (Rq,),
                       a + "q_b_proj.weight": (H * (Dn + P), Rq)}
        else:
            shapes[a + "q_proj.weight"] = (H * (Dn + P), d)
        shapes |= {a + "kv_a_proj_with_mqa.weight": (R + P, d), a + "kv_a_layernorm.weight": (R,),
                   a + "kv_b_proj.weight": (H * (Dn + Dv), R), a + "o_proj.weight": (d, H * Dv),
                   p + "mlp.gate_proj.weight": (F, d), p + "mlp.up_proj.weight": (F, d),
                   p + "mlp.down_proj.weight": (d, F),
                   p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    return shapes


def _decoder_weights(files: dict[str, Path], cfg: ModelConfig) -> dict[str, Path]:
    """The checkpoint's weights without multi-token-prediction layers; MoE weights refused."""
    moe = sorted(n for n in files if ".mlp.experts." in n or ".mlp.gate." in n)
    if moe:
        raise ValueError(f"the checkpoint holds mixture-of-experts weights ({moe[0]} ...): "
                         f"kvlib's MLP is dense")
    layer = re.compile(r"model\.layers\.(\d+)\.")
    return {n: f for n, f in files.items()
            if not ((m := layer.match(n)) and int(m.group(1)) >= cfg.num_layers)}


def check_checkpoint(folder: Path, cfg: ModelConfig) -> dict[str, Path]:
    """Every expected weight present with its shape, nothing unexpected; headers only."""
    from safetensors import safe_open

    files = _decoder_weights(hf._weight_files(folder), cfg)
    expected = expected_shapes(cfg)
    extra = sorted(set(files) - set(expected) - {"lm_head.weight"})
    missing = sorted(set(expected) - set(files))
    if missing or extra:
        raise ValueError(f"{folder}: weights do not match config.json: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if files.get(name) != file:
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                want = expected.get(name, (cfg.vocab_size, cfg.d_model))
                if shape != want:
                    raise ValueError(f"{file.name}: {name} has shape {shape}, config.json "
                                     f"implies {want}")
    return files


def _to_half_and_half(name: str, w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Reorder the rotary output rows of the query and kv_a projections (module note)."""
    order = rotary_order(cfg.qk_rope_head_dim)
    if name.endswith(("q_proj.weight", "q_b_proj.weight")):
        heads = w.view(cfg.num_heads, cfg.head_dim, -1)  # (H, Dn + P, in)
        rope = heads[:, cfg.qk_nope_head_dim:][:, order]  # (H, P, in)
        return torch.cat([heads[:, :cfg.qk_nope_head_dim], rope], dim=1).reshape(w.shape)
    if name.endswith("kv_a_proj_with_mqa.weight"):
        R = cfg.kv_lora_rank
        return torch.cat([w[:R], w[R:][order]])  # (R + P, d)
    return w  # no other weight makes rotary dims


def load(folder: Path, *, dtype: torch.dtype = torch.float32,
         device: torch.device | str = "cpu", name: str = "hf") -> TransformerLM:
    """A kvlib `TransformerLM` (latent attention) with a DeepSeek-V3 checkpoint's weights."""
    from safetensors import safe_open

    raw = json.loads((folder / "config.json").read_text())
    cfg = config_from_hf(raw, name=name)
    interleaved = raw.get("rope_interleave", True)
    files = check_checkpoint(folder, cfg)
    with torch.device("meta"):
        model = TransformerLM(cfg)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():
                if files.get(hf_name) != file or (cfg.tie_embeddings
                                                   and hf_name == "lm_head.weight"):
                    continue
                w = f.get_tensor(hf_name)
                if interleaved:
                    w = _to_half_and_half(hf_name, w, cfg)
                state[kvlib_name(hf_name)] = w.to(device=device, dtype=dtype)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()
