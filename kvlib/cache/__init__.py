"""KV caches. Every cache implements the contract in `contract.py`."""

from kvlib.cache.blocks import BlockAllocator, KVCacheBlock
from kvlib.cache.contract import DenseKV, KVCache, PagedKV, StepBatch
from kvlib.cache.flat import FlatKVCache
from kvlib.cache.paged import PagedKVCache
from kvlib.cache.quant_memory import KVQuantConfig
from kvlib.cache.quantize import QuantScheme
from kvlib.cache.quantized import QuantizedKVCache

__all__ = ["BlockAllocator", "DenseKV", "FlatKVCache", "KVCache", "KVCacheBlock",
           "KVQuantConfig", "PagedKV", "PagedKVCache", "QuantScheme", "QuantizedKVCache",
           "StepBatch"]
