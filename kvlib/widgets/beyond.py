"""Chapter 10's live widgets: where disaggregation pays, and what cache-aware routing wins.

Every state is a simulation (`kvlib.experiments.cluster`): kvlib's scheduler and block
manager, steps priced by a cost model, so a state is the same on any machine.

- Disaggregation: Llama-3-8B on H100s, steps priced by the roofline. Two GPUs either serve
  side by side (each prefills and decodes its share, chunked prefill) or split the work (one
  prefills, one decodes, the cache crossing `link`). Controls: the link, the prompt length,
  the load (as a share of what one GPU can prefill).
- Routing: n replicas of the chapter's bench model, steps priced by costs measured on this
  machine, a trace where prompts start with one of 32 shared prefixes. Controls: replicas,
  the prefix's share of each prompt. Round robin against prefix-aware routing.

States are HTML (a table with bars): light, sharp on any screen, readable on a phone.
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from kvlib.analysis import GPUS, PRESETS, Hardware
from kvlib.config import ModelConfig
from kvlib.experiments import cluster as cl
from kvlib.links import LINKS, compute_seconds, token_bytes, transfer_seconds
from kvlib.routing import PrefixAware, RoundRobin
from kvlib.widgets.live import live

DISAGG_LINKS = ("100 Gb/s Ethernet", "400 Gb/s network", "NVLink 4")  # PCIe 5: near 400G
PROMPTS = (512, 2048, 8192)
LOADS = (0.4, 0.8)  # arrival rate as a share of what one GPU can prefill
BAR = {"colocated": "#1f77b4", "disaggregated": "#ff7f0e", "round robin": "#1f77b4",
       "prefix-aware": "#2ca02c"}


def p90(xs: Sequence[float]) -> float:
    return sorted(xs)[int(0.9 * (len(xs) - 1))]


# -- disaggregation ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DisaggState:
    prompt_len: int
    rate_per_s: float
    transfer_s: float  # one prompt's cache over the link
    prefill_s: float  # one prompt's prefill on one GPU
    colocated: cl.Served
    disaggregated: cl.Served


def disagg_states(model: ModelConfig = PRESETS["llama-3-8b"],
                  gpu: Hardware = GPUS["H100-SXM"], *, links: Sequence[str] = DISAGG_LINKS,
                  prompts: Sequence[int] = PROMPTS, loads: Sequence[float] = LOADS,
                  num_requests: int = 32, max_new_tokens: int = 48,
                  num_blocks: int = 16384) -> dict[tuple[str, int, float], DisaggState]:
    """(link, prompt length, load) -> both set-ups served on the same trace. Colocated: two
    replicas, round robin, 2,048-token chunks; disaggregated: one prefill, one decode."""
    costs = cl.RooflineStepCosts(model, gpu)
    out = {}
    for prompt in prompts:
        prefill_s = compute_seconds(model, prompt, gpu)
        for load in loads:
            trace = cl.uniform_trace(num_requests, load / prefill_s, prompt, max_new_tokens,
                                     seed=prompt)
            side = [cl.SimReplica(costs, num_blocks, max_num_batched_tokens=2048,
                                  prefix_caching=False) for _ in range(2)]
            colocated = cl.serve_colocated(trace, side, RoundRobin(2))
            for name in links:
                link = LINKS[name]

                def move(n: int, link=link) -> float:
                    return transfer_seconds(n * token_bytes(model), link)

                split = cl.serve_disaggregated(
                    trace, cl.SimReplica(costs, num_blocks, max_num_batched_tokens=8192,
                                         prefix_caching=False),
                    cl.SimReplica(costs, num_blocks, prefix_caching=False), move)
                out[name, prompt, load] = DisaggState(prompt, load / prefill_s, move(prompt),
                                                      prefill_s, colocated, split)
    return out


def bars_html(title: str, unit: str, rows: Sequence[tuple[str, float, float]],
              decimals: int = 0) -> str:
    """A small table: one row per (name, mean, p90), a bar for the mean, the p90 in text."""
    top = max(m for _, m, _ in rows) or 1.0
    cells = []
    for name, mean, tail in rows:
        width = max(1.0, 100 * mean / top)
        cells.append(
            f'<tr><td style="padding:2px 8px 2px 0;white-space:nowrap">{html.escape(name)}</td>'
            f'<td style="width:100%"><div style="background:{BAR.get(name, "#888")};'
            f'width:{width:.0f}%;height:14px"></div></td>'
            f'<td style="padding-left:8px;white-space:nowrap">{mean:,.{decimals}f} {unit}'
            f'{"" if tail is None else f" (p90 {tail:,.{decimals}f})"}</td></tr>')
    return (f'<div style="margin:6px 0 2px 0"><b>{html.escape(title)}</b></div>'
            f'<table style="width:100%;max-width:640px;border-collapse:collapse">'
            f'{"".join(cells)}</table>')


def disagg_html(s: DisaggState) -> str:
    rows = {"colocated": s.colocated, "disaggregated": s.disaggregated}
    ttft = [(k, 1e3 * statistics.mean(v.ttft_s), 1e3 * p90(v.ttft_s)) for k, v in rows.items()]
    tpot = [(k, 1e3 * statistics.mean(v.tpot_s), 1e3 * p90(v.tpot_s)) for k, v in rows.items()]
    note = (f"{s.rate_per_s:.1f} requests/s; one prompt: prefill {1e3 * s.prefill_s:.0f} ms, "
            f"its cache over the link {1e3 * s.transfer_s:.1f} ms "
            f"({s.transfer_s / s.prefill_s:.0%} of the prefill)")
    return (f'<div style="max-width:640px">{html.escape(note)}'
            + bars_html("time to first token", "ms", ttft)
            + bars_html("time per output token", "ms", tpot, decimals=1) + "</div>")


def disagg_widget(states: dict[tuple[str, int, float], DisaggState]):
    """Link x prompt length x load -> TTFT and TPOT, colocated against disaggregated."""
    links, prompts, loads = (sorted({k[i] for k in states}, key=_order(i)) for i in range(3))

    def render(link: str, prompt_tokens: int, load: float) -> str:
        return disagg_html(states[link, prompt_tokens, load])

    defaults = {"link": "400 Gb/s network", "prompt_tokens": 2048}
    grid = {"link": links, "prompt_tokens": prompts}
    return live(render, link=links, prompt_tokens=prompts, load=loads,
                defaults={k: v for k, v in defaults.items() if v in grid[k]})


def _order(i: int):
    return (lambda name: LINKS[name].bandwidth) if i == 0 else (lambda x: x)


# -- routing -----------------------------------------------------------------------------------
REPLICAS = (2, 4, 8)
SHARES = (0.5, 0.9)


def routing_states(costs: cl.StepCosts, *, replicas: Sequence[int] = REPLICAS,
                   shares: Sequence[float] = SHARES, num_requests: int = 128,
                   prompt_len: int = 512, num_prefixes: int = 32, max_new_tokens: int = 16,
                   rate_per_s: float = 1000.0, num_blocks: int = 320,
                   block_size: int = 16) -> dict[tuple[int, float], dict[str, cl.Served]]:
    """(replicas, prefix share) -> {router: served}. Each replica's pool holds about
    `num_blocks * block_size / prompt_len` prompts, fewer than the prefixes in play."""
    out = {}
    for share in shares:
        prefix = int(share * prompt_len)
        trace = cl.shared_prefix_trace(num_requests, rate_per_s, num_prefixes=num_prefixes,
                                       prefix_len=prefix, suffix_len=prompt_len - prefix,
                                       max_new_tokens=max_new_tokens, seed=7)
        for n in replicas:
            routers = {"round robin": RoundRobin(n),
                       "prefix-aware": PrefixAware(n, block_size, num_blocks)}
            out[n, share] = {
                name: cl.serve_colocated(
                    trace, [cl.SimReplica(costs, num_blocks, block_size) for _ in range(n)],
                    router)
                for name, router in routers.items()}
    return out


def routing_html(served: dict[str, cl.Served]) -> str:
    hits = [(k, 100 * v.hit_rate, None) for k, v in served.items()]
    tput = [(k, v.tokens_per_s, None) for k, v in served.items()]
    ttft = [(k, statistics.mean(v.ttft_s), p90(v.ttft_s)) for k, v in served.items()]
    return ('<div style="max-width:640px">'
            + bars_html("prompt tokens found in a prefix cache", "%", hits)
            + bars_html("throughput (generated tokens per simulated second)", "tok/s", tput)
            + bars_html("time to first token", "s", ttft, decimals=2) + "</div>")


def routing_widget(states: dict[tuple[int, float], dict[str, cl.Served]]):
    """Replicas x prefix share -> hit rate, throughput and TTFT of both routers."""
    replicas = sorted({k[0] for k in states})
    shares = sorted({k[1] for k in states})

    def render(replicas: int, prefix_share: float) -> str:
        return routing_html(states[replicas, prefix_share])

    return live(render, replicas=replicas, prefix_share=shares)
