"""Rows of codes: how a quantized cache packs a (token, KV head) row into bytes, and back.

llama.cpp-style, each row holds the codes of the D channels followed by their scales and zero
points:

    row = [ codes: D bytes (int8, fp8) or D/2 (int4) | scales | zero points ]

so the memory saved is memory really saved, and paging or forking a quantized sequence is
paging or forking its rows. Scales live where their granularity puts them:
  - per token (groups of channels): in the token's own row;
  - per channel (groups of G tokens, KIVI's keys): one group's D scales are spread over the
    group's G rows (ceil(D / G) each); a group is encoded once all its G tokens are known;
  - per head / per tensor (vLLM's FP8): one scale per layer, calibrated on the first rows
    encoded for that layer and fixed after it (later values beyond it are clipped).

Legend: N rows, Hkv KV heads, D head dim, W row bytes, G tokens per scale group, B, S.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kvlib.cache.quant_memory import KVQuantConfig, row_layout
from kvlib.cache.quantize import (
    blocked,
    compute_params,
    decode,
    encode,
    pack_int4,
    unblocked,
    unpack_int4,
)


class RowCodec:
    """Encode (N, Hkv, D) keys or values into (N, Hkv, W) byte rows, and decode them."""

    def __init__(self, quant: KVQuantConfig, head_dim: int, dtype: torch.dtype) -> None:
        self.quant, self.head_dim, self.dtype = quant, head_dim, dtype
        self.layouts = (row_layout(quant.keys, head_dim), row_layout(quant.values, head_dim))
        self.row_bytes = max(lay.row_bytes for lay in self.layouts)  # W: K and V rows alike
        # (layer, 0 for K / 1 for V) -> (scale, zero) of a per-tensor or per-head scheme
        self.static: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def encode(self, layer: int, kind: int, xs: list[torch.Tensor]) -> torch.Tensor:
        """Per-sequence (n_b, Hkv, D) runs of whole groups -> (sum n_b, Hkv, W) uint8 rows.

        Returns the rows; a per-tensor or per-head scheme calibrates its scale on the first
        rows of a layer (`static` then holds it: the caller may forget it again on abort)."""
        scheme, lay = (self.quant.keys, self.quant.values)[kind], self.layouts[kind]
        x = torch.cat(xs)  # (N, Hkv, D)
        if scheme.granularity in ("tensor", "head"):
            if (layer, kind) not in self.static:
                self.static[(layer, kind)] = compute_params(x.transpose(0, 1), scheme)
            scale, zero = self.static[(layer, kind)]
            codes = encode(x.transpose(0, 1), scale, zero, scheme).transpose(0, 1)
            return self._pack(lay, codes, None, None)  # (N, Hkv, W)
        if scheme.granularity == "token":
            xb = blocked(x[:, :, None], scheme)  # (N, Hkv, 1, nG, g)
            scale, zero = compute_params(xb, scheme)  # (N, Hkv, 1, nG, 1)
            codes = unblocked(encode(xb, scale, zero, scheme), scheme, (*x.shape[:2], 1,
                                                                       x.shape[2]))
            return self._pack(lay, codes[:, :, 0], scale.flatten(2),
                              None if zero is None else zero.flatten(2))
        out = []  # per channel, groups of G tokens
        G = scheme.group_size
        for run in xs:
            n = run.shape[0]
            assert n % G == 0, "a run of rows to encode per channel holds whole groups"
            rows = x.new_zeros(n, run.shape[1], self.row_bytes, dtype=torch.uint8)
            if n:
                grp = blocked(run.transpose(0, 1), scheme)  # (Hkv, nG, G, D)
                scale, zero = compute_params(grp, scheme)  # (Hkv, nG, 1, D)
                codes = encode(grp, scale, zero, scheme).flatten(1, 2)  # (Hkv, n, D)
                spread = [None if t is None else _spread(t, G, lay.num_scales)
                          for t in (scale, zero)]  # (Hkv, n, ceil(D/G))
                rows[:] = self._pack(lay, codes.transpose(0, 1), *[
                    None if t is None else t.transpose(0, 1) for t in spread])
            out.append(rows)
        return torch.cat(out)  # (N, Hkv, W)

    def decode(self, layer: int, kind: int, data: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, S, W) bytes -> (B, Hkv, S, D) in the cache's dtype."""
        scheme, lay = (self.quant.keys, self.quant.values)[kind], self.layouts[kind]
        D, dtype = self.head_dim, self.dtype
        payload = data[..., :lay.payload]
        codes = unpack_int4(payload, D) if scheme.bits == 4 else payload  # (B, Hkv, S, D)
        if scheme.granularity in ("tensor", "head"):
            if (layer, kind) not in self.static:  # nothing encoded for this layer yet
                return torch.zeros(codes.shape, dtype=dtype, device=codes.device)
            scale, zero = self.static[(layer, kind)]
            return decode(codes, scale, zero, scheme, dtype)
        params = [data[..., a:b].contiguous().view(scheme.scale_dtype)
                  for a, b in lay.param_spans]  # (B, Hkv, S, n) each
        if scheme.granularity == "token":
            shape = (*codes.shape[:3], 1, D)
            cb = blocked(codes[:, :, :, None], scheme)  # (B, Hkv, S, 1, nG, g)
            pb = [p[:, :, :, None, :, None] for p in params]  # (B, Hkv, S, 1, nG, 1)
            x = unblocked(decode(cb, pb[0], pb[1] if len(pb) > 1 else None, scheme, dtype),
                          scheme, shape)
            return x[:, :, :, 0]
        G, S = scheme.group_size, codes.shape[2]
        extra = -S % G
        codes = F.pad(codes, (0, 0, 0, extra))  # (B, Hkv, S', D)
        pb = [_gather(F.pad(p, (0, 0, 0, extra)), G, D) for p in params]
        cb = codes.unflatten(2, (-1, G))  # (B, Hkv, nG, G, D)
        x = decode(cb, pb[0], pb[1] if len(pb) > 1 else None, scheme, dtype)
        return x.flatten(2, 3)[:, :, :S]  # (B, Hkv, S, D)

    def _pack(self, lay, codes: torch.Tensor, scale: torch.Tensor | None,
              zero: torch.Tensor | None) -> torch.Tensor:
        """codes (N, Hkv, D) uint8, scale/zero (N, Hkv, n) -> rows (N, Hkv, W) uint8."""
        parts = [pack_int4(codes) if lay.scheme.bits == 4 else codes]
        parts += [t.contiguous().view(torch.uint8) for t in (scale, zero) if t is not None]
        row = torch.cat(parts, dim=-1)  # (N, Hkv, lay.row_bytes)
        return F.pad(row, (0, self.row_bytes - row.shape[-1]))  # (N, Hkv, W)


def _spread(t: torch.Tensor, G: int, per_row: int) -> torch.Tensor:
    """(Hkv, nG, 1, D) group parameters -> (Hkv, nG * G, per_row): each group's D values
    spread over its G rows, per_row = ceil(D / G) each (zero-padded)."""
    Hkv, nG, _, D = t.shape
    flat = F.pad(t[:, :, 0], (0, G * per_row - D))  # (Hkv, nG, G*per_row)
    return flat.view(Hkv, nG * G, per_row)


def _gather(p: torch.Tensor, G: int, D: int) -> torch.Tensor:
    """Inverse of `_spread`: (B, Hkv, S', per_row) -> (B, Hkv, nG, 1, D)."""
    B, Hkv, S, per = p.shape
    return p.reshape(B, Hkv, S // G, G * per)[..., :D][:, :, :, None]
