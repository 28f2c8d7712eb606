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

from kvlib.backends import attend
from kvlib.cache.flat import FlatKVCache
from kvlib.cache.groups import check_cache_matches
from kvlib.config import CacheConfig, Layout, ModelConfig
from kvlib.contract import DenseKV, KVCache, StepBatch, check_query_lens
from kvlib.sampling import SamplingBatch, SamplingParams, sample


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
    """cos and sin (..., D) for absolute positions of any shape (...); frequencies in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float()
                               / head_dim)  # (D/2,)
    angles = positions.float()[..., None] * inv_freq  # (..., D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) by each position's angle; cos, sin broadcast to x."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., D/2) each
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

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: KVCache | None,
                backend: str) -> torch.Tensor:
        """x (N, d) packed tokens of `batch` -> (N, d). With a cache, the new keys and values
        are written to it and attention reads the layer back from it, in place; the view
        carries the layer's window and sinks (the cache was checked against this model)."""
        N = x.shape[0]
        cfg = self.config
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = self.q_proj(x).view(N, H, D)  # (N, H, D)
        k = self.k_proj(x).view(N, Hkv, D)  # (N, Hkv, D)
        v = self.v_proj(x).view(N, Hkv, D)  # (N, Hkv, D)
        cos, sin = rotary_cos_sin(batch.positions, D, cfg.rope_theta, q.dtype)  # (N, D)
        q, k = apply_rotary(q, cos[:, None], sin[:, None]), apply_rotary(k, cos[:, None],
                                                                       sin[:, None])
        if cache is None:  # keys and values are the new tokens themselves, (B, Hkv, T, D)
            kv = _dense_from_packed(k, v, batch, cfg.window(self.layer_idx), cfg.sink_tokens)
        else:
            cache.write(self.layer_idx, batch, k, v)
            kv = cache.read(self.layer_idx, batch)  # past + new, read where it lies
        out = attend(q, kv, batch, backend)  # (N, H, D)
        return self.o_proj(out.reshape(N, H * D))  # (N, d)


def _dense_from_packed(k: torch.Tensor, v: torch.Tensor, batch: StepBatch,
                       window: int | None, sink_tokens: int) -> DenseKV:
    """Without a cache, keys and values are the new tokens themselves: (N, Hkv, D) packed
    -> (B, Hkv, T_max, D), zero-padded past each sequence's length."""
    B, T = batch.num_seqs, max(batch.query_lens)
    if batch.uniform_len is not None:
        kd = k.view(B, T, *k.shape[1:]).transpose(1, 2)  # (B, Hkv, T, D)
        vd = v.view(B, T, *v.shape[1:]).transpose(1, 2)
    else:
        rows = batch.token_rows.to(k.device)  # (N,)
        kd = k.new_zeros(B, T, *k.shape[1:])  # (B, T, Hkv, D)
        vd = v.new_zeros(B, T, *v.shape[1:])
        kd[rows, batch.positions], vd[rows, batch.positions] = k, v
        kd, vd = kd.transpose(1, 2), vd.transpose(1, 2)  # (B, Hkv, T, D)
    lens = torch.tensor(batch.query_lens, device=k.device)  # (B,)
    return DenseKV(kd, vd, lens, window, sink_tokens)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (N, d)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); the attention is
    multi-head latent attention (`kvlib.mla`) when the config has a `kv_lora_rank`."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        if config.is_latent:  # DeepSeek's latent attention; kvlib.mla builds on this module
            from kvlib.mla import MultiHeadLatentAttention

            self.attn = MultiHeadLatentAttention(config, layer_idx)
        else:
            self.attn = MultiHeadAttention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: KVCache | None,
                backend: str) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), batch, cache, backend)
        return x + self.mlp(self.mlp_norm(x))  # (N, d)


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
        # How attention runs: a name in kvlib.backends.BACKENDS ("fast", "reference",
        # "sdpa", ...). One switch for the whole model; `attention` checks it on use. The
        # default is the fastest exact path for the device (kernels that read blocks in
        # place, SDPA otherwise); chapters that compare paths name theirs.
        self.attention = "fast"

    def cache_config(self, max_batch_size: int, max_seq_len: int, **kwargs) -> CacheConfig:
        """A CacheConfig with this model's layers, KV heads, head dim, dtype and device,
        for any cache kind: `PagedKVCache(model.cache_config(1, 4096), num_blocks=256)`."""
        weight = self.embed.weight
        kwargs = {"dtype": weight.dtype, "device": weight.device, **kwargs}
        return CacheConfig.for_model(self.config, max_batch_size=max_batch_size,
                                     max_seq_len=max_seq_len, **kwargs)

    def new_cache(self, batch_size: int, max_seq_len: int,
                  layout: Layout = Layout.SEQ_MAJOR) -> FlatKVCache:
        """An empty flat cache with this model's shape, dtype and device (other kinds take
        `cache_config`)."""
        return FlatKVCache(self.cache_config(batch_size, max_seq_len, layout=layout))

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
        x = self.packed_hidden_states(tokens.reshape(-1), [T] * B, cache, seq_ids)  # (N, d)
        return x.view(B, T, -1)  # (B, T, d)

    def packed_hidden_states(self, token_ids: torch.Tensor, query_lens: Sequence[int],
                             cache: KVCache | None = None,
                             seq_ids: Sequence[int] | None = None) -> torch.Tensor:
        """(N,) new tokens of B sequences, packed, `query_lens[b]` each -> (N, d).

        Sequences may feed different numbers of tokens (some a chunk of a prompt, some one
        decode token): there is no padding, and each sequence attends only to its own keys.
        Without a cache every sequence starts at position 0.
        """
        if token_ids.dim() != 1 or token_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token_ids must be packed integer ids (N,), got "
                             f"{tuple(token_ids.shape)} of {token_ids.dtype}")
        self._check_vocab(token_ids)
        lens = check_query_lens(query_lens, len(query_lens))
        if not lens:
            raise ValueError("query_lens is empty: a step feeds at least one sequence")
        if sum(lens) != token_ids.shape[0]:
            raise ValueError(f"query_lens {lens} sum to {sum(lens)}, but {token_ids.shape[0]} "
                             f"tokens were given")
        seq_ids = list(range(len(lens))) if seq_ids is None else list(seq_ids)
        if len(seq_ids) != len(lens):
            raise ValueError(f"{len(seq_ids)} seq_ids for {len(lens)} query_lens")
        if cache is None:
            if max(lens) > self.config.max_seq_len:
                raise ValueError(f"positions up to {max(lens) - 1} exceed the model's "
                                 f"max_seq_len {self.config.max_seq_len}")
            batch = StepBatch.make(seq_ids, [0] * len(lens), lens,
                                   torch.arange(sum(lens), device=token_ids.device)[None],
                                   step=-1)
            return self.forward_batch(token_ids, batch, None)
        self.check_cache(cache)
        batch = cache.begin(seq_ids, lens, token_ids)
        try:
            if max(batch.context_lens) > self.config.max_seq_len:
                raise ValueError(f"positions up to {max(batch.context_lens) - 1} exceed the "
                                 f"model's max_seq_len {self.config.max_seq_len}")
            x = self.forward_batch(token_ids, batch, cache)  # (N, d)
            cache.commit(batch)
        except BaseException:
            cache.abort(batch)  # NOTE: a failed step leaves the cache as it was
            raise
        return x

    def forward_batch(self, token_ids: torch.Tensor, batch: StepBatch,
                      cache: KVCache | None) -> torch.Tensor:
        """(N,) tokens of an open step -> (N, d) final hidden states, writing every layer's
        keys and values to `cache`; the caller began the step and commits or aborts it.

        What an engine calls: it checks its requests once, so nothing here reads a tensor
        back to the host (on a GPU such a read waits for every queued kernel)."""
        x = self.embed(token_ids)  # (N, d)
        for block in self.layers:
            x = block(x, batch, cache, self.attention)
        return self.norm(x)  # (N, d)

    def check_cache(self, cache: KVCache) -> None:
        """Raise ValueError unless `cache` fits this model: layers, heads, dtype, device, and
        every layer's window and sinks (a cache that drops keys a layer reads would give
        wrong logits silently)."""
        weight = self.embed.weight
        check_cache_matches(self.config, cache.config, weight.dtype, weight.device)

    def _check_vocab(self, token_ids: torch.Tensor) -> None:
        V = self.config.vocab_size
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= V):
            bad = token_ids[(token_ids < 0) | (token_ids >= V)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary: ids must be in "
                             f"[0, {V}) (vocab_size {V})")

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

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor, cache: KVCache,
                seq_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Store the prompt's (B, P) keys and values in `cache`; (B, V) logits of its end."""
        return self.next_token_logits(prompt, cache, seq_ids)

    @torch.no_grad()
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
                held = [s for s, n in zip(seq_ids, cache.lengths(seq_ids).tolist()) if n]
                if held:  # a paged cache refuses to release what it never admitted
                    cache.release(held)
            raise

    def _generate(self, prompt: torch.Tensor, max_new_tokens: int, cache: KVCache | None,
                  sampling: SamplingParams, seq_ids: list[int]) -> Generation:
        # NOTE: row b draws from its own stream, keyed by seed + b and its step
        # (kvlib.sampling.sample), so a row's tokens never depend on the other rows; row 0
        # draws exactly as the engine does for a request with that seed.
        B = prompt.shape[0]
        seeds = [None if sampling.seed is None else (sampling.seed + b) % 2**64 for b in range(B)]
        tokens, all_logits = prompt, []
        for step in range(max_new_tokens):
            if cache is None:
                logits = self.next_token_logits(tokens)  # (B, V), recomputes all positions
            elif step == 0:
                logits = self.prefill(prompt, cache, seq_ids)  # (B, V)
            else:
                logits = self.decode_step(tokens[:, -1], cache, seq_ids)  # (B, V)
            rows = SamplingBatch.make([sampling] * B, [step] * B, logits.shape[-1],
                                      logits.device, seeds)
            next_token = sample(logits, rows)  # (B,)
            all_logits.append(logits)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)  # (B, P + step + 1)
        new = tokens[:, prompt.shape[1]:]  # (B, N)
        return Generation(tokens=new, logits=torch.stack(all_logits, dim=1))  # (B, N, V)


def _init_weights(module: nn.Module) -> None:
    """GPT-2-style init: small normal weights, so a random model gives varied logits."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
