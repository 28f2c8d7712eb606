"""Fine-tune the book's model until it copies from its context: kvlib/assets/stdlib-lm-copying.

Usage:
    python tools/train_copying.py                        # the shipped run, about 30 min on 2 cores
    python tools/train_copying.py --smoke --base /tmp/m --out /tmp/c   # a few steps, seconds

The book's model (`tools/train_model.py`) predicts code well but does not copy: read a
stretch of text twice and it predicts the second reading no better than the first; a name
defined early in a file is not recalled at its end (chapter 9 measures both). Its layer 1 has
previous-token heads, but no later layer has the induction heads that use them (Olsson et
al., 2022). Chapter 9 needs a model that copies, to ask which cache policies break copying.

So this script goes on training that model, from its weights and on its own training files,
with two losses summed every step:
1. the language-modelling loss on windows of the training text, as before (the model must
   stay a model of code), at the full 2,048 positions: a first run on windows of 512 tokens
   copied, but forgot the positions past 512 (held-out loss 4.0 to 5.0 nats per token there,
   against 3.5 to 3.8 before);
2. a copying loss on rows of code in which a token sequence repeats: half the rows are a
   little code followed by one sequence over and over, the other half code with one sequence
   placed three times at random places. Only the repeats are scored. The lengths and places
   vary, so no fixed offset solves it: the model must find the earlier occurrence by its
   content, which is what an induction head does.

It runs in two stages. For the first `--ids-steps` steps every repeated sequence is random
token ids, which nothing but their first occurrence predicts: the cleanest signal, and the
one on which an induction head forms (in the shipped run the copying loss sat near chance,
ln 4096 = 8.3 nats, for about 480 steps, then fell below 1 within 200). Such a head copies
random ids but hardly helps on text, whose tokens recur: 'ke' or '_' alone does not say
which earlier occurrence to copy from. So from then on the sequences are in turn random ids,
words of random syllables (common tokens, only their order is new) and stretches of the
training code. The rows are 192 tokens long, and the copying they teach reaches a few hundred
tokens back: chapter 9 measures how far.

Every `--eval-every` steps it measures what chapter 9 measures: the strongest induction head,
rereading held-out text, and recalling a random name with the full cache and with a 64-token
window (`kvlib.experiments.held_out`, `kvlib.experiments.shrink`). It saves a Hugging Face
folder like the base's, with `training_run.json`: the base's record (corpus, split, tokenizer)
with `fine_tune` (every hyperparameter, both loss curves, the measurements, times) and the
held-out metrics of the *saved* weights, scored as `train_model.py` scores its own.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import train_model  # noqa: E402  (registers the causal_training backend)

from kvlib import book_model  # noqa: E402
from kvlib.experiments import code_corpus, held_out, shrink  # noqa: E402

DEFAULT_OUT = ROOT / "kvlib" / "assets" / "stdlib-lm-copying"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, default=book_model.path(), help="the folder to start from")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--smoke", action="store_true", help="a few small steps: checks the script")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--ids-steps", type=int, default=500,
                   help="the first steps repeat random ids only; then every kind in turn")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--decay-from", type=float, default=0.7,
                   help="constant lr until this fraction of the steps, then cosine to 10%%")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--lm-batch", type=int, default=1)
    p.add_argument("--lm-len", type=int, default=2048,
                   help="the base's longest context: shorter windows forget the positions past them")
    p.add_argument("--copy-rows", type=int, default=24)
    p.add_argument("--copy-len", type=int, default=192)
    p.add_argument("--copy-weight", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-files", type=int, default=3, help="held-out files for the rereading")
    p.add_argument("--eval-probes", type=int, default=4, help="names to recall")
    p.add_argument("--completion-tokens", type=int, default=48)
    p.add_argument("--eval-max-tokens", type=int, default=None,
                   help="final scoring: each held-out file's first N tokens only (default: all)")
    args = p.parse_args(argv)
    if args.smoke:
        for name, value in dict(steps=4, ids_steps=2, lm_batch=1, lm_len=64, copy_rows=6,
                                log_every=1, eval_every=2, eval_files=1, eval_probes=1,
                                completion_tokens=8, eval_max_tokens=128).items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    if args.copy_len < 192:
        p.error(f"--copy-len must be at least 192 (three 32-token repeats and the code "
                f"between them), got {args.copy_len}")
    return args


def lr_at(step: int, args) -> float:
    """Linear warm-up, constant, then cosine decay to a tenth over the last steps."""
    if step <= args.warmup_steps:
        return args.lr * step / args.warmup_steps
    start = int(args.decay_from * args.steps)
    if step <= start:
        return args.lr
    frac = (step - start) / max(1, args.steps - start)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


SYLLABLE_START, SYLLABLE_END = "bdfghjklmnpqrstvz", "aeiou"


class CopyRows:
    """Rows of training text with token sequences repeated in them, and which targets are
    repeats (the only ones the copying loss scores). A repeated sequence is one of three kinds:
    random ids (nothing but the first occurrence predicts them); words of random syllables
    (common tokens such as 'ke' or '_', where the current token alone does not say which
    earlier occurrence to copy from, but the two or three before it do); a stretch of the
    training code."""

    KINDS = ("ids", "syllables", "code")

    def __init__(self, stream: torch.Tensor, tok, vocab_size: int, seed: int) -> None:
        self.stream, self.tok, self.V = stream, tok, vocab_size
        self.g = torch.Generator().manual_seed(seed)

    def _int(self, lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=self.g))

    def _sequence(self, kind: str) -> torch.Tensor:
        if kind == "ids":
            return torch.randint(300 if self.V > 600 else 1, self.V, (self._int(6, 33),),
                                 generator=self.g)
        if kind == "syllables":
            words = ["".join(SYLLABLE_START[self._int(0, 17)] + SYLLABLE_END[self._int(0, 5)]
                             for _ in range(self._int(2, 5))) for _ in range(self._int(2, 5))]
            sep = ("_", " ", ", ", ".")[self._int(0, 4)]
            return torch.tensor(self.tok.encode(sep.join(words)).ids[:32])
        L = self._int(6, 33)
        o = self._int(0, len(self.stream) - 40)
        return self.stream[o:o + L].clone()

    def batch(self, rows: int, T: int, kinds: tuple[str, ...]) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
        """(rows, T + 1) token ids and a (rows, T) mask of the targets that repeat. Even rows:
        a little code, then one sequence over and over to the end; odd rows: one sequence
        early, then twice more at random places in the code. Kinds in turn, two rows each."""
        seqs, masks = [], []
        for i in range(rows):
            o = self._int(0, len(self.stream) - T - 2)
            seq = self.stream[o:o + T + 1].clone()  # (T + 1,)
            mask = torch.zeros(T, dtype=torch.bool)  # target t + 1 predicted at t
            R = self._sequence(kinds[(i // 2) % len(kinds)])
            L = len(R)
            if i % 2 == 0:
                a = self._int(1, 32)
                seq[a:] = R.repeat((T + L - a) // L)[:T + 1 - a]
                mask[a + L:] = True
            else:
                a = self._int(1, 48)
                seq[a:a + L] = R
                b = self._int(a + L + 1, T + 1 - 2 * L - 1)
                seq[b:b + L] = R
                c = self._int(b + L, T + 1 - L)
                seq[c:c + L] = R
                mask[b:b + L - 1] = True
                mask[c:c + L - 1] = True
            seqs.append(seq)
            masks.append(mask)
        return torch.stack(seqs), torch.stack(masks)


class Probes:
    """What chapter 9 asks of a model that copies, on held-out files."""

    def __init__(self, book: held_out.BookModel, args) -> None:
        self.book = book
        n = 512 if not args.smoke else 192
        self.reread_len = 200 if not args.smoke else 40
        self.files = held_out.heldout_files(book, n, args.eval_files)
        self.probe_files = held_out.heldout_files(book, 2 * n, args.eval_probes)
        self.probe_len = n

    @torch.no_grad()
    def __call__(self, model) -> dict:
        model.eval()
        model.attention = "reference"
        heads = shrink.copying_heads(model)
        rereads = [held_out.reread(model, ids, self.reread_len) for ids in self.files.values()]
        rng = random.Random(0)
        full, window = [], []
        for ids in self.probe_files.values():
            p = held_out.copy_probe(self.book, ids, held_out.random_name(rng), self.probe_len)
            logits = model(torch.tensor([p.ids]))[0].float()  # (S, V)
            full.append(held_out.recall(logits, p))
            windowed = shrink.run(model, p.ids, shrink.POLICIES["window"], 64).logits.float()
            window.append(held_out.recall(windowed, p))
        nats, n = 0.0, 0
        for ids in self.files.values():
            logits = model(torch.tensor([ids]))[0].float()
            nats += float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
            n += len(ids) - 1
        model.train()
        model.attention = "causal_training"
        mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
        return {"induction_max": round(float(heads.induction.max()), 4),
                "previous_token_max": round(float(heads.previous.max()), 4),
                "reread_first": mean([r.first for r in rereads]),
                "reread_second": mean([r.second for r in rereads]),
                "name_token_accuracy_full": mean([r.token_accuracy for r in full]),
                "name_bits_full": mean([r.bits for r in full]),
                "name_bits_window64": mean([r.bits for r in window]),
                "heldout_nats_per_token": round(nats / n, 4)}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    book = held_out.load(args.base)
    model, tok = book.model, book.tokenizer
    root = code_corpus.stdlib_root()
    texts = [code_corpus.read_source(n, root) for n in book.record["corpus"]["train"]
             if (root / n).is_file()]
    stream = train_model.token_stream(tok, texts, book.eos_id)
    rows = CopyRows(stream, tok, model.config.vocab_size, args.seed)
    probes = Probes(book, args)
    evals = {"step": [0], **{k: [v] for k, v in probes(model).items()}}
    log(f"base {args.base.name}: " + json.dumps({k: v[0] for k, v in evals.items()}))

    opt = train_model.optimizer(model, args)
    model.train()
    model.attention = "causal_training"
    curve = {"step": [], "lm_loss": [], "copy_loss": [], "lr": []}
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        offsets = torch.randint(0, len(stream) - args.lm_len - 1, (args.lm_batch,),
                                generator=rows.g).tolist()
        text = torch.stack([stream[o:o + args.lm_len + 1] for o in offsets])  # (B, T + 1)
        lm = F.cross_entropy(model(text[:, :-1]).flatten(0, 1), text[:, 1:].flatten())
        kinds = ("ids",) if step <= args.ids_steps else CopyRows.KINDS
        rep, mask = rows.batch(args.copy_rows, args.copy_len, kinds)  # (R, T + 1), (R, T)
        cp = F.cross_entropy(model(rep[:, :-1])[mask], rep[:, 1:][mask])
        opt.zero_grad()
        (lm + args.copy_weight * cp).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        if step % args.log_every == 0:
            for k, v in (("step", step), ("lm_loss", round(lm.item(), 4)),
                         ("copy_loss", round(cp.item(), 4)), ("lr", lr_at(step, args))):
                curve[k].append(v)
            log(f"step {step}: lm {lm.item():.3f} copy {cp.item():.3f} "
                f"{time.perf_counter() - t0:.0f} s")
        if step % args.eval_every == 0 or step == args.steps:
            measured = probes(model)
            evals["step"].append(step)
            for k, v in measured.items():
                evals[k].append(v)
            log(f"eval {step}: " + json.dumps(measured))
    train_s = time.perf_counter() - t0

    model.attention = "reference"
    train_model.save_folder(model, tok, args.out)
    record = copy.deepcopy(book.record)
    base_weights = args.base / "model.safetensors"
    record["name"] = args.out.name
    record["fine_tune"] = {
        "from": {"name": book.record.get("name"), "sha256":
                 hashlib.sha256(base_weights.read_bytes()).hexdigest()},
        "why": "the base does not copy from its context; this run teaches it to (see the "
               "docstring of tools/train_copying.py)",
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v)
                            for k, v in vars(args).items()},
        "data": "each step: lm_batch windows of lm_len + 1 training tokens (language-modelling "
                "loss on all), and copy_rows rows of copy_len + 1 with random sequences of 6-32 "
                "ids repeated (copying loss on the repeats only); the loss is lm + copy_weight "
                "* copy",
        "curve": curve, "evals": evals,
        "train_step_time_s": round(train_s, 1),
        "torch": torch.__version__, "threads": args.threads,
    }
    record["metrics"] = train_model.evaluate(args.out, record, args, log)
    record["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": train_model.sha256_file(p)}
                       for p in sorted(args.out.iterdir()) if p.name != train_model.RECORD}
    record["time_s"] = {"fine_tune": round(train_s, 1),
                        "total": round(time.perf_counter() - t_start, 1)}
    (args.out / train_model.RECORD).write_text(json.dumps(record, indent=1) + "\n")
    log(f"saved {args.out}")


if __name__ == "__main__":
    main()
