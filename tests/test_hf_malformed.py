"""Malformed checkpoints: each is refused with a ValueError naming the file and what is wrong,
before any tensor is read (kvlib.hf). Every checkpoint here is built in a tmp folder, then
broken one way: a truncated or corrupt shard, an index that points at a shard without the
weight, or outside the folder, an index or config.json that is not JSON, or one that lacks a
field or gives it the wrong type, a weight of an integer dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvlib import hf as kvhf

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


@pytest.fixture(scope="module")
def hf_model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


@pytest.fixture
def sharded(hf_model, tmp_path) -> Path:
    """A checkpoint in several shards with an index."""
    hf_model.save_pretrained(tmp_path / "sharded", safe_serialization=True,
                             max_shard_size="20KB")
    assert (tmp_path / "sharded" / kvhf.WEIGHTS_INDEX).is_file()
    return tmp_path / "sharded"


@pytest.fixture
def single(hf_model, tmp_path) -> Path:
    """A checkpoint in one model.safetensors."""
    hf_model.save_pretrained(tmp_path / "single", safe_serialization=True)
    assert (tmp_path / "single" / "model.safetensors").is_file()
    return tmp_path / "single"


@pytest.fixture(autouse=True)
def headers_only(no_tensor_reads):
    """Every refusal here comes from headers alone (conftest's no_tensor_reads)."""


def refused(folder: Path, *patterns: str) -> str:
    """load_pretrained(folder) raises a ValueError whose message matches every pattern."""
    with pytest.raises(ValueError) as info:
        kvhf.load_pretrained(folder)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    return message


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# -- shards ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [1, 100, 4000], ids=["one-byte", "some-data", "into-header"])
def test_a_truncated_shard_is_named(sharded, cut):
    shard = shards(sharded)[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:max(len(data) - cut, 4)])
    refused(sharded, shard.name, "not a whole safetensors file")


def test_a_truncated_single_file_is_named(single):
    path = single / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    refused(single, "model.safetensors", "not a whole safetensors file")


@pytest.mark.parametrize("content", [b"", b"garbage" * 40, b"\x08" + b"\x00" * 7 + b"{not json"],
                         ids=["empty", "garbage", "bad-header"])
def test_a_corrupt_shard_is_named(sharded, content):
    shard = shards(sharded)[0]
    shard.write_bytes(content)
    refused(sharded, shard.name, "not a whole safetensors file")


def test_an_index_entry_that_its_shard_lacks_is_named(sharded):
    index = sharded / kvhf.WEIGHTS_INDEX
    weight_map = json.loads(index.read_text())["weight_map"]
    name = "model.layers.1.mlp.up_proj.weight"
    elsewhere = next(f for f in sorted(set(weight_map.values())) if f != weight_map[name])
    edit_json(index, weight_map={**weight_map, name: elsewhere})
    refused(sharded, kvhf.WEIGHTS_INDEX, name, elsewhere, "does not hold")


def test_an_index_entry_no_shard_has_is_named(sharded):
    index = sharded / kvhf.WEIGHTS_INDEX
    weight_map = json.loads(index.read_text())["weight_map"]
    ghost = "model.layers.0.mlp.ghost.weight"
    edit_json(index, weight_map={**weight_map, ghost: weight_map["model.norm.weight"]})
    refused(sharded, kvhf.WEIGHTS_INDEX, ghost)


@pytest.mark.parametrize("target", ["../model.safetensors", "/etc/passwd.safetensors",
                                    "sub/model.safetensors", "model.bin", 7],
                         ids=["parent", "absolute", "subfolder", "pickle", "not-a-string"])
def test_an_index_cannot_point_outside_the_folder(sharded, target):
    index = sharded / kvhf.WEIGHTS_INDEX
    weight_map = json.loads(index.read_text())["weight_map"]
    edit_json(index, weight_map={**weight_map, "model.norm.weight": target})
    refused(sharded, kvhf.WEIGHTS_INDEX, "model.norm.weight", "not a .safetensors file name")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"metadata": {}}',
                                  '{"weight_map": ["a"]}', '{"weight_map": {}}', "\udcff"],
                         ids=["not-json", "a-list", "no-weight-map", "map-is-a-list",
                              "empty-map", "not-utf8"])
def test_an_index_that_is_not_an_index_is_named(sharded, text):
    index = sharded / kvhf.WEIGHTS_INDEX
    if text == "\udcff":
        index.write_bytes(b"\xff\xfe{")
    else:
        index.write_text(text)
    refused(sharded, kvhf.WEIGHTS_INDEX)


def test_a_weight_of_an_integer_dtype_is_named(hf_model, single):
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
    safetensors_torch.save_file(state, single / "model.safetensors")
    refused(single, "model.safetensors", "model.norm.weight", "dtype I32")


# -- config.json -----------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["{not json", "[]", '"llama"', "null"],
                         ids=["not-json", "a-list", "a-string", "null"])
def test_a_config_that_is_not_a_json_object_is_named(single, text):
    (single / "config.json").write_text(text)
    refused(single, "config.json")


@pytest.mark.parametrize("field", kvhf.REQUIRED_FIELDS)
def test_a_missing_required_field_is_named(single, field):
    edit_json(single / "config.json", **{field: ...})
    refused(single, "config.json", field, "missing")


@pytest.mark.parametrize(("changes", "field"), [
    ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": 32.0}, "hidden_size"),
    ({"num_key_value_heads": False}, "num_key_value_heads"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}}, "rope_theta"),
    ({"rope_parameters": [10000.0]}, "rope_parameters"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"rope_scaling": "linear"}, "rope_scaling"),
    ({"quantization_config": "gptq"}, "quantization_config"),
    ({"architectures": "LlamaForCausalLM"}, "architectures"),
    ({"max_position_embeddings": -1}, "max_position_embeddings"),
], ids=lambda v: v if isinstance(v, str) else next(iter(v.values())).__class__.__name__)
def test_a_field_of_the_wrong_type_is_named(single, changes, field):
    edit_json(single / "config.json", **changes)
    refused(single, "config.json", field)


def test_mistral_layer_types_must_cover_every_layer(tmp_path):
    config = transformers.MistralConfig(**CONFIG, sliding_window=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformers.MistralForCausalLM(config).save_pretrained(tmp_path,
                                                                safe_serialization=True)
    edit_json(tmp_path / "config.json", layer_types=["sliding_attention"])  # 1 entry, 2 layers
    refused(tmp_path, "config.json", "layer_types")


def test_config_from_hf_names_the_field_without_a_file():
    with pytest.raises(ValueError, match="required field.*num_hidden_layers"):
        kvhf.config_from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
                             "intermediate_size": 8, "num_attention_heads": 2})
    with pytest.raises(ValueError, match="must be a JSON object"):
        kvhf.config_from_hf(["llama"])


def test_the_intact_checkpoints_still_load(sharded, single, monkeypatch):
    monkeypatch.undo()  # tensors may be read now
    a, b = kvhf.load_pretrained(sharded), kvhf.load_pretrained(single)
    tokens = torch.arange(8)[None]
    assert torch.equal(a(tokens), b(tokens))
