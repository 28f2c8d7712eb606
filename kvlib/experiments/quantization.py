"""Measurements of quantized KV caches that chapter 5 and `bench/quantized.py` share.

Keys of real models have a few *outlier channels*: the same channels are large in every
token. `outlier_keys` makes such keys (and plain values) with a seeded generator, so that the
error of a scheme on them can be measured without a checkpoint. `next_token_agreement` runs
a random-weight model through a quantized cache and compares its next-token distribution with
the unquantized cache's, step by step. `time_quantized_attention` times one layer's read +
decode attention, quantized against flat, in the same process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlib.attention import attention
from kvlib.backends import attend
from kvlib.bench import Timing, measure
from kvlib.cache.flat import FlatKVCache
from kvlib.cache.quant_memory import KVQuantConfig
from kvlib.cache.quantize import QuantScheme, fake_quantize
from kvlib.cache.quantized import QuantizedKVCache
from kvlib.config import CacheConfig, ModelConfig
from kvlib.contract import append
from kvlib.model import TransformerLM
from kvlib.sampling import SamplingParams

# A small random-weight model: quick enough for 256 steps per scheme on a 2-core CPU.
# Head dim 32: llama.cpp's groups of 32 channels are one scale per token here.
SMALL_CONFIG = ModelConfig(vocab_size=512, d_model=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_seq_len=512, name="kvlib-small")


def outlier_keys(num_tokens: int, head_dim: int = 128, num_kv_heads: int = 1, *,
                 num_outliers: int = 4, strength: float = 10.0, seed: int = 0,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys with `num_outliers` channels `strength` times larger than the rest, plain values,
    and one query per head: k, v (Hkv, S, D), q (Hkv, 1, D), float32."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_kv_heads, num_tokens, head_dim)
    k = torch.randn(shape, generator=gen)  # (Hkv, S, D)
    channels = torch.randperm(head_dim, generator=gen)[:num_outliers]
    k[..., channels] *= strength  # the same channels in every token
    v = torch.randn(shape, generator=gen)  # (Hkv, S, D)
    q = torch.randn(num_kv_heads, 1, head_dim, generator=gen)  # (Hkv, 1, D)
    return k, v, q


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| over all elements."""
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


def attention_error(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor,
                    k_scheme: QuantScheme | None, v_scheme: QuantScheme | None) -> float:
    """Relative error of one decode step's attention output when K and V are round-tripped
    through their schemes (None: kept exact). k, v (Hkv, S, D), q (Hkv, 1, D)."""
    S = k.shape[1]
    kq = k if k_scheme is None else fake_quantize(k, k_scheme)
    vq = v if v_scheme is None else fake_quantize(v, v_scheme)
    pos = torch.full((1, 1), S - 1)
    lens = torch.tensor([S])
    exact = attention(q[None], k[None], v[None], pos, lens)  # (1, Hkv, 1, D)
    approx = attention(q[None], kq[None], vq[None], pos, lens)
    return relative_error(approx, exact)


def ordinary_channel_errors(schemes: dict[str, QuantScheme], strengths: tuple[float, ...],
                            num_tokens: int = 256, head_dim: int = 128,
                            ) -> dict[str, list[float]]:
    """Relative error on the *ordinary* channels of `outlier_keys` (1 head), per scheme and
    outlier strength: what a scale set by the outliers does to everything else."""
    errors: dict[str, list[float]] = {name: [] for name in schemes}
    for strength in strengths:
        k, _, _ = outlier_keys(num_tokens, head_dim, 1, strength=float(strength))  # (1, S, D)
        ordinary = k[0].abs().mean(0) < 3  # (D,): the channels that were not scaled up
        for name, scheme in schemes.items():
            errors[name].append(relative_error(fake_quantize(k, scheme)[..., ordinary],
                                               k[..., ordinary]))
    return errors


@torch.no_grad()
def calibration_errors(quant: KVQuantConfig, first: torch.Tensor, later: torch.Tensor,
                       ) -> tuple[float, float]:
    """Keys (and the same values) written to a one-layer `QuantizedKVCache` in two writes,
    `first` (Hkv, T1, D) and then `later` (Hkv, T2, D): the relative error of each, read back.

    A per-tensor scheme calibrates its scale on a layer's first write and keeps it, so later
    values beyond what its `max_code` headroom allows are clipped.
    """
    Hkv, T1, D = first.shape
    config = CacheConfig(num_layers=1, num_kv_heads=Hkv, head_dim=D, max_batch_size=1,
                         max_seq_len=T1 + later.shape[1] + 1)
    cache = QuantizedKVCache(config, quant)
    for keys in (first, later):
        append(cache, [0], keys[None, None], keys[None, None])  # (L, B, Hkv, T, D)
    batch = cache.begin([0], [1])  # an open step: read() hands back everything written
    cache.write(0, batch, torch.zeros(1, Hkv, D), torch.zeros(1, Hkv, D))  # (N, Hkv, D)
    stored = cache.read(0, batch).k[0]  # (Hkv, T1 + T2 + 1, D)
    cache.abort(batch)
    return (relative_error(stored[:, :T1], first),
            relative_error(stored[:, T1:T1 + later.shape[1]], later))


@dataclass(frozen=True)
class Agreement:
    """How a quantized cache changes the model's next-token distribution, per step."""

    top1: float  # fraction of steps whose most likely token is the unquantized one's
    kl: float  # mean KL(unquantized || quantized) in nats
    kl_by_step: tuple[float, ...]
    flip_margins: tuple[float, ...]  # reference's top-1 minus top-2 logit where they differ


@torch.no_grad()
def reference_run(model: TransformerLM, steps: int = 256, prompt_len: int = 16,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt and `steps` tokens *sampled* (temperature 1, seeded) from the unquantized
    model, and the logits of each step: tokens (1, prompt_len + steps), logits (steps, V).

    NOTE: sampled, not greedy: a random-weight model's greedy text falls into a loop of one
    near-tie repeated, so greedy steps would not be independent trials."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen)
    cache = model.new_cache(1, prompt_len + steps)
    out = model.generate(prompt, steps, cache=cache,
                         sampling=SamplingParams(temperature=1.0, seed=seed))
    return torch.cat([prompt, out.tokens], dim=1), out.logits[0]


def quantized_cache_for(model: TransformerLM, quant: KVQuantConfig, max_seq_len: int,
                        batch_size: int = 1) -> QuantizedKVCache:
    weight = model.embed.weight
    config = CacheConfig.for_model(model.config, max_batch_size=batch_size,
                                   max_seq_len=max_seq_len, dtype=weight.dtype,
                                   device=weight.device)
    return QuantizedKVCache(config, quant)


@torch.no_grad()
def next_token_agreement(model: TransformerLM, quant: KVQuantConfig,
                         reference: tuple[torch.Tensor, torch.Tensor],
                         prompt_len: int = 16) -> Agreement:
    """Feed the reference tokens through a quantized cache (prefill the prompt, then one
    token a step) and compare each step's next-token distribution with the reference's."""
    tokens, ref_logits = reference
    steps = ref_logits.shape[0]
    cache = quantized_cache_for(model, quant, tokens.shape[1])
    logits = [model.prefill(tokens[:, :prompt_len], cache)]
    for i in range(prompt_len, prompt_len + steps - 1):
        logits.append(model.decode_step(tokens[:, i], cache))
    got = torch.cat(logits).float()  # (steps, V)
    ref_logp, logp = ref_logits.float().log_softmax(-1), got.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (steps,)
    same = got.argmax(-1) == ref_logits.argmax(-1)  # (steps,)
    top2 = ref_logits.float().topk(2, dim=-1).values  # (steps, 2)
    margins = (top2[:, 0] - top2[:, 1])[~same]
    return Agreement(float(same.float().mean()), float(kl.mean()), tuple(kl.tolist()),
                     tuple(margins.tolist()))


def _decode_step_over(quant: KVQuantConfig | None, k: torch.Tensor, v: torch.Tensor):
    """A one-layer cache holding k, v (Hkv, S, D) but the last token, and an open step that
    has written the last: (cache, batch). `quant=None`: a flat cache."""
    Hkv, S, D = k.shape
    config = CacheConfig(num_layers=1, num_kv_heads=Hkv, head_dim=D, max_batch_size=1,
                         max_seq_len=max(S, 0 if quant is None else quant.residual))
    cache = FlatKVCache(config) if quant is None else QuantizedKVCache(config, quant)
    if S > 1:
        append(cache, [0], k[None, None, :, :-1], v[None, None, :, :-1])  # (L, B, Hkv, S-1, D)
    batch = cache.begin([0], [1])
    cache.write(0, batch, k[:, -1][None], v[:, -1][None])  # (N=1, Hkv, D)
    return cache, batch


@torch.no_grad()
def cache_attention_error(quant: KVQuantConfig, k: torch.Tensor, v: torch.Tensor,
                          q: torch.Tensor) -> float:
    """Relative error of a decode step's attention output read through a quantized cache
    (residual and all) against exact K and V. k, v (Hkv, S, D); q (H, D), H a multiple of Hkv."""
    outs = []
    for which in (None, quant):
        cache, batch = _decode_step_over(which, k, v)
        outs.append(attend(q[None], cache.read(0, batch), batch, "sdpa"))  # (1, H, D)
        cache.abort(batch)
    return relative_error(outs[1], outs[0])


@torch.no_grad()
def time_quantized_attention(quant: KVQuantConfig | None, context_len: int, *,
                             num_kv_heads: int = 8, head_dim: int = 128, num_heads: int = 32,
                             warmup: int = 2, repeats: int = 7, seed: int = 0) -> Timing:
    """One layer's decode step over `context_len` cached tokens: read the layer from the
    cache (dequantizing, for a quantized one) and attend. `quant=None` times a flat cache."""
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, num_kv_heads, context_len, head_dim, generator=gen)
    cache, batch = _decode_step_over(quant, k, v)
    q = torch.randn(1, num_heads, head_dim, generator=gen)  # (N, H, D)
    try:
        return measure(lambda: attend(q, cache.read(0, batch), batch, "sdpa"),
                       warmup=warmup, repeats=repeats)
    finally:
        cache.abort(batch)
