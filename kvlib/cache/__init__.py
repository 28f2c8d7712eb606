"""KV caches. Every cache implements the contract in `contract.py`."""

from kvlib.cache.contract import KVCache
from kvlib.cache.flat import FlatKVCache

__all__ = ["FlatKVCache", "KVCache"]
