"""Train the book's small model on the Python standard library's source, on a CPU.

Usage:
    python tools/train_model.py                       # the shipped run: kvlib/assets/stdlib-lm
    python tools/train_model.py --smoke --out /tmp/m  # a few steps of a tiny model, seconds
    python tools/train_model.py --evaluate kvlib/assets/stdlib-lm   # metrics again, no training

Every machine with Python 3.11 has the text (`kvlib.experiments.code_corpus`), so the run
needs no download. It is seeded, and every choice is recorded in `training_run.json` beside
the weights: the corpus (file list, sha256), the split by file, the tokenizer, every
hyperparameter, the loss curves, the wall time and throughput, and the held-out metrics.

What it does, in order:
1. lists the corpus and splits it by file (seeded); trains a byte-level BPE on the training
   files only (the `tokenizers` package);
2. trains kvlib's own `TransformerLM` with its plain no-cache forward, `model(tokens)`, on
   random windows of the training files' tokens (each file framed by end-of-text tokens), in
   phases of growing context (the last at the full 2,048 positions, so every position the
   config allows has been trained), AdamW with warm-up and cosine decay;
3. saves a Hugging Face folder (`LlamaForCausalLM` config.json, fp16 `model.safetensors`,
   tokenizer.json) and scores the *saved* weights on the held-out files: bits per byte
   beside gzip -9 and xz -9 on the same files, top-1 accuracy on tokens that repeat an
   earlier sequence of their file against the others, and greedy completions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvlib import backends  # noqa: E402
from kvlib.config import ModelConfig  # noqa: E402
from kvlib.experiments import code_corpus, lm_metrics  # noqa: E402
from kvlib.model import TransformerLM  # noqa: E402

EOS = "<|endoftext|>"
RECORD = "training_run.json"
DEFAULT_OUT = ROOT / "kvlib" / "assets" / "stdlib-lm"
CHECK_SLICE_FILES = 4  # held-out files in the quick slice the tests re-score
CHECK_SLICE_TOKENS = 256


def causal_training_attention(q, kv, batch):
    """Whole sequences from position 0, all the same length (training, no cache): torch's
    fused causal attention, without the explicit mask the general `sdpa` backend builds."""
    B, T = batch.num_seqs, batch.uniform_len
    N, H, D = q.shape
    if T is None or kv.key_start is not None or kv.window is not None:
        raise ValueError("the training backend takes uniform whole sequences without windows")
    qb = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    out = F.scaled_dot_product_attention(qb, kv.k, kv.v, is_causal=True,
                                         enable_gqa=True)  # (B, H, T, D)
    return out.transpose(1, 2).reshape(N, H, D)  # (N, H, D)


backends.register("causal_training", causal_training_attention)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--evaluate", type=Path, default=None,
                   help="score an existing folder and update its record; no training")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny model, a few files and steps: checks the script in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--max-files", type=int, default=None, help="corpus: first N files only")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn-dim", type=int, default=704)
    p.add_argument("--rope-theta", type=float, default=10_000.0)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--phases", default="1100x8x512,160x2x2048",
                   help="comma-separated STEPSxBATCHxSEQ_LEN, run in order")
    p.add_argument("--steps", type=int, default=None,
                   help="override: this many steps in every phase (a quick check)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-windows", type=int, default=4, help="held-out windows of max_seq_len")
    p.add_argument("--completion-tokens", type=int, default=48)
    p.add_argument("--eval-max-tokens", type=int, default=None,
                   help="score each held-out file's first N tokens only (default: all)")
    p.add_argument("--skip-eval", action="store_true", help="train and save, score nothing")
    p.add_argument("--state", type=Path, default=None,
                   help="save the training state (and a snapshot folder) here at every "
                        "held-out evaluation, and the tokenizer once")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step, with the state saved (then --resume)")
    p.add_argument("--resume", action="store_true",
                   help="go on from --state's saved step, with its tokenizer")
    p.add_argument("--shared-machine", default="",
                   help="a note for the record, e.g. that other jobs shared the CPU")
    args = p.parse_args(argv)
    if args.smoke:
        for name, value in dict(max_files=40, vocab_size=384, d_model=64, num_layers=2,
                                num_heads=2, num_kv_heads=1, head_dim=32, ffn_dim=128,
                                max_seq_len=128, phases="3x2x64,2x1x128", warmup_steps=2,
                                log_every=1, eval_every=2, val_windows=1,
                                completion_tokens=8, eval_max_tokens=128).items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    return args


def parse_phases(text: str, steps: int | None) -> list[dict[str, int]]:
    phases = []
    for part in text.split(","):
        n, b, t = (int(x) for x in part.lower().split("x"))
        phases.append({"steps": steps or n, "batch_size": b, "seq_len": t})
    return phases


# --- 1. corpus and tokenizer -------------------------------------------------------------

def corpus(args) -> dict:
    root = code_corpus.stdlib_root()
    names = code_corpus.corpus_files(root)
    if args.max_files:
        names = names[:args.max_files]
    train, heldout = code_corpus.split_files(names, args.heldout_fraction, args.seed)
    size = lambda ns: sum((root / n).stat().st_size for n in ns)
    return {
        "source": f"Python {platform.python_version()} standard library: every .py file "
                  f"except those in folders {sorted(code_corpus.SKIP_DIRS)} and those named "
                  f"{', '.join(p + '*' for p in code_corpus.SKIP_PREFIXES)}",
        "python": sys.version.split()[0],
        "num_files": len(names), "bytes": size(names),
        "sha256": code_corpus.corpus_hash(names, root),
        "split": {"by": "file", "seed": args.seed, "heldout_fraction": args.heldout_fraction,
                  "train_files": len(train), "train_bytes": size(train),
                  "heldout_files": len(heldout), "heldout_bytes": size(heldout),
                  "heldout_sha256": code_corpus.corpus_hash(heldout, root)},
        "train": train, "heldout": heldout,
    }


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def token_stream(tok, texts: list[str], eos_id: int) -> torch.Tensor:
    """Every file framed by end-of-text tokens, one after another: (num_tokens,) int64."""
    ids = [eos_id]
    for encoding in tok.encode_batch(texts):
        ids += encoding.ids
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int64)


# --- 2. training --------------------------------------------------------------------------

def model_config(args, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, d_model=args.d_model, num_layers=args.num_layers,
                       num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                       head_dim=args.head_dim, ffn_dim=args.ffn_dim, rope_theta=args.rope_theta,
                       norm_eps=1e-5, max_seq_len=args.max_seq_len, tie_embeddings=True,
                       name="stdlib-lm")


def lr_at(step: int, total: int, args) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - 1 - args.warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio)
                      * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer(model: TransformerLM, args) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings
    plain = [p for p in model.parameters() if p.dim() < 2]  # norm gains
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": plain, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, args.beta2), eps=1e-8)


@torch.no_grad()
def validation_loss(model: TransformerLM, windows: torch.Tensor, split_at: int) -> dict:
    """Mean held-out loss (nats/token) on fixed windows (W, T + 1), overall and over the
    positions before and from `split_at` (how well the longer positions are learned)."""
    model.eval()
    logits = model(windows[:, :-1])  # (W, T, V)
    nats = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(),
                           reduction="none").view(windows.shape[0], -1)  # (W, T)
    model.train()
    return {"loss": float(nats.mean()), f"loss_before_{split_at}": float(nats[:, :split_at].mean()),
            f"loss_from_{split_at}": float(nats[:, split_at:].mean())}


def train(model: TransformerLM, train_ids: torch.Tensor, val_windows: torch.Tensor,
          phases: list[dict[str, int]], args, log, tok) -> dict:
    """The training loop. With `--state DIR` it saves everything it needs to go on (model,
    optimizer, data generator, curves) at every held-out evaluation, and `--resume` goes on
    from there: the same steps, on the same batches, as one uninterrupted run."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = optimizer(model, args)
    total = sum(ph["steps"] for ph in phases)
    progress = {"step": 0, "tokens": 0, "train_s": 0.0, "wall_s": 0.0, "segments": [],
                "curve": {"step": [], "train_loss": [], "lr": [], "seq_len": [], "elapsed_s": []},
                "val_curve": {"step": []}}
    state_file = None if args.state is None else args.state / "state.pt"
    if args.resume and state_file is not None and state_file.is_file():
        saved = torch.load(state_file, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        progress = saved["progress"]
        log(f"resumed at step {progress['step']}")
    model.train()
    model.attention = "causal_training"
    curve, val_curve = progress["curve"], progress["val_curve"]
    split_at = phases[0]["seq_len"]
    window_loss, window_n = 0.0, 0
    segment = {"from_step": progress["step"], "threads": torch.get_num_threads()}
    start, wall_before = time.perf_counter(), progress["wall_s"]
    step = 0
    for ph in phases:
        B, T = ph["batch_size"], ph["seq_len"]
        for _ in range(ph["steps"]):
            if step < progress["step"]:  # done before a resume
                step += 1
                continue
            t0 = time.perf_counter()
            lr = lr_at(step, total, args)
            for group in opt.param_groups:
                group["lr"] = lr
            offsets = torch.randint(0, len(train_ids) - T - 1, (B,), generator=gen)  # (B,)
            batch = torch.stack([train_ids[o:o + T + 1] for o in offsets.tolist()])  # (B, T+1)
            logits = model(batch[:, :-1])  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            progress["train_s"] += time.perf_counter() - t0
            progress["tokens"] += B * T
            step += 1
            progress["step"] = step
            progress["wall_s"] = wall_before + time.perf_counter() - start
            window_loss, window_n = window_loss + loss.item(), window_n + 1
            if step % args.log_every == 0 or step == total:
                elapsed = progress["wall_s"]
                for key, value in (("step", step), ("train_loss", window_loss / window_n),
                                   ("lr", lr), ("seq_len", T), ("elapsed_s", round(elapsed, 1))):
                    curve[key].append(value)
                log(f"step {step}/{total}  T={T}  loss {window_loss / window_n:.4f}  "
                    f"lr {lr:.2e}  {progress['tokens'] / progress['train_s']:.0f} tok/s  "
                    f"{elapsed:.0f} s")
                window_loss, window_n = 0.0, 0
            stopping = args.stop_after is not None and step >= args.stop_after
            if step % args.eval_every == 0 or step == total or stopping:
                val = validation_loss(model, val_windows, split_at)
                val_curve["step"].append(step)
                for key, value in val.items():
                    val_curve.setdefault(key, []).append(round(value, 5))
                log(f"  held-out {json.dumps({k: round(v, 4) for k, v in val.items()})}")
                if state_file is not None:
                    done = {**segment, "to_step": step,
                            "wall_s": round(time.perf_counter() - start, 1)}
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "generator": gen.get_state(),
                                "progress": {**progress,
                                             "segments": progress["segments"] + [done]}},
                               state_file)
                    save_folder(model, tok, args.state / "snapshot")
            if stopping:
                raise SystemExit(f"stopped after step {step}; the state is in {args.state}")
    progress["segments"].append({**segment, "to_step": step,
                                 "wall_s": round(time.perf_counter() - start, 1)})
    model.attention = "reference"
    return {"curve": curve, "val_curve": val_curve, "tokens_seen": progress["tokens"],
            "train_step_time_s": round(progress["train_s"], 1),
            "tokens_per_s": round(progress["tokens"] / progress["train_s"], 1),
            "wall_time_s": round(progress["wall_s"], 1), "segments": progress["segments"]}


# --- 3. the folder and its metrics ---------------------------------------------------------

def save_folder(model: TransformerLM, tok, out: Path) -> None:
    from kvlib.experiments.batching import to_huggingface
    from kvlib.experiments.models import _no_progress_bars

    out.mkdir(parents=True, exist_ok=True)
    eos_id = tok.token_to_id(EOS)
    hf = to_huggingface(model).to(torch.float16)  # fp16 on disk: half the bytes
    for cfg in (hf.config, hf.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = eos_id, eos_id, eos_id
    with _no_progress_bars():
        hf.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
        "pad_token": EOS, "unk_token": None, "model_max_length": model.config.max_seq_len,
        "clean_up_tokenization_spaces": False}, indent=2) + "\n")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate(folder: Path, record: dict, args, log) -> dict:
    """Score the saved folder (fp16 weights, read back in fp32) on the held-out files."""
    from tokenizers import Tokenizer

    from kvlib.hf import load_pretrained

    model = load_pretrained(folder)
    model.attention = "sdpa"
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos_id = tok.token_to_id(EOS)
    heldout = {n: code_corpus.read_source(n) for n in record["corpus"]["heldout"]}
    if args.eval_max_tokens is not None:
        heldout = {n: lm_metrics.head_text(tok, t, args.eval_max_tokens) for n, t in heldout.items()}
    t0 = time.perf_counter()
    scores = lm_metrics.score_texts(model, tok, heldout, eos_id)
    compressors = lm_metrics.compressor_bits_per_byte(heldout)
    rep = scores.repeat
    metrics = {
        "heldout_files": len(heldout), "heldout_bytes": scores.num_bytes,
        "heldout_max_tokens_per_file": args.eval_max_tokens,
        "heldout_tokens": int(scores.nats.numel()),
        "bits_per_byte": round(scores.bits_per_byte, 4),
        "bits_per_token": round(scores.bits_per_token, 4),
        "loss_nats_per_token": round(float(scores.nats.mean()), 4),
        "compressors_bits_per_byte": {k: {m: round(x, 4) for m, x in v.items()}
                                      for k, v in compressors.items()},
        "scoring": "each held-out file as [eos] + tokens + [eos], every token after the first "
                   f"predicted, in windows of {model.config.max_seq_len} that do not overlap",
        "top1_accuracy": round(scores.accuracy(), 4),
        "copying": {"ngram": 4,
                    "definition": "a target token repeats when it and the 3 tokens before it "
                                  "occurred in that order earlier in the same window",
                    "repeat_tokens": int(rep.sum()), "other_tokens": int((~rep).sum()),
                    "top1_repeat": round(scores.accuracy(rep), 4),
                    "top1_other": round(scores.accuracy(~rep), 4),
                    "bits_per_token_repeat": round(float(scores.nats[rep].mean()) / math.log(2), 4),
                    "bits_per_token_other": round(float(scores.nats[~rep].mean()) / math.log(2), 4)},
        "eval_time_s": round(time.perf_counter() - t0, 1),
    }
    check = sorted(heldout)[:CHECK_SLICE_FILES]
    sliced = lm_metrics.score_texts(
        model, tok, {n: lm_metrics.head_text(tok, code_corpus.read_source(n), CHECK_SLICE_TOKENS)
                     for n in check}, eos_id)
    metrics["check_slice"] = {"files": check, "tokens_per_file": CHECK_SLICE_TOKENS,
                              "sha256": code_corpus.corpus_hash(check),
                              "bits_per_byte": round(sliced.bits_per_byte, 6)}
    metrics["completions"] = completions(model, tok, heldout, eos_id, args.completion_tokens)
    log(json.dumps({k: v for k, v in metrics.items() if k != "completions"}, indent=1))
    for c in metrics["completions"]:
        log(f"--- {c['file']}\n{c['prompt']}\u2588{c['completion']}")
    return metrics


def completions(model, tok, heldout: dict[str, str], eos_id: int, new_tokens: int) -> list:
    """Greedy continuations of the first lines of a few held-out files (seeded choice)."""
    import random

    out = []
    names = sorted(heldout)
    for name in random.Random(0).sample(names, min(4, len(names))):
        prompt = ""
        for line in heldout[name].splitlines(keepends=True)[:12]:  # lines that fit the context
            if len(tok.encode(prompt + line).ids) + new_tokens + 1 > model.config.max_seq_len:
                break
            prompt += line
        if not prompt.strip():
            continue
        text = lm_metrics.greedy_completion(model, tok, prompt, new_tokens, eos_id)
        out.append({"file": name, "prompt": prompt, "completion": text})
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.evaluate is not None:
        folder = args.evaluate
        record = json.loads((folder / RECORD).read_text())
        record["metrics"] = evaluate(folder, record, args, print)
        (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        return
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log = lambda msg: print(msg, flush=True)

    record: dict = {"name": "stdlib-lm", "corpus": corpus(args)}
    root = code_corpus.stdlib_root()
    train_texts = [code_corpus.read_source(n, root) for n in record["corpus"]["train"]]
    heldout_texts = [code_corpus.read_source(n, root) for n in record["corpus"]["heldout"]]
    log(f"corpus: {record['corpus']['num_files']} files, {record['corpus']['bytes']:,} bytes, "
        f"sha256 {record['corpus']['sha256'][:16]}; held out {len(heldout_texts)} files")

    t0 = time.perf_counter()
    saved_tok = None if args.state is None else args.state / "tokenizer.json"
    if args.resume and saved_tok is not None and saved_tok.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(saved_tok))  # the run's own, not trained again
        tok_time = json.loads((args.state / "tokenizer_time.json").read_text())["time_s"]
    else:
        tok = train_tokenizer(train_texts, args.vocab_size)
        tok_time = round(time.perf_counter() - t0, 1)
        if saved_tok is not None:
            args.state.mkdir(parents=True, exist_ok=True)
            tok.save(str(saved_tok))
            (args.state / "tokenizer_time.json").write_text(json.dumps({"time_s": tok_time}))
    eos_id = tok.token_to_id(EOS)
    train_ids = token_stream(tok, train_texts, eos_id)
    heldout_ids = token_stream(tok, heldout_texts, eos_id)
    train_bytes = record["corpus"]["split"]["train_bytes"]
    record["tokenizer"] = {
        "kind": "byte-level BPE (Hugging Face tokenizers "
                f"{__import__('tokenizers').__version__}), trained on the training files only",
        "vocab_size": tok.get_vocab_size(), "special_tokens": [EOS], "eos_id": eos_id,
        "min_frequency": 2, "pre_tokenizer": "ByteLevel(add_prefix_space=False)",
        "framing": "every file is [eos] + tokens, the stream ends with [eos]",
        "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids),
        "train_bytes_per_token": round(train_bytes / len(train_ids), 3),
        "time_s": tok_time}
    log(f"tokenizer: {tok.get_vocab_size()} tokens; {len(train_ids):,} training tokens "
        f"({record['tokenizer']['train_bytes_per_token']} bytes each), "
        f"{len(heldout_ids):,} held out; {record['tokenizer']['time_s']} s")

    cfg = model_config(args, tok.get_vocab_size())
    phases = parse_phases(args.phases, args.steps)
    if max(ph["seq_len"] for ph in phases) > cfg.max_seq_len:
        raise ValueError(f"a phase's seq_len exceeds max_seq_len {cfg.max_seq_len}")
    model = TransformerLM(cfg)
    num_params = sum(p.numel() for p in model.parameters())
    T = cfg.max_seq_len
    num_val = min(args.val_windows, (len(heldout_ids) - 1) // (T + 1))
    if num_val < 1:
        raise ValueError(f"the held-out files hold fewer than {T + 1} tokens")
    stride = (len(heldout_ids) - T - 1) // num_val
    val_windows = torch.stack([heldout_ids[i * stride:i * stride + T + 1]
                               for i in range(num_val)])  # (W, T + 1), evenly spread
    config = {k: v for k, v in asdict(cfg).items() if k != "name"}
    hyper = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
             if k not in ("out", "evaluate", "state", "resume")}
    record["model"] = {"config": config, "parameters": num_params,
                       "non_embedding_parameters": num_params - cfg.vocab_size * cfg.d_model}
    log(f"model: {num_params:,} parameters; phases {phases}")
    record["training"] = {
        "hyperparameters": hyper, "phases": phases, "optimizer": "AdamW(betas=(0.9, beta2), "
        "eps=1e-8), weight decay on matrices and embeddings only; linear warm-up then cosine "
        "decay to min_lr_ratio * lr; gradient norm clipped to grad_clip",
        "data": "each step: batch_size windows of seq_len + 1 tokens at uniform random offsets "
                "(seeded) of the training stream",
        "attention": "torch scaled_dot_product_attention(is_causal=True) for whole sequences",
        "val_windows": f"{num_val} held-out windows of {T} tokens, evenly spread",
        "torch": torch.__version__,
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "machine_note": args.shared_machine,
    }
    record["training"].update(train(model, train_ids, val_windows, phases, args, log, tok))
    save_folder(model, tok, out)
    t_eval = time.perf_counter()
    if not args.skip_eval:
        record["metrics"] = evaluate(out, record, args, log)
    times = {"tokenizer": tok_time, "training": record["training"]["wall_time_s"],
             "evaluation": round(time.perf_counter() - t_eval, 1)}
    record["time_s"] = {**times, "total": round(sum(times.values()), 1),
                        "this_process": round(time.perf_counter() - t_start, 1)}
    record["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                       for p in sorted(out.iterdir()) if p.name != RECORD}
    (out / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {out}; times (s): {record['time_s']}")


if __name__ == "__main__":
    main()
