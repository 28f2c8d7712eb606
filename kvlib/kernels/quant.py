"""The one quantized encoding of a paged cache: codes in the pool, a scale per row beside it.

A key (or value) row of one head, D numbers, is stored as D codes and one scale:

    codes  (NB, Hkv, BS, D) int8 (symmetric two's complement, -127..127) or float8_e4m3fn
    scale  (NB, Hkv, BS) float32: row ~= scale * codes, scale = max|row| / CODE_MAX

with CODE_MAX 127 for int8 and 448 (e4m3's largest finite value) for fp8. An all-zero row
gets scale 1 (not 0/0). The layout is the float pool's, so block tables, slot mappings and
the kernels' addressing are the same; the scales are a second, smaller pool of the same
(NB, Hkv, BS) blocks.

Why fp32 scales: one per row of D = 128 codes costs 4 bytes against the codes' 128, 3% of
the payload (fp16 would save 1.5%), and keeps the error bound of every row: fp16 cannot hold
a scale below its smallest normal, 6.1e-5, so a row whose largest value is below about 8e-3
would be coded with a coarser step than max|row| / 127 (4.7x the bound at 1e-3). The decode
kernels read the fp32 scale with no conversion.

What the cache (`kvlib.cache.quantized`) stores and the kernels read is this encoding:
`store_kv_quantized` (`kvlib.kernels.store_kv`) writes it on the GPU; `quantize_kv` here is
the reference and the CPU path.

>>> codes, scale = quantize_kv(torch.tensor([[[[0.5, -1.0], [0.0, 0.0]]]]), torch.int8)
>>> codes.tolist(), scale.tolist()
([[[[64, -127], [0, 0]]]], [[[0.007874015718698502, 1.0]]])
>>> dequantize_kv(codes, scale, torch.float32)[0, 0, 0].tolist()
[0.5039370059967041, -1.0]

Legend: NB blocks, Hkv KV heads, BS block size, D head dim, N new tokens.
"""

from __future__ import annotations

import torch

# The largest code of each format: the row's largest magnitude is coded as +-CODE_MAX.
CODE_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
SCALE_DTYPE = torch.float32


def check_codes(codes: torch.Tensor, scale: torch.Tensor, name: str = "pool") -> None:
    """codes (..., D) int8 or float8_e4m3fn, scale (...) float32, on one device."""
    if codes.dtype not in CODE_MAX:
        raise ValueError(f"{name} must hold int8 or float8_e4m3fn codes, got {codes.dtype}")
    if scale.shape != codes.shape[:-1] or scale.dtype != SCALE_DTYPE:
        raise ValueError(f"{name}'s scales must be float32 of shape {tuple(codes.shape[:-1])}, "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if scale.device != codes.device:
        raise ValueError(f"{name}'s scales are on {scale.device}, its codes on {codes.device}")


def row_scale(x: torch.Tensor, code_dtype: torch.dtype) -> torch.Tensor:
    """max|row| / CODE_MAX per row of the last dim, in fp32; 1 for an all-zero row. (...,)"""
    absmax = x.float().abs().amax(dim=-1)  # (...,)
    return torch.where(absmax > 0, absmax / CODE_MAX[code_dtype], torch.ones_like(absmax))


def encode(x: torch.Tensor, scale: torch.Tensor, code_dtype: torch.dtype) -> torch.Tensor:
    """Codes of x (..., D) with its row scales (...,): round to nearest (ties to even) for
    int8, e4m3's own rounding for fp8. (..., D) in `code_dtype`."""
    y = x.float() / scale[..., None]  # (..., D) in [-CODE_MAX, CODE_MAX]
    top = CODE_MAX[code_dtype]
    if code_dtype == torch.int8:
        return y.round().clamp(-top, top).to(torch.int8)
    return y.clamp(-top, top).to(code_dtype)


def quantize_kv(x: torch.Tensor, code_dtype: torch.dtype = torch.int8,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) float -> codes (..., D) in `code_dtype`, scales (...,) fp32: one per row."""
    if code_dtype not in CODE_MAX:
        raise ValueError(f"code_dtype must be one of {list(CODE_MAX)}, got {code_dtype}")
    scale = row_scale(x, code_dtype)  # (...,)
    return encode(x, scale, code_dtype), scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                  ) -> torch.Tensor:
    """codes (..., D) and scales (...,) -> (..., D) in `dtype`, computed in fp32."""
    check_codes(codes, scale, "codes")
    return (codes.float() * scale[..., None]).to(dtype)
