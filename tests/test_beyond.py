"""Chapter 10's helpers: the cost model of links, routers, the serving simulator (checked
against the real engine's schedule), the measurements and widgets (its drawings are checked
with every other in tests/test_viz_style.py)."""

from __future__ import annotations

import statistics

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from kvlib.analysis import GPUS, PRESETS  # noqa: E402
from kvlib.config import ModelConfig  # noqa: E402
from kvlib.engine import BatchedInferenceEngine, EngineMetrics, StepRecord  # noqa: E402
from kvlib.experiments import beyond as bx  # noqa: E402
from kvlib.experiments import cluster as cl  # noqa: E402
from kvlib.links import LINKS, move_over_compute, transfer_seconds  # noqa: E402
from kvlib.model import TransformerLM  # noqa: E402
from kvlib.preemption import Recompute, Swap  # noqa: E402
from kvlib.routing import PrefixAware, RoundRobin, prefix_hashes  # noqa: E402
from kvlib.scheduler import Request  # noqa: E402
from kvlib.widgets import beyond as wb  # noqa: E402

LLAMA = PRESETS["llama-3-8b"]
H100 = GPUS["H100-SXM"]


def tiny(seed=0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4,
                                     num_kv_heads=2, max_seq_len=256)).eval()


# -- links --------------------------------------------------------------------------------------
def test_moving_pays_more_on_faster_links_and_twice_as_little_for_a_swap():
    ratios = [move_over_compute(LLAMA, 2048, H100, link) for link in LINKS.values()]
    by_bw = sorted(zip((link.bandwidth for link in LINKS.values()), ratios))
    assert [r for _, r in by_bw] == sorted(ratios, reverse=True)
    one = move_over_compute(LLAMA, 2048, H100, LINKS["PCIe 5 x16"])
    assert move_over_compute(LLAMA, 2048, H100, LINKS["PCIe 5 x16"], trips=2) == 2 * one
    assert transfer_seconds(0, LINKS["NVLink 4"]) == LINKS["NVLink 4"].latency_s
    with pytest.raises(ValueError):
        transfer_seconds(-1, LINKS["NVLink 4"])


# -- routers -------------------------------------------------------------------------------------
def test_round_robin_cycles():
    r = RoundRobin(3)
    assert [r.route([1], [0, 0, 0]) for _ in range(5)] == [0, 1, 2, 0, 1]


def test_prefix_aware_keeps_a_prefix_on_one_replica_within_the_balance_guard():
    r = PrefixAware(4, block_size=4, capacity_blocks=100, max_imbalance=2)
    doc = list(range(40))
    first = r.route(doc + [1000], [0, 0, 0, 0])
    loads = [0, 0, 0, 0]
    loads[first] = 1
    assert r.route(doc + [1001], loads) == first  # the same document: the same replica
    other = r.route(list(range(500, 540)), loads)
    assert other != first  # no match: the least loaded
    loads[first] = 5  # too busy: the guard sends the next one elsewhere
    assert r.route(doc + [1002], loads) != first


def test_prefix_aware_forgets_beyond_its_capacity():
    r = PrefixAware(2, block_size=4, capacity_blocks=3)
    r.route(list(range(16)), [0, 0])
    assert r.match(0, prefix_hashes(list(range(16)), 4)) == 0  # its 4 blocks: 1 forgotten
    with pytest.raises(ValueError):
        r.route([1, 2], [0])


# -- the simulator ------------------------------------------------------------------------------
def test_simulated_replica_schedules_exactly_as_the_engine():
    model = tiny()
    prompts = [[(7 * i + j) % 97 for j in range(5 + 4 * i)] for i in range(8)]
    engine = BatchedInferenceEngine(model, num_blocks=12, block_size=4, max_num_batched_tokens=16)
    run = engine.generate(prompts, max_new_tokens=[3 + i % 4 for i in range(8)],
                          show_progress=False)
    trace = [cl.TimedRequest(0.0, Request(p, max_new_tokens=3 + i % 4))
             for i, p in enumerate(prompts)]
    replica = cl.SimReplica(cl.LinearStepCosts(1e-3, 0, 0), 12, 4, max_num_batched_tokens=16)
    served = cl.serve_colocated(trace, [replica], RoundRobin(1))
    steps = round(served.makespan_s / 1e-3)
    assert steps == len(run.metrics.steps)
    assert served.generated_tokens == sum(len(o.token_ids) for o in run.outputs)
    assert run.metrics.num_preemptions > 0  # the schedule included preemptions


def test_fit_recovers_step_costs():
    metrics = EngineMetrics()
    for i, (p, d) in enumerate([(0, 4), (32, 2), (64, 0), (16, 8), (0, 1), (128, 3)]):
        metrics.steps.append(StepRecord(i, p + d, 1, d, p, 0, 0, 0.002 + 1e-4 * p + 5e-4 * d, ()))
    fit = cl.fit_step_costs(metrics)
    assert fit.fixed_s == pytest.approx(0.002) and fit.per_prefill_token_s == pytest.approx(1e-4)
    assert fit.per_decode_s == pytest.approx(5e-4)


def test_roofline_decode_step_reads_the_weights():
    costs = cl.RooflineStepCosts(LLAMA, H100, fixed_s=0.0)
    trace = cl.uniform_trace(1, 1.0, 16, 3)
    served = cl.serve_colocated(trace, [cl.SimReplica(costs, 64)], RoundRobin(1))
    weights = 2 * (7.5e9) / H100.bandwidth  # ~15 GB of bf16 weights (no embedding) per step
    assert statistics.mean(served.tpot_s) == pytest.approx(weights, rel=0.1)


def test_disaggregated_serving_finishes_everything_and_pays_the_transfer():
    costs = cl.RooflineStepCosts(LLAMA, H100)
    trace = cl.uniform_trace(12, 5.0, 512, 8, seed=1)
    move = 0.05  # seconds per request, whatever its length
    split = cl.serve_disaggregated(trace, cl.SimReplica(costs, 1024), cl.SimReplica(costs, 1024),
                                   lambda n: move)
    together = cl.serve_colocated(trace, [cl.SimReplica(costs, 1024) for _ in range(2)],
                                  RoundRobin(2))
    assert split.generated_tokens == together.generated_tokens == 12 * 8
    assert min(split.ttft_s) > move
    assert statistics.mean(split.tpot_s) <= statistics.mean(together.tpot_s)


def test_prefix_aware_routing_finds_more_of_the_prompts_cached():
    costs = cl.LinearStepCosts(1e-3, 1e-5, 1e-4)
    states = wb.routing_states(costs, replicas=(4,), shares=(0.9,), num_requests=48,
                               prompt_len=128, num_prefixes=12, num_blocks=40, block_size=16)
    rr, pa = states[4, 0.9]["round robin"], states[4, 0.9]["prefix-aware"]
    assert pa.hit_rate > rr.hit_rate and pa.tokens_per_s > rr.tokens_per_s
    assert "prefix-aware" in wb.routing_html(states[4, 0.9])


# -- measurements -------------------------------------------------------------------------------
def test_swap_and_recompute_are_timed_and_predicted():
    model = tiny()
    rows = bx.time_swap_vs_recompute(model, [16, 64], block_size=8, repeats=1)
    assert [r.tokens for r in rows] == [16, 64]
    assert rows[1].bytes_each_way == 64 * model.cache_config(1, 8).bytes_per_token
    rates = bx.cpu_rates(model, repeats=1)
    swap, again = bx.predicted_swap_vs_recompute(model, 64, rates)
    assert 0 < swap < again


def test_swapping_and_recomputing_give_the_same_outputs_with_less_prefill():
    model = tiny().double()
    reqs = [Request([(3 * i + j) % 97 for j in range(20)], max_new_tokens=12) for i in range(6)]
    runs = {name: bx.run_preemption(model, reqs, policy, num_blocks=12, num_host_blocks=40,
                                    block_size=4, max_num_batched_tokens=24)
            for name, policy in (("swap", Swap()), ("recompute", Recompute()))}
    assert runs["swap"].outputs == runs["recompute"].outputs
    assert runs["swap"].num_swaps > 0 and runs["recompute"].num_swaps == 0
    assert runs["swap"].prefill_tokens < runs["recompute"].prefill_tokens


def test_a_host_tier_finds_prefixes_the_device_pool_lost():
    model = tiny().double()
    system = list(range(40))
    prompts = [system + [50], list(range(60, 90)), list(range(90, 120)), system + [70]]
    plain, out_plain = bx.prefix_hits(model, prompts, num_blocks=12, num_host_blocks=None,
                                      block_size=4)
    tiered, out_tiered = bx.prefix_hits(model, prompts, num_blocks=12, num_host_blocks=32,
                                        block_size=4)
    assert out_plain == out_tiered and tiered > plain


# -- widgets and drawings ----------------------------------------------------------------------
def test_disaggregation_widget_states():
    states = wb.disagg_states(links=("NVLink 4", "100 Gb/s Ethernet"), prompts=(256,),
                              loads=(0.5,), num_requests=6, max_new_tokens=4, num_blocks=256)
    slow, fast = states["100 Gb/s Ethernet", 256, 0.5], states["NVLink 4", 256, 0.5]
    assert slow.transfer_s > fast.transfer_s
    assert statistics.mean(slow.disaggregated.ttft_s) > statistics.mean(fast.disaggregated.ttft_s)
    widget = wb.disagg_widget(states)
    assert "time per output token" in wb.disagg_html(slow) and widget.children
