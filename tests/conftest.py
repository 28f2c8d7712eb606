"""Shared test helpers: an independent, deliberately naive attention reference, unit-scale
random models, and hypothesis settings without wall-clock deadlines.

`naive_attention` is written from the definition, one (row, head, query) at a time, in
float64, with an explicit softmax and no mask tensor: it shares no code and no tricks (grouped
reshapes, masked_fill, torch.softmax) with `kvlib.attention`, so agreement with it means
something.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import settings
from torch import nn

from kvlib.config import ModelConfig
from kvlib.model import TransformerLM

# Wall-clock deadlines fail on a loaded machine without saying anything about correctness.
settings.register_profile("kvlib", deadline=None)
settings.load_profile("kvlib")


def _naive_attention(q, k, v, q_positions, kv_lens, window=None, sink_tokens=0, key_start=None):
    """q (B, H, T, D), k/v (B, Hkv, S, D), q_positions (B, T), kv_lens (B,) -> (B, H, T, D).

    Key j of row b sits at position key_start[b] + j (key_start None: j). Query t of row b
    (absolute position p) sees the keys at positions 0 .. min(p, kv_lens[b] - 1), and with a
    window W only those with p - position < W or position < sink_tokens; query head h reads
    KV head h // (H // Hkv) (the Llama convention: each KV head serves a run of consecutive
    query heads).
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = H // Hkv
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        first = 0 if key_start is None else int(key_start[b])
        for h in range(H):
            kv_head = h // group
            for t in range(T):
                p = int(q_positions[b, t])
                visible = [j for j in range(S) if first + j <= p and first + j < int(kv_lens[b])
                           and (window is None or p - (first + j) < window
                                or first + j < sink_tokens)]
                keys = k[b, kv_head, visible].double()  # (visible, D)
                values = v[b, kv_head, visible].double()  # (visible, D)
                query = q[b, h, t].double()  # (D,)
                scores = [float(query @ keys[j]) / math.sqrt(D) for j in range(len(visible))]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                row = torch.zeros(D, dtype=torch.float64)
                for j, w in enumerate(weights):
                    row += (w / total) * values[j]
                out[b, h, t] = row
    return out


def _naive_decode(q, k, v, context_lens):
    """q (B, H, D) one new token per row at position context_lens[b] - 1 -> (B, H, D)."""
    positions = (context_lens.long() - 1)[:, None]  # (B, 1)
    return _naive_attention(q[:, :, None], k, v, positions, context_lens)[:, :, 0]


@pytest.fixture(scope="session")
def naive_attention():
    return _naive_attention


@pytest.fixture(scope="session")
def naive_decode():
    return _naive_decode


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-tensor tests on one intra-op thread, then restore the setting.

    On a 2-core machine, splitting (2, 4, 1, 16)-sized matmuls across threads costs more than
    it saves (and far more when other processes compete for the cores): the model tests run
    several times faster on one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def unit_scale_model(seed: int, *, random_norms: bool = False, **fields) -> TransformerLM:
    """A seeded fp32 model (eval mode, no grad) whose weights are redrawn at unit scale.

    The 0.02 init leaves attention nearly uniform and logits within a few hundredths of each
    other, so a cache that mixes up positions, rows or layers would only move the fifth
    decimal; at unit scale (linear weights ~ N(0, 1.5^2 / fan_in), embeddings ~ N(0, 1))
    attention is sharp and logits differ by whole units. `random_norms` also draws the
    RMSNorm weights from [0.5, 1.5), so a norm applied to the wrong tensor shows too.
    Imported by the test modules as `from conftest import unit_scale_model`.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TransformerLM(ModelConfig(**fields))
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    std = 1.5 / math.sqrt(module.in_features)
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                elif isinstance(module, nn.Embedding):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
            if random_norms:
                for name, param in model.named_parameters():
                    if name.endswith("norm.weight"):
                        param.copy_(0.5 + torch.rand(param.shape, generator=gen))
    return model.eval().requires_grad_(False)


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail the test if any tensor data is read (headers may be): a checkpoint is checked
    before any of its tensors is copied."""
    import safetensors

    real = safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            return self.inner.get_slice(name)

        def get_tensor(self, name):
            raise AssertionError(f"tensor {name} read before the checkpoint was checked")

    monkeypatch.setattr(safetensors, "safe_open", Spy)
