"""Kernels: fast paths over paged KV pools, each beside the plain reference it must equal.

They take plain tensors (queries, pools, block tables, lengths), never a cache, and import
nothing above `kvlib.attention`, `kvlib.checks` and `kvlib.config`.

`common`: input checks, which keys a query sees (windows, sinks), where Triton runs.
`reference`: gather-then-attend in fp32, the reference of every kernel here.
`quant`: the one INT8/FP8 encoding: codes in the pool, an fp32 scale per row beside it.
`store_kv`: new keys and values into a pool through `slot_mapping`, plain or quantized (Triton).
`paged_decode_cpu`: decode reading blocks in place on the CPU (numba), `paged_decode_numba`.
`paged_decode`: flash-decoding over block tables, split KV + merge (Triton),
    `paged_decode_triton`.
`paged_decode_int8`: the same over INT8/FP8 pools, in several variants (Triton),
    `paged_decode_quantized`.
`paged_prefill`: packed query chunks of a mixed step over block tables (Triton),
    `paged_prefill_triton`.
"""
