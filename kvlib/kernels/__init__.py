"""Kernels: fast paths over the caches, each beside the pure-torch reference it must equal.

`paged_decode_cpu`: decode attention that reads a paged cache's blocks in place (numba).
"""
