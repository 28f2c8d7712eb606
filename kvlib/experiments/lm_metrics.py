"""How well a language model predicts held-out code: bits per byte, copying, completions.

Bits per byte beside gzip's and xz's on the same files; top-1 accuracy on tokens that copy
from their context against the others; greedy completions.

Bits per byte is the honest unit for comparing a language model with a compressor: a model
that gives the next token probability p can code it in -log2 p bits (arithmetic coding gets
within a few bits of that over a whole file), and byte-level BPE covers every byte of the
text, so summing those bits and dividing by the file's UTF-8 bytes compares directly with
`len(gzip.compress(data, 9)) * 8 / len(data)`.

A file is scored as `[eos] + tokens + [eos]`: every token of the file and its end are
predicted. A file longer than the model's context is cut into windows that do not overlap,
so the first tokens of each later window are predicted with less context than they could be
(the figure is a little pessimistic, never flattering).

A target token *repeats* an earlier sequence when the `ngram` tokens ending at it (it and the
`ngram - 1` before it) already occurred, in that order, earlier in the same window: a model
that copies from its context (an induction head) predicts such tokens far better than others.

>>> repeats_earlier([5, 6, 7, 5, 6, 7, 8], ngram=2)
[False, False, False, False, True, True, False]
"""

from __future__ import annotations

import gzip
import lzma
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from kvlib.model import TransformerLM


def repeats_earlier(ids: Sequence[int], ngram: int) -> list[bool]:
    """For each position i: did the `ngram` tokens ending at i occur ending at some j < i?"""
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    seen: set[tuple[int, ...]] = set()
    flags = []
    for i in range(len(ids)):
        if i < ngram - 1:
            flags.append(False)
            continue
        gram = tuple(ids[i - ngram + 1:i + 1])
        flags.append(gram in seen)
        seen.add(gram)
    return flags


@dataclass(frozen=True)
class TokenScores:
    """Per predicted token of one or more files (all the same length n)."""

    nats: torch.Tensor  # (n,) float64: -ln p(target)
    correct: torch.Tensor  # (n,) bool: the target was the model's top-1
    repeat: torch.Tensor  # (n,) bool: the target repeats an earlier n-gram of its window
    num_bytes: int  # UTF-8 bytes of the text scored

    @property
    def bits_per_byte(self) -> float:
        return float(self.nats.sum()) / math.log(2) / self.num_bytes

    @property
    def bits_per_token(self) -> float:
        return float(self.nats.mean()) / math.log(2)

    def accuracy(self, which: torch.Tensor | None = None) -> float:
        """Top-1 accuracy over the tokens selected by `which` (n,) bool (default: all)."""
        picked = self.correct if which is None else self.correct[which]
        return float(picked.float().mean()) if picked.numel() else float("nan")

    @staticmethod
    def concat(scores: Sequence[TokenScores]) -> TokenScores:
        return TokenScores(torch.cat([s.nats for s in scores]),
                           torch.cat([s.correct for s in scores]),
                           torch.cat([s.repeat for s in scores]),
                           sum(s.num_bytes for s in scores))


def file_ids(tokenizer, text: str, eos_id: int) -> list[int]:
    """`[eos] + tokens + [eos]`: a file as the model was trained to read it."""
    return [eos_id, *tokenizer.encode(text).ids, eos_id]


@torch.no_grad()
def score_ids(model: TransformerLM, ids: Sequence[int], num_bytes: int, *,
              context: int | None = None, ngram: int = 4) -> TokenScores:
    """Score every token after the first of `ids`, in windows of at most `context` inputs
    (default: the model's max_seq_len) that do not overlap."""
    context = model.config.max_seq_len if context is None else context
    if len(ids) < 2:
        raise ValueError(f"need at least 2 token ids to predict one, got {len(ids)}")
    device = model.embed.weight.device
    nats, correct, repeat = [], [], []
    for start in range(0, len(ids) - 1, context):
        window = list(ids[start:start + context + 1])  # inputs window[:-1], targets window[1:]
        x = torch.tensor(window, device=device)  # (T + 1,)
        logits = model(x[None, :-1])[0].float()  # (T, V)
        targets = x[1:]  # (T,)
        nats.append(F.cross_entropy(logits, targets, reduction="none").double().cpu())  # (T,)
        correct.append((logits.argmax(-1) == targets).cpu())  # (T,)
        repeat.append(torch.tensor(repeats_earlier(window, ngram)[1:]))  # (T,)
    return TokenScores(torch.cat(nats), torch.cat(correct), torch.cat(repeat), num_bytes)


def score_texts(model: TransformerLM, tokenizer, texts: Mapping[str, str], eos_id: int, *,
                context: int | None = None, ngram: int = 4) -> TokenScores:
    """Scores of every text (name -> text), concatenated."""
    return TokenScores.concat([
        score_ids(model, file_ids(tokenizer, text, eos_id), len(text.encode()), context=context,
                  ngram=ngram)
        for text in texts.values()])


def first_lines(text: str, num_lines: int) -> str:
    """The first `num_lines` lines of `text`, without the last one's newline: a prompt that
    stops where a line's text ends. A byte-level BPE joins a newline with the indentation
    after it ("\\n" + 7 spaces is one token, the 8th space starts the next word), so a prompt
    ending in a bare newline tells the model that the next line is not indented.

    >>> first_lines("def f():\\n    return 1\\n\\nx = f()\\n", 2)
    'def f():\\n    return 1'
    """
    if num_lines < 1:
        raise ValueError(f"first_lines needs num_lines >= 1, got {num_lines}")
    return "".join(text.splitlines(keepends=True)[:num_lines]).rstrip("\n")


def head_text(tokenizer, text: str, max_tokens: int) -> str:
    """The text of `text`'s first `max_tokens` tokens (all of it if shorter): a quick slice
    that the model and the compressors both read."""
    ids = tokenizer.encode(text).ids
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def compressor_bits_per_byte(texts: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """`gzip -9` and `xz -9` (Python's gzip and lzma at those levels) on the same texts, each
    file compressed on its own (as the model reads them) and all of them concatenated (the
    compressor may then copy across files)."""
    datas = [t.encode() for t in texts.values()]
    total = sum(len(d) for d in datas)
    codecs = {"gzip -9": lambda d: gzip.compress(d, compresslevel=9, mtime=0),
              "xz -9": lambda d: lzma.compress(d, preset=9)}
    return {name: {"per_file": 8 * sum(len(fn(d)) for d in datas) / total,
                   "concatenated": 8 * len(fn(b"".join(datas))) / total}
            for name, fn in codecs.items()}


@torch.no_grad()
def greedy_completion(model: TransformerLM, tokenizer, prompt: str, max_new_tokens: int,
                      eos_id: int) -> str:
    """The model's greedy continuation of `prompt` (a file's beginning), through a cache,
    stopped at the end-of-file token."""
    ids = [eos_id, *tokenizer.encode(prompt).ids]
    x = torch.tensor([ids], device=model.embed.weight.device)  # (1, P)
    out = model.generate(x, max_new_tokens, cache=model.new_cache(1, len(ids) + max_new_tokens))
    new = out.tokens[0].tolist()
    if eos_id in new:
        new = new[:new.index(eos_id)]
    return tokenizer.decode(new)
