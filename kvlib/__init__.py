"""kvlib: the small library under the KV-Cache Book.

One concept per module: `config` (shapes), `checks` (input validation), `attention`
(reference attention), `flash` (chunked attention with online softmax, split-KV decoding),
`contract` (what caches, kernels, the model and the scheduler agree on), `backends` (how
attention runs: reference, SDPA, chunked, fast paths), `cache` (flat, ring, paged and
quantized caches; cache groups, the block manager, storage and step builder), `kernels`
(fast paths beside their references), `model` (a Llama-style decoder), `sampling`,
`scheduler` and `engine` (continuous batching over any paged cache), `static_batching` (its
baseline), `presets` (model shapes, GPU peaks), `analysis` (memory, FLOP and roofline
formulas), `real_models` (caches of real models: sliding windows, MLA, tensor-parallel
shards), `hf` (Hugging Face checkpoints of the Llama family, read from safetensors), `bench`
(timing),
`experiments` (the measurements chapters share), `viz` and `widgets` (for the chapters).
"""

from kvlib.cache import FlatKVCache, KVCache, PagedKVCache
from kvlib.config import CacheConfig, Layout, ModelConfig
from kvlib.model import Generation, MultiHeadAttention, TransformerBlock, TransformerLM
from kvlib.sampling import SamplingParams

__all__ = [
    "CacheConfig", "FlatKVCache", "Generation", "KVCache", "Layout", "ModelConfig",
    "MultiHeadAttention", "PagedKVCache", "SamplingParams", "TransformerBlock", "TransformerLM",
]
__version__ = "0.1.0"
