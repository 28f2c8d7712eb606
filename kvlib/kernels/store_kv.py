"""Writing new keys and values into a paged pool through `slot_mapping` (Triton).

A forward pass produces keys and values for N new tokens, packed (N, Hkv, D). Each token has
a slot, `slot = block_id * BS + offset_in_block`, chosen by the cache; these kernels scatter
every token's (Hkv, D) rows to `pool[block_id, :, offset_in_block, :]`. A negative slot means
"do not store" (padding tokens), as in vLLM's `reshape_and_cache`.

Worked example, block size 16: slot 37 is block 2, offset 5.

>>> divmod(37, 16)
(2, 5)

`store_kv` copies the rows as they are (converted to the pool's dtype). `store_kv_quantized`
quantizes each row while it writes it, in the encoding of `kvlib.kernels.quant`: codes into
an int8 or float8_e4m3fn pool, one fp32 scale per (token, KV head) into a (NB, Hkv, BS)
scale pool beside it. Each has a plain-torch reference (`store_kv_ref`,
`store_kv_quantized_ref`), which is also what runs where Triton cannot (a CPU tensor without
`TRITON_INTERPRET=1`), so callers never need to check.

Legend: N new tokens, Hkv KV heads, D head dim, NB blocks, BS block size.
"""

from __future__ import annotations

import torch

from kvlib.kernels.common import check_pools, pow2_at_least, triton_runs_on
from kvlib.kernels.quant import CODE_MAX, check_codes, encode, row_scale

try:
    import triton
    import triton.language as tl
except ImportError:  # kvlib imports without triton; store_kv falls back to the reference
    triton = None


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """pool[slot // BS, :, slot % BS] = new, for k and v; negative slots are skipped."""
    keep = slot_mapping >= 0  # (N,)
    slots = slot_mapping[keep].long()  # (N',)
    BS = k_pool.shape[2]
    k_pool[slots // BS, :, slots % BS] = k[keep].to(k_pool.dtype)  # (N', Hkv, D) into the pool
    v_pool[slots // BS, :, slots % BS] = v[keep].to(v_pool.dtype)


def store_kv_quantized_ref(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                           v_pool: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
    """Quantize each new row (`kvlib.kernels.quant`), then store codes and scale at its slot."""
    keep = slot_mapping >= 0  # (N,)
    slots = slot_mapping[keep].long()  # (N',)
    BS = k_pool.shape[2]
    for new, pool, scale in ((k, k_pool, k_scale), (v, v_pool, v_scale)):
        s = row_scale(new[keep], pool.dtype)  # (N', Hkv)
        pool[slots // BS, :, slots % BS] = encode(new[keep], s, pool.dtype)  # (N', Hkv, D)
        scale[slots // BS, :, slots % BS] = s


def _check(k, v, k_pool, v_pool, slot_mapping) -> None:
    check_pools(k_pool, v_pool)
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected k, v (N, Hkv, D) of equal shape, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    N, Hkv, D = k.shape
    if (k_pool.shape[1], k_pool.shape[3]) != (Hkv, D):
        raise ValueError(f"k {tuple(k.shape)} does not fit pools {tuple(k_pool.shape)}: "
                         f"Hkv and D must match")
    if slot_mapping.shape != (N,):
        raise ValueError(f"slot_mapping must be (N={N},), got {tuple(slot_mapping.shape)}")


def store_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys and values in the pools, in place.

    Args:
        k, v: (N, Hkv, D) the new tokens' keys and values.
        k_pool, v_pool: (NB, Hkv, BS, D) one layer's pool, any strides.
        slot_mapping: (N,) int slot of each token (block_id * BS + offset); < 0 skips it.
    """
    _check(k, v, k_pool, v_pool, slot_mapping)
    if not triton_runs_on(k_pool) or k.shape[0] == 0:
        store_kv_ref(k, v, k_pool, v_pool, slot_mapping)
        return
    N, Hkv, D = k.shape
    _store_kv_kernel[(N, Hkv)](
        k, v, k_pool, v_pool, slot_mapping,
        *k.stride(), *v.stride(), *k_pool.stride(), *v_pool.stride(),
        BS=k_pool.shape[2], D=D, D_PAD=pow2_at_least(D))


def store_kv_quantized(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                       v_pool: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Quantize new keys and values row by row and store codes and scales, in place.

    Args:
        k, v: (N, Hkv, D) the new tokens' keys and values, any float dtype.
        k_pool, v_pool: (NB, Hkv, BS, D) int8 or float8_e4m3fn codes, any strides.
        k_scale, v_scale: (NB, Hkv, BS) float32 scales, any strides.
        slot_mapping: (N,) int slot of each token (block_id * BS + offset); < 0 skips it.

    Each row gets scale = max|row| / CODE_MAX (1 for an all-zero row) and codes
    round(row / scale) (ties to even) for int8, row / scale in e4m3 for fp8: the same bits as
    `store_kv_quantized_ref`.
    """
    _check(k, v, k_pool, v_pool, slot_mapping)
    check_codes(k_pool, k_scale, "k_pool")
    check_codes(v_pool, v_scale, "v_pool")
    if k_pool.dtype != v_pool.dtype:
        raise ValueError(f"k_pool and v_pool hold different codes: {k_pool.dtype}, "
                         f"{v_pool.dtype}")
    if not triton_runs_on(k_pool) or k.shape[0] == 0:
        store_kv_quantized_ref(k, v, k_pool, v_pool, k_scale, v_scale, slot_mapping)
        return
    N, Hkv, D = k.shape
    _store_kv_quantized_kernel[(N, Hkv)](
        k, v, k_pool, v_pool, k_scale, v_scale, slot_mapping,
        *k.stride(), *v.stride(), *k_pool.stride(), *v_pool.stride(), *k_scale.stride(),
        *v_scale.stride(), BS=k_pool.shape[2], D=D, D_PAD=pow2_at_least(D),
        CODE_MAX=CODE_MAX[k_pool.dtype], INT_CODES=k_pool.dtype == torch.int8)


if triton is not None:

    @triton.jit
    def _store_kv_kernel(
        k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, slot_ptr,
        sk_n, sk_h, sk_d, sv_n, sv_h, sv_d,  # strides of k, v (N, Hkv, D)
        skp_b, skp_h, skp_t, skp_d,  # strides of k_pool (NB, Hkv, BS, D)
        svp_b, svp_h, svp_t, svp_d,  # strides of v_pool
        BS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    ):
        # One program per (token, KV head): one row of D values for K and one for V.
        n = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(slot_ptr + n).to(tl.int64)
        if slot >= 0:
            # -- step 1: where the token goes --
            block = slot // BS
            offset = slot % BS
            d = tl.arange(0, D_PAD)  # (D_PAD,)
            mask = d < D
            # -- step 2: copy its key and value rows, converting to the pool's dtype --
            k_row = tl.load(k_ptr + n * sk_n + h * sk_h + d * sk_d, mask=mask)  # (D_PAD,)
            v_row = tl.load(v_ptr + n * sv_n + h * sv_h + d * sv_d, mask=mask)
            tl.store(k_pool_ptr + block * skp_b + h * skp_h + offset * skp_t + d * skp_d,
                     k_row.to(k_pool_ptr.dtype.element_ty), mask=mask)
            tl.store(v_pool_ptr + block * svp_b + h * svp_h + offset * svp_t + d * svp_d,
                     v_row.to(v_pool_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _quantize_row(row, CODE_MAX: tl.constexpr, INT_CODES: tl.constexpr):
        """(codes, scale) of one fp32 row, as `kvlib.kernels.quant.quantize_kv`."""
        absmax = tl.max(tl.abs(row), 0)
        scale = tl.where(absmax > 0, tl.div_rn(absmax, CODE_MAX), 1.0)
        y = tl.div_rn(row, scale)  # (D_PAD,) in [-CODE_MAX, CODE_MAX]
        if INT_CODES:
            # round to nearest, ties to even (as torch.round): adding 1.5 * 2^23 leaves no
            # fraction bits in an fp32, so the hardware's rounding of the sum does it
            y = (y + 12582912.0) - 12582912.0
        return y.to(tl.float32), scale

    @triton.jit
    def _store_kv_quantized_kernel(
        k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
        sk_n, sk_h, sk_d, sv_n, sv_h, sv_d,  # strides of k, v (N, Hkv, D)
        skp_b, skp_h, skp_t, skp_d,  # strides of k_pool (NB, Hkv, BS, D)
        svp_b, svp_h, svp_t, svp_d,  # strides of v_pool
        sks_b, sks_h, sks_t, svs_b, svs_h, svs_t,  # strides of k_scale, v_scale (NB, Hkv, BS)
        BS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, CODE_MAX: tl.constexpr,
        INT_CODES: tl.constexpr,
    ):
        # One program per (token, KV head): quantize its key row and its value row.
        n = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(slot_ptr + n).to(tl.int64)
        if slot >= 0:
            # -- step 1: where the token goes --
            block = slot // BS
            offset = slot % BS
            d = tl.arange(0, D_PAD)  # (D_PAD,)
            mask = d < D
            # -- step 2: each row's scale and codes (padding lanes load 0: no effect on max) --
            k_row = tl.load(k_ptr + n * sk_n + h * sk_h + d * sk_d, mask=mask, other=0.0)
            v_row = tl.load(v_ptr + n * sv_n + h * sv_h + d * sv_d, mask=mask, other=0.0)
            k_codes, k_s = _quantize_row(k_row.to(tl.float32), CODE_MAX, INT_CODES)
            v_codes, v_s = _quantize_row(v_row.to(tl.float32), CODE_MAX, INT_CODES)
            # -- step 3: codes into the pools, scales beside them --
            k_codes = tl.clamp(k_codes, -CODE_MAX, CODE_MAX)
            v_codes = tl.clamp(v_codes, -CODE_MAX, CODE_MAX)
            tl.store(k_pool_ptr + block * skp_b + h * skp_h + offset * skp_t + d * skp_d,
                     k_codes.to(k_pool_ptr.dtype.element_ty), mask=mask)
            tl.store(v_pool_ptr + block * svp_b + h * svp_h + offset * svp_t + d * svp_d,
                     v_codes.to(v_pool_ptr.dtype.element_ty), mask=mask)
            tl.store(k_scale_ptr + block * sks_b + h * sks_h + offset * sks_t, k_s)
            tl.store(v_scale_ptr + block * svs_b + h * svs_h + offset * svs_t, v_s)
