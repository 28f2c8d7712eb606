"""Configuration: the shape of a model and the shape of its KV cache.

Both are frozen dataclasses validated on construction, so a bad value fails where it is
written, with the field's name, instead of deep inside a matmul.

>>> cfg = ModelConfig(vocab_size=1000, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2)
>>> cfg.head_dim, cfg.queries_per_kv
(16, 2)
>>> CacheConfig.for_model(cfg, max_batch_size=3, max_seq_len=128).shape
(2, 3, 128, 2, 2, 16)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from kvlib.checks import is_int, require_int, require_number

# kv_cache_dtype -> the dtype of the codes a paged cache stores (None: the values themselves)
KV_CODE_DTYPES = {"auto": None, "int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


class Layout(str, Enum):
    """How a flat cache orders its dimensions.

    SEQ_MAJOR is `[layers, batch, seq, 2, kv_heads, head_dim]`, the simplest to write: one
    token's keys and values for every head sit together, which makes appending cheap.
    HEAD_MAJOR is `[layers, 2, batch, kv_heads, seq, head_dim]`: each head's keys form one
    contiguous `(seq, head_dim)` matrix, which a batched matmul needs to avoid copying
    (chapter 2 measures it; fused kernels such as FlashAttention read either layout).
    """

    SEQ_MAJOR = "seq_major"
    HEAD_MAJOR = "head_major"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-style decoder.

    `head_dim` defaults to `d_model // num_heads`; it may differ (some models decouple them).
    `num_kv_heads` below `num_heads` is grouped-query attention (one KV head per group of
    `queries_per_kv` query heads); `num_kv_heads == 1` is multi-query attention.

    Switches some real families need: `qkv_bias` puts biases on the q, k and v projections
    (Qwen2; o has none). `sliding_window` W makes a layer attend to its last W keys only (the
    query's own included), on the layers in `sliding_layers`, or on every layer when that is
    None (Mistral-7B v0.1); Gemma-2 alternates, windowed layers 0, 2, 4, ...
    `sink_tokens` k keeps the first k positions visible to the windowed layers besides their
    window (StreamingLLM's "attention sinks": a model trained with full attention, run with
    a window and sinks so that its cache stops growing).

    >>> cfg = ModelConfig(vocab_size=10, d_model=8, num_layers=4, num_heads=2, num_kv_heads=1,
    ...                   sliding_window=16, sliding_layers=(0, 2))
    >>> cfg.layer_windows
    (16, None, 16, None)
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: derive d_model // num_heads
    ffn_dim: int = 0  # 0: derive 4 * d_model
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None  # None: every layer attends to all earlier keys
    sliding_layers: tuple[int, ...] | None = None  # layers with the window; None: all of them
    sink_tokens: int = 0  # windowed layers also always see the first k positions (StreamingLLM)
    kv_lora_rank: int = 0  # R: MLA's latent per token and layer; 0: K and V per KV head
    qk_rope_head_dim: int = 0  # P: MLA's rotary part of each query and key (one key for all heads)
    qk_nope_head_dim: int = 0  # MLA's part of each head's query and key without rotation
    v_head_dim: int = 0  # MLA's value dim per head
    q_lora_rank: int = 0  # MLA's query bottleneck; 0: queries straight from the hidden state
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                     "max_seq_len"):
            require_int(f"ModelConfig.{name}", getattr(self, name), minimum=1)
        for name in ("head_dim", "ffn_dim"):  # 0: derived below
            require_int(f"ModelConfig.{name} (0: derive it)", getattr(self, name), minimum=0)
        self._check_latent()
        if self.head_dim == 0:
            _require(
                self.d_model % self.num_heads == 0,
                f"ModelConfig.d_model ({self.d_model}) must be divisible by num_heads "
                f"({self.num_heads}) when head_dim is not given",
            )
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", 4 * self.d_model)
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
            f"({self.num_kv_heads}): each KV head serves a whole group of query heads",
        )
        _require(self.head_dim % 2 == 0,
                 f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("rope_theta", "norm_eps"):
            require_number(f"ModelConfig.{name}", getattr(self, name), above=0)
        for name in ("tie_embeddings", "qkv_bias"):
            _require(isinstance(getattr(self, name), bool),
                     f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        self._check_window()

    def _check_latent(self) -> None:
        names = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                 "q_lora_rank")
        for name in names:
            require_int(f"ModelConfig.{name}", getattr(self, name), minimum=0)
        if not self.kv_lora_rank:
            _require(not any(getattr(self, n) for n in names[1:]),
                     "ModelConfig: qk_rope_head_dim, qk_nope_head_dim, v_head_dim and "
                     "q_lora_rank are latent attention's; give kv_lora_rank too")
            return
        for name in names[1:4]:
            require_int(f"ModelConfig.{name}", getattr(self, name), minimum=1)
        _require(self.qk_rope_head_dim % 2 == 0, f"ModelConfig.qk_rope_head_dim must be even "
                 f"for rotary embeddings, got {self.qk_rope_head_dim}")
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        _require(self.head_dim in (0, qk), f"ModelConfig.head_dim {self.head_dim} must be "
                 f"qk_nope_head_dim + qk_rope_head_dim = {qk} with latent attention")
        object.__setattr__(self, "head_dim", qk)
        _require(self.num_kv_heads == self.num_heads and not self.qkv_bias,
                 f"ModelConfig: latent attention expands a key and a value for every head "
                 f"(num_kv_heads must equal num_heads, {self.num_heads}; got "
                 f"{self.num_kv_heads}) and has no q, k, v biases")

    @property
    def is_latent(self) -> bool:
        """Whether the layers are multi-head latent attention (`kv_lora_rank` > 0)."""
        return self.kv_lora_rank > 0

    @property
    def cache_kv_heads(self) -> int:
        """KV heads a cache stores per token and layer: 1 latent row under MLA."""
        return 1 if self.is_latent else self.num_kv_heads

    @property
    def cache_head_dim(self) -> int:
        """Numbers per cached head: the latent and the rotary key (R + P) under MLA."""
        return self.kv_lora_rank + self.qk_rope_head_dim if self.is_latent else self.head_dim

    def _check_window(self) -> None:
        if self.sliding_window is not None:
            require_int("ModelConfig.sliding_window", self.sliding_window, minimum=1)
        require_int("ModelConfig.sink_tokens", self.sink_tokens, minimum=0)
        _require(self.sink_tokens == 0 or self.sliding_window is not None,
                 f"ModelConfig.sink_tokens {self.sink_tokens} given without a sliding_window: "
                 f"sinks are kept beside a window")
        if self.sliding_layers is None:
            return
        _require(self.sliding_window is not None,
                 f"ModelConfig.sliding_layers {self.sliding_layers!r} given without a "
                 f"sliding_window")
        _require(isinstance(self.sliding_layers, tuple | list),
                 f"ModelConfig.sliding_layers must be a tuple of layer indices, got "
                 f"{self.sliding_layers!r}")
        layers = tuple(self.sliding_layers)
        _require(all(is_int(i) and 0 <= i < self.num_layers for i in layers)
                 and len(set(layers)) == len(layers),
                 f"ModelConfig.sliding_layers must be distinct layer indices in "
                 f"[0, {self.num_layers}), got {self.sliding_layers!r}")
        object.__setattr__(self, "sliding_layers", tuple(sorted(layers)))

    def window(self, layer_idx: int) -> int | None:
        """Keys layer `layer_idx` attends to at most (its window W), or None for all of them."""
        if self.sliding_layers is None or layer_idx in self.sliding_layers:
            return self.sliding_window
        return None

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """`window(i)` for every layer i."""
        return tuple(self.window(i) for i in range(self.num_layers))

    @property
    def queries_per_kv(self) -> int:
        """Query heads sharing one KV head (the GQA group size)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class CacheConfig:
    """The shape of a KV cache: which model dimensions it stores and how much room it has.

    `max_batch_size` and `max_seq_len` size a flat (preallocated) cache; `block_size` is for
    the paged cache, which carves the same memory into blocks of that many tokens.

    `layer_windows` and `sink_tokens` say which keys each layer reads, as the model's layers
    do (`for_model` copies them; `()` means no layer has a window). A cache hands them to
    attention with every view, and may drop what no query reads again; the model refuses a
    cache whose windows are not its own.

    What one token's row is. By default a cache stores two rows per token, layer and KV
    head: a key and a value of `head_dim` numbers each (`kv_parts` = 2). With `latent_dim`
    R > 0 it stores ONE row per token and layer (multi-head latent attention, `kvlib.mla`):
    `num_kv_heads` is 1 and `head_dim` is R + P, the latent (R numbers) followed by the
    rotary key (P). Attention reads the whole row as the key and its first R numbers as the
    value, so nothing is stored twice (vLLM's MLA cache holds the same one row of
    `kv_lora_rank + qk_rope_head_dim`). Storage keeps one part where it kept two
    (`kv_parts` = 1); writes pass the row as `k` and no `v`.

    >>> cfg = ModelConfig(vocab_size=10, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1,
    ...                   sliding_window=4, sliding_layers=(0,))
    >>> CacheConfig.for_model(cfg, max_batch_size=1, max_seq_len=16).layer_windows
    (4, None)
    >>> latent = CacheConfig(num_layers=61, num_kv_heads=1, head_dim=512 + 64, max_batch_size=1,
    ...                      max_seq_len=16, latent_dim=512, dtype=torch.bfloat16)
    >>> latent.kv_parts, latent.value_dim, latent.bytes_per_token   # DeepSeek-V3: 61 x 576 x 2
    (1, 512, 70272)
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_batch_size: int
    max_seq_len: int
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    layout: Layout = Layout.SEQ_MAJOR
    block_size: int = 16
    layer_windows: tuple[int | None, ...] = ()  # a window W per layer, or None; (): none at all
    sink_tokens: int = 0  # first positions windowed layers always read
    latent_dim: int = 0  # R > 0: one row per token (MLA's latent + rotary key); 0: K and V
    # How a paged cache stores keys and values: "auto" in `dtype`; "int8" or "fp8_e4m3" as one
    # code per number and a float32 scale per (token, KV head), what the fused kernels read.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "max_batch_size",
                     "max_seq_len", "block_size"):
            require_int(f"CacheConfig.{name}", getattr(self, name), minimum=1)
        windows = tuple(self.layer_windows)
        _require(not windows or len(windows) == self.num_layers,
                 f"CacheConfig.layer_windows has {len(windows)} entries for {self.num_layers} "
                 f"layers")
        for w in windows:
            if w is not None:
                require_int("CacheConfig.layer_windows entry", w, minimum=1)
        if all(w is None for w in windows):
            windows = ()
        object.__setattr__(self, "layer_windows", windows)
        require_int("CacheConfig.sink_tokens", self.sink_tokens, minimum=0)
        _require(self.sink_tokens == 0 or bool(windows),
                 f"CacheConfig.sink_tokens {self.sink_tokens} given without layer_windows")
        require_int("CacheConfig.latent_dim", self.latent_dim, minimum=0)
        _require(self.latent_dim <= self.head_dim,
                 f"CacheConfig.latent_dim must be in [0, head_dim={self.head_dim}], got "
                 f"{self.latent_dim}")
        _require(not self.latent_dim or self.num_kv_heads == 1,
                 f"CacheConfig.latent_dim {self.latent_dim}: a latent row serves every head, "
                 f"so num_kv_heads must be 1, got {self.num_kv_heads}")
        _require(self.kv_cache_dtype in KV_CODE_DTYPES,
                 f"CacheConfig.kv_cache_dtype must be one of {sorted(KV_CODE_DTYPES)}, got "
                 f"{self.kv_cache_dtype!r}")
        _require(not (self.latent_dim and self.code_dtype is not None),
                 f"CacheConfig: a latent row (latent_dim {self.latent_dim}) is stored in "
                 f"`dtype`; kv_cache_dtype {self.kv_cache_dtype!r} codes only keys and values")
        _require(isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point,
                 f"CacheConfig.dtype must be a floating torch.dtype, got {self.dtype!r}")
        try:
            object.__setattr__(self, "device", torch.device(self.device))
        except (RuntimeError, TypeError, ValueError) as err:
            raise ValueError(f"CacheConfig.device: {err}") from None
        try:
            object.__setattr__(self, "layout", Layout(self.layout))
        except ValueError:
            raise ValueError(f"CacheConfig.layout must be one of "
                             f"{[m.value for m in Layout]}, got {self.layout!r}") from None

    @classmethod
    def for_model(cls, model: ModelConfig, *, max_batch_size: int, max_seq_len: int,
                  **kwargs) -> CacheConfig:
        """A cache config with the model's layers, cached heads and row (a latent row under
        MLA), windows and sinks."""
        kwargs = {"layer_windows": model.layer_windows, "sink_tokens": model.sink_tokens,
                  "latent_dim": model.kv_lora_rank, **kwargs}
        return cls(num_layers=model.num_layers, num_kv_heads=model.cache_kv_heads,
                   head_dim=model.cache_head_dim, max_batch_size=max_batch_size,
                   max_seq_len=max_seq_len, **kwargs)

    @property
    def code_dtype(self) -> torch.dtype | None:
        """The dtype of the stored codes (int8, float8_e4m3fn), or None: values in `dtype`."""
        return KV_CODE_DTYPES[self.kv_cache_dtype]

    def window(self, layer: int) -> int | None:
        """The window W of layer `layer`, or None when it reads every earlier key."""
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def kv_parts(self) -> int:
        """Rows stored per token, layer and head: 2 (a key and a value), 1 (a latent row)."""
        return 1 if self.latent_dim else 2

    @property
    def value_dim(self) -> int:
        """Numbers in a value attention reads: head_dim, or the latent's R."""
        return self.latent_dim or self.head_dim

    @property
    def shape(self) -> tuple[int, ...]:
        """The flat cache's tensor shape in this layout (K and V, or the latent row, in one
        tensor)."""
        L, B, S, H, D = (self.num_layers, self.max_batch_size, self.max_seq_len,
                         self.num_kv_heads, self.head_dim)
        if self.layout is Layout.SEQ_MAJOR:
            return (L, B, S, self.kv_parts, H, D)
        return (L, self.kv_parts, B, H, S, D)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers: K and V of every KV head (with codes,
        one byte a number plus a 4-byte scale per head), or the one latent row."""
        if self.code_dtype is not None:
            return 2 * self.num_layers * self.num_kv_heads * (self.head_dim + 4)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.kv_parts * self.num_layers * self.num_kv_heads * self.head_dim * itemsize
