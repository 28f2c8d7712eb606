"""Chapter 9's sweep machinery: held-out files and copying probes, one point per (policy,
regime, budget), and the summary read off the curves; on a small random model with a byte
tokenizer (the real numbers come from bench/shrink.py on the book's model)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from conftest import unit_scale_model

from kvlib.experiments import budget_sweep, held_out, shrink

pytestmark = pytest.mark.usefixtures("one_thread")

FILES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "shlex.py"]


class ByteTokenizer:
    """Bytes as tokens, 256 as the end of text: enough of `tokenizers.Tokenizer` for a sweep."""

    def encode(self, text):
        return SimpleNamespace(ids=list(text.encode("utf-8")))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

    def token_to_id(self, token):
        assert token == held_out.EOS
        return 256


@pytest.fixture(scope="module")
def book():
    model = unit_scale_model(1, vocab_size=257, d_model=32, num_layers=2, num_heads=4,
                             num_kv_heads=2, max_seq_len=256)
    return held_out.BookModel(model, ByteTokenizer(), {"corpus": {"heldout": FILES}})


def test_heldout_files_are_framed_and_long_enough(book):
    files = held_out.heldout_files(book, 120, max_files=3)
    assert list(files) == FILES[:3]
    assert all(len(ids) == 120 and ids[0] == 256 for ids in files.values())


def test_a_copy_probe_asks_for_the_name_it_defined(book):
    ids = held_out.heldout_files(book, 400, max_files=1)[FILES[0]]
    name = held_out.random_name(random.Random(3))
    probe = held_out.copy_probe(book, ids, name, 300)
    assert len(probe.ids) == 300
    n = len(probe.asked_at)
    assert probe.ids[probe.defined_at:probe.defined_at + n] == probe.ids[-n:]
    assert book.tokenizer.decode(probe.ids[-n:]) == name
    text = book.tokenizer.decode(probe.ids)
    assert text.count(f'_KEY = "{name}') == 2 and text.endswith(f'\n\n_KEY = "{name}')
    with pytest.raises(ValueError, match="no room"):
        held_out.copy_probe(book, ids, name, 40)


def test_recall_reads_the_greedy_choice_at_the_end(book):
    ids = held_out.heldout_files(book, 400, max_files=1)[FILES[0]]
    probe = held_out.copy_probe(book, ids, "ab_cd", 200)
    logits = torch.zeros(200, 257)
    for i in probe.asked_at:
        logits[i - 1, probe.ids[i]] = 50.0  # certain of every name token
    assert held_out.recall(logits, probe) == held_out.Recall(True, 1.0, pytest.approx(0.0))
    logits[probe.asked_at[0] - 1] = 0.0  # unsure of the first
    got = held_out.recall(logits, probe)
    assert not got.exact and got.token_accuracy == pytest.approx(4 / 5)
    assert got.bits == pytest.approx(8.0056, abs=1e-3)  # log2(257): one uniform token


def test_a_sweep_records_every_point_and_the_full_cache_is_the_model(book):
    data = budget_sweep.texts(book, 200, num_files=2, num_probes=2)
    policies = [shrink.POLICIES[n] for n in ("sinks + window", "SnapKV, whole blocks",
                                             "sinks + window, INT4 rest")]
    records = budget_sweep.sweep(book, data, policies, budgets=(0.25, 0.5, 1.0))
    keys = {(r["policy"], r["regime"], r["fraction"]) for r in records}
    assert ("sinks + window", "decode", 0.25) in keys
    assert ("SnapKV, whole blocks", "decode", 0.5) not in keys  # a prompt-only policy
    assert ("sinks + window, INT4 rest", "decode", 0.25) not in keys  # below INT4's floor
    full = [r for r in records if r["fraction"] == 1.0]
    assert all(r["agreement"] == 1.0 for r in full)
    assert len({r["bpb"] for r in full}) == 1  # every policy's full cache is the same model
    whole = budget_sweep.full_logits(book, data)
    expected = sum(held_out.recall(whole[f"probe {i}"], p).bits
                   for i, p in enumerate(data.probes)) / 2
    assert all(r["name_bits"] == pytest.approx(expected, abs=1e-3) for r in full)
    bytes_full = 2 * 2 * 2 * 8 * 2  # K and V x layers x KV heads x head dim x fp16
    assert all(r["bytes_per_token"] == r["fraction"] * bytes_full for r in records)


def test_summary_reads_the_smallest_budget_that_holds():
    rows = [dict(policy="p", regime="decode", fraction=f, bpb=b, recall=c, far_copy=c / 2,
                 name_accuracy=min(1.0, 2 * c)) for f, b, c in [(0.1, 2.0, 0.0), (0.3, 1.505, 0.5), (0.5, 1.49, 0.95),
                            (1.0, 1.5, 1.0)]]
    got = budget_sweep.summary(rows)
    assert got == {"decode": {"p": {"bpb_within": 0.3, "recall_holds": 0.5,
                                    "name_accuracy_holds": 0.3, "far_copy_holds": 0.5}}}
    rows[2]["bpb"] = 1.7  # a bump above 1% at 0.5: only budgets above it count
    assert budget_sweep.summary(rows)["decode"]["p"]["bpb_within"] is None


class InductionOracle:
    """Predicts, after token x, whatever followed x's previous occurrence (token 0 if none):
    a perfect copier, for `reread` to score."""

    def __call__(self, seq):  # (1, S) -> (1, S, V)
        ids = seq[0].tolist()
        logits = torch.zeros(1, len(ids), 300)
        after: dict[int, int] = {}
        for t, x in enumerate(ids):
            logits[0, t, after.get(x, 0)] = 1.0
            if t + 1 < len(ids):
                after[x] = ids[t + 1]  # noted after predicting: only earlier occurrences
        return logits


def test_reread_scores_each_copy_inside_itself():
    ids = [256, *range(10, 60)]  # distinct tokens: nothing repeats inside one copy
    got = held_out.reread(InductionOracle(), ids, 40)
    assert got == held_out.Reread(0.0, 1.0)


@pytest.mark.parametrize("length", [1, 50])
def test_reread_refuses_lengths_the_file_cannot_give(length):
    with pytest.raises(ValueError, match="reread needs"):
        held_out.reread(InductionOracle(), [256, *range(10, 40)], length)
