"""Chapters' measurements on the book's trained model: its real keys, quantized decoding.

Held-out text, the real queries, keys and values `kvlib.book_model` caches, and what
quantizing its cache costs it.

The held-out files are named in the model's training record and read from the running
interpreter's standard library (`code_corpus`); a file this Python lacks is skipped, and one
whose text differs from the training machine's is still a module the model never saw.

Legend: H query heads, Hkv KV heads, S tokens, D head dim, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvlib.attention import attention
from kvlib.cache.quant_memory import KVQuantConfig
from kvlib.cache.quantize import QuantScheme, fake_quantize
from kvlib.experiments import code_corpus
from kvlib.experiments.quantization import quantized_cache_for, relative_error
from kvlib.model import TransformerLM, apply_rotary, rotary_cos_sin


def heldout_texts(record: Mapping[str, Any], max_files: int | None = None) -> dict[str, str]:
    """name -> text of the record's held-out files that this Python has, in record order."""
    root = code_corpus.stdlib_root()
    names = [n for n in record["corpus"]["heldout"] if (root / n).is_file()]
    return {n: code_corpus.read_source(n, root) for n in names[:max_files]}


def longest_files(texts: Mapping[str, str], tokenizer, min_tokens: int) -> dict[str, list[int]]:
    """name -> token ids (no framing) of the files with at least `min_tokens` tokens."""
    ids = {n: tokenizer.encode(t).ids for n, t in texts.items()}
    return {n: i for n, i in ids.items() if len(i) >= min_tokens}


@dataclass(frozen=True)
class LayerQKV:
    """One layer's rotated queries and cached keys and values over a text."""

    q: torch.Tensor  # (H, S, D), after the rotary embedding, as attention reads them
    k: torch.Tensor  # (Hkv, S, D), as the cache holds them (rotated)
    v: torch.Tensor  # (Hkv, S, D)


@torch.no_grad()
def capture_qkv(model: TransformerLM, ids: Sequence[int]) -> list[LayerQKV]:
    """Run `ids` (one sequence) through the model with a flat cache; every layer's queries
    (caught on their way out of q_proj and rotated as the model rotates them), keys, values."""
    cfg = model.config
    S = len(ids)
    device = model.embed.weight.device
    caught: dict[int, torch.Tensor] = {}
    hooks = [layer.attn.q_proj.register_forward_hook(
        lambda _m, _in, out, i=i: caught.__setitem__(i, out.detach()))
        for i, layer in enumerate(model.layers)]
    try:
        cache = model.new_cache(1, S)
        model.prefill(torch.tensor([list(ids)], device=device), cache)
    finally:
        for h in hooks:
            h.remove()
    cos, sin = rotary_cos_sin(torch.arange(S, device=device), cfg.head_dim, cfg.rope_theta,
                              caught[0].dtype)  # (S, D)
    out = []
    for i in range(cfg.num_layers):
        q = caught[i].view(S, cfg.num_heads, cfg.head_dim)  # (S, H, D)
        q = apply_rotary(q, cos[:, None], sin[:, None]).transpose(0, 1)  # (H, S, D)
        out.append(LayerQKV(q.float(), cache.keys(i)[0, :, :S].float(),
                            cache.values(i)[0, :, :S].float()))  # (Hkv, S, D) each
    return out


def channel_magnitudes(x: torch.Tensor) -> torch.Tensor:
    """Mean |x| of each channel over the tokens, divided by the median channel's: (Hkv, D)
    for x (Hkv, S, D). An outlier channel stands out as a ratio far above 1."""
    mag = x.abs().mean(dim=1)  # (Hkv, D)
    return mag / mag.median(dim=-1, keepdim=True).values  # (Hkv, D)


def attention_error(layer: LayerQKV, k_scheme: QuantScheme | None,
                    v_scheme: QuantScheme | None, num_queries: int = 64) -> float:
    """Relative error of the attention output of the last `num_queries` real queries (every
    head, causal) when keys and values are round-tripped through their schemes."""
    k, v = layer.k, layer.v
    S = k.shape[1]
    T = min(num_queries, S)
    kq = k if k_scheme is None else fake_quantize(k, k_scheme)
    vq = v if v_scheme is None else fake_quantize(v, v_scheme)
    q = layer.q[None, :, S - T:]  # (1, H, T, D)
    pos = torch.arange(S - T, S)[None]  # (1, T)
    lens = torch.tensor([S])
    exact = attention(q, k[None], v[None], pos, lens)  # (1, H, T, D)
    return relative_error(attention(q, kq[None], vq[None], pos, lens), exact)


def scheme_errors(layers: Sequence[LayerQKV], scheme: QuantScheme) -> tuple[float, float, float]:
    """(keys, values, attention output) relative errors of `scheme` on K and V, each the mean
    over the layers."""
    ek = sum(relative_error(fake_quantize(x.k, scheme), x.k) for x in layers) / len(layers)
    ev = sum(relative_error(fake_quantize(x.v, scheme), x.v) for x in layers) / len(layers)
    ea = sum(attention_error(x, scheme, scheme) for x in layers) / len(layers)
    return ek, ev, ea


@dataclass(frozen=True)
class HeldoutDecode:
    """Decode steps over held-out text through one cache, scored on the true next tokens."""

    bits_per_byte: float
    top1: float  # the true next token was the model's top-1
    agreement: float  # top-1 equal to the unquantized cache's top-1 (1.0 for the reference)
    kl: float  # mean KL(unquantized || this cache), nats
    logits: torch.Tensor  # (steps, V) float32: every scored step, all texts


@torch.no_grad()
def decode_heldout(model: TransformerLM, texts: Sequence[Sequence[int]], prompt_len: int,
                   quant: KVQuantConfig | None, tokenizer,
                   reference: HeldoutDecode | None = None) -> HeldoutDecode:
    """Prefill each text's first `prompt_len` tokens, then feed the rest one token per decode
    step, through a quantized cache (`quant`) or a flat one (None); score each step's logits
    on the text's true next token, and against `reference`'s logits if given.

    The texts (of one length) go through together, one sequence each in a batch, so a step
    costs about what one text's would."""
    lengths = {len(ids) for ids in texts}
    if len(lengths) != 1 or not 0 < prompt_len < min(lengths):
        raise ValueError(f"decode_heldout needs texts of one length, longer than prompt_len "
                         f"{prompt_len}; got lengths {sorted(lengths)}")
    device = model.embed.weight.device
    x = torch.tensor([list(ids) for ids in texts], device=device)  # (B, S)
    B, S = x.shape
    cache = (model.new_cache(B, S) if quant is None
             else quantized_cache_for(model, quant, S, batch_size=B))
    steps = [model.prefill(x[:, :prompt_len], cache)]  # (B, V) each
    for i in range(prompt_len, S - 1):
        steps.append(model.decode_step(x[:, i], cache))
    logits_all = torch.stack(steps, dim=1).float().cpu().flatten(0, 1)  # (B * (S - P), V)
    target = x[:, prompt_len:].cpu().flatten()  # (B * (S - P),), text by text
    num_bytes = sum(len(tokenizer.decode(list(ids[prompt_len:])).encode()) for ids in texts)
    logp = logits_all.log_softmax(-1)  # (n, V)
    nats = -logp.gather(1, target[:, None]).sum()
    top1 = float((logits_all.argmax(-1) == target).float().mean())
    if reference is None:
        agreement, kl = 1.0, 0.0
    else:
        ref_logp = reference.logits.log_softmax(-1)  # (n, V)
        agreement = float((logits_all.argmax(-1) == reference.logits.argmax(-1)).float().mean())
        kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
    return HeldoutDecode(float(nats) / math.log(2) / num_bytes, top1, agreement, kl, logits_all)
