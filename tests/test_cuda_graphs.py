"""Decode steps replayed per bucket (kvlib.cuda_graphs) give the eager engine's outputs.

On this CPU the graphs are `Replay` stand-ins: the step function is kept at "capture" and run
again on the same persistent buffers at each "replay", so what a real graph depends on is
exercised here: padding to a bucket, one graph per bucket, buffers that never move, the fixed
table width, padding rows that store nothing. The Triton backend over those buffers runs in
tests/test_kernels_triton.py (under the interpreter on a CPU). Only the last test here
captures real `torch.cuda.CUDAGraph`s, and it runs only where CUDA is available.
"""

from __future__ import annotations

import doctest

import pytest
import torch
from test_engine_caches import SETUPS, make_model, random_requests

import kvlib.cuda_graphs
from kvlib.cache.paged import PagedKVCache
from kvlib.cache.quantized import QuantizedKVCache
from kvlib.cuda_graphs import DecodeGraphs
from kvlib.engine import BatchedInferenceEngine
from kvlib.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def run(model, prompts, lengths, samplings, graphs, **engine_args):
    args = {"num_blocks": 200, "block_size": 4, "max_num_batched_tokens": 64, **engine_args}
    engine = BatchedInferenceEngine(model, cuda_graphs=graphs, **args)
    result = engine.generate(prompts, samplings, lengths, show_progress=False)
    engine.cache.check_invariants()
    assert engine.cache.num_used_blocks == 0
    return [o.token_ids for o in result.outputs], engine


def test_module_doctests():
    result = doctest.testmod(kvlib.cuda_graphs)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("setup", ["paged", "int8-codes", "window-6", "gemma-style",
                                   "sinks-2-window-6", "mla", "mla-sinks-2-window-6"])
@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("num_requests", [1, 3, 13])
def test_replayed_decode_steps_equal_eager_ones(setup, backend, num_requests):
    """Greedy and seeded requests of different lengths (sequences finish mid-run, so the
    batch shrinks through the buckets), windows, sinks, two cache groups, INT8 codes, latent
    attention."""
    model = make_model(SETUPS[setup])
    model.attention = backend
    prompts, lengths, samplings = random_requests(num_requests, seed=num_requests)
    eager, _ = run(model, prompts, lengths, samplings, graphs=False, kv_cache_dtype=SETUPS[
        setup].kv_cache_dtype)
    replayed, engine = run(model, prompts, lengths, samplings, graphs=True,
                           kv_cache_dtype=SETUPS[setup].kv_cache_dtype)
    assert replayed == eager
    graphs = engine.graphs
    assert graphs.num_replays > 0 and set(graphs.graphs) <= set(graphs.sizes)
    decodes = [s for s in engine.metrics.steps if s.num_seqs and not s.num_prefill_tokens]
    assert graphs.num_replays == len(decodes)  # every pure decode step, and nothing else


def test_preemption_and_recomputation_keep_outputs():
    model = make_model(SETUPS["paged"])
    prompts, lengths, samplings = random_requests(10, seed=5)
    eager, _ = run(model, prompts, lengths, samplings, graphs=False, num_blocks=14,
                   max_num_batched_tokens=16)
    replayed, engine = run(model, prompts, lengths, samplings, graphs=True, num_blocks=14,
                           max_num_batched_tokens=16)
    assert replayed == eager and engine.metrics.num_preemptions > 0


def test_buckets_pad_and_buffers_stay_put():
    """One graph per bucket used; the buffers' addresses and the table width never change;
    padding rows store nothing (the null blocks stay zero) and read the null block."""
    model = make_model(SETUPS["gemma-style"])
    prompts, lengths, samplings = random_requests(6, seed=1)
    engine = BatchedInferenceEngine(model, num_blocks=200, block_size=4, cuda_graphs=True,
                                    max_num_seqs=6)
    graphs = engine.graphs
    assert graphs.sizes == (1, 2, 4, 8)
    M = -(-model.config.max_seq_len // 4)
    assert graphs.buffers.block_tables.shape == (2, 8, M)  # two groups, Bmax 8, fixed width
    addresses = [t.data_ptr() for t in vars(graphs.buffers).values()]
    ids = [engine.add_request(p, s, n) for p, s, n in zip(prompts, samplings, lengths)]
    seen = []
    while engine.has_unfinished:
        engine.step()
        step = engine.metrics.steps[-1]
        if step.num_seqs and not step.num_prefill_tokens:
            seen.append(step.num_seqs)
            b = next(b for b in graphs.sizes if b >= step.num_seqs)
            buf = graphs.buffers
            assert (buf.slot_mapping[:, step.num_seqs:b] == -1).all()
            assert (buf.context_lens[step.num_seqs:b] == 1).all()
        assert [t.data_ptr() for t in vars(graphs.buffers).values()] == addresses
    assert set(graphs.graphs) == {next(b for b in graphs.sizes if b >= n) for n in seen}
    for pool in engine.cache.storage.pools:  # (L_g, 2, NB + 1, Hkv, BS, D): row NB is null
        assert not pool[:, :, -1].any()
    eager, _ = run(model, prompts, lengths, samplings, graphs=False, max_num_seqs=6)
    assert [engine.output(i).token_ids for i in ids] == eager


def test_capturing_every_bucket_up_front_stores_nothing_and_changes_no_output():
    model = make_model(SETUPS["sinks-2-window-6"])
    prompts, lengths, samplings = random_requests(7, seed=2)
    engine = BatchedInferenceEngine(model, num_blocks=200, block_size=4, cuda_graphs=True,
                                    max_num_seqs=8)
    engine.graphs.capture_all()
    assert set(engine.graphs.graphs) == {1, 2, 4, 8} and engine.graphs.num_replays == 0
    assert not any(p.any() for p in engine.cache.storage.pools)  # padding rows store nothing
    out = engine.generate(prompts, samplings, lengths, show_progress=False)
    eager, _ = run(model, prompts, lengths, samplings, graphs=False, max_num_seqs=8)
    assert [o.token_ids for o in out.outputs] == eager


def test_a_step_of_more_sequences_than_the_largest_bucket_runs_eagerly():
    model = make_model(SETUPS["paged"])
    engine = BatchedInferenceEngine(model, num_blocks=200, block_size=4, cuda_graphs=True,
                                    max_num_seqs=4)
    graphs = DecodeGraphs(model, engine.cache, 2, use_cuda_graphs=False)
    engine.graphs = graphs  # buckets 1 and 2 only
    for i in range(4):
        engine.add_request([1 + i, 2, 3], SamplingParams(temperature=1.0, seed=i), 3)
    engine.run(show_progress=False)
    assert graphs.num_replays == 0  # every decode step had 4 sequences


def test_graphs_are_refused_where_they_cannot_run():
    model = make_model(SETUPS["int8"])
    cache = QuantizedKVCache(model.cache_config(1, 96, block_size=4), SETUPS["int8"].quant,
                             lambda c: PagedKVCache(c, num_blocks=24))
    with pytest.raises(ValueError, match="QuantizedKVCache"):
        BatchedInferenceEngine(model, cache=cache, cuda_graphs=True)
    assert BatchedInferenceEngine(model, cache=cache).graphs is None  # the default: eager
    paged = make_model(SETUPS["paged"])
    assert BatchedInferenceEngine(paged, num_blocks=8).graphs is None  # on a CPU: eager
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraphs(paged, PagedKVCache(paged.cache_config(1, 96, block_size=4), 8), 4,
                     use_cuda_graphs=True)


def test_decode_steps_read_the_device_at_most_twice_with_graphs():
    from test_engine_syncs import count_reads

    model = make_model(SETUPS["gemma-style"])
    engine = BatchedInferenceEngine(model, num_blocks=100, block_size=4, cuda_graphs=True)
    for i in range(5):
        engine.add_request([1 + i, 2, 3, 4], SamplingParams(1.0, seed=i) if i % 2 else
                           SamplingParams(), 12)
    engine.step()
    for _ in range(3):
        with count_reads() as seen:
            engine.step()
        assert len(seen) <= 2, seen
    assert engine.graphs.num_replays == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_graphs_equal_eager_on_a_gpu():
    """The real capture: engine outputs with `torch.cuda.CUDAGraph` replays equal the eager
    engine's, greedy and seeded, over buckets 1 to 16, windowed and global layers."""
    pytest.importorskip("triton")
    model = make_model(SETUPS["gemma-style"]).float().cuda()
    model.attention = "triton"
    prompts, lengths, samplings = random_requests(13, seed=3)
    eager, _ = run(model, prompts, lengths, samplings, graphs=False)
    replayed, engine = run(model, prompts, lengths, samplings, graphs=True)
    assert engine.graphs is not None and engine.graphs.use_cuda_graphs
    assert engine.graphs.num_replays > 0
    assert replayed == eager
    engine.graphs.capture_all()  # the rest, up front, on padding rows
    again = engine.generate(prompts, samplings, lengths, show_progress=False)
    assert [o.token_ids for o in again.outputs] == eager


def test_graphs_are_off_unless_asked_for_and_the_switch_is_a_bool():
    model = make_model(SETUPS["paged"])
    assert BatchedInferenceEngine(model, num_blocks=20, block_size=4).graphs is None
    for bad in (None, 1, "yes"):
        with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
            BatchedInferenceEngine(model, num_blocks=20, block_size=4, cuda_graphs=bad)
