"""Chapter 10's drawings: moving against recomputing, swaps measured, disaggregation and routing
swept, the cache of tensor-parallel ranks. Each draws on the Axes it is given; the numbers
come from `kvlib.links`, `kvlib.real_models` and the chapter's measurements and simulations.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes

from kvlib import real_models
from kvlib.analysis import Hardware
from kvlib.config import ModelConfig
from kvlib.links import LINKS, move_over_compute

MODE_COLORS = {"colocated": "#1f77b4", "disaggregated": "#ff7f0e", "round robin": "#1f77b4",
               "prefix-aware": "#2ca02c", "swap": "#2ca02c", "recompute": "#d62728"}


def draw_move_over_compute(ax: Axes, models: Mapping[str, ModelConfig], gpu: Hardware,
                           links: Sequence[str], num_tokens: int = 4096) -> None:
    """Seconds to move a sequence's cache once over each link, over seconds to prefill it
    again on `gpu`: below 1 (the line), moving pays."""
    width = 0.8 / len(models)
    x = np.arange(len(links))
    for i, (name, cfg) in enumerate(models.items()):
        ratios = [move_over_compute(cfg, num_tokens, gpu, LINKS[link]) for link in links]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, ratios, width, label=name)
    ax.axhline(1.0, color="black", lw=1)
    ax.set_yscale("log")
    ax.set_xticks(x, [link.replace(" network", "").replace(" Ethernet", " Eth.")
                      for link in links])
    ax.set_ylabel("move / recompute time")
    ax.set_xlabel(f"link ({num_tokens:,}-token sequence, {gpu.name})")
    ax.legend(ncols=2, loc="upper right")


def draw_swap_vs_recompute(ax: Axes, rows: Sequence, predicted: Sequence[tuple[float, float]],
                           device: str) -> None:
    """Measured swap (out and back) and recompute times per preempted sequence against its
    length; the cost model's predictions dashed."""
    tokens = [r.tokens for r in rows]
    ax.plot(tokens, [1e3 * r.swap_s for r in rows], "o-", color=MODE_COLORS["swap"],
            label="swap out + in, measured")
    ax.plot(tokens, [1e3 * p[0] for p in predicted], "--", color=MODE_COLORS["swap"],
            label="swap, predicted")
    ax.plot(tokens, [1e3 * r.recompute_s for r in rows], "o-", color=MODE_COLORS["recompute"],
            label="recompute, measured")
    ax.plot(tokens, [1e3 * p[1] for p in predicted], "--", color=MODE_COLORS["recompute"],
            label="recompute, predicted")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"tokens of the preempted sequence ({device})")
    ax.set_ylabel("time (ms)")
    ax.legend()


def draw_disagg_sweep(axes: Sequence[Axes], states: Mapping, link: str) -> None:
    """Mean TTFT (first axes) and TPOT (second) against prompt length, colocated and
    disaggregated, at each load, over `link`."""
    prompts = sorted({k[1] for k in states})
    loads = sorted({k[2] for k in states})
    for load, style in zip(loads, ("-", ":")):
        for mode in ("colocated", "disaggregated"):
            runs = [getattr(states[link, p, load], mode) for p in prompts]
            label = f"{mode}, load {load:.0%}"
            axes[0].plot(prompts, [1e3 * statistics.mean(r.ttft_s) for r in runs], style,
                         marker="o", color=MODE_COLORS[mode], label=label)
            axes[1].plot(prompts, [1e3 * statistics.mean(r.tpot_s) for r in runs], style,
                         marker="o", color=MODE_COLORS[mode], label=label)
    for ax, what in zip(axes, ("time to first token (ms)", "time per output token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt (tokens)")
        ax.set_ylabel(what)
    axes[0].set_yscale("log")
    axes[1].set_ylim(bottom=0)
    axes[1].legend()


def draw_tp_cache(ax: Axes, names: Sequence[str], tps: Sequence[int],
                  dtype: str = "bf16") -> None:
    """Cache bytes per token on each GPU against the tensor-parallel degree: halving while
    the KV heads split, flat once every GPU is down to one (replicated) KV head."""
    for name in names:
        cfg = real_models.REAL_MODELS[name]
        ok = [t for t in tps if cfg.num_heads % t == 0]
        per_gpu = [real_models.cache_bytes(cfg, 1, dtype=dtype, tp=t) / 1024 for t in ok]
        ax.plot(ok, per_gpu, "o-", label=f"{name} ({cfg.num_kv_heads} KV heads)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(list(tps), [str(t) for t in tps])
    ax.set_xlabel("tensor-parallel GPUs")
    ax.set_ylabel("cache per token per GPU (KiB)")
    ax.legend()


def draw_routing(axes: Sequence[Axes], states: Mapping, share: float) -> None:
    """Hit rate (first axes) and throughput (second) against the number of replicas, for
    each router, at one prefix share."""
    replicas = sorted({k[0] for k in states})
    for router in ("round robin", "prefix-aware"):
        runs = [states[n, share][router] for n in replicas]
        axes[0].plot(replicas, [100 * r.hit_rate for r in runs], "o-",
                     color=MODE_COLORS[router], label=router)
        axes[1].plot(replicas, [r.tokens_per_s for r in runs], "o-",
                     color=MODE_COLORS[router], label=router)
    for ax, what in zip(axes, ("prefix-cache hits (% of prompt)", "throughput (tokens/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(replicas, [str(n) for n in replicas])
        ax.set_xlabel("replicas")
        ax.set_ylabel(what)
        ax.set_ylim(bottom=0)
    axes[0].legend()
