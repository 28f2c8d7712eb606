"""The book's trained model and text it never saw: held-out files and a copying probe.

The book's model is the Hugging Face folder shipped inside kvlib (`kvlib.book_model`), trained
on the Python standard library; its `training_run.json` names the files held out of training.
They are read from the running interpreter's standard library (`code_corpus`), so every
machine has them offline (a file this Python lacks is skipped). Each is framed as in training: the end-of-text token,
then the file's tokens.

Copying also happens in the files themselves: code repeats names and phrases. `far_repeats`
finds the tokens that continue a phrase seen only long before (its last earlier occurrence
at least `min_distance` tokens back): a model predicts them from far context or not at all.

A copying probe asks whether the model still remembers something it read long ago: a name
made of random syllables (so nothing but the context can predict it) is defined near the top
of a held-out file, `_KEY = "tovima_relasu"`, and asked for again at the end, after the file's
own text, by repeating the definition's start: `_KEY = "`. A model that copies from its
context predicts the name's tokens; a cache that dropped the definition cannot.

>>> random_name(random.Random(0))
'rodizo_riviku'
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvlib import book_model, hf
from kvlib.experiments import code_corpus
from kvlib.model import TransformerLM

# The book's model, shipped inside kvlib. Point `load` at another folder of the same kind (a
# Llama-family checkpoint with tokenizer.json and training_run.json) to measure that instead.
CHECKPOINT = book_model.path()
EOS = book_model.EOS


@dataclass(frozen=True)
class BookModel:
    """A model, its tokenizer (`tokenizers.Tokenizer`) and the record of its training."""

    model: TransformerLM
    tokenizer: Any
    record: dict[str, Any]

    @property
    def eos_id(self) -> int:
        return self.tokenizer.token_to_id(EOS)


def load(folder: Path | str = CHECKPOINT, dtype: torch.dtype = torch.float32) -> BookModel:
    """The checkpoint through `kvlib.hf.load_pretrained`, with its tokenizer and record."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    if not (folder / "training_run.json").is_file():
        raise FileNotFoundError(f"{folder} holds no trained model (no training_run.json)")
    return BookModel(hf.load_pretrained(folder, dtype=dtype),
                     Tokenizer.from_file(str(folder / "tokenizer.json")),
                     json.loads((folder / "training_run.json").read_text()))


def heldout_files(book: BookModel, min_tokens: int, max_files: int | None = None,
                  ) -> dict[str, list[int]]:
    """name -> [eos] + the first `min_tokens - 1` tokens, for the held-out files with at
    least that many, in the record's order."""
    root = code_corpus.stdlib_root()
    out: dict[str, list[int]] = {}
    for name in book.record["corpus"]["heldout"]:
        if not (root / name).is_file():
            continue
        ids = book.tokenizer.encode(code_corpus.read_source(name, root)).ids
        if len(ids) >= min_tokens - 1:
            out[name] = [book.eos_id, *ids[:min_tokens - 1]]
        if max_files is not None and len(out) == max_files:
            break
    return out


def text_bytes(book: BookModel, ids: Sequence[int]) -> int:
    """UTF-8 bytes the tokens spell (the end-of-text token spells none)."""
    return len(book.tokenizer.decode([i for i in ids if i != book.eos_id]).encode("utf-8"))


def random_name(rng: random.Random, syllables: int = 3) -> str:
    """Two words of random consonant-vowel syllables joined by '_' (nothing predicts it)."""
    def word() -> str:
        return "".join(rng.choice("bdfghjklmnpqrstvz") + rng.choice("aeiou")
                       for _ in range(syllables))
    return f"{word()}_{word()}"


@dataclass(frozen=True)
class CopyProbe:
    """A held-out file with a name defined near its top and asked for at its end."""

    ids: list[int]  # (S,) the whole sequence
    name: str
    defined_at: int  # position of the definition's first name token
    asked_at: range  # positions of the name's tokens at the end (what the model must predict)


def copy_probe(book: BookModel, file_ids: Sequence[int], name: str, num_tokens: int,
               defined_after: int = 48) -> CopyProbe:
    """`file_ids` ([eos] + a file's tokens) with `_KEY = "name"` after its first
    `defined_after` tokens (at a line end) and `_KEY = "name"` again at the end, the
    whole `num_tokens` long. Segments are tokenized apart, at boundaries where the
    tokenizer splits anyway (a quote, a line end), so the name's tokens are the same twice."""
    enc = book.tokenizer.encode

    def ids(text: str) -> list[int]:
        return enc(text).ids

    newline = [i for i, t in enumerate(file_ids) if i >= defined_after
               and "\n" in book.tokenizer.decode([t])]
    cut = newline[0] + 1 if newline else defined_after
    head, name_ids = list(file_ids[:cut]), ids(name)
    define = ids('_KEY = "') + name_ids + ids('"\n')
    ask = ids('\n\n_KEY = "')
    room = num_tokens - len(head) - len(define) - len(ask) - len(name_ids)
    if room < 0:
        raise ValueError(f"a probe of {num_tokens} tokens has no room for the file's text")
    body = list(file_ids[cut:cut + room])
    seq = head + define + body + ask + name_ids
    start = len(head) + len(ids('_KEY = "'))
    return CopyProbe(seq, name, start, range(len(seq) - len(name_ids), len(seq)))


@dataclass(frozen=True)
class Recall:
    """How well the name asked for at the end was predicted."""

    exact: bool  # every one of its tokens was the greedy choice
    token_accuracy: float  # the share of its tokens that were
    bits: float  # -log2 p of the whole name


def recall(logits: torch.Tensor, probe: CopyProbe) -> Recall:
    """What `logits` (S, V) of a probe's sequence say about the name at its end."""
    targets = torch.tensor([probe.ids[i] for i in probe.asked_at])  # (n,)
    before = torch.tensor([i - 1 for i in probe.asked_at])  # (n,) the logits predicting each
    logp = logits[before].log_softmax(-1)  # (n, V)
    hits = logp.argmax(-1) == targets  # (n,)
    bits = -float(logp.gather(1, targets[:, None]).sum()) / math.log(2)
    return Recall(bool(hits.all()), float(hits.float().mean()), bits)


@dataclass(frozen=True)
class Reread:
    """Top-1 accuracy on a stretch of text read once, and on the same stretch read again."""

    first: float
    second: float


def reread(model: TransformerLM, file_ids: Sequence[int], length: int) -> Reread:
    """Feed [eos] + the file's first `length` tokens, then the same `length` tokens again,
    and score the greedy next token inside each copy. A model that copies from its context
    (induction heads) predicts nearly all of the second copy; one that does not, no better
    than the first."""
    if length < 2 or len(file_ids) < length + 1:
        raise ValueError(f"reread needs 2 <= length <= {len(file_ids) - 1}; got {length}")
    text = list(file_ids[1:length + 1])
    seq = torch.tensor([file_ids[0], *text, *text])  # (1 + 2 * length,)
    with torch.no_grad():
        picked = model(seq[None])[0].argmax(-1)  # (1 + 2 * length,)
    hit = picked[:-1] == seq[1:]  # (2 * length,) position t predicted token t + 1
    # Inside each copy: the first copy's tokens 2..length, the second's 2..length (the first
    # token of each copy follows an end of text or the other copy's end: not a copy).
    return Reread(float(hit[1:length].float().mean()),
                  float(hit[length + 1:2 * length].float().mean()))


def far_repeats(ids: Sequence[int], start: int, ngram: int = 4,
                min_distance: int = 256) -> list[int]:
    """Positions t >= start whose next token continues an n-gram (ids[t - n + 2 .. t + 1])
    that last occurred at least `min_distance` tokens earlier, and not since.

    >>> far_repeats([7, 8, 9, 1, 2, 3, 7, 8, 9], start=0, ngram=3, min_distance=5)
    [7]
    >>> far_repeats([7, 8, 9, 1, 2, 3, 7, 8, 9], start=0, ngram=3, min_distance=7)
    []
    """
    last: dict[tuple[int, ...], int] = {}
    out = []
    for t in range(ngram - 2, len(ids) - 1):
        gram = tuple(ids[t - ngram + 2:t + 2])  # the n tokens ending with the target
        seen = last.get(gram)
        if seen is not None and t >= start and t - seen >= min_distance:
            out.append(t)
        last[gram] = t
    return out
