"""What a quantized KV cache stores, byte by byte: the row layout, the configurations, the ratio.

"INT8 halves the cache, INT4 quarters it" counts only the codes. A quantized cache also
stores scales (and zero points), and keeps some recent tokens in full precision. Per token,
KV head and layer, for each of K and V:

    row bytes = codes + scales + zero points  (+ padding when K and V rows differ)

plus, per sequence, its most recent tokens in full precision (the *residual*: transformers'
`residual_length`, KIVI's R), each stored once: a token is quantized when it leaves the
residual (in whole groups of G tokens when scales are shared over tokens), and only then. For
llama.cpp's q4_0 at head dim 128: codes 64 B, four fp16 scales 8 B: 72 B against fp16's
256 B, 3.56x.

>>> lay = row_layout(LLAMA_CPP_Q4_0, 128)
>>> lay.payload, lay.num_scales, lay.row_bytes
(64, 4, 72)
>>> m = memory(PRESETS["llama.cpp-q4_0"], 1, 1, 128, num_tokens=1000)
>>> round(m.ratio_vs_fp16, 2), m.naive_ratio
(3.56, 4.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlib.cache.quantize import (
    HF_QUANTO_INT4,
    KIVI_KEYS_INT4,
    KIVI_VALUES_INT4,
    LLAMA_CPP_Q4_0,
    LLAMA_CPP_Q8_0,
    VLLM_FP8,
    QuantScheme,
    payload_bytes,
)


@dataclass(frozen=True)
class KVQuantConfig:
    """Schemes for keys and values, and how many recent tokens stay in full precision
    (`residual`: not to be confused with a layer's sliding window, which hides keys)."""

    keys: QuantScheme
    values: QuantScheme
    residual: int = 0
    name: str = "custom"

    def __post_init__(self) -> None:
        for which in ("keys", "values"):
            scheme = getattr(self, which)
            if not isinstance(scheme, QuantScheme):
                raise ValueError(f"KVQuantConfig.{which} must be a QuantScheme, got "
                                 f"{type(scheme).__name__}")
            if scheme.granularity == "channel" and scheme.group_size is None:
                raise ValueError(f"KVQuantConfig.{which}: per-channel scales in a cache need a "
                                 f"group of tokens (group_size): a scale is computed once its "
                                 f"group of tokens is complete")
        groups = {s.group_size for s in (self.keys, self.values) if s.granularity == "channel"}
        if len(groups) > 1:
            raise ValueError(f"keys and values grouped over tokens must use one group size, "
                             f"got {sorted(groups)}")
        r = self.residual
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"KVQuantConfig.residual must be an int >= 0, got {r!r}")

    @property
    def token_group(self) -> int:
        """G: tokens that share a scale (1 unless a scheme is per channel)."""
        return max([s.group_size for s in (self.keys, self.values)
                    if s.granularity == "channel"] + [1])

    @property
    def tail_len(self) -> int:
        """C: the most recent tokens a sequence can hold in full precision (the residual, and
        a group not yet complete)."""
        return self.residual + self.token_group - 1

    def quantized_len(self, length: int) -> int:
        """Of a sequence of `length` tokens, how many are stored as codes: every token that
        has left the residual, in whole groups of G. The rest are kept in full precision.

        >>> kivi = PRESETS["kivi-int4"]               # residual 128, groups of 32 tokens
        >>> kivi.quantized_len(300), kivi.quantized_len(100)   # (300 - 128) // 32 * 32
        (160, 0)
        """
        G = self.token_group
        return max(0, length - self.residual) // G * G


@dataclass(frozen=True)
class RowLayout:
    """One (token, head) row: codes, then scales, then zero points, in bytes."""

    scheme: QuantScheme
    payload: int  # bytes of codes
    num_scales: int  # scale entries per row (zero points: as many, if asymmetric)
    scale_bytes: int

    @property
    def param_spans(self) -> list[tuple[int, int]]:
        """Byte ranges of the scales and (if any) the zero points within the row."""
        a = self.payload
        b = a + self.num_scales * self.scale_bytes
        spans = [(a, b)] if self.num_scales else []
        if self.num_scales and not self.scheme.symmetric:
            spans.append((b, b + self.num_scales * self.scale_bytes))
        return spans

    @property
    def row_bytes(self) -> int:
        return self.payload + sum(b - a for a, b in self.param_spans)


def row_layout(scheme: QuantScheme, head_dim: int) -> RowLayout:
    """Where the codes and parameters of one row go; per-tensor/per-head scales are not in
    rows, per-channel ones are spread ceil(D / G) to a row."""
    D = head_dim
    if scheme.granularity == "token":
        n = -(-D // (scheme.group_size or D))
    elif scheme.granularity == "channel":
        n = -(-D // scheme.group_size)
    else:
        n = 0
    size = torch.empty((), dtype=scheme.scale_dtype).element_size()
    return RowLayout(scheme, payload_bytes(scheme, D), n, size)


@dataclass(frozen=True)
class Memory:
    """Bytes of one sequence of `num_tokens` tokens, every layer, K and V."""

    num_tokens: int
    payload: int
    scales: int  # in rows, plus the per-layer static scales
    zeros: int
    padding: int  # when K and V rows differ in width, the narrower is padded
    residual: int  # the recent tokens kept in full precision
    fp16: int  # the same tokens in an fp16 cache
    bits: int

    @property
    def total(self) -> int:
        return self.payload + self.scales + self.zeros + self.padding + self.residual

    @property
    def bytes_per_token(self) -> float:
        return self.total / self.num_tokens

    @property
    def ratio_vs_fp16(self) -> float:
        return self.fp16 / self.total

    @property
    def naive_ratio(self) -> float:
        """The ratio that counts codes only: 16 / bits (2x for 8 bits, 4x for 4)."""
        return 16 / self.bits


def memory(quant: KVQuantConfig, num_layers: int, num_kv_heads: int, head_dim: int,
           num_tokens: int, residual_dtype: torch.dtype = torch.float16) -> Memory:
    """The byte accounting of `QuantizedKVCache` for one sequence, without building one:
    codes for the tokens that left the residual, full precision for the others."""
    lays = [row_layout(s, head_dim) for s in (quant.keys, quant.values)]
    width = max(lay.row_bytes for lay in lays)
    quantized = quant.quantized_len(num_tokens)
    rows = num_layers * num_kv_heads * quantized  # rows of K, and as many of V
    spans = [[b - a for a, b in lay.param_spans] for lay in lays]
    static = 0
    for s in (quant.keys, quant.values):
        if s.granularity in ("tensor", "head"):
            n = 1 if s.granularity == "tensor" else num_kv_heads
            per = torch.empty((), dtype=s.scale_dtype).element_size()
            static += num_layers * n * per * (1 if s.symmetric else 2)
    fp_size = torch.empty((), dtype=residual_dtype).element_size()
    tail = num_tokens - quantized
    return Memory(
        num_tokens=num_tokens,
        payload=rows * sum(lay.payload for lay in lays),
        scales=rows * sum(sp[0] for sp in spans if sp) + static,
        zeros=rows * sum(sp[1] for sp in spans if len(sp) > 1),
        padding=rows * sum(width - lay.row_bytes for lay in lays),
        residual=2 * num_layers * num_kv_heads * tail * head_dim * fp_size,
        fp16=2 * num_layers * num_kv_heads * num_tokens * head_dim * 2,
        bits=max(quant.keys.bits, quant.values.bits),
    )


def _preset(name: str, keys: QuantScheme, values: QuantScheme | None = None,
            residual: int = 0) -> KVQuantConfig:
    return KVQuantConfig(keys, values or keys, residual, name)


# The anchors' configurations, and plain ones to compare them with.
PRESETS: dict[str, KVQuantConfig] = {p.name: p for p in (
    _preset("int8-token", QuantScheme("int8", "token")),
    _preset("int4-token", QuantScheme("int4", "token")),
    _preset("fp8-e4m3-token", QuantScheme("fp8_e4m3", "token")),
    _preset("fp8-e5m2-token", QuantScheme("fp8_e5m2", "token")),
    _preset("vllm-fp8", VLLM_FP8),  # e4m3, one fp32 scale per layer for K and for V
    _preset("llama.cpp-q8_0", LLAMA_CPP_Q8_0),
    _preset("llama.cpp-q4_0", LLAMA_CPP_Q4_0),
    _preset("hf-quanto-int4", HF_QUANTO_INT4, residual=128),  # groups of 64, 128 recent tokens
    _preset("kivi-int4", KIVI_KEYS_INT4, KIVI_VALUES_INT4, residual=128),
)}
