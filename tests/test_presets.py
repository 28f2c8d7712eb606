"""Every model shape in kvlib against the fields of its public config.json.

`tests/data/model_configs/<name>.json` keeps, for each entry of `REAL_MODELS` (which holds
every entry of `PRESETS`), the fields of the model's `config.json` that a cache or a FLOP
count depends on, with the repository it comes from (`_source`) and how the copy was checked
(`_checked`). This test reads them the way transformers does and compares with kvlib's shape,
so a typo in a preset fails here, naming the model and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvlib.presets import GPUS, PRESETS
from kvlib.real_models import REAL_MODELS, MLAConfig

CONFIGS = Path(__file__).parent / "data" / "model_configs"


def _load(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def _sliding_layers(hf: dict, num_layers: int) -> tuple[int, ...] | None:
    """Which layers keep a window, read as transformers reads each family's config."""
    if "layer_types" in hf:  # gpt-oss, and newer configs of every family
        return tuple(i for i, t in enumerate(hf["layer_types"]) if t == "sliding_attention")
    if "sliding_window_pattern" in hf:  # Gemma 3: every n-th layer is global
        n = hf["sliding_window_pattern"]
        return tuple(i for i in range(num_layers) if (i + 1) % n)
    if "attention_chunk_size" in hf:  # Llama 4: every n-th layer has no RoPE and is global
        n = hf["no_rope_layer_interval"]
        return tuple(i for i in range(num_layers) if (i + 1) % n)
    if "_layer_pattern" in hf:  # Gemma 2: even layers slide
        return tuple(range(0, num_layers, 2))
    return None


def expected_fields(hf: dict) -> dict:
    """ModelConfig's fields from a Llama-family config.json (GPT-2 under its own names)."""
    if "n_layer" in hf:  # GPT-2
        return dict(vocab_size=hf["vocab_size"], d_model=hf["n_embd"],
                    num_layers=hf["n_layer"], num_heads=hf["n_head"], num_kv_heads=hf["n_head"],
                    head_dim=hf["n_embd"] // hf["n_head"], ffn_dim=hf["n_inner"] or 4 * hf["n_embd"],
                    max_seq_len=hf["n_positions"], tie_embeddings=hf["tie_word_embeddings"])
    layers = hf["num_hidden_layers"]
    window = hf.get("sliding_window", hf.get("attention_chunk_size"))
    if hf.get("use_sliding_window") is False:
        window = None
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=layers,
        num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        # Llama 4's dense MLP width; its experts are counted by their published total.
        ffn_dim=hf.get("intermediate_size_mlp", hf["intermediate_size"]),
        rope_theta=float(hf["rope_theta"]), norm_eps=hf["rms_norm_eps"],
        max_seq_len=hf["max_position_embeddings"],
        tie_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=window,
        sliding_layers=_sliding_layers(hf, layers) if window else None,
    )


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_every_model_has_a_config_snapshot(name):
    hf = _load(name)
    assert hf["_source"] and hf["_checked"], f"{name}: say where the fields come from"


@pytest.mark.parametrize("name", [n for n, m in REAL_MODELS.items()
                                  if not isinstance(m, MLAConfig)])
def test_shape_matches_its_config_json(name):
    model, want = REAL_MODELS[name], expected_fields(_load(name))
    for field, value in want.items():
        got = getattr(model, field)
        assert got == value, f"{name}.{field} = {got!r}, its config.json says {value!r}"
    assert model.name == name


def test_deepseek_latent_matches_its_config_json():
    hf, model = _load("deepseek-v3"), REAL_MODELS["deepseek-v3"]
    assert (model.num_layers, model.kv_lora_rank, model.qk_rope_head_dim, model.max_seq_len) == (
        hf["num_hidden_layers"], hf["kv_lora_rank"], hf["qk_rope_head_dim"],
        hf["max_position_embeddings"])


def test_every_preset_is_a_real_model_without_windows():
    for name, cfg in PRESETS.items():
        assert REAL_MODELS[name] is cfg
        assert cfg.sliding_window is None, f"{name}: windowed models belong in REAL_MODELS only"


def test_the_late_2026_models_are_there():
    for name in ("llama-3.1-8b", "llama-3.1-70b", "qwen3-8b", "gemma-3-27b", "llama-4-scout",
                 "gpt-oss-120b", "deepseek-v3"):
        assert name in REAL_MODELS
    # Gemma 3: five local layers, then a global one; gpt-oss: alternating, sliding first.
    assert REAL_MODELS["gemma-3-27b"].layer_windows[:6] == (1024,) * 5 + (None,)
    assert REAL_MODELS["gpt-oss-120b"].layer_windows[:4] == (128, None, 128, None)
    assert sum(w is None for w in REAL_MODELS["llama-4-scout"].layer_windows) == 12


def test_gpu_ridge_points():
    ridges = {name: round(hw.ridge_point) for name, hw in GPUS.items()}
    assert ridges == {"L4": 403, "A100-80GB": 153, "H100-SXM": 295, "H200": 206}
