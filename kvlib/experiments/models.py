"""Chapter 8's experiments: a checkpoint in kvlib beside transformers, on every cache kind.

On Colab the chapter loads SmolLM2-135M from the hub; offline it makes a small random-weight
checkpoint with transformers (`random_checkpoint`), so that the same cells run everywhere.
transformers is needed here (it is the reference), not by the rest of kvlib.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from kvlib.cache.paged import PagedKVCache
from kvlib.cache.ring import RingKVCache
from kvlib.config import CacheConfig, Layout
from kvlib.contract import KVCache
from kvlib.model import TransformerLM

# SmolLM2-135M's shape, shrunk: its head_dim (64), its 3:1 query-to-KV-head ratio, tied
# embeddings and rope_theta; fewer layers, heads and vocabulary so it is made in a second.
SMALL_SMOLLM2 = dict(vocab_size=1024, hidden_size=192, intermediate_size=512,
                     num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1,
                     head_dim=64, rope_theta=100_000.0, rms_norm_eps=1e-5,
                     max_position_embeddings=512, tie_word_embeddings=True)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off (they would be saved as widgets in the notebook),
    restored after."""
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def random_checkpoint(folder: str | Path, family: str = "llama", seed: int = 0,
                      embed_scale: float = 0.3, **overrides) -> Path:
    """Save a random-weight transformers model (safetensors) to `folder`; return the folder.

    `family` is "llama", "mistral" or "qwen2"; `overrides` change `SMALL_SMOLLM2`'s fields.
    Weights are drawn at unit scale (not the 0.02 init), so logits vary by whole units and
    generated text is not one token repeated.
    """
    import transformers

    names = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
             "mistral": ("MistralConfig", "MistralForCausalLM"),
             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
    if family not in names:
        raise ValueError(f"family must be one of {sorted(names)}, got {family!r}")
    config_cls, model_cls = (getattr(transformers, n) for n in names[family])
    config = config_cls(**{**SMALL_SMOLLM2, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(0.5 + torch.rand(p.shape, generator=gen))
                elif name.endswith("bias"):
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
                elif "embed" in name:
                    p.copy_(embed_scale * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / math.sqrt(p.shape[1]))
    with _no_progress_bars():
        model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def reference_model(folder: str | Path, device: torch.device | str = "cpu"):
    """The same checkpoint through transformers (safetensors only, no remote code), fp32."""
    import transformers

    with _no_progress_bars():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, use_safetensors=True, trust_remote_code=False)
    model = model.to(device=device, dtype=torch.float32)  # any transformers version's default
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.48
        model.set_attn_implementation("eager")
    # NOTE: no stopping at end-of-text, so that both generate exactly the tokens asked for.
    model.generation_config.eos_token_id = None
    return model.eval()


def cache_kinds(model: TransformerLM, batch_size: int, max_seq_len: int,
                max_query_len: int) -> dict[str, KVCache]:
    """One empty cache of every kind kvlib has, sized for `batch_size` x `max_seq_len`.

    The ring cache keeps `max_query_len` - 1 keys beyond each window (a prompt is fed in one
    step of that many tokens); on a model without windows it keeps everything, as flat does.
    The paged cache has a block table per group of layers with the same window, and frees
    the blocks each window has passed.
    """
    caches: dict[str, KVCache] = {
        f"flat, {layout.value}": model.new_cache(batch_size, max_seq_len, layout)
        for layout in Layout}
    weight = model.embed.weight
    config = CacheConfig.for_model(model.config, max_batch_size=batch_size,
                                   max_seq_len=max_seq_len, dtype=weight.dtype,
                                   device=weight.device)
    caches["ring (sliding windows)"] = RingKVCache(config, max_query_len)
    caches["paged"] = PagedKVCache(
        config, num_blocks=batch_size * -(-max_seq_len // config.block_size))
    return caches


@dataclass(frozen=True)
class Agreement:
    """kvlib against transformers on one prompt."""

    max_logit_diff: float  # over every position of the prompt, fp32
    logit_scale: float  # the logits' standard deviation, for scale
    reference_tokens: list[int]  # transformers' greedy continuation
    tokens: dict[str, list[int]]  # kvlib's, per cache kind

    @property
    def all_match(self) -> bool:
        return all(t == self.reference_tokens for t in self.tokens.values())


@torch.no_grad()
def compare_with_transformers(model: TransformerLM, reference, prompt: torch.Tensor,
                              new_tokens: int) -> Agreement:
    """Logits over `prompt` (1, P) and greedy continuations, kvlib (each cache) vs reference."""
    P = prompt.shape[1]
    prompt = prompt.to(model.embed.weight.device)
    ref_prompt = prompt.to(reference.device)
    expected = reference(ref_prompt).logits.float().cpu()  # (1, P, V)
    diff = float((model(prompt).float().cpu() - expected).abs().max())
    ref = reference.generate(ref_prompt, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)[0, P:].tolist()
    caches = cache_kinds(model, 1, P + new_tokens, max_query_len=P)
    tokens = {name: model.generate(prompt, new_tokens, cache=cache).tokens[0].tolist()
              for name, cache in caches.items()}
    return Agreement(diff, float(expected.std()), ref, tokens)
