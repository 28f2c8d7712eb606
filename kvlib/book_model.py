"""The book's own small trained model, shipped inside kvlib: path(), load(), tokenizer().

A Llama-style checkpoint trained on the Python standard library's source, so that chapters
show a trained model's cache offline.

It is a Hugging Face folder (`config.json` for `LlamaForCausalLM`, fp16 `model.safetensors`,
`tokenizer.json`) with `training_run.json` beside it: the corpus, the split, the tokenizer,
every hyperparameter, the loss curves and the held-out metrics. `tools/train_model.py` made
it on a 2-core CPU; chapter 8 tells how, and what it can and cannot do.

Beside it, `path(COPYING)` is the same model fine-tuned until it copies from its context
(`tools/train_copying.py`): the book's model has no induction heads, and chapter 9 needs one
that has, to ask which cache policies break copying.

>>> path().name
'stdlib-lm'
>>> (path() / "config.json").is_file()
True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvlib import hf
from kvlib.model import TransformerLM

NAME = "stdlib-lm"
COPYING = "stdlib-lm-copying"  # the same, fine-tuned to copy (tools/train_copying.py)
EOS = "<|endoftext|>"  # frames every file: [eos] + the file's tokens + [eos]


def path(name: str = NAME) -> Path:
    """The checkpoint folder inside the installed kvlib package (`NAME` or `COPYING`)."""
    if name not in (NAME, COPYING):
        raise ValueError(f"kvlib ships {NAME!r} and {COPYING!r}, not {name!r}")
    return Path(__file__).resolve().parent / "assets" / name


def load(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> TransformerLM:
    """The model, through `kvlib.hf.load_pretrained` (checked, safetensors only), eval mode."""
    return hf.load_pretrained(path(), dtype=dtype, device=device)


def tokenizer() -> Any:
    """Its byte-level BPE as a `tokenizers.Tokenizer` (`encode(text).ids`, `decode(ids)`)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path() / "tokenizer.json"))


def training_run() -> dict[str, Any]:
    """The record of the run that made it (corpus, hyperparameters, curves, metrics)."""
    return json.loads((path() / "training_run.json").read_text())
