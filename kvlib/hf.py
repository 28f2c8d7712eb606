"""Loading Hugging Face checkpoints of the Llama family into kvlib's model.

Llama 2 and 3, SmolLM2, Mistral and Qwen2 share one architecture with small switches (QKV
biases, sliding windows, tied embeddings), which `ModelConfig` spells out. A checkpoint is a
folder with `config.json` and safetensors files; on a machine that is online, a hub id such as
`"HuggingFaceTB/SmolLM2-135M"` is downloaded first (config, safetensors and tokenizer files
only).

Safety and honesty, in that order:
- Only safetensors are read (no pickle, so no code runs while loading), and never
  `trust_remote_code`: a folder holding only `pytorch_model.bin` is refused.
- Everything is checked before any tensor is copied: config.json and the shard index (valid
  JSON, every required field of the right type), every file (a whole safetensors file, not a
  truncated or corrupt one; only plain file names, inside the folder), and every weight's
  name, dtype and shape against what the config implies, in the file the index names. A
  malformed checkpoint is a `ValueError` that names the file and what is wrong.

Hugging Face names map to kvlib's one to one:

>>> kvlib_name("model.layers.3.self_attn.q_proj.weight")
'layers.3.attn.q_proj.weight'
>>> kvlib_name("model.layers.0.post_attention_layernorm.weight")
'layers.0.mlp_norm.weight'
>>> kvlib_name("model.embed_tokens.weight"), kvlib_name("lm_head.weight")
('embed.weight', 'lm_head.weight')
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from kvlib.checks import require_int, require_number
from kvlib.config import ModelConfig
from kvlib.model import TransformerLM

# model_type -> the architecture name its checkpoints carry. Everything else is refused.
SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM"}
WEIGHTS_INDEX = "model.safetensors.index.json"
HUB_FILES = ["config.json", "*.safetensors", WEIGHTS_INDEX, "generation_config.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

# Fields every Llama-family config.json has; the others have defaults.
REQUIRED_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                   "num_hidden_layers", "num_attention_heads")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names for the dtypes kvlib loads

_RENAMES = [  # applied in order to a name without its "model." prefix
    ("embed_tokens.", "embed."),
    (".self_attn.", ".attn."),
    (".input_layernorm.", ".attn_norm."),
    (".post_attention_layernorm.", ".mlp_norm."),
]


def kvlib_name(hf_name: str) -> str:
    """The kvlib parameter name of a Hugging Face Llama-family weight name."""
    name = hf_name.removeprefix("model.")
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name


def _typed(hf: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """hf[key] if it is of `kind` (a missing key or null: `default`); else ValueError."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{key} must be {names}, got {value!r}")
    return value


def _count(hf: dict[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    """An int field (bools refused): required when `default` is None."""
    if hf.get(key) is None:
        if default is None:
            raise ValueError(f"{key} is missing")
        return default
    return require_int(key, hf[key], minimum=minimum)


def _architecture(hf: dict[str, Any]) -> str:
    model_type = hf.get("model_type")
    archs = _typed(hf, "architectures", list, [])
    if model_type not in SUPPORTED or any(a != SUPPORTED[model_type] for a in archs):
        named = ", ".join(archs) or f"model_type {model_type!r}"
        raise ValueError(
            f"unsupported architecture {named}: kvlib loads "
            f"{', '.join(SUPPORTED.values())} (Llama 2/3, SmolLM2, Mistral, Qwen2)")
    return model_type


def _rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta from `rope_parameters` (transformers >= 5) or the older top-level keys."""
    params = _typed(hf, "rope_parameters", dict, {})
    scaling = _typed(hf, "rope_scaling", dict, {})
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"unsupported RoPE scaling {rope_type!r} (e.g. Llama 3.1's 'llama3'): "
                         f"kvlib implements plain rotary embeddings only")
    return require_number("rope_theta", params.get("rope_theta", hf.get("rope_theta", 10_000.0)),
                          above=0)


def _sliding_layers(hf: dict[str, Any], model_type: str,
                    num_layers: int) -> tuple[int | None, tuple[int, ...] | None]:
    """(sliding_window, sliding_layers) in ModelConfig's terms."""
    window = hf.get("sliding_window")
    if model_type == "llama" or window is None:
        return None, None
    types = _typed(hf, "layer_types", list, None)
    if types is not None:  # transformers >= 5 writes it out
        if len(types) != num_layers:
            raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    elif model_type == "qwen2":  # Qwen2: layers from max_window_layers on, if enabled
        enabled = _typed(hf, "use_sliding_window", bool, False)
        first = _count(hf, "max_window_layers", num_layers, minimum=0) if enabled else num_layers
        layers = tuple(range(first, num_layers))
    else:  # Mistral v0.1: every layer
        layers = tuple(range(num_layers))
    if not layers:
        return None, None
    return (require_int("sliding_window", window, minimum=1),
            None if len(layers) == num_layers else layers)


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    """A `ModelConfig` from a checkpoint's config.json (as a dict); refuses what kvlib lacks.

    A missing required field, or a field of the wrong type (a bool where a count belongs, a
    string where a number does), is a ValueError naming the field.
    """
    if not isinstance(hf, dict):
        raise ValueError(f"a config must be a JSON object, got {type(hf).__name__}")
    missing = [key for key in REQUIRED_FIELDS if hf.get(key) is None]
    if missing:
        raise ValueError(f"required field(s) missing: {', '.join(missing)}")
    model_type = _architecture(hf)
    if _typed(hf, "hidden_act", str, "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: kvlib's MLP is SwiGLU")
    quantization = _typed(hf, "quantization_config", dict, {})
    if quantization:
        method = quantization.get("quant_method", "?")
        raise ValueError(f"unsupported quantized checkpoint ({method}): kvlib loads float "
                         f"weights only")
    if _typed(hf, "mlp_bias", bool, False):
        raise ValueError("unsupported mlp_bias=True: kvlib's MLP has no biases")
    if model_type == "llama" and _typed(hf, "attention_bias", bool, False):
        raise ValueError("unsupported attention_bias=True on Llama (biases on q, k, v and o): "
                         "kvlib has biases on q, k, v only, as Qwen2 does")
    num_layers, heads = _count(hf, "num_hidden_layers"), _count(hf, "num_attention_heads")
    d_model = _count(hf, "hidden_size")
    window, layers = _sliding_layers(hf, model_type, num_layers)
    return ModelConfig(
        vocab_size=_count(hf, "vocab_size"), d_model=d_model, num_layers=num_layers,
        num_heads=heads, num_kv_heads=_count(hf, "num_key_value_heads", heads),
        head_dim=_count(hf, "head_dim", 0, minimum=0),  # 0: d_model // heads
        ffn_dim=_count(hf, "intermediate_size"), rope_theta=_rope_theta(hf),
        norm_eps=require_number("rms_norm_eps", hf.get("rms_norm_eps", 1e-6), above=0),
        max_seq_len=_count(hf, "max_position_embeddings", 2048),
        tie_embeddings=_typed(hf, "tie_word_embeddings", bool, False),
        qkv_bias=model_type == "qwen2", sliding_window=window, sliding_layers=layers,
        name=name)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face weight name -> shape, for every weight a checkpoint of `cfg` must hold."""
    d, H, Hkv, D, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (H * D, d),
                   p + "self_attn.k_proj.weight": (Hkv * D, d),
                   p + "self_attn.v_proj.weight": (Hkv * D, d),
                   p + "self_attn.o_proj.weight": (d, H * D),
                   p + "mlp.gate_proj.weight": (F, d), p + "mlp.up_proj.weight": (F, d),
                   p + "mlp.down_proj.weight": (d, F),
                   p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
        if cfg.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (H * D,), p + "self_attn.k_proj.bias": (Hkv * D,),
                       p + "self_attn.v_proj.bias": (Hkv * D,)}
    return shapes


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; ValueError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape) from a file's header; no tensor is read.

    A truncated or corrupt file (safetensors checks that its header parses and that the
    offsets it lists cover the file exactly) is a ValueError naming the file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {name: (str(s.get_dtype()), tuple(s.get_shape())) for name, s in slices.items()}
    except SafetensorError as err:
        raise ValueError(f"{file}: not a whole safetensors file ({err})") from None


def _index(index: Path) -> dict[str, Path]:
    """Weight name -> shard, from model.safetensors.index.json; shards must be plain file
    names in the folder (an index cannot point outside it)."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no weight_map (an object of weight name -> file name)")
    files = {}
    for name, file in weight_map.items():
        if not (isinstance(file, str) and file.endswith(".safetensors")
                and Path(file).name == file and file not in (".", "..")):
            raise ValueError(f"{index}: {name} is mapped to {file!r}, not a .safetensors file "
                             f"name in the checkpoint's folder")
        files[name] = index.parent / file
    return files


def _weight_files(folder: Path) -> dict[str, Path]:
    """Weight name -> the safetensors file holding it (one file, or an index of shards)."""
    index, single = folder / WEIGHTS_INDEX, folder / "model.safetensors"
    if index.is_file():
        files = _index(index)
    elif single.is_file():
        files = dict.fromkeys(read_header(single), single)
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {', '.join(pickled)}: pickle, which kvlib never loads)" if pickled else ""
        raise FileNotFoundError(f"no model.safetensors or {WEIGHTS_INDEX} in {folder}{hint}")
    missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
    if missing:
        raise FileNotFoundError(f"{folder} lacks weight file(s) {', '.join(missing)} "
                                f"named in {WEIGHTS_INDEX}")
    return files


def check_checkpoint(folder: Path, cfg: ModelConfig) -> dict[str, Path]:
    """Every expected weight present, in the file that is said to hold it, with a float dtype
    and its shape; nothing unexpected; every file whole. Reads headers only."""
    files = _weight_files(folder)
    headers = {file: read_header(file) for file in sorted(set(files.values()))}
    absent = sorted(name for name, file in files.items() if name not in headers[file])
    if absent:
        raise ValueError(f"{folder / WEIGHTS_INDEX}: lists {len(absent)} weight(s) that their "
                         f"shard does not hold: {absent[0]} (in {files[absent[0]].name})"
                         f"{' ...' if len(absent) > 1 else ''}")
    expected = expected_shapes(cfg)
    # Tied checkpoints sometimes store lm_head anyway; it must then equal the embeddings' shape.
    extra = sorted(set(files) - set(expected) - {"lm_head.weight"})
    missing = sorted(set(expected) - set(files))
    if missing or extra:
        raise ValueError(f"{folder}: weights do not match config.json: missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}, unexpected {extra[:4]}"
                         f"{' ...' if len(extra) > 4 else ''}")
    for file, header in headers.items():  # in file order, then the file's own order
        for name, (dtype, shape) in header.items():
            if files.get(name) != file:
                continue
            want = expected.get(name, (cfg.vocab_size, cfg.d_model))
            if shape != want:
                raise ValueError(f"{file.name}: {name} has shape {shape}, config.json "
                                 f"implies {want}")
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"{file.name}: {name} has dtype {dtype}: kvlib loads float "
                                 f"weights ({', '.join(FLOAT_DTYPES)})")
    return files


def resolve(path_or_id: str | Path) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (config, safetensors, tokenizer)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_id)):
        raise FileNotFoundError(f"{path_or_id!r} is neither a folder nor a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{path_or_id!r} is not a folder, and huggingface_hub is not "
                                f"installed to download it") from None
    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=HUB_FILES))
    except Exception as err:  # offline, unknown repo, gated model, ...
        raise FileNotFoundError(f"{path_or_id!r} is not a folder, and downloading it from the "
                                f"hub failed: {type(err).__name__}: {err}") from err


def load_config(path_or_id: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint folder or hub id."""
    folder = resolve(path_or_id)
    if _is_deepseek_v3(folder):
        from kvlib import hf_deepseek

        return hf_deepseek.config_from_hf(json.loads((folder / "config.json").read_text()),
                                          name=Path(path_or_id).name)
    return _read_config(folder, name=Path(path_or_id).name)


def _read_config(folder: Path, name: str) -> ModelConfig:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    try:
        return config_from_hf(_read_json(config_file), name=name)
    except ValueError as err:
        message = str(err)
        raise ValueError(message if message.startswith(str(config_file))
                         else f"{config_file}: {message}") from None


def load_pretrained(path_or_id: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> TransformerLM:
    """A kvlib `TransformerLM` with a checkpoint's weights, in `dtype` on `device`, eval mode.

    The whole checkpoint is validated first (architecture, files, names, shapes); only then
    are tensors read, one at a time, converted and placed.
    """
    from safetensors import safe_open

    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    folder = resolve(path_or_id)
    if _is_deepseek_v3(folder):  # latent attention: its own names and shapes
        from kvlib import hf_deepseek

        return hf_deepseek.load(folder, dtype=dtype, device=device, name=Path(path_or_id).name)
    cfg = _read_config(folder, name=Path(path_or_id).name)
    files = check_checkpoint(folder, cfg)
    with torch.device("meta"):
        model = TransformerLM(cfg)  # shapes only: no memory, no random init
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if files.get(name) == file and not (cfg.tie_embeddings and name == "lm_head.weight"):
                    state[kvlib_name(name)] = f.get_tensor(name).to(device=device, dtype=dtype)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # one Parameter, as in training
    return model.eval()


# -- DeepSeek-V3 (multi-head latent attention): kvlib.hf_deepseek ------------------------------

def _is_deepseek_v3(folder: Path) -> bool:
    """Whether config.json names DeepSeek-V3, which `kvlib.hf_deepseek` loads."""
    config_file = folder / "config.json"
    try:
        return json.loads(config_file.read_text()).get("model_type") == "deepseek_v3"
    except (OSError, ValueError, AttributeError):
        return False  # no config, or not JSON: the Llama path says what is wrong


def load_tokenizer(path_or_id: str | Path) -> Any:
    """The checkpoint's tokenizer through transformers (ImportError if it is not installed)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("load_tokenizer needs transformers: pip install transformers") from None
    return AutoTokenizer.from_pretrained(resolve(path_or_id), trust_remote_code=False)
