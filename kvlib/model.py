"""A Llama-style decoder, read top to bottom: norm, rotary embeddings, attention, MLP, block, model.

The architecture is the Llama family's (pre-norm RMSNorm, rotary position embeddings on the
rotate-half convention, grouped-query attention, SwiGLU MLP, no biases), so real checkpoints
of that family load into it. The cache is an argument, never hidden state: pass `None` to
recompute everything, or any `KVCache` (flat, paged, quantized) to reuse past keys and values.

Legend: B batch, T new tokens, S keys attended to, H query heads, Hkv KV heads, D head dim,
d model width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from kvlib.attention import attention
from kvlib.cache.contract import KVCache
from kvlib.cache.flat import FlatKVCache
from kvlib.config import CacheConfig, Layout, ModelConfig
from kvlib.sampling import SamplingParams, sample_next


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, T, D) for absolute positions (B, T); frequencies in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float()
                               / head_dim)  # (D/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) by each position's angle; x (B, heads, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, heads, T, D/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class MultiHeadAttention(nn.Module):
    """Grouped-query attention that writes its new keys and values to a cache, if given."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        d, H, Hkv, D = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.qkv_bias  # Qwen2 has biases on q, k, v (never on o)
        self.q_proj = nn.Linear(d, H * D, bias=bias)
        self.k_proj = nn.Linear(d, Hkv * D, bias=bias)
        self.v_proj = nn.Linear(d, Hkv * D, bias=bias)
        self.o_proj = nn.Linear(H * D, d, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                seq_ids: Sequence[int]) -> torch.Tensor:
        B, T, _ = x.shape
        cfg = self.config
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        cos, sin = rotary_cos_sin(positions, D, cfg.rope_theta, q.dtype)  # (B, 1, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, seq_ids, k, v)  # (B, Hkv, S, D), past + new
        kv_lens = positions[:, -1] + 1  # (B,) keys that exist: everything up to the last query
        out = attention(q, k, v, positions, kv_lens)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))  # (B, T, d)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, d)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = MultiHeadAttention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                seq_ids: Sequence[int]) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, cache, seq_ids)
        return x + self.mlp(self.mlp_norm(x))  # (B, T, d)


@dataclass(frozen=True)
class Generation:
    """What `generate` returns: the new tokens and the logits each was chosen from."""

    tokens: torch.Tensor  # (B, N) new token ids
    logits: torch.Tensor  # (B, N, V) float32 logits of the step that chose each token


class TransformerLM(nn.Module):
    """Token embedding, `num_layers` blocks, final norm, and the language-model head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(_init_weights)

    def new_cache(self, batch_size: int, max_seq_len: int,
                  layout: Layout = Layout.SEQ_MAJOR) -> FlatKVCache:
        """An empty flat cache with this model's shape, dtype and device."""
        weight = self.embed.weight
        return FlatKVCache(CacheConfig.for_model(
            self.config, max_batch_size=batch_size, max_seq_len=max_seq_len,
            dtype=weight.dtype, device=weight.device, layout=layout))

    def hidden_states(self, tokens: torch.Tensor, cache: KVCache | None = None,
                      seq_ids: Sequence[int] | None = None) -> torch.Tensor:
        """(B, T) new tokens -> (B, T, d) final hidden states.

        Without a cache, the tokens are a whole sequence starting at position 0. With one,
        they continue each sequence after its committed tokens, and are committed after.
        """
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be integer ids (B, T), got {tuple(tokens.shape)} "
                             f"of {tokens.dtype}")
        B, T = tokens.shape
        seq_ids = list(range(B)) if seq_ids is None else list(seq_ids)
        if len(seq_ids) != B:
            raise ValueError(f"{len(seq_ids)} seq_ids for a batch of {B} rows")
        start = torch.zeros(B, dtype=torch.int64) if cache is None else cache.lengths(seq_ids)
        limit = self.config.max_seq_len
        if int(start.max()) + T > limit:
            raise ValueError(f"positions up to {int(start.max()) + T - 1} exceed the model's "
                             f"max_seq_len {limit}")
        positions = start.to(tokens.device)[:, None] + torch.arange(T, device=tokens.device)
        x = self.embed(tokens)  # (B, T, d)
        for block in self.layers:
            x = block(x, positions, cache, seq_ids)
        if cache is not None:
            cache.advance(seq_ids, T)
        return self.norm(x)  # (B, T, d)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                seq_ids: Sequence[int] | None = None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, V) logits for every position."""
        return self.lm_head(self.hidden_states(tokens, cache, seq_ids))

    def next_token_logits(self, tokens: torch.Tensor, cache: KVCache | None = None,
                          seq_ids: Sequence[int] | None = None) -> torch.Tensor:
        """(B, T) tokens -> (B, V) float32 logits of the last position only.

        Prefill is this call with the prompt; a decode step is this call with T = 1.
        """
        return self.lm_head(self.hidden_states(tokens, cache, seq_ids)[:, -1]).float()

    def prefill(self, prompt: torch.Tensor, cache: KVCache,
                seq_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Store the prompt's (B, P) keys and values in `cache`; (B, V) logits of its end."""
        return self.next_token_logits(prompt, cache, seq_ids)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache,
                    seq_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Feed one new token per sequence, (B,), through the cache; (B, V) next logits."""
        if tokens.dim() != 1:
            raise ValueError(f"decode_step takes one token per sequence (B,), got "
                             f"{tuple(tokens.shape)}")
        return self.next_token_logits(tokens[:, None], cache, seq_ids)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *,
                 cache: KVCache | None = None, sampling: SamplingParams = SamplingParams(),
                 seq_ids: Sequence[int] | None = None) -> Generation:
        """Continue each prompt row by `max_new_tokens` tokens.

        With `cache=None` every step runs the whole sequence so far through the model (the
        quadratic way); with a cache, the prompt is prefilled once and each step feeds only
        the newest token. Both give the same tokens: the chapter on incremental decoding
        checks it. The cache must hold nothing yet for `seq_ids` (default: 0..B-1).
        """
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be (B, P) token ids with P >= 1, got "
                             f"{tuple(prompt.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        longest = prompt.shape[1] + max_new_tokens - 1  # the last new token is never fed back
        if longest > self.config.max_seq_len:
            raise ValueError(f"a {prompt.shape[1]}-token prompt plus {max_new_tokens} new tokens "
                             f"needs {longest} positions; the model has {self.config.max_seq_len}")
        seq_ids = list(range(prompt.shape[0])) if seq_ids is None else list(seq_ids)
        if cache is not None and bool(cache.lengths(seq_ids).any()):
            raise ValueError(f"the cache already holds tokens for seq_ids {seq_ids} "
                             f"(lengths {cache.lengths(seq_ids).tolist()}); release them first")
        try:
            return self._generate(prompt, max_new_tokens, cache, sampling, seq_ids)
        except BaseException:
            # NOTE: the sequences were empty before; emptying them again undoes a partial run
            # (e.g. a cache too small for the whole generation), so no half-written cache stays.
            if cache is not None:
                cache.release(seq_ids)
            raise

    def _generate(self, prompt: torch.Tensor, max_new_tokens: int, cache: KVCache | None,
                  sampling: SamplingParams, seq_ids: list[int]) -> Generation:
        generator = sampling.generator(prompt.device)
        tokens, all_logits = prompt, []
        for step in range(max_new_tokens):
            if cache is None:
                logits = self.next_token_logits(tokens)  # (B, V), recomputes all positions
            elif step == 0:
                logits = self.prefill(prompt, cache, seq_ids)  # (B, V)
            else:
                logits = self.decode_step(tokens[:, -1], cache, seq_ids)  # (B, V)
            next_token = sample_next(logits, sampling, generator)  # (B,)
            all_logits.append(logits)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)  # (B, P + step + 1)
        new = tokens[:, prompt.shape[1]:]  # (B, N)
        return Generation(tokens=new, logits=torch.stack(all_logits, dim=1))  # (B, N, V)


def _init_weights(module: nn.Module) -> None:
    """GPT-2-style init: small normal weights, so a random model gives varied logits."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
