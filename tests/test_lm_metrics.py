"""Held-out scoring, the corpus split, and the chapters' measurements on a trained model,
checked on small random models (the shipped checkpoint has its own tests)."""

from __future__ import annotations

import gzip
import math
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from kvlib.cache.quant_memory import PRESETS
from kvlib.cache.quantize import QuantScheme
from kvlib.config import ModelConfig
from kvlib.experiments import code_corpus, lm_metrics, trained
from kvlib.experiments import quantization as qx
from kvlib.model import TransformerLM

CONFIG = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_seq_len=64)


class ByteTokenizer:
    """Token id = byte: enough to check the arithmetic of bits per byte."""

    def encode(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(ids=list(text.encode()))

    def decode(self, ids) -> str:
        return bytes(ids).decode()


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(CONFIG).eval()


def test_repeats_earlier_marks_ngrams_seen_before():
    assert lm_metrics.repeats_earlier([1, 2, 1, 2, 1], ngram=1) == [False, False, True, True, True]
    assert lm_metrics.repeats_earlier([1, 2, 1, 2, 1], ngram=3) == [False] * 4 + [True]
    with pytest.raises(ValueError, match="ngram"):
        lm_metrics.repeats_earlier([1], ngram=0)


@torch.no_grad()
def test_score_ids_is_cross_entropy_per_window(model):
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    scores = lm_metrics.score_ids(model, ids, num_bytes=100, context=64)
    assert scores.nats.shape == (149,)
    expected = []
    for start in range(0, 149, 64):  # windows that do not overlap, each from scratch
        w = torch.tensor(ids[start:start + 65])
        expected.append(F.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="none"))
    torch.testing.assert_close(scores.nats.float(), torch.cat(expected), atol=1e-5, rtol=0)
    assert scores.bits_per_byte == pytest.approx(float(scores.nats.sum()) / math.log(2) / 100)
    assert scores.accuracy() == pytest.approx(float(scores.correct.float().mean()))


def test_score_texts_frames_files_and_counts_their_bytes(model):
    tok = ByteTokenizer()
    texts = {"a.py": "x = 1\n" * 5, "b.py": "def f():\n    return 2\n"}
    scores = lm_metrics.score_texts(model, tok, texts, eos_id=0, context=32)
    # every byte of each file is predicted, and its end: len + 1 targets per file
    assert scores.nats.numel() == sum(len(t) + 1 for t in texts.values())
    assert scores.num_bytes == sum(len(t.encode()) for t in texts.values())
    # "x = 1\n" five times: the later copies repeat earlier 4-grams
    assert bool(scores.repeat[:31].any())
    assert lm_metrics.head_text(tok, "abcdef", 3) == "abc"
    assert lm_metrics.head_text(tok, "ab", 3) == "ab"


def test_compressors_on_the_same_bytes():
    texts = {"a": "spam and eggs\n" * 200, "b": "spam and eggs\n" * 200}
    got = lm_metrics.compressor_bits_per_byte(texts)
    data = texts["a"].encode()
    per_file = 8 * 2 * len(gzip.compress(data, compresslevel=9, mtime=0)) / (2 * len(data))
    assert got["gzip -9"]["per_file"] == pytest.approx(per_file)
    for figures in got.values():  # repetitive text compresses far, and copying across files helps
        assert 0 < figures["concatenated"] < figures["per_file"] < 1


def test_split_by_file_is_seeded_and_disjoint():
    names = [f"m{i}.py" for i in range(50)]
    train, held = code_corpus.split_files(names, 0.1, seed=3)
    assert (train, held) == code_corpus.split_files(list(reversed(names)), 0.1, seed=3)
    assert len(held) == 5 and not set(train) & set(held) and set(train) | set(held) == set(names)
    assert held != code_corpus.split_files(names, 0.1, seed=4)[1]
    with pytest.raises(ValueError, match="heldout_fraction"):
        code_corpus.split_files(names, 1.0, seed=0)


def test_corpus_is_the_stdlib_without_tests():
    names = code_corpus.corpus_files()
    assert "json/decoder.py" in names and "os.py" in names
    assert not any(n.startswith("test/") or "/tests/" in n or n.split("/")[-1].startswith("test_")
                   or "_sysconfigdata" in n for n in names)


@torch.no_grad()
def test_captured_queries_keys_values_reproduce_attention(model):
    """Attention of the captured (rotated) q, k, v is what the layer fed to o_proj."""
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    into_o = {}
    hooks = [layer.attn.o_proj.register_forward_pre_hook(
        lambda _m, args, i=i: into_o.__setitem__(i, args[0])) for i, layer in enumerate(model.layers)]
    try:
        layers = trained.capture_qkv(model, ids)
    finally:
        for h in hooks:
            h.remove()
    S, H, D = 40, CONFIG.num_heads, CONFIG.head_dim
    from kvlib.attention import attention

    for i, x in enumerate(layers):
        assert x.q.shape == (H, S, D) and x.k.shape == x.v.shape == (2, S, D)
        out = attention(x.q[None], x.k[None], x.v[None], torch.arange(S)[None],
                        torch.tensor([S]))  # (1, H, S, D)
        torch.testing.assert_close(out[0].transpose(0, 1).reshape(S, H * D), into_o[i],
                                   atol=1e-5, rtol=1e-5)
    assert trained.attention_error(layers[0], None, None) == 0.0
    ek, ev, ea = trained.scheme_errors(layers, QuantScheme("int4", "token"))
    ek8, ev8, ea8 = trained.scheme_errors(layers, QuantScheme("int8", "token"))
    assert 0 < ek8 < ek and 0 < ev8 < ev and 0 < ea8 < ea


def test_channel_magnitudes_find_outlier_channels():
    k, _, _ = qx.outlier_keys(256, head_dim=64, num_kv_heads=2, num_outliers=3, strength=10.0)
    ratios = trained.channel_magnitudes(k)  # (Hkv, D)
    assert ratios.shape == (2, 64)
    assert int((ratios > 5).sum(-1)[0]) == 3 and float(ratios.max()) == pytest.approx(10, rel=0.3)


@torch.no_grad()
def test_decode_heldout_matches_the_full_forward(model):
    tok = ByteTokenizer()
    texts = [list(b"import os\nimport sys\n\n\ndef main():\n    pass\n")]
    ref = trained.decode_heldout(model, texts, 8, None, tok)
    full = model(torch.tensor(texts))[0, 7:-1]  # (S - 8, V): logits predicting tokens 8..
    torch.testing.assert_close(ref.logits, full.float(), atol=1e-4, rtol=0)
    assert (ref.agreement, ref.kl) == (1.0, 0.0)
    q8 = trained.decode_heldout(model, texts, 8, PRESETS["int8-token"], tok, reference=ref)
    assert q8.agreement > 0.9 and 0 < q8.kl < 1e-3
    assert q8.bits_per_byte == pytest.approx(ref.bits_per_byte, rel=0.01)


@torch.no_grad()
def test_decode_heldout_batches_texts_as_if_one_by_one(model):
    tok = ByteTokenizer()
    texts = [list(b"import os\nimport sys\n\n\n"), list(b"def main():\n    pass\n\n\n")]
    both = trained.decode_heldout(model, texts, 8, PRESETS["int4-token"], tok)
    alone = [trained.decode_heldout(model, [t], 8, PRESETS["int4-token"], tok) for t in texts]
    torch.testing.assert_close(both.logits, torch.cat([a.logits for a in alone]), atol=1e-5,
                               rtol=0)
    with pytest.raises(ValueError, match="one length"):
        trained.decode_heldout(model, [texts[0], texts[1][:-1]], 8, None, tok)


def test_first_lines_stops_where_a_line_ends():
    text = "import os\n\n\ndef f():\n    return 1\n"
    assert lm_metrics.first_lines(text, 4) == "import os\n\n\ndef f():"
    assert lm_metrics.first_lines(text, 99) == text.rstrip("\n")
    with pytest.raises(ValueError, match="num_lines"):
        lm_metrics.first_lines(text, 0)
