"""Kernels: fast paths over the caches, each beside the pure-torch reference it must equal.

`paged_decode_cpu`: decode attention that reads a paged cache's blocks in place (numba).
`store_kv`: new keys and values into a paged pool through `slot_mapping` (Triton).
`paged_decode`: flash-decoding over block tables, split KV length + merge (Triton).
`paged_decode_int8`: the same over INT8 pools, dequantized inside the kernel (Triton).
"""
