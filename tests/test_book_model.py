"""The checkpoint that ships inside kvlib (kvlib.book_model) and the script that trains it.

CI never trains: these tests load the shipped folder, re-score a small held-out slice (a
random-weight model would be far off), check it against transformers, and run the training
script for a few steps of a tiny model.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvlib import book_model, hf
from kvlib.experiments import code_corpus, lm_metrics

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 20 * 2**20


@pytest.fixture(scope="module")
def record() -> dict:
    return book_model.training_run()


@pytest.fixture(scope="module")
def model():
    return book_model.load()


def test_folder_is_small_complete_and_recorded(record):
    folder = book_model.path()
    files = {p.name: p for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "training_run.json"} <= set(files)
    assert sum(p.stat().st_size for p in files.values()) <= MAX_BYTES
    for name, meta in record["files"].items():  # the record names the bytes it describes
        assert hashlib.sha256(files[name].read_bytes()).hexdigest() == meta["sha256"], name
    corpus = record["corpus"]
    assert not set(corpus["train"]) & set(corpus["heldout"])  # split by file
    assert corpus["split"]["heldout_files"] == len(corpus["heldout"])
    assert record["model"]["config"]["max_seq_len"] >= 2048
    assert max(p["seq_len"] for p in record["training"]["phases"]) >= 2048  # trained that far


def test_loads_in_one_call_with_its_tokenizer(model, record):
    cfg = model.config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        record["model"]["config"]["num_heads"], record["model"]["config"]["num_kv_heads"], 64)
    assert cfg.num_kv_heads < cfg.num_heads  # grouped-query attention, as real models
    tok = book_model.tokenizer()
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id(book_model.EOS) == record["tokenizer"]["eos_id"]


def test_heldout_slice_is_scored_as_recorded(model, record):
    """The first tokens of a few held-out files: the recorded figure again, well below what
    gzip needs on the same bytes (random weights need about log2(4096) / 3.5 = 3.4 bits)."""
    check = record["metrics"]["check_slice"]
    if code_corpus.corpus_hash(check["files"]) != check["sha256"]:
        pytest.skip("this Python's standard library differs from the training machine's")
    tok = book_model.tokenizer()
    eos = tok.token_to_id(book_model.EOS)
    texts = {n: lm_metrics.head_text(tok, code_corpus.read_source(n), check["tokens_per_file"])
             for n in check["files"]}
    scores = lm_metrics.score_texts(model, tok, texts, eos)
    assert scores.bits_per_byte == pytest.approx(check["bits_per_byte"], abs=2e-3)
    gzip_bpb = lm_metrics.compressor_bits_per_byte(texts)["gzip -9"]["per_file"]
    assert scores.bits_per_byte < 0.8 * gzip_bpb


@torch.no_grad()
def test_transformers_loads_the_same_folder_and_agrees(model):
    pytest.importorskip("transformers")
    from kvlib.experiments.models import reference_model

    reference = reference_model(book_model.path())
    tok = book_model.tokenizer()
    ids = tok.encode("import os\n\n\ndef walk(top):\n    for name in os.listdir(top):\n").ids
    prompt = torch.tensor([[0, *ids]])
    ours = model(prompt).float()
    theirs = reference(prompt).logits.float()
    assert (ours - theirs).abs().max() < 1e-4
    # and kvlib's loader refuses nothing in it: every weight checked against config.json
    assert hf.check_checkpoint(book_model.path(), model.config)


def test_training_script_runs_a_few_steps(tmp_path):
    """A tiny model on 40 files for 5 steps, saved and scored: the whole pipeline."""
    out = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "tools/train_model.py", "--smoke", "--threads", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "training_run.json").read_text())
    assert run["training"]["curve"]["step"][-1] == sum(p["steps"] for p in run["training"]["phases"])
    assert run["metrics"]["bits_per_byte"] > 0
    assert run["metrics"]["compressors_bits_per_byte"]["gzip -9"]["per_file"] > 0
    loaded = hf.load_pretrained(out)
    assert loaded.config.vocab_size == run["tokenizer"]["vocab_size"]


def test_copying_script_fine_tunes_a_few_steps(tmp_path):
    """The copying fine-tune on a tiny base for 4 steps, measured, saved and scored."""
    base, out = tmp_path / "base", tmp_path / "copying"
    for cmd in (["tools/train_model.py", "--smoke", "--max-seq-len", "256", "--out", str(base)],
                ["tools/train_copying.py", "--smoke", "--base", str(base), "--out", str(out)]):
        result = subprocess.run([sys.executable, *cmd, "--threads", "1"], cwd=ROOT,
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "training_run.json").read_text())
    tune = run["fine_tune"]
    assert tune["curve"]["step"] == [1, 2, 3, 4]
    assert tune["evals"]["step"] == [0, 2, 4]
    assert all(len(v) == 3 for v in tune["evals"].values())
    base_weights = (base / "model.safetensors").read_bytes()
    assert tune["from"]["sha256"] == hashlib.sha256(base_weights).hexdigest()
    assert run["corpus"] == json.loads((base / "training_run.json").read_text())["corpus"]
    assert run["metrics"]["bits_per_byte"] > 0
    assert hf.load_pretrained(out).config == hf.load_pretrained(base).config


@pytest.fixture(scope="module")
def copying_record() -> dict:
    folder = book_model.path(book_model.COPYING)
    return json.loads((folder / "training_run.json").read_text())


def test_the_copying_fine_tune_is_shipped_and_names_its_base(copying_record, record):
    folder = book_model.path(book_model.COPYING)
    for name, meta in copying_record["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == meta["sha256"], name
    base_weights = (book_model.path() / "model.safetensors").read_bytes()
    assert copying_record["fine_tune"]["from"]["sha256"] == hashlib.sha256(
        base_weights).hexdigest()
    assert copying_record["corpus"] == record["corpus"]  # the same split: held-out stays held out
    with pytest.raises(ValueError, match="ships"):
        book_model.path("stdlib-lm-large")


@torch.no_grad()
def test_the_fine_tune_copies_and_the_base_does_not(model):
    """What chapter 9 relies on: an induction head in the fine-tune and none in the base, and
    text read a second time predicted far better than the first time only by the fine-tune."""
    from kvlib.experiments import held_out, shrink

    copying = held_out.load(book_model.path(book_model.COPYING))
    base = held_out.load(book_model.path())
    for book in (base, copying):
        book.model.attention = "reference"
    assert float(shrink.copying_heads(base.model).induction.max()) < 0.05
    assert float(shrink.copying_heads(copying.model).induction.max()) > 0.5
    files = held_out.heldout_files(base, 512, max_files=2)
    if not files:
        pytest.skip("this Python's standard library lacks the held-out files")
    for ids in files.values():
        before, after = (held_out.reread(b.model, ids, 200) for b in (base, copying))
        assert after.second - after.first > 0.1 > before.second - before.first
