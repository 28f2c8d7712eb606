"""KV caches. Every cache implements the contract in `contract.py`."""

from kvlib.cache.blocks import BlockAllocator, KVCacheBlock
from kvlib.cache.contract import DenseKV, KVCache, PagedKV, StepBatch
from kvlib.cache.flat import FlatKVCache
from kvlib.cache.paged import PagedKVCache

__all__ = ["BlockAllocator", "DenseKV", "FlatKVCache", "KVCache", "KVCacheBlock", "PagedKV",
           "PagedKVCache", "StepBatch"]
