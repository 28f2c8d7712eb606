"""Reads from the device per engine step: at most 2, whatever the layers and sequences.

On a GPU every read of a device tensor into Python (`.item()`, `.tolist()`, `.numpy()`,
`int()` / `bool()` / `float()` of a tensor, `.cpu()` or `.to("cpu")`) waits for every kernel queued
before it, so a step that makes one per layer or per sequence leaves the GPU idle between
them. This machine has no GPU, so the test counts the calls themselves during a step, with
wrappers around those `Tensor` methods (a `TorchDispatchMode` would miss `.tolist()` and
`.numpy()` of a CPU tensor), made from kvlib's own code. Excluded: the CPU kernels in
`kvlib.kernels`, which hand their tensors' memory to numba (a zero-copy view, the CPU's
own memory; on a GPU the Triton kernels take the tensors as they are).
The GPU benchmark counts the real synchronisations with `torch.cuda.set_sync_debug_mode`.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from kvlib.config import ModelConfig
from kvlib.engine import BatchedInferenceEngine
from kvlib.model import TransformerLM
from kvlib.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster

READS = ["item", "tolist", "numpy", "cpu", "__int__", "__bool__", "__float__", "__index__"]


@contextlib.contextmanager
def count_reads():
    """Count reads of tensors into the host made by kvlib (not its CPU kernels)."""
    seen: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    original_to = torch.Tensor.to

    def caller_counts() -> bool:
        frame = sys._getframe(2)
        module = frame.f_globals.get("__name__", "")
        return module.startswith("kvlib") and not module.startswith("kvlib.kernels")

    def wrap(name):
        def wrapper(self, *args, **kwargs):
            if caller_counts():
                seen.append(f"{name} at {sys._getframe(1).f_code.co_filename.split('kvlib/')[-1]}"
                            f":{sys._getframe(1).f_lineno}")
            return originals[name](self, *args, **kwargs)
        return wrapper

    def to(self, *args, **kwargs):
        # NOTE: `.to("cpu")` named as a string is a copy to the host; `.to(x.device)` moves a
        # tensor to wherever x lives (the GPU, on a GPU), which on this CPU happens to be cpu.
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, str) and target.startswith("cpu") and caller_counts():
            seen.append(f"to(cpu) at {sys._getframe(1).f_code.co_filename}")
        return original_to(self, *args, **kwargs)

    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    torch.Tensor.to = to
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.Tensor.to = original_to


def engine_at_decode(num_layers: int, num_seqs: int, backend: str, **fields):
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=97, d_model=32, num_layers=num_layers,
                                      num_heads=4, num_kv_heads=2, max_seq_len=128,
                                      **fields)).eval()
    model.attention = backend
    engine = BatchedInferenceEngine(model, num_blocks=8 * num_seqs, block_size=4,
                                    max_num_batched_tokens=512)
    for i in range(num_seqs):  # half greedy, half seeded sampling
        sampling = SamplingParams() if i % 2 else SamplingParams(temperature=1.0, seed=i)
        engine.add_request([1 + i, 2, 3, 4, 5, 6], sampling, max_new_tokens=20)
    engine.step()  # every prompt in one step; the next steps are pure decodes
    return engine


@pytest.mark.parametrize("backend", ["sdpa", "reference", "fast"])
@pytest.mark.parametrize(("num_layers", "num_seqs"), [(1, 1), (2, 8), (6, 16)])
def test_a_decode_step_reads_the_device_at_most_twice(backend, num_layers, num_seqs):
    engine = engine_at_decode(num_layers, num_seqs, backend)
    for _ in range(3):
        with count_reads() as seen:
            engine.step()
        assert engine.metrics.steps[-1].num_decode_tokens == num_seqs  # a decode step
        assert len(seen) <= 2, seen


def test_windowed_and_mixed_models_too():
    engine = engine_at_decode(4, 8, "fast", sliding_window=5, sliding_layers=(0, 2),
                              sink_tokens=2)
    for _ in range(3):
        with count_reads() as seen:
            engine.step()
        assert len(seen) <= 2, seen


def test_the_counter_sees_reads():
    """The wrappers do count: code of a kvlib module reading 4 elements one by one is seen 4
    times; this test module's own reads are not kvlib's and are not counted."""
    with count_reads() as seen:
        t = torch.arange(4)
        [int(x) for x in t]
        assert not seen
        exec("[int(x) for x in t]", {"__name__": "kvlib.fake", "t": t})
    assert len(seen) == 4
