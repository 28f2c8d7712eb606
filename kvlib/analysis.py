"""Memory, FLOP and byte formulas for a Llama-style decoder, and rooflines.

Everything here is arithmetic on a `ModelConfig`: no tensors are made. FLOPs count 2 per
multiply-add and cover the matrix products only; norms, RoPE, softmax and residual adds are
lower order and left out. The model shapes (`PRESETS`) and GPU peaks (`GPUS`, `Hardware`)
live in `kvlib.presets` and are re-exported here: `analysis.PRESETS["llama-3-8b"]` works.

A worked example: one token of Llama-3-8B's cache is 2 (K and V) x 32 layers x 8 KV heads x
128 dims x 2 bytes = 131,072 bytes = 128 KiB in bf16, so 8,192 tokens of one sequence take
exactly 1 GiB.

>>> llama = PRESETS["llama-3-8b"]
>>> kv_bytes_per_token(llama, "bf16")
131072
>>> kv_cache_bytes(llama, 8192, dtype=torch.bfloat16) == 2**30
True
>>> param_count(llama)
8030261248
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from kvlib.checks import require_int
from kvlib.config import ModelConfig
from kvlib.presets import GPUS, PRESETS, Hardware

__all__ = [
    "GPUS", "PRESETS", "Hardware", "Operation", "StepCost", "decode_step_cost",
    "decode_step_operations", "dtype_bytes", "flop_speedup", "generation_cost",
    "kv_bytes_per_token", "kv_cache_bytes", "naive_attention_count", "param_count",
    "prefill_cost", "roofline_seconds", "roofline_seconds_by_operation", "step_weight_bytes",
    "weight_bytes",
]

_BYTES_BY_NAME = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or one of the names fp32, fp16, bf16, fp8, int8.

    >>> dtype_bytes("bf16"), dtype_bytes(torch.float32), dtype_bytes("int8")
    (2, 4, 1)
    """
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if isinstance(dtype, str) and dtype in _BYTES_BY_NAME:
        return _BYTES_BY_NAME[dtype]
    raise ValueError(
        f"dtype must be a torch.dtype or one of {sorted(_BYTES_BY_NAME)}, got {dtype!r}")


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype | str = "bf16") -> int:
    """Cache bytes of one token: 2 (K and V) x layers x KV heads x head_dim x bytes.

    >>> kv_bytes_per_token(PRESETS["llama-3-8b"], "bf16")  # 2*32*8*128*2 = 128 KiB
    131072
    """
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes(dtype)


def kv_cache_bytes(cfg: ModelConfig, seq_len: int, batch_size: int = 1,
                   dtype: torch.dtype | str = "bf16") -> int:
    """Bytes of a cache holding `seq_len` tokens for each of `batch_size` sequences.

    >>> kv_cache_bytes(PRESETS["llama-3-8b"], 8192) / 2**30  # GiB, bf16
    1.0
    >>> kv_cache_bytes(PRESETS["llama-3-70b"], 8192, batch_size=32) / 2**30
    80.0
    """
    require_int("seq_len", seq_len, minimum=0)
    require_int("batch_size", batch_size, minimum=1)
    return batch_size * seq_len * kv_bytes_per_token(cfg, dtype)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of kvlib's Llama-style model with this shape (no biases).

    Embeddings (vocab x d_model); per layer q, k, v, o, the 3 MLP matrices (gate, up, down)
    and 2 RMSNorm weight vectors; a final norm; an lm_head unless tied to the embeddings.
    For GPT-2 this is not the published count (see the note on PRESETS).

    >>> param_count(PRESETS["smollm2-135m"])
    134515008
    """
    d, hd = cfg.d_model, cfg.head_dim
    attention = d * cfg.num_heads * hd + 2 * d * cfg.num_kv_heads * hd + cfg.num_heads * hd * d
    mlp = 3 * d * cfg.ffn_dim
    per_layer = attention + mlp + 2 * d
    embeddings = cfg.vocab_size * d
    lm_head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return embeddings + cfg.num_layers * per_layer + d + lm_head


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype | str = "bf16") -> int:
    """Bytes of all parameters stored in `dtype`.

    >>> weight_bytes(PRESETS["llama-3-8b"]) / 1e9  # GB in bf16
    16.060522496
    """
    return param_count(cfg) * dtype_bytes(dtype)


def step_weight_bytes(cfg: ModelConfig, num_tokens: int = 1,
                      dtype: torch.dtype | str = "bf16") -> int:
    """Bytes of weights one forward pass over `num_tokens` tokens reads from memory.

    Every matrix is read once, whatever the number of tokens, except the embedding table: a
    lookup reads one row per token (at most the whole table). With tied embeddings the LM head
    multiplies by the whole table, so all of it is read. `weight_bytes` is what memory must
    *hold*; this is what a step *reads*: for Llama-3-8B, 15.0 GB of its 16.1 GB.

    >>> step_weight_bytes(PRESETS["llama-3-8b"]) / 1e9  # the 1.05 GB table, less one row
    15.009857536
    >>> step_weight_bytes(PRESETS["gpt2"]) == weight_bytes(PRESETS["gpt2"])  # tied
    True
    """
    require_int("num_tokens", num_tokens, minimum=1)
    if cfg.tie_embeddings:
        return weight_bytes(cfg, dtype)
    table = cfg.vocab_size * cfg.d_model
    rows = min(num_tokens, cfg.vocab_size) * cfg.d_model
    return (param_count(cfg) - table + rows) * dtype_bytes(dtype)


# ---------------------------------------------------------------------------------------------
# Cost of a decode step
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepCost:
    """FLOPs (2 per multiply-add) and bytes of work, summed over all layers.

    `bytes_moved` counts the weights a step reads (`step_weight_bytes`: every matrix once,
    one embedding row per token) plus cache traffic; activations are ignored.
    Two costs add field by field, so a whole generation is the sum of its steps.
    """

    projection_flops: int  # q, k, v, o
    attention_flops: int  # Q K^T and A V
    mlp_flops: int  # gate, up, down
    lm_head_flops: int
    bytes_moved: int

    @property
    def total_flops(self) -> int:
        return self.projection_flops + self.attention_flops + self.mlp_flops + self.lm_head_flops

    @property
    def arithmetic_intensity(self) -> float:
        """FLOPs per byte moved: compare with a device's FLOP/s divided by its bytes/s."""
        return self.total_flops / self.bytes_moved

    def __add__(self, other: StepCost) -> StepCost:
        return StepCost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def _per_token_flops(cfg: ModelConfig) -> tuple[int, int]:
    """(projection, MLP) FLOPs for one token through all layers."""
    d = cfg.d_model
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    projections = 2 * d * (q_width + 2 * kv_width) + 2 * q_width * d
    mlp = 2 * 3 * d * cfg.ffn_dim
    return cfg.num_layers * projections, cfg.num_layers * mlp


def _attention_flops(cfg: ModelConfig, num_keys: int) -> int:
    """Q K^T plus A V for one query over `num_keys` keys, all heads and layers."""
    return cfg.num_layers * 2 * 2 * cfg.num_heads * cfg.head_dim * num_keys


def _causal_pass(cfg: ModelConfig, num_tokens: int, bytes_moved: int) -> StepCost:
    """`num_tokens` tokens at once, causally masked, logits for the last position only."""
    projections, mlp = _per_token_flops(cfg)
    # Query i attends to keys 0..i, i.e. i + 1 of them: sum_{i<n} (i + 1) = n (n + 1) / 2.
    causal_keys = num_tokens * (num_tokens + 1) // 2
    return StepCost(projection_flops=num_tokens * projections,
                    attention_flops=_attention_flops(cfg, causal_keys),
                    mlp_flops=num_tokens * mlp,
                    lm_head_flops=2 * cfg.d_model * cfg.vocab_size,
                    bytes_moved=bytes_moved)


def decode_step_cost(cfg: ModelConfig, context_len: int, *, cached: bool,
                     dtype: torch.dtype | str = "bf16") -> StepCost:
    """The cost of one decode step when S = `context_len` tokens are already cached.

    S counts the tokens before the step's input token (the newest one), so the step attends
    over S + 1 keys and produces the token after them: S = 4,095 is the step with 4,096 keys.
    - cached: only the input token goes through the layers, reading S tokens of K and V from
      the cache and writing its own. Bytes: `step_weight_bytes(cfg, 1)` + (S + 1) x
      kv_bytes_per_token.
    - uncached: all S + 1 tokens are recomputed, query i attending to i + 1 keys.
      Bytes: `step_weight_bytes(cfg, S + 1)` (activations ignored).
    Both compute logits for the last position only, as kvlib's generate does. Neither reads
    the whole embedding table (a lookup reads one row per token), unless it is tied to the
    LM head.

    A config small enough to check by hand (d_model 4, 2 heads, 1 KV head, head_dim 2):
    projections 2*4*(4 + 2*2) + 2*4*4 = 96, attention over 4 keys 2*2*2*2*4 = 64,
    MLP 2*3*4*8 = 192, lm_head 2*4*10 = 80.

    >>> tiny = ModelConfig(vocab_size=10, d_model=4, num_layers=1, num_heads=2,
    ...                    num_kv_heads=1, head_dim=2, ffn_dim=8)
    >>> step = decode_step_cost(tiny, 3, cached=True)
    >>> step.projection_flops, step.attention_flops, step.mlp_flops, step.lm_head_flops
    (96, 64, 192, 80)
    >>> decode_step_cost(tiny, 3, cached=False).total_flops  # 4*96 + 16*(1+2+3+4) + 4*192 + 80
    1392
    """
    require_int("context_len", context_len, minimum=0)
    if not cached:
        weights = step_weight_bytes(cfg, context_len + 1, dtype)
        return _causal_pass(cfg, context_len + 1, bytes_moved=weights)
    projections, mlp = _per_token_flops(cfg)
    kv_traffic = (context_len + 1) * kv_bytes_per_token(cfg, dtype)  # read S, write 1
    return StepCost(projection_flops=projections,
                    attention_flops=_attention_flops(cfg, context_len + 1),
                    mlp_flops=mlp,
                    lm_head_flops=2 * cfg.d_model * cfg.vocab_size,
                    bytes_moved=step_weight_bytes(cfg, 1, dtype) + kv_traffic)


def prefill_cost(cfg: ModelConfig, prompt_len: int, *,
                 dtype: torch.dtype | str = "bf16") -> StepCost:
    """The prompt's one pass that fills the cache and yields the first new token's logits.

    Same FLOPs as an uncached step at context prompt_len - 1; bytes add the cache writes.
    """
    require_int("prompt_len", prompt_len, minimum=1)
    written = prompt_len * kv_bytes_per_token(cfg, dtype)
    return _causal_pass(cfg, prompt_len, step_weight_bytes(cfg, prompt_len, dtype) + written)


def generation_cost(cfg: ModelConfig, prompt_len: int, new_tokens: int, *, cached: bool,
                    dtype: torch.dtype | str = "bf16") -> StepCost:
    """The summed cost of generating `new_tokens` tokens after a prompt of `prompt_len`.

    New token k (k = 0 .. new_tokens - 1) follows prompt_len + k tokens, so its step runs at
    S = prompt_len - 1 + k cached tokens (the newest token is the step's input).
    - uncached: every token is a full recompute, `decode_step_cost(cached=False)`.
    - cached: the prompt is prefilled once (token 0), then one cached step per later token.
    With one new token both do the same FLOPs.

    >>> tiny = ModelConfig(vocab_size=10, d_model=4, num_layers=1, num_heads=2,
    ...                    num_kv_heads=1, head_dim=2, ffn_dim=8)
    >>> [generation_cost(tiny, 4, 1, cached=c).total_flops for c in (True, False)]
    [1392, 1392]
    >>> [generation_cost(tiny, 4, 2, cached=c).total_flops for c in (True, False)]
    [1840, 3152]
    """
    require_int("prompt_len", prompt_len, minimum=1)
    require_int("new_tokens", new_tokens, minimum=1)
    contexts = range(prompt_len - 1, prompt_len - 1 + new_tokens)
    if not cached:
        steps = [decode_step_cost(cfg, s, cached=False, dtype=dtype) for s in contexts]
    else:
        steps = [prefill_cost(cfg, prompt_len, dtype=dtype)]
        steps += [decode_step_cost(cfg, s, cached=True, dtype=dtype) for s in contexts[1:]]
    total = steps[0]
    for step in steps[1:]:
        total = total + step
    return total


# ---------------------------------------------------------------------------------------------
# The honest speedup
# ---------------------------------------------------------------------------------------------

def naive_attention_count(seq_len: int) -> int:
    """Score entries of ONE layer's, ONE head's full Q K^T over `seq_len` tokens: S x S.

    A widely quoted table compares "prefill cost 16,777,216 vs cached decode 4,096" at
    4,096 tokens. Those are this count (S x S) against S, the scores of one new query,
    for a single layer and head. Their ratio is S, but it is not the speedup of a cache:
    it leaves out the causal mask (which halves the recomputed scores), the projections,
    MLP and lm_head, and every other layer and head. `flop_speedup` counts the whole step.
    Even that is a FLOP ratio; time shrinks by far less, as a cached step is memory bound.

    >>> naive_attention_count(4096)
    16777216
    """
    require_int("seq_len", seq_len, minimum=0)
    return seq_len * seq_len


def flop_speedup(cfg: ModelConfig, context_len: int) -> float:
    """Total FLOPs of an uncached decode step divided by a cached one, S = `context_len`.

    The ratio is below S + 1: the causal mask halves recomputed attention, and the lm_head
    (one position in both paths) and attention over S + 1 keys stay in the cached step. It
    is a FLOP ratio; a cached step is memory bound, so time shrinks by far less.

    >>> round(flop_speedup(PRESETS["llama-3-8b"], 4095))  # 4,096 tokens in the step
    3589
    >>> flop_speedup(PRESETS["llama-3-8b"], 0)  # nothing to reuse yet
    1.0
    """
    uncached = decode_step_cost(cfg, context_len, cached=False)
    cached = decode_step_cost(cfg, context_len, cached=True)
    return uncached.total_flops / cached.total_flops


# ---------------------------------------------------------------------------------------------
# Roofline: the time a step cannot beat on a given device
# ---------------------------------------------------------------------------------------------

def roofline_seconds(cost: StepCost, hw: Hardware) -> float:
    """A lower bound on a step's time: the slower of doing its FLOPs and moving its bytes.

    This pools the whole step into one intensity, as if every byte could feed every FLOP.
    When a step's operations have very different intensities (a batched decode step's weight
    matmuls and its attention), bound each one: `decode_step_operations`.

    >>> hw = Hardware("toy", peak_flops=100.0, bandwidth=10.0)
    >>> roofline_seconds(StepCost(0, 0, 500, 0, bytes_moved=20), hw)  # compute bound
    5.0
    """
    return max(cost.total_flops / hw.peak_flops, cost.bytes_moved / hw.bandwidth)


@dataclass(frozen=True)
class Operation:
    """One kind of work within a step, with its own FLOPs and bytes, so its own roofline."""

    name: str
    flops: int
    bytes_moved: int

    @property
    def arithmetic_intensity(self) -> float:
        return self.flops / self.bytes_moved

    def seconds(self, hw: Hardware) -> float:
        """The slower of this operation's FLOPs and its bytes on `hw`."""
        return max(self.flops / hw.peak_flops, self.bytes_moved / hw.bandwidth)

    def compute_bound(self, hw: Hardware) -> bool:
        return self.arithmetic_intensity > hw.ridge_point


def decode_step_operations(cfg: ModelConfig, context_len: int, batch_size: int = 1, *,
                           dtype: torch.dtype | str = "bf16") -> tuple[Operation, Operation]:
    """A cached decode step of `batch_size` (B) sequences with S = `context_len` cached tokens
    each, as its two kinds of work, each bounded on its own (they run as separate kernels):

    - "weight matmuls" (projections, MLP, LM head): B tokens' FLOPs, the weights read once
      for the whole batch. About 2 FLOPs per weight per token over 2 bytes per weight in 16
      bits: intensity ~ B, compute bound once B passes the ridge point, whatever S is.
    - "attention": each query head against its sequence's S + 1 keys; each sequence reads
      its own S cached tokens and writes one. Per key and layer 4 H D FLOPs over
      2 Hkv D x bytes: intensity 2 H / (Hkv x bytes) = H / Hkv in 16 bits, at every B and S,
      far below any GPU's ridge point. Batching never makes attention compute bound.

    Summing the two bounds (`roofline_seconds_by_operation`) is tighter than pooling the
    step's FLOPs and bytes into one intensity (`roofline_seconds`).

    >>> tiny = ModelConfig(vocab_size=10, d_model=4, num_layers=1, num_heads=2,
    ...                    num_kv_heads=1, head_dim=2, ffn_dim=8)
    >>> matmuls, attention = decode_step_operations(tiny, 3, batch_size=2)
    >>> matmuls.flops, matmuls.bytes_moved  # 2 x (96 + 192 + 80); (236 - 40 + 2*4) x 2 B
    (736, 408)
    >>> attention.flops, attention.bytes_moved  # 2 x 64; 2 seqs x 4 tokens x 8 B
    (128, 64)
    >>> attention.arithmetic_intensity  # H / Hkv = 2
    2.0
    """
    require_int("context_len", context_len, minimum=0)
    require_int("batch_size", batch_size, minimum=1)
    one = decode_step_cost(cfg, context_len, cached=True, dtype=dtype)
    matmul_flops = one.projection_flops + one.mlp_flops + one.lm_head_flops
    cache_bytes = (context_len + 1) * kv_bytes_per_token(cfg, dtype)  # read S, write 1
    return (Operation("weight matmuls", batch_size * matmul_flops,
                      step_weight_bytes(cfg, batch_size, dtype)),
            Operation("attention", batch_size * one.attention_flops, batch_size * cache_bytes))


def roofline_seconds_by_operation(operations: tuple[Operation, ...], hw: Hardware) -> float:
    """A lower bound on a step's time: each operation's own bound, summed.

    >>> hw = Hardware("toy", peak_flops=100.0, bandwidth=10.0)  # ridge point 10 FLOP/byte
    >>> ops = (Operation("matmul", 1000, 10), Operation("attention", 20, 100))
    >>> roofline_seconds_by_operation(ops, hw)  # 10 s of compute + 10 s of memory
    20.0
    >>> roofline_seconds(StepCost(0, 0, 1020, 0, bytes_moved=110), hw)  # pooled: 11 s
    11.0
    """
    return sum(op.seconds(hw) for op in operations)
