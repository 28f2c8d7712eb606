"""Quantize and dequantize keys and values: INT8, INT4 (two per byte), FP8 e4m3 and e5m2.

A quantized tensor is a payload of small codes plus the *scales* (and, for asymmetric
integers, *zero points*) that turn codes back into numbers:

    symmetric int    x ~ scale * q          q in [-(2^(b-1) - 1), 2^(b-1) - 1]
    asymmetric int   x ~ scale * q + zero   q in [0, 2^b - 1], zero = the block's minimum
    fp8              x ~ scale * f          f a float8 number, scale = amax / float8 max

Which numbers share one scale is the *granularity*, over a tensor (..., Hkv, S, D):

    tensor   one scale for everything            scale (..., 1, 1, 1)
    head     one per KV head                     scale (..., Hkv, 1, 1)
    token    one per token and head              scale (..., Hkv, S, nG, 1), groups of
             (group_size: groups of channels)                 g channels, nG = ceil(D / g)
    channel  one per channel and head            scale (..., Hkv, nG, 1, D), groups of
             (group_size: groups of tokens)                   g tokens, nG = ceil(S / g)

A group size that does not divide its axis leaves the last group shorter. Scales are stored
in fp16 or fp32 and rounded *up* when stored, so no value lands outside the codes' range and
every integer round trip errs by at most half a step (scale / 2). The stored scale is the
block's own step rounded up to the scale dtype, subnormal numbers included, so the bound holds
for every block however small its values: in fp16, scale <= step * (1 + 2^-10) + 2^-24.

A scale is computed from a block's largest magnitude. Where it is computed once and kept
(one scale per tensor, calibrated on the first write, as vLLM's FP8 cache does), `max_code`
maps that first maximum below the largest code, leaving headroom for larger later values:
vLLM divides it by 200 for keys and 100 for values (VLLM_FP8_KEYS, VLLM_FP8_VALUES).

Worked example: llama.cpp's q4_0 keeps 32 4-bit codes and one fp16 scale per group: 32 * 4 +
16 = 144 bits for 32 values, 4.5 bits per value, so it shrinks fp16 by 16 / 4.5 = 3.56x, not 4x.

>>> bits_per_value(LLAMA_CPP_Q4_0, head_dim=128)
4.5
>>> bits_per_value(LLAMA_CPP_Q8_0, head_dim=128)
8.5

Legend: Hkv KV heads, S tokens, D head dim (channels), g group size, nG groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvlib.checks import require_number

FORMATS = ("int8", "int4", "fp8_e4m3", "fp8_e5m2")
GRANULARITIES = ("tensor", "head", "token", "channel")
SCALE_DTYPES = (torch.float16, torch.float32)
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_MANTISSA_BITS = {"fp8_e4m3": 3, "fp8_e5m2": 2}


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor (keys or values) is quantized. Validated on construction.

    `group_size` splits the axis that *shares* a scale: for `token` granularity the channels
    of a token (g channels per scale), for `channel` the tokens of a channel (g tokens per
    scale, KIVI's keys). None means the whole axis; tensor and head take no group size.

    `max_code` (symmetric schemes) is the code a block's largest magnitude maps to: None for
    the largest code there is (127 for int8, 448 for fp8 e4m3). Smaller leaves headroom for
    values larger than the ones the scale was computed on, which matters only for a scale
    kept after it is computed (per tensor or head, calibrated once): vLLM's FP8 cache maps
    keys to 200 and values to 100, so keys may later grow 448 / 200 = 2.24x before clipping.
    """

    format: str = "int8"
    granularity: str = "token"
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.float16
    max_code: float | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"QuantScheme.format must be one of {FORMATS}, got {self.format!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantScheme.granularity must be one of {GRANULARITIES}, got "
                             f"{self.granularity!r}")
        g = self.group_size
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise ValueError(f"QuantScheme.group_size must be a positive int or None, got {g!r}")
        if g is not None and self.granularity in ("tensor", "head"):
            raise ValueError(f"QuantScheme.group_size applies to token or channel granularity, "
                             f"not {self.granularity!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantScheme.symmetric must be a bool, got {self.symmetric!r}")
        if self.is_float and not self.symmetric:
            raise ValueError(f"{self.format} is symmetric (a sign bit and a scale); zero points "
                             f"are for the integer formats")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"QuantScheme.scale_dtype must be torch.float16 or torch.float32, "
                             f"got {self.scale_dtype!r}")
        if self.max_code is not None:
            if not self.symmetric:
                raise ValueError("QuantScheme.max_code is for symmetric schemes: an asymmetric "
                                 "one maps its block's minimum to code 0 and has no headroom")
            top = (torch.finfo(FP8_DTYPES[self.format]).max if self.is_float
                   else 2 ** (self.bits - 1) - 1)  # code_range's highest code
            require_number("QuantScheme.max_code (or None)", self.max_code, above=0, maximum=top)

    @property
    def is_float(self) -> bool:
        return self.format.startswith("fp8")

    @property
    def bits(self) -> int:
        return 4 if self.format == "int4" else 8

    @property
    def group_axis(self) -> str | None:
        """The axis split into groups that share a scale ('channel' or 'token'), if any."""
        if self.granularity == "token":
            return "channel"
        return "token" if self.granularity == "channel" else None

    @property
    def name(self) -> str:
        group = f"/g{self.group_size}" if self.group_size else ""
        sym = "" if self.symmetric else " asym"
        top = "" if self.max_code is None else f" max {self.max_code:g}"
        return f"{self.format} per-{self.granularity}{group}{sym}{top}"


# Named configurations of the anchors (README of each project; see chapter 5).
LLAMA_CPP_Q8_0 = QuantScheme("int8", "token", group_size=32)  # 32 int8 + one fp16 scale
LLAMA_CPP_Q4_0 = QuantScheme("int4", "token", group_size=32)  # 32 int4 + one fp16 scale
VLLM_FP8 = QuantScheme("fp8_e4m3", "tensor", scale_dtype=torch.float32)  # one scale a layer
# vLLM's calculate_kv_scales: scale = first max |x| / K_SCALE_CONSTANT (200) for keys and
# / V_SCALE_CONSTANT (100) for values, leaving 448/200 and 448/100 of headroom.
VLLM_FP8_KEYS = QuantScheme("fp8_e4m3", "tensor", scale_dtype=torch.float32, max_code=200.0)
VLLM_FP8_VALUES = QuantScheme("fp8_e4m3", "tensor", scale_dtype=torch.float32, max_code=100.0)
HF_QUANTO_INT4 = QuantScheme("int4", "token", group_size=64, symmetric=False)
KIVI_KEYS_INT4 = QuantScheme("int4", "channel", group_size=32, symmetric=False)
KIVI_VALUES_INT4 = QuantScheme("int4", "token", group_size=32, symmetric=False)


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes and the parameters to decode them; shapes as in the module docstring."""

    payload: torch.Tensor  # (..., Hkv, S, ceil(D * bits / 8)) uint8: codes (int4: 2 a byte)
    scale: torch.Tensor  # blocked shape of the granularity, in scheme.scale_dtype
    zero: torch.Tensor | None  # like scale, asymmetric integers only
    scheme: QuantScheme
    shape: tuple[int, ...]  # (..., Hkv, S, D) of the original tensor

    @property
    def nbytes(self) -> dict[str, int]:
        """Bytes actually stored: payload, scales and zero points."""
        zero = 0 if self.zero is None else self.zero.numel() * self.zero.element_size()
        return {"payload": self.payload.numel(), "scales": self.scale.numel()
                * self.scale.element_size(), "zeros": zero}


def _check_input(x: torch.Tensor, scheme: QuantScheme) -> None:
    if not isinstance(scheme, QuantScheme):
        raise ValueError(f"scheme must be a QuantScheme, got {type(scheme).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 3 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating (..., Hkv, S, D) tensor, got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if x.numel() == 0:
        raise ValueError(f"x is empty: {tuple(x.shape)}")


def _pad(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Repeat the last slice along `dim` up to a multiple: the block min/max do not change."""
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    last = x.narrow(dim, x.shape[dim] - 1, 1)
    return torch.cat([x, last.expand(*[extra if d == dim % x.dim() else -1
                                         for d in range(x.dim())])], dim=dim)


def blocked(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """View x (..., Hkv, S, D) so that each scale's block is reduced over `block_dims`.

    token: (..., Hkv, S, nG, g)   channel: (..., Hkv, nG, g, D)   head/tensor: x itself.
    """
    S, D = x.shape[-2:]
    if scheme.granularity == "token":
        g = scheme.group_size or D
        return _pad(x, -1, g).unflatten(-1, (-1, g))  # (..., Hkv, S, nG, g)
    if scheme.granularity == "channel":
        g = scheme.group_size or S
        return _pad(x, -2, g).unflatten(-2, (-1, g))  # (..., Hkv, nG, g, D)
    return x


def block_dims(scheme: QuantScheme) -> tuple[int, ...]:
    return {"tensor": (-3, -2, -1), "head": (-2, -1), "token": (-1,),
            "channel": (-2,)}[scheme.granularity]


def unblocked(xb: torch.Tensor, scheme: QuantScheme, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `blocked`: back to `shape` (..., Hkv, S, D), padding cut off."""
    S, D = shape[-2:]
    if scheme.granularity == "token":
        return xb.flatten(-2)[..., :D]  # (..., Hkv, S, D)
    if scheme.granularity == "channel":
        return xb.flatten(-3, -2)[..., :S, :]  # (..., Hkv, S, D)
    return xb


def _round_up(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Store s (float32, >= 0) in dtype, rounded up so that s <= stored; never 0.

    NOTE: subnormal scales are kept. Clamping to the dtype's smallest *normal* number (6.1e-5
    in fp16) would give every int8 block whose values are all below about 8e-3 a step up to
    that many times coarser than its own; the smallest subnormal (6e-8 in fp16) costs at most
    that much absolute, about the spacing of fp16 numbers that small themselves.

    >>> _round_up(torch.tensor([1e-3 / 127, 0.0]), torch.float16).tolist()  # 7.87e-6: subnormal
    [7.927417755126953e-06, 5.960464477539063e-08]
    """
    stored = s.to(dtype)
    low = stored.float() < s
    stored = torch.where(low, torch.nextafter(stored, stored.new_tensor(math.inf)), stored)
    zero = torch.zeros((), dtype=dtype, device=s.device)
    smallest = torch.nextafter(zero, zero + 1)  # the smallest positive (subnormal) number
    return stored.clamp(min=smallest)


def _round_down(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    stored = z.to(dtype)
    high = stored.float() > z
    return torch.where(high, torch.nextafter(stored, stored.new_tensor(-math.inf)), stored)


def code_range(scheme: QuantScheme) -> tuple[float, float]:
    """(lowest, highest) code: int8 symmetric (-127, 127), int4 asymmetric (0, 15), ..."""
    if scheme.is_float:
        top = torch.finfo(FP8_DTYPES[scheme.format]).max
        return -top, top
    if scheme.symmetric:
        return -(2 ** (scheme.bits - 1) - 1), 2 ** (scheme.bits - 1) - 1
    return 0, 2 ** scheme.bits - 1


def compute_params(xb: torch.Tensor, scheme: QuantScheme,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of each block of `blocked(x)`, reduced over `block_dims`."""
    x32, dims = xb.float(), block_dims(scheme)
    lo, hi = code_range(scheme)
    if scheme.symmetric:
        amax = x32.abs().amax(dim=dims, keepdim=True)
        scale = _round_up(amax / (scheme.max_code or hi), scheme.scale_dtype)
        _check_finite(scale, None, x32, scheme)
        return scale, None
    zero = _round_down(x32.amin(dim=dims, keepdim=True), scheme.scale_dtype)
    span = x32.amax(dim=dims, keepdim=True) - zero.float()
    scale = _round_up(span / hi, scheme.scale_dtype)
    _check_finite(scale, zero, x32, scheme)
    return scale, zero


def _check_finite(scale: torch.Tensor, zero: torch.Tensor | None, x32: torch.Tensor,
                  scheme: QuantScheme) -> None:
    """A non-finite scale or zero point would decode every value of its block to NaN."""
    if bool(torch.isfinite(scale).all()) and (zero is None or bool(torch.isfinite(zero).all())):
        return
    if not bool(torch.isfinite(x32).all()):
        raise ValueError("x holds NaN or infinite values: they have no scale")
    raise ValueError(f"x holds values up to {float(x32.abs().max()):.3g}, too large for "
                     f"{scheme.scale_dtype} scales of {scheme.name} (fp16 holds up to 65504): "
                     f"use scale_dtype=torch.float32")


def encode(xb: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           scheme: QuantScheme) -> torch.Tensor:
    """Codes of xb, as uint8 bytes of the same shape (int4 not packed yet).

    Symmetric integers are stored with an offset (q + 2^(b-1)), fp8 as its raw bits.
    Values outside the codes' range (a scale fixed before they came) are clipped.
    """
    x32 = xb.float()
    lo, hi = code_range(scheme)
    if scheme.is_float:
        f = (x32 / scale.float()).clamp(lo, hi).to(FP8_DTYPES[scheme.format])
        return f.view(torch.uint8)
    shifted = x32 if zero is None else x32 - zero.float()
    q = torch.round(shifted / scale.float()).clamp(lo, hi)
    offset = 2 ** (scheme.bits - 1) if scheme.symmetric else 0
    return (q + offset).to(torch.uint8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           scheme: QuantScheme, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `encode` (codes uint8, unpacked), in `dtype`."""
    if scheme.is_float:
        f = codes.view(FP8_DTYPES[scheme.format]).float()
    else:
        offset = 2 ** (scheme.bits - 1) if scheme.symmetric else 0
        f = codes.float() - offset
    x = f * scale.float()
    if zero is not None:
        x = x + zero.float()
    return x.to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., D) codes in [0, 15] -> (..., ceil(D / 2)) bytes, element 2i in the low nibble.

    >>> pack_int4(torch.tensor([1, 2, 15], dtype=torch.uint8)).tolist()
    [33, 15]
    """
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], dim=-1)
    pairs = codes.unflatten(-1, (-1, 2))  # (..., D/2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)  # (..., ceil(D/2))


def unpack_int4(packed: torch.Tensor, D: int) -> torch.Tensor:
    """(..., ceil(D / 2)) bytes -> (..., D) codes."""
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)  # (..., 2 ceil(D/2))
    return codes[..., :D]


def payload_bytes(scheme: QuantScheme, D: int) -> int:
    """Bytes of one token's codes for one head: D (8-bit formats) or ceil(D / 2) (int4)."""
    return -(-D // 2) if scheme.bits == 4 else D


def quantize(x: torch.Tensor, scheme: QuantScheme) -> QuantizedTensor:
    """x (..., Hkv, S, D) floating -> QuantizedTensor (payload (..., Hkv, S, D * bits / 8))."""
    _check_input(x, scheme)
    xb = blocked(x, scheme)
    scale, zero = compute_params(xb, scheme)
    codes = unblocked(encode(xb, scale, zero, scheme), scheme, tuple(x.shape))  # (..., S, D)
    payload = pack_int4(codes) if scheme.bits == 4 else codes.contiguous()
    return QuantizedTensor(payload, scale, zero, scheme, tuple(x.shape))


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """QuantizedTensor -> (..., Hkv, S, D) in dtype."""
    scheme, shape = qt.scheme, qt.shape
    codes = unpack_int4(qt.payload, shape[-1]) if scheme.bits == 4 else qt.payload
    cb = blocked(codes, scheme)
    return unblocked(decode(cb, qt.scale, qt.zero, scheme, dtype), scheme, shape)


def fake_quantize(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype: what attention sees after a round trip."""
    return dequantize(quantize(x, scheme), x.dtype)


def error_bound(x: torch.Tensor, scheme: QuantScheme, qt: QuantizedTensor) -> torch.Tensor:
    """The largest round-trip error each element may have, (..., Hkv, S, D).

    Integers: half a step, scale / 2. FP8: half the spacing of float8 numbers near x / scale
    (2^-(m+1) relative, m mantissa bits), or half the subnormal spacing near zero.
    """
    scale = unblocked(torch.broadcast_to(qt.scale.float(), blocked(x, scheme).shape), scheme,
                      tuple(x.shape))  # (..., Hkv, S, D)
    if not scheme.is_float:
        return scale / 2
    m = FP8_MANTISSA_BITS[scheme.format]
    sub = torch.finfo(FP8_DTYPES[scheme.format]).tiny * 2.0 ** -m  # smallest subnormal
    return scale * torch.maximum((x.float() / scale).abs() * 2.0 ** -(m + 1),
                                 torch.full_like(scale, sub / 2))


def bits_per_value(scheme: QuantScheme, head_dim: int, tokens: int = 1024) -> float:
    """Bits stored per value, scales and zero points included, for one head of `tokens`
    tokens (per-tensor and per-head scales spread over them)."""
    x = torch.zeros(1, tokens, head_dim)  # (Hkv=1, S, D)
    qt = quantize(x, scheme)
    return 8 * sum(qt.nbytes.values()) / x.numel()
