"""Drawings for chapter 9 (shrinking the cache): quality against budget per policy, which
tokens each head keeps against the blocks a paged cache frees, the attention sink, the heads
that copy, and what latent attention reads and computes. Each draws on a given Axes; numbers come from
`kvlib.experiments.shrink`, `budget_sweep` and `kvlib.mla`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes

from kvlib.eviction import freeable_blocks
from kvlib.experiments.shrink import CopyingHeads
from kvlib.mla import DecodeCost

# One colour and line per policy, in every figure of the chapter.
POLICY_STYLE = {
    "window": ("#7f7f7f", "-"),
    "sinks + window": ("#1f77b4", "-"),
    "sinks + window, cache positions": ("#1f77b4", ":"),
    "H2O": ("#d62728", "-"),
    "SnapKV": ("#2ca02c", "-"),
    "SnapKV, whole blocks": ("#2ca02c", "--"),
    "sinks + window, INT4 rest": ("#9467bd", "-"),
}
METRICS = {"bpb": "held-out bits per byte", "agreement": "greedy agreement with full cache",
           "far_copy": "top-1 on far repeats", "recall": "names recalled (share of probes)",
           "name_accuracy": "name tokens predicted (top-1)",
           "name_bits": "bits to name the name (mean)",
           "paged_bytes_per_token": "bytes per token a paged cache holds"}
BUDGET_TICKS = (5, 10, 20, 30, 50, 75, 100)


def plot_budget_curves(ax: Axes, records: Sequence[Mapping], metric: str, regime: str,
                       policies: Sequence[str] | None = None, title: str | None = None) -> None:
    """`metric` against the budget (percent of the full cache's bytes), one line per policy
    measured in `regime`; the full cache's value dashed."""
    rows = [r for r in records if r["regime"] == regime]
    names = [p for p in (policies or POLICY_STYLE) if any(r["policy"] == p for r in rows)]
    full = None
    for name in names:
        pts = sorted((r["fraction"] * 100, r[metric]) for r in rows if r["policy"] == name)
        color, line = POLICY_STYLE.get(name, ("black", "-"))
        ax.plot([x for x, _ in pts], [y for _, y in pts], line, color=color, marker="o",
                markersize=3.5, label=name)
        full = pts[-1][1] if pts and pts[-1][0] == 100 else full
    if full is not None:
        ax.axhline(full, color="black", lw=0.8, ls="--", alpha=0.6)
    ax.set_xscale("log")
    ax.set_xticks(BUDGET_TICKS, [f"{t}" for t in BUDGET_TICKS])
    ax.minorticks_off()
    ax.set_xlabel("cache budget (% of the full cache's bytes)")
    ax.set_ylabel(METRICS.get(metric, metric))
    ax.set_title(title or f"{regime} regime")
    ax.grid(True, alpha=0.3)


def draw_kept(ax: Axes, kept: torch.Tensor, block_size: int, title: str) -> None:
    """Which tokens each layer's KV heads keep (dark), tokens across, one row per (layer,
    head), with the block boundaries of a paged cache; blocks that no head keeps anything
    of, and so could be freed, are marked green below. kept: (L, Hkv, S) bool."""
    L, Hkv, S = kept.shape
    rows = kept.reshape(L * Hkv, S).float().numpy()  # (L * Hkv, S)
    ax.imshow(1 - rows, aspect="auto", cmap="gray", vmin=0, vmax=1, interpolation="nearest",
              extent=(0, S, L * Hkv, 0))
    for b in range(block_size, S, block_size):
        ax.axvline(b, color="#ff7f0e", lw=0.5, alpha=0.7)
    used = kept.any(0).any(0)  # (S,)
    for b in range(0, S, block_size):
        if not bool(used[b:b + block_size].any()):
            ax.axvspan(b, min(b + block_size, S), ymin=0, ymax=0.04, color="#2ca02c")
    free = freeable_blocks(kept, block_size)
    ax.set_yticks([i * Hkv for i in range(L)], [f"layer {i}" for i in range(L)])
    ax.set_xlabel("token position")
    ax.set_title(f"{title}: {kept.float().mean():.0%} of keys kept, "
                 f"{free:.0%} of blocks free")


def plot_first_token_attention(ax: Axes, shares: torch.Tensor, uniform: float) -> None:
    """Each head's mean attention on the first token, per layer (bars), against `uniform`,
    what spreading every query's attention evenly over its keys would give it
    (`shrink.uniform_first_token_share`). shares: (L, H)."""
    L, H = shares.shape
    width = 0.8 / H
    for h in range(H):
        ax.bar(np.arange(L) + (h - (H - 1) / 2) * width, shares[:, h].numpy(), width,
               label=f"head {h}")
    ax.axhline(uniform, color="black", ls="--", lw=0.8, label="uniform over the keys")
    ax.set_xticks(range(L), [f"layer {i}" for i in range(L)])
    ax.set_ylabel("attention on token 0")
    ax.yaxis.set_major_formatter(lambda y, _: f"{y:.2%}")
    ax.set_ylim(0, max(float(shares.max()), uniform) * 1.5)
    ax.legend(ncols=min(H + 1, 3))


def plot_copying_heads(axes: Sequence[Axes], heads: Mapping[str, CopyingHeads]) -> None:
    """Two panels, the strongest head of each layer per model: the attention a token pays to
    the token before it (previous-token heads), and the attention a token read a second time
    pays to what followed it the first time (induction heads). `shrink.copying_heads`."""
    L = next(iter(heads.values())).previous.shape[0]
    width = 0.8 / len(heads)
    for ax, field, title in zip(axes, ("previous", "induction"),
                                ("to the token before", "to what followed its twin")):
        for m, (name, h) in enumerate(heads.items()):
            best = getattr(h, field).max(dim=1).values.numpy()  # (L,)
            ax.bar(np.arange(L) + (m - (len(heads) - 1) / 2) * width, best, width, label=name)
        ax.set_xticks(range(L), [f"layer {i}" for i in range(L)])
        ax.set_ylim(0, 1)
        ax.set_ylabel("attention, strongest head")
        ax.yaxis.set_major_formatter(lambda y, _: f"{y:.0%}")
        ax.set_title(title)
    axes[1].legend(loc="upper left")


def plot_mla_costs(axes: Sequence[Axes], costs: Mapping[str, DecodeCost], context: int) -> None:
    """Two panels for one decode step of one layer: bytes read (cache rows and weights) and
    FLOPs (annotated with FLOPs per byte of cache), per computation (expanded K and V,
    naive latent, absorbed latent)."""
    names = list(costs)
    x = np.arange(len(names))
    cache = np.array([costs[n].cache_bytes for n in names]) / 2**20
    weights = np.array([costs[n].weight_bytes for n in names]) / 2**20
    axes[0].bar(x, cache, label="cache rows")
    axes[0].bar(x, weights, bottom=cache, label="up-projection weights")
    axes[0].set_ylabel("bytes read (MiB)")
    axes[0].legend()
    flops = np.array([costs[n].flops for n in names]) / 1e9
    axes[1].bar(x, flops, color="#d62728")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("GFLOP")
    axes[1].set_ylim(top=flops.max() * 30)  # room for the labels above the bars
    for ax, title in zip(axes, ("read", "computed")):
        ax.set_xticks(x, names)
        ax.set_title(f"{title}, one layer, {context:,} tokens")
    for i, n in enumerate(names):
        axes[1].annotate(f"{costs[n].flops_per_cache_byte:,.0f} per\ncache byte", (i, flops[i]),
                         ha="center", va="bottom", fontsize=9.5)
