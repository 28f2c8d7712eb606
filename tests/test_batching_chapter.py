"""Chapter 4's helpers: the scheduler's invariants under random loads (hypothesis), the
timeline drawing, the widgets' state counts, and the static-batching arithmetic."""

from __future__ import annotations

import doctest

import ipywidgets as W
import matplotlib
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.engine import BatchedInferenceEngine
from kvlib.experiments import batching as bx
from kvlib.scheduler import Request
from kvlib.viz import batching as bviz
from kvlib.widgets import batching as bw

matplotlib.use("Agg")
TINY = bx.tiny_model()


def test_doctests():
    for module in (bx, bviz):
        assert doctest.testmod(module).failed == 0


@settings(max_examples=25)
@given(lengths=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12)), min_size=1,
                        max_size=12),
       num_blocks=st.integers(6, 30), budget=st.integers(1, 48), seed=st.integers(0, 99))
def test_scheduler_invariants_hold_after_every_step(lengths, num_blocks, budget, seed):
    engine = BatchedInferenceEngine(TINY, num_blocks=num_blocks, block_size=4,
                                    max_num_batched_tokens=budget, max_num_seqs=8)
    rng = np.random.default_rng(seed)
    ids = []
    for p, n in lengths:
        if -(-(p + n - 1) // 4) > num_blocks:
            continue  # add_request would refuse it (tested elsewhere)
        ids.append(engine.add_request(Request(rng.integers(0, 128, p).tolist(), max_new_tokens=n)))
    for _ in range(2000):
        if not engine.has_unfinished:
            break
        engine.step()
        rec = engine.metrics.steps[-1]
        running = engine.scheduler.running
        assert rec.num_tokens <= budget  # the token budget
        assert len(running) <= 8  # max_num_seqs
        assert set(engine.cache.seq_ids) == {s.seq_id for s in running}  # waiting hold none
        for s in running:  # the cache holds exactly what the scheduler thinks it computed
            assert engine.cache.lengths([s.seq_id]).item() == s.num_computed_tokens
        engine.cache.check_invariants()
        if rec.num_tokens == 0:
            assert not engine.has_unfinished  # a step with work to do always makes progress
    assert not engine.has_unfinished, "did not finish in 2000 steps"
    kept = [n for p, n in lengths if -(-(p + n - 1) // 4) <= num_blocks]
    for i, n in zip(ids, kept):
        assert len(engine.output(i).token_ids) == n
    assert engine.cache.num_used_blocks == 0


def test_timeline_grid_marks_waiting_prefill_decode_and_padding():
    reqs = bx.RequestSet([[1, 2, 3], [4, 5]], [3, 1])
    trace = bx.run_trace(TINY, reqs, [0, 1], num_blocks=8, block_size=4)
    grid = bviz.timeline_grid(trace.metrics, trace.arrival_steps)
    assert grid[0].tolist()[:3] == [2, 3, 3]  # prefill, then two decodes
    assert grid[1, 0] == 0 and grid[1, 1] == 2  # arrives at step 1, prefills at once
    from kvlib.static_batching import static_generate

    static = static_generate(TINY, reqs.prompts, max_new_tokens=reqs.max_new_tokens,
                             batch_size=2, block_size=4, show_progress=False)
    sgrid = bviz.timeline_grid(static.metrics, [0, 0])
    assert sgrid[1].tolist() == [2, 5, 5]  # done after its prefill, then fed as padding


def test_step_latencies_count_steps_from_arrival():
    reqs = bx.RequestSet([[1, 2, 3], [4, 5]], [3, 1])
    trace = bx.run_trace(TINY, reqs, [0, 1], num_blocks=8, block_size=4)
    lat = bx.step_latencies(trace)
    assert lat == {"queue": [0, 0], "ttft": [1, 1], "latency": [3, 1]}


def test_widgets_have_one_state_per_grid_point_and_static_sweeps():
    load = bw.load_traces(TINY, rates=(0.5, 2.0), num_blocks=(20, 40), lengths=("uniform",),
                          num_requests=4)
    widget = bw.load_widget(load)
    assert isinstance(widget, W.VBox) and len(load) == 4
    assert bw.draw_load_sweep(load).axes
    budgets = bw.budget_traces(TINY, budgets=(8, 64), lengths=("uniform",), num_requests=4)
    assert isinstance(bw.budget_widget(budgets), W.VBox)
    assert len(bw.draw_budget_sweep(budgets).axes) == 3
