"""Chapter 4's live widgets: the real engine's schedule under different loads and budgets.

Every state is one run of `BatchedInferenceEngine` on a tiny model (the schedule depends on
lengths, budgets and arrivals, not on the weights), with time counted in steps, so each state
is the same on any machine. Built with `kvlib.widgets.live.live`: all states precomputed.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from kvlib.experiments.batching import (
    Trace,
    arrival_steps,
    chapter_requests,
    run_trace,
    step_latencies,
)
from kvlib.model import TransformerLM
from kvlib.viz import batching as bviz
from kvlib.viz import style
from kvlib.widgets.live import live

BLOCK_SIZE = 8


def _summary(trace: Trace) -> str:
    lat = step_latencies(trace)
    m = trace.metrics
    return (f"{len(m.steps)} steps, {m.num_preemptions} preemptions, mean TTFT "
            f"{np.mean(lat['ttft']):.1f} steps, mean latency {np.mean(lat['latency']):.1f} steps")


def schedule_figure(trace: Trace, title: str = "") -> Figure:
    """Timeline (one row per request) above block use, sharing the step axis."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=style.size(0.68), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    bviz.draw_timeline(top, trace.metrics, trace.arrival_steps, title or _summary(trace))
    top.set_xlabel("")
    bviz.draw_block_use(bottom, trace.metrics, trace.num_blocks)
    return fig


def load_traces(model: TransformerLM, *, rates=(0.25, 0.5, 2.0), num_blocks=(20, 40, 80),
                lengths=("uniform", "long tail"), num_requests: int = 16,
                max_num_batched_tokens: int = 64) -> dict[tuple, Trace]:
    """One engine run per (arrival rate, block budget, length distribution)."""
    traces = {}
    for kind in lengths:
        reqs = chapter_requests(kind, num_requests)
        for rate in rates:
            arrivals = arrival_steps(num_requests, rate, seed=1)
            for nb in num_blocks:
                traces[rate, nb, kind] = run_trace(
                    model, reqs, arrivals, num_blocks=nb, block_size=BLOCK_SIZE,
                    max_num_batched_tokens=max_num_batched_tokens)
    return traces


def load_widget(traces: dict[tuple, Trace]):
    """Arrival rate x block budget x length distribution -> the engine's schedule."""
    rates, blocks, lengths = (sorted({k[i] for k in traces}, key=_order) for i in range(3))

    def render(arrival_rate: float, num_blocks: int, lengths: str) -> Figure:
        return schedule_figure(traces[arrival_rate, num_blocks, lengths])

    return live(render, arrival_rate=rates, num_blocks=blocks, lengths=lengths,
                defaults={"num_blocks": blocks[len(blocks) // 2]})


def draw_load_sweep(traces: dict[tuple, Trace]) -> Figure:
    """The whole sweep at a glance: mean TTFT and preemptions against the block budget."""
    rates, blocks, lengths = (sorted({k[i] for k in traces}, key=_order) for i in range(3))
    fig, axes = style.panels(2 * len(lengths), height=2.6, min_width=3.3)
    for j, kind in enumerate(lengths):
        ttft_ax, pre_ax = axes[2 * j], axes[2 * j + 1]
        for rate in rates:
            runs = [traces[rate, nb, kind] for nb in blocks]
            ttft = [np.mean(step_latencies(t)["ttft"]) for t in runs]
            ttft_ax.plot(blocks, ttft, "o-", label=f"{rate:g} requests/step")
            pre_ax.plot(blocks, [t.metrics.num_preemptions for t in runs], "o-")
        ttft_ax.set_title(f"{kind}: mean time to first token")
        ttft_ax.set_ylabel("TTFT (steps)")
        pre_ax.set_title(f"{kind}: preemptions")
        pre_ax.set_ylabel("preemptions (count)")
        for ax in (ttft_ax, pre_ax):
            ax.set_xlabel("blocks in the pool")
            ax.set_xticks(blocks)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
               ncol=len(rates), frameon=False)
    return fig


def budget_traces(model: TransformerLM, *, budgets=(8, 16, 32, 64, 256),
                  lengths=("uniform", "long tail"), num_requests: int = 16,
                  num_blocks: int = 80, arrival_rate: float = 0.5) -> dict[tuple, Trace]:
    """One engine run per (token budget, length distribution), with roomy memory."""
    traces = {}
    for kind in lengths:
        reqs = chapter_requests(kind, num_requests)
        arrivals = arrival_steps(num_requests, arrival_rate, seed=1)
        for budget in budgets:
            traces[budget, kind] = run_trace(model, reqs, arrivals, num_blocks=num_blocks,
                                             block_size=BLOCK_SIZE,
                                             max_num_batched_tokens=budget)
    return traces


def budget_widget(traces: dict[tuple, Trace]):
    """Token budget x length distribution -> tokens per step, and what it does to latency."""
    budgets, lengths = (sorted({k[i] for k in traces}, key=_order) for i in range(2))

    def render(token_budget: int, lengths: str) -> Figure:
        trace = traces[token_budget, lengths]
        lat = step_latencies(trace)
        fig, ax = plt.subplots(figsize=style.size(0.4))
        bviz.draw_tokens_per_step(ax, trace.metrics, token_budget)
        largest = max(s.num_tokens for s in trace.metrics.steps)
        ax.set_title(f"{len(trace.metrics.steps)} steps · mean TTFT {np.mean(lat['ttft']):.1f} "
                     f"steps · largest step {largest} tokens")
        return fig

    return live(render, token_budget=budgets, lengths=lengths,
                defaults={"token_budget": budgets[len(budgets) // 2]})


def draw_budget_sweep(traces: dict[tuple, Trace]) -> Figure:
    """Mean TTFT, the largest step and total steps against the token budget."""
    budgets, lengths = (sorted({k[i] for k in traces}, key=_order) for i in range(2))
    fig, axes = style.panels(3, height=2.7)
    for kind in lengths:
        runs = [traces[b, kind] for b in budgets]
        axes[0].plot(budgets, [np.mean(step_latencies(t)["ttft"]) for t in runs], "o-",
                     label=kind)
        axes[1].plot(budgets, [max(s.num_tokens for s in t.metrics.steps) for t in runs], "o-")
        axes[2].plot(budgets, [len(t.metrics.steps) for t in runs], "o-")
    for ax, title, unit in zip(axes, ("mean TTFT", "largest step", "all requests done"),
                               ("steps", "tokens", "steps")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("token budget (tokens)")
        ax.set_ylabel(f"{title} ({unit})")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
               ncol=len(lengths), frameon=False)
    return fig


def _order(value):
    return (isinstance(value, str), value)


def _mean_tpot_steps(trace: Trace, lat: dict[str, list[int]]) -> float:
    """Steps per output token after the first, averaged over requests with more than one."""
    per = [(lat["latency"][i] - lat["ttft"][i]) / (len(o.token_ids) - 1)
           for i, o in enumerate(trace.outputs) if len(o.token_ids) > 1]
    return float(np.mean(per)) if per else 0.0


def mean_tpot_steps(trace: Trace) -> float:
    return _mean_tpot_steps(trace, step_latencies(trace))
