"""Drawings of the book models' training: loss curves, bits per byte, the copying fine-tune.

`kvlib.book_model.training_run()` holds the numbers. Each draws on a given Axes, in the
book's figure style (`viz.style`): no text smaller than the style's, units in the labels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matplotlib.axes import Axes

from kvlib.viz.common import COLORS


def plot_loss_curves(ax: Axes, record: Mapping[str, Any]) -> None:
    """Training loss (mean over each logging window) and held-out loss, in nats per token,
    against the step; a dotted line where the context grows."""
    curve, val = record["training"]["curve"], record["training"]["val_curve"]
    ax.plot(curve["step"], curve["train_loss"], color=COLORS["cached"], lw=1,
            label="training batches")
    ax.plot(val["step"], val["loss"], color=COLORS["uncached"], marker="o", ms=4,
            label="held-out files")
    step = 0
    for phase in record["training"]["phases"][:-1]:
        step += phase["steps"]
        ax.axvline(step, color=COLORS["claim"], ls=":", lw=1.2)
    seq_lens = " then ".join(f"{p['seq_len']:,}" for p in record["training"]["phases"])
    ax.set_title(f"context {seq_lens} tokens (dotted)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend(frameon=False, loc="upper right")
    ax.grid(True, alpha=0.3)


def plot_bits_per_byte(ax: Axes, metrics: Mapping[str, Any]) -> None:
    """Held-out bits per byte, one horizontal bar each: the model beside gzip -9 and xz -9 on
    the same files, each file compressed alone and all of them concatenated."""
    bars = {"model": metrics["bits_per_byte"]}
    for name, figures in metrics["compressors_bits_per_byte"].items():
        bars[f"{name}, per file"] = figures["per_file"]
        bars[f"{name}, all files"] = figures["concatenated"]
    colors = [COLORS["measured"]] + [COLORS["claim"]] * (len(bars) - 1)
    rows = list(range(len(bars)))[::-1]  # the model on top
    ax.barh(rows, list(bars.values()), color=colors)
    for row, value in zip(rows, bars.values()):
        ax.text(value, row, f" {value:.2f}", va="center")
    ax.set_yticks(rows, list(bars))
    ax.set_xlim(0, max(bars.values()) * 1.25)  # room for the numbers
    ax.set_xlabel("bits per byte (lower is better)")
    ax.set_title(f"{metrics['heldout_files']} held-out files, {metrics['heldout_bytes']:,} bytes")


def plot_copying_run(axes, fine_tune: Mapping[str, Any]) -> None:
    """The copying fine-tune (`tools/train_copying.py`): left, both losses against the step
    (copying at chance, ln 4096 nats, until an induction head forms); right, what it measured
    every few steps: the strongest induction head, text read a second time, and the name's
    tokens recalled. A dotted line where the repeats stop being random ids only."""
    curve, evals = fine_tune["curve"], fine_tune["evals"]
    switch = fine_tune["hyperparameters"]["ids_steps"]
    left, right = axes
    left.plot(curve["step"], curve["lm_loss"], color=COLORS["cached"], lw=1,
              label="language modelling")
    left.plot(curve["step"], curve["copy_loss"], color=COLORS["uncached"], lw=1,
              label="copying (the repeats)")
    left.set_ylabel("loss (nats per token)")
    left.legend(frameon=False, loc="upper right")
    right.plot(evals["step"], evals["induction_max"], marker="o", ms=4,
               color=COLORS["measured"], label="strongest induction head")
    right.plot(evals["step"], evals["reread_second"], marker="o", ms=4,
               color=COLORS["cached"], label="second reading, top-1")
    right.plot(evals["step"], evals["name_token_accuracy_full"], marker="o", ms=4,
               color=COLORS["uncached"], label="name tokens, top-1")
    right.set_ylim(0, 1)
    right.set_ylabel("share")
    right.yaxis.set_major_formatter(lambda y, _: f"{y:.0%}")
    right.legend(frameon=False, loc="upper left")
    for ax in axes:
        ax.axvline(switch, color=COLORS["claim"], ls=":", lw=1.2)
        ax.set_xlabel("fine-tuning step")
        ax.grid(True, alpha=0.3)
