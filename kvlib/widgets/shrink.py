"""Chapter 9's live widget: a cache policy and a budget, the tokens that stay drawn over the
text, and what dropping the others costs. Every state is a real run of the model
(`kvlib.experiments.shrink.run`), computed when the cell runs (`kvlib.widgets.live`)."""

from __future__ import annotations

import html
from collections.abc import Sequence

import ipywidgets as W
import torch

from kvlib.eviction import freeable_blocks
from kvlib.experiments import shrink
from kvlib.experiments.held_out import BookModel
from kvlib.widgets.live import live

STYLE = ("font-family: monospace; font-size: 12px; line-height: 1.35; white-space: pre-wrap; "
         "max-height: 22em; overflow-y: auto; border: 1px solid #ddd; padding: 6px")


def kept_text_html(pieces: Sequence[str], share: Sequence[float]) -> str:
    """The text, one span per token, shaded by the share of layers and heads keeping it
    (dark blue: all of them; no shade and grey: none).

    >>> kept_text_html(["a", "<b"], [1.0, 0.0])
    '<span style="background: rgba(31, 119, 180, 0.70)">a</span><span style="color: #aaa">&lt;b</span>'
    """
    spans = []
    for piece, s in zip(pieces, share):
        text = html.escape(piece)
        if s <= 0:
            spans.append(f'<span style="color: #aaa">{text}</span>')
        else:
            spans.append(f'<span style="background: rgba(31, 119, 180, {0.15 + 0.55 * s:.2f})">'
                         f'{text}</span>')
    return "".join(spans)


def eviction_widget(book: BookModel, ids: Sequence[int], policies: Sequence[str],
                    budgets: Sequence[float], regime: str = "decode") -> W.VBox:
    """Policy x budget: what the last token's cache holds, over the text, and the bits per
    byte of the text's second half and greedy agreement against the full cache."""
    model, S = book.model, len(ids)
    half = S // 2
    nbytes = len(book.tokenizer.decode(list(ids[half + 1:])).encode("utf-8"))
    pieces = [book.tokenizer.decode([i]) if i != book.eos_id else "⏎" for i in ids]
    with torch.no_grad():
        full = model(torch.tensor([list(ids)]))[0].float()  # (S, V)
    full_bpb = shrink.bits_per_byte(full, ids, nbytes, half)
    prompt = half if regime == "prompt" else None

    def render(policy: str, budget: float) -> str:
        p = shrink.POLICIES[policy]
        tokens = shrink.full_budget(p, budget, prompt or S, model.config.head_dim)
        if tokens is None:
            return (f"<p>{policy} cannot get below {p.bytes_ratio(model.config.head_dim):.0%} "
                    f"of the bytes: every token it keeps costs that much.</p>")
        run = shrink.run(model, ids, p, tokens, regime, prompt)
        bpb = shrink.bits_per_byte(run.logits.float(), ids, nbytes, half)
        agree = shrink.agreement(run.logits.float(), full, half)
        kept = run.kept.float().mean((0, 1)).tolist()  # (S,) share of layers x heads
        free = freeable_blocks(run.kept[..., :prompt] if prompt else run.kept,
                               shrink.BLOCK_SIZE)
        note = (f"<p><b>{policy}</b>, {tokens} tokens in full precision per layer and KV head "
                f"({budget:.0%} of the bytes). Second half of the text: "
                f"<b>{bpb:.3f}</b> bits per byte (full cache {full_bpb:.3f}, "
                f"{bpb / full_bpb - 1:+.1%}); greedy agreement <b>{agree:.0%}</b>; "
                f"blocks of {shrink.BLOCK_SIZE} a paged cache could free: {free:.0%}.</p>")
        if p.rest is not None:
            note += "<p>Grey tokens are not dropped: they are read back in INT4.</p>"
        return note + f'<div style="{STYLE}">{kept_text_html(pieces, kept)}</div>'

    return live(render, kinds={"policy": "dropdown"}, policy=list(policies),
                budget=list(budgets))
