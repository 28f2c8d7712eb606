"""kvlib.hf: checkpoints made by transformers load into kvlib and behave as transformers does.

Each case saves a tiny random model with transformers (`save_pretrained`, safetensors) and
loads the folder with `load_pretrained`. Weights are drawn at a larger scale than the 0.02
init (and QKV biases are non-zero), so logits vary by whole units and a wrong mapping, head
order, bias or RoPE theta changes tokens, not the fifth decimal. The cases cover MHA, GQA and
MQA, Qwen2's QKV bias, tied embeddings, head dims 64 and 128, a head dim that is not
d_model / heads, two RoPE thetas, and a sliding window shorter than the prompt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from kvlib import hf as kvhf
from kvlib.cache.paged import PagedKVCache
from kvlib.cache.ring import RingKVCache
from kvlib.config import CacheConfig, ModelConfig

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEW = 48, 64
VOCAB = 96
COMMON = {"vocab_size": VOCAB, "intermediate_size": 80, "num_hidden_layers": 2,
          "max_position_embeddings": 128, "rms_norm_eps": 1e-6}

# name: (family, config overrides). Head dim = head_dim if given, else hidden / heads.
CASES = {
    "llama-mha-tied-hd64": ("llama", dict(hidden_size=128, num_attention_heads=2,
                                          num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-gqa-theta5e5": ("llama", dict(hidden_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, rope_theta=500_000.0)),
    "mistral-mqa-hd128": ("mistral", dict(hidden_size=64, num_attention_heads=2,
                                          num_key_value_heads=1, head_dim=128,
                                          sliding_window=None)),
    "qwen2-bias-gqa": ("qwen2", dict(hidden_size=64, num_attention_heads=4,
                                     num_key_value_heads=2, use_sliding_window=False)),
    # Every layer windowed, W = 12 < the 48-token prompt (Mistral v0.1 style).
    "mistral-window12": ("mistral", dict(hidden_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, sliding_window=12)),
    # Layer 1 windowed, layer 0 global (Qwen2's max_window_layers; per-layer like Gemma-2).
    "qwen2-window-layer1": ("qwen2", dict(hidden_size=64, num_attention_heads=2,
                                          num_key_value_heads=1, use_sliding_window=True,
                                          sliding_window=20, max_window_layers=1)),
}

FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A seeded transformers model with weights at a scale that makes every mistake visible."""
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    config = config_cls(**{**COMMON, **overrides})
    config.eos_token_id = None  # generate exactly NEW tokens
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(0.5 + torch.rand(param.shape, generator=gen))
                elif name.endswith("bias"):
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
                elif "embed" in name:
                    param.copy_(torch.randn(param.shape, generator=gen))
                else:
                    std = 1.5 / math.sqrt(param.shape[1])
                    param.copy_(torch.randn(param.shape, generator=gen) * std)
    model.set_attn_implementation("eager")
    return model.requires_grad_(False)


def save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def paged_cache(model, block_size: int = 16) -> PagedKVCache:
    """A paged cache for one sequence of PROMPT + NEW tokens; its windowed layers (a group
    of their own) free the blocks their window has passed."""
    cfg = CacheConfig.for_model(model.config, max_batch_size=1, max_seq_len=PROMPT + NEW,
                                block_size=block_size)
    return PagedKVCache(cfg, num_blocks=-(-(PROMPT + NEW) // block_size))


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, kvlib model loaded from its saved folder) for one case."""
    family, overrides = CASES[request.param]
    hf_model = make_hf_model(family, seed=len(request.param), **overrides)
    folder = save(hf_model, tmp_path_factory.mktemp(request.param))
    return hf_model, kvhf.load_pretrained(folder)


def test_logits_match_transformers(pair):
    hf_model, model = pair
    tokens = prompt(1)
    with torch.no_grad():
        expected = hf_model(tokens).logits.float()  # (1, P, V)
    assert expected.std() > 1.0  # not a timid model: a small error would change tokens
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers_generate(pair):
    hf_model, model = pair
    tokens = prompt(2)
    expected = hf_model.generate(tokens, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)[:, PROMPT:]  # (1, NEW)
    for cache in (model.new_cache(1, PROMPT + NEW), paged_cache(model)):
        got = model.generate(tokens, NEW, cache=cache).tokens  # (1, NEW)
        assert got.tolist() == expected.tolist(), type(cache).__name__
    assert len(set(got[0].tolist())) > 3  # the continuation changes token, more than once


def test_loaded_config_reads_every_switch(tmp_path):
    hf_model = make_hf_model("qwen2", hidden_size=64, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=32, rope_theta=1e6,
                             tie_word_embeddings=True, use_sliding_window=True,
                             sliding_window=8, max_window_layers=1)
    cfg = kvhf.load_config(save(hf_model, tmp_path / "qwen"))
    assert (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (64, 4, 1, 32)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.max_seq_len) == (1e6, 1e-6, 128)
    assert cfg.qkv_bias and cfg.tie_embeddings
    assert cfg.layer_windows == (None, 8)  # Qwen2: layers from max_window_layers on
    mistral = make_hf_model("mistral", hidden_size=32, num_attention_heads=2,
                            num_key_value_heads=2, sliding_window=16)
    assert kvhf.load_config(save(mistral, tmp_path / "mistral")).layer_windows == (16, 16)


def test_tied_embeddings_are_one_parameter(tmp_path):
    hf_model = make_hf_model("llama", hidden_size=32, num_attention_heads=2,
                             num_key_value_heads=2, tie_word_embeddings=True)
    model = kvhf.load_pretrained(save(hf_model, tmp_path))
    assert model.lm_head.weight is model.embed.weight


def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    hf_model = make_hf_model("llama", hidden_size=32, num_attention_heads=2,
                             num_key_value_heads=1)
    one = kvhf.load_pretrained(save(hf_model, tmp_path / "one"))
    folder = save(hf_model, tmp_path / "shards", max_shard_size="20KB")
    assert (folder / kvhf.WEIGHTS_INDEX).is_file()
    sharded = kvhf.load_pretrained(folder)
    for (name, a), (_, b) in zip(one.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_dtype_and_device(tmp_path):
    hf_model = make_hf_model("llama", hidden_size=32, num_attention_heads=2,
                             num_key_value_heads=2)
    model = kvhf.load_pretrained(save(hf_model, tmp_path), dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training


# ---------------------------------------------------------------------------------------------
# Refusals: each names what was wrong, and nothing is read before the checks pass
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path) -> Path:
    hf_model = make_hf_model("llama", hidden_size=32, num_attention_heads=2,
                             num_key_value_heads=1)
    return save(hf_model, tmp_path / "ckpt", max_shard_size="20KB")


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_shard_is_named(folder, no_tensor_reads):
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        kvhf.load_pretrained(folder)


def test_missing_config_is_named(folder):
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        kvhf.load_pretrained(folder)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8,
         "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled, ever")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*pickle"):
        kvhf.load_pretrained(tmp_path)


@pytest.mark.parametrize(("changes", "message"), [
    ({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, "Gemma2ForCausalLM"),
    ({"model_type": "gpt2", "architectures": None}, "model_type 'gpt2'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "RoPE scaling 'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}},
     r"quantized checkpoint \(gptq\)"),
], ids=["gemma2", "gpt2", "classifier", "rope-llama3", "gelu", "llama-o-bias", "gptq"])
def test_unsupported_configs_are_refused_by_name(folder, no_tensor_reads, changes, message):
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        kvhf.load_pretrained(folder)


def test_shapes_that_disagree_with_the_config_are_refused(folder, no_tensor_reads):
    edit_config(folder, intermediate_size=48)  # the saved MLP has 80
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(80, 32\).*\(48, 32\)"):
        kvhf.load_pretrained(folder)


def test_a_head_count_that_disagrees_is_refused(folder, no_tensor_reads):
    edit_config(folder, num_key_value_heads=2)  # k_proj was saved for 1 KV head
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(16, 32\).*\(32, 32\)"):
        kvhf.load_pretrained(folder)


def test_missing_and_unexpected_weights_are_named(tmp_path, no_tensor_reads):
    hf_model = make_hf_model("llama", hidden_size=32, num_attention_heads=2,
                             num_key_value_heads=1)
    save(hf_model, tmp_path)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    safetensors_torch.save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\], "
                                         r"unexpected \['model.layers.1.mlp.extra.weight'\]"):
        kvhf.load_pretrained(tmp_path)


def test_neither_folder_nor_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub id"):
        kvhf.load_pretrained(tmp_path / "no" / "such" / "folder")


def test_hub_id_downloads_safetensors_and_config_only(folder, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    model = kvhf.load_pretrained("someone/tiny-llama")
    assert asked["repo_id"] == "someone/tiny-llama"
    assert "*.safetensors" in asked["allow_patterns"] and "config.json" in asked["allow_patterns"]
    assert not any(p.endswith((".bin", ".pt", ".pth", ".py")) for p in asked["allow_patterns"])
    assert model.config.num_kv_heads == 1


def test_a_failed_download_says_so(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, allow_patterns):
        raise OSError("no network")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="downloading it from the hub failed: OSError"):
        kvhf.load_pretrained("someone/tiny-llama")


def test_dtype_must_be_floating(folder):
    with pytest.raises(ValueError, match="floating torch.dtype"):
        kvhf.load_pretrained(folder, dtype=torch.int8)


def test_failed_load_leaves_the_folder_untouched(folder):
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    edit_config(folder, intermediate_size=48)
    edited = (folder / "config.json").read_bytes()
    with pytest.raises(ValueError):
        kvhf.load_pretrained(folder)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after == {**before, "config.json": edited}
    shutil.rmtree(folder)


# ---------------------------------------------------------------------------------------------
# ModelConfig's switches for these families
# ---------------------------------------------------------------------------------------------

BASE = dict(vocab_size=10, d_model=8, num_layers=4, num_heads=2, num_kv_heads=1)


def test_window_on_every_layer_or_on_some():
    assert ModelConfig(**BASE, sliding_window=4).layer_windows == (4, 4, 4, 4)
    assert ModelConfig(**BASE).layer_windows == (None,) * 4
    cfg = ModelConfig(**BASE, sliding_window=4, sliding_layers=[2, 0])
    assert cfg.sliding_layers == (0, 2) and cfg.window(1) is None and cfg.window(2) == 4


@pytest.mark.parametrize(("fields", "message"), [
    ({"sliding_window": 0}, "sliding_window must be an int >= 1"),
    ({"sliding_window": True}, "sliding_window must be an int >= 1"),
    ({"sliding_layers": (0,)}, "given without a sliding_window"),
    ({"sliding_window": 4, "sliding_layers": (4,)}, r"distinct layer indices in \[0, 4\)"),
    ({"sliding_window": 4, "sliding_layers": (1, 1)}, "distinct layer indices"),
    ({"qkv_bias": 1}, "qkv_bias must be a bool"),
])
def test_bad_switches_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**BASE, **fields)


# ---------------------------------------------------------------------------------------------
# Sliding windows: what the mask hides, on every backend
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    family, overrides = CASES["mistral-window12"]
    hf_model = make_hf_model(family, seed=5, **overrides)
    return hf_model, kvhf.load_pretrained(save(hf_model, tmp_path_factory.mktemp("w")))


def test_the_window_hides_old_keys_only(windowed):
    _, model = windowed
    tokens = prompt(3)
    unwindowed = type(model)(dataclasses.replace(model.config, sliding_window=None)).eval()
    unwindowed.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model(tokens), unwindowed(tokens)  # (1, P, V)
    # Positions 0..11 see at most 12 keys either way; from position 12 on the window bites.
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("backend", ["reference", "sdpa", "fast"])
def test_windowed_backends_agree_with_transformers(windowed, backend):
    hf_model, model = windowed
    tokens = prompt(4)
    with torch.no_grad():
        expected = hf_model(tokens).logits.float()
    model.attention = backend
    try:
        torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=1e-4)
        flat = model.new_cache(1, PROMPT + NEW)
        ring = RingKVCache.for_model(model.config, max_batch_size=1, max_seq_len=PROMPT + NEW,
                                     max_query_len=PROMPT)
        paged = paged_cache(model, block_size=4)
        got = [model.generate(tokens, NEW, cache=c).tokens.tolist() for c in (flat, ring, paged)]
    finally:
        model.attention = "reference"
    want = hf_model.generate(tokens, max_new_tokens=NEW, do_sample=False,
                             pad_token_id=0)[:, PROMPT:].tolist()
    assert got == [want, want, want]
    # 111 tokens held; the next query (position 111) reads keys 100..111: blocks 25.. of 4.
    table = paged.block_table(0)
    null = paged.manager.null_block(0)  # the entries the window freed point at the null block
    assert table[:25] == [null] * 25 and null not in table[25:]
    assert ring.capacities == [12 + PROMPT - 1] * 2  # of PROMPT + NEW = 112 positions


# ---------------------------------------------------------------------------------------------
# Chapter 8's experiment, as the chapter runs it offline
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("family", "overrides"), [
    ("llama", {}), ("mistral", {"sliding_window": 8, "tie_word_embeddings": False})],
    ids=["smollm2-like", "mistral-window8"])
def test_chapter_experiment_agrees_on_every_cache_kind(tmp_path, family, overrides):
    from kvlib.experiments import models as mexp

    folder = mexp.random_checkpoint(tmp_path, family=family, num_hidden_layers=2, **overrides)
    model = kvhf.load_pretrained(folder)
    result = mexp.compare_with_transformers(model, mexp.reference_model(folder),
                                            prompt(5)[:, :24], new_tokens=24)
    assert result.max_logit_diff < 1e-4 and result.logit_scale > 1.0
    assert set(result.tokens) == {"flat, seq_major", "flat, head_major",
                                  "ring (sliding windows)", "paged"}
    assert result.all_match and len(set(result.reference_tokens)) > 8
