"""Writing new keys and values into a paged pool through `slot_mapping` (Triton).

A forward pass produces keys and values for N new tokens, packed (N, Hkv, D). Each token has
a slot, `slot = block_id * BS + offset_in_block`, chosen by the cache in `begin`; this kernel
scatters every token's (Hkv, D) rows to `pool[block_id, :, offset_in_block, :]`. A negative
slot means "do not store" (padding tokens), as in vLLM's `reshape_and_cache`.

Worked example, block size 16: slot 37 is block 2, offset 5.

>>> divmod(37, 16)
(2, 5)

`store_kv_ref` is the same scatter in plain torch indexing; `store_kv` runs the Triton kernel
where Triton can run (a CUDA tensor, or any tensor under `TRITON_INTERPRET=1`) and the
reference otherwise, so callers never need to check.

Legend: N new tokens, Hkv KV heads, D head dim, NB blocks, BS block size.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # kvlib imports without triton; store_kv falls back to the reference
    triton = None

# NOTE: Triton decides when a kernel is decorated (at import) whether it is compiled for a GPU
# or run by the interpreter on any tensor; this module's kernels follow that one decision.
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """pool[slot // BS, :, slot % BS] = new, for k and v; negative slots are skipped."""
    keep = slot_mapping >= 0  # (N,)
    slots = slot_mapping[keep].long()  # (N',)
    BS = k_pool.shape[2]
    k_pool[slots // BS, :, slots % BS] = k[keep].to(k_pool.dtype)  # (N', Hkv, D) into the pool
    v_pool[slots // BS, :, slots % BS] = v[keep].to(v_pool.dtype)


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take this tensor: on a GPU, or anywhere when interpreted."""
    return triton is not None and (INTERPRETED or t.device.type == "cuda")


def _check(k, v, k_pool, v_pool, slot_mapping) -> None:
    if k.dim() != 3 or v.shape != k.shape or k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(f"expected k, v (N, Hkv, D) and pools (NB, Hkv, BS, D), got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}, k_pool {tuple(k_pool.shape)}, "
                         f"v_pool {tuple(v_pool.shape)}")
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
        BS=k_pool.shape[2], D=D, D_PAD=triton.next_power_of_2(D))


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
