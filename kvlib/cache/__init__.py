"""KV caches. Every cache implements the contract in `kvlib.contract`."""

from kvlib.cache.block_manager import BlockManager, SequenceBlocks
from kvlib.cache.blocks import BlockAllocator, KVCacheBlock
from kvlib.cache.flat import FlatKVCache
from kvlib.cache.groups import CacheGroup, cache_groups, check_cache_matches
from kvlib.cache.paged import PagedKVCache
from kvlib.cache.quant_memory import KVQuantConfig
from kvlib.cache.quantize import QuantScheme
from kvlib.cache.quantized import QuantizedKVCache
from kvlib.cache.ring import RingKVCache
from kvlib.contract import DenseKV, KVCache, KVCacheManager, PagedKV, StepBatch

__all__ = ["BlockAllocator", "BlockManager", "CacheGroup", "DenseKV", "FlatKVCache", "KVCache",
           "KVCacheBlock", "KVCacheManager", "KVQuantConfig", "PagedKV", "PagedKVCache",
           "QuantScheme", "QuantizedKVCache", "RingKVCache", "SequenceBlocks", "StepBatch",
           "cache_groups", "check_cache_matches"]
