"""Every cache policy at every budget, on held-out files and copying probes: chapter 9's curves.

For each policy (`shrink.POLICIES`), regime and budget (a fraction of the bytes the full
cache would hold), `sweep` reads each held-out file and each probe through `shrink.run` and
records:

    bpb              held-out bits per byte of the scored tokens (all files together)
    agreement        share of scored positions whose greedy next token is the full cache's
    far_copy         top-1 accuracy on the scored tokens that continue a 4-gram last seen at
                     least 256 tokens before (`held_out.far_repeats`): copying from far back
    recall           share of probes whose name is recalled exactly (every token greedy)
    name_accuracy    share of the probes' name tokens predicted
    bytes_per_token  the cache's bytes per token of context, fp16 (what the budget buys)
    paged_bytes_per_token  what a paged cache of 16-token blocks still holds: per-head
                     choices free a block only when no head of any layer keeps any of it

Regimes (`kvlib.eviction`): "decode" reads a file of S tokens with a cache that never holds
more than f x S tokens and scores its second half; "prompt" cuts the first half (a probe:
everything before the name it asks for) to f x P tokens once, then scores what follows.
`summary` reads off, per policy, the smallest budget from which bits per byte stay within 1%
of the full cache's, and from which recall stays at least 90% of the full cache's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from kvlib import eviction
from kvlib.experiments import held_out, shrink
from kvlib.experiments.held_out import BookModel, CopyProbe

BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
FAR_NGRAM, FAR_DISTANCE = 4, 256
FP16_BYTES = 2


@dataclass(frozen=True)
class Texts:
    """What a sweep reads: held-out files and copying probes, all `num_tokens` long."""

    files: dict[str, list[int]]
    probes: list[CopyProbe]
    num_bytes: dict[str, int]  # UTF-8 bytes of each file's scored half
    far: dict[str, list[int]]  # each file's scored positions that copy from far back

    @property
    def num_tokens(self) -> int:
        return len(next(iter(self.files.values())))


def texts(book: BookModel, num_tokens: int, num_files: int, num_probes: int,
          seed: int = 0) -> Texts:
    """The first `num_files` held-out files of at least `num_tokens` tokens, and probes
    made from the next ones (names drawn with `seed`)."""
    found = held_out.heldout_files(book, num_tokens, num_files + num_probes)
    if len(found) < num_files + num_probes:
        raise ValueError(f"only {len(found)} held-out files have {num_tokens} tokens; "
                         f"asked for {num_files} + {num_probes}")
    names = list(found)
    files = {n: found[n] for n in names[:num_files]}
    rng = random.Random(seed)
    probes = [held_out.copy_probe(book, found[n], held_out.random_name(rng), num_tokens)
              for n in names[num_files:]]
    half = num_tokens // 2
    return Texts(files, probes, {n: held_out.text_bytes(book, ids[half + 1:])
                                 for n, ids in files.items()},
                 {n: held_out.far_repeats(ids, half, FAR_NGRAM, FAR_DISTANCE)
                  for n, ids in files.items()})


def _prompt_len(regime: str, ids: Sequence[int], probe: CopyProbe | None) -> int | None:
    if regime == "decode":
        return None
    return probe.asked_at.start if probe is not None else len(ids) // 2


def _regimes(policy: shrink.Policy) -> tuple[str, ...]:
    return ("prompt",) if policy.shared_blocks else shrink.REGIMES


def measure(book: BookModel, data: Texts, policy: shrink.Policy, regime: str, fraction: float,
            full: dict[str, torch.Tensor]) -> dict | None:
    """One point of the sweep (None when the policy cannot be that small); `full` holds the
    full cache's logits of every file and probe, by name (probes: 'probe i')."""
    model, S = book.model, data.num_tokens
    D = model.config.head_dim
    half, bits, nbytes, agree, paged, far_hits, far_total = S // 2, 0.0, 0, [], [], 0, 0

    def read(key: str, ids: Sequence[int], probe: CopyProbe | None):
        """(logits, kept) of one sequence; None when the policy cannot be that small."""
        P = _prompt_len(regime, ids, probe)
        if fraction >= 1.0:  # nothing dropped: the full cache itself (tests check run agrees)
            return full[key], None
        budget = shrink.full_budget(policy, fraction, P or S, D)
        if budget is None:
            return None
        run = shrink.run(model, ids, policy, budget, regime, P)
        return run.logits, (run.kept[..., :P] if P else run.kept)  # (L, Hkv, P or S)

    for name, ids in data.files.items():
        got = read(name, ids, None)
        if got is None:
            return None
        logits, kept = got
        bits += float(shrink.token_nats(logits, ids, half).sum()) / math.log(2)
        nbytes += data.num_bytes[name]
        agree.append(shrink.agreement(logits, full[name], half))
        far = torch.tensor(data.far[name], dtype=torch.int64)  # (n,) positions
        targets = torch.tensor(ids, device=logits.device)[far + 1]  # (n,) what comes next
        far_hits += int((logits[far].argmax(-1) == targets).sum())
        far_total += len(far)
        paged.append(1.0 if kept is None else
                     1 - eviction.freeable_blocks(kept, shrink.BLOCK_SIZE))
    recalls = [held_out.recall(read(f"probe {i}", p.ids, p)[0], p)
               for i, p in enumerate(data.probes)]
    cfg = model.config
    full_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * D * FP16_BYTES
    return {"policy": policy.name, "regime": regime, "fraction": fraction,
            "bpb": round(bits / nbytes, 5), "agreement": round(sum(agree) / len(agree), 4),
            "far_copy": round(far_hits / max(far_total, 1), 4),
            "recall": round(sum(r.exact for r in recalls) / len(recalls), 4),
            "name_accuracy": round(sum(r.token_accuracy for r in recalls) / len(recalls), 4),
            "name_bits": round(sum(r.bits for r in recalls) / len(recalls), 3),
            "bytes_per_token": round(fraction * full_bytes, 1),
            "paged_bytes_per_token": round(sum(paged) / len(paged) * full_bytes, 1)
            if policy.rest is None else round(fraction * full_bytes, 1)}


def full_logits(book: BookModel, data: Texts) -> dict[str, torch.Tensor]:
    """The full cache's logits of every file and probe (the reference every point needs)."""
    with torch.no_grad():
        out = {n: book.model(torch.tensor([ids]))[0].float() for n, ids in data.files.items()}
        out |= {f"probe {i}": book.model(torch.tensor([p.ids]))[0].float()
                for i, p in enumerate(data.probes)}
    return out


def each_point(book: BookModel, data: Texts, policies: Iterable[shrink.Policy] | None = None,
               budgets: Sequence[float] = BUDGETS, regimes: Sequence[str] = shrink.REGIMES,
               ) -> Iterator[dict]:
    """Every (policy, regime, budget) point, measured one at a time; budget 1.0 is the full
    cache itself; points a policy cannot reach are left out."""
    policies = list(shrink.POLICIES.values()) if policies is None else list(policies)
    full = full_logits(book, data)
    for policy in policies:
        for regime in _regimes(policy):
            if regime not in regimes:
                continue
            for fraction in budgets:
                record = measure(book, data, policy, regime, fraction, full)
                if record is not None:
                    yield record


def sweep(book: BookModel, data: Texts, policies: Iterable[shrink.Policy] | None = None,
          budgets: Sequence[float] = BUDGETS, regimes: Sequence[str] = shrink.REGIMES,
          ) -> list[dict]:
    """`each_point`'s records, as a list."""
    return list(each_point(book, data, policies, budgets, regimes))


def summary(records: Sequence[dict], tolerance: float = 0.01,
            recall_share: float = 0.9) -> dict[str, dict[str, dict[str, float | None]]]:
    """regime -> policy -> the smallest budget from which bits per byte stay within
    `tolerance` of the full cache's (and every larger budget too), and the same for recall,
    the name's tokens predicted and far copying staying at least `recall_share` of the full
    cache's; None if no budget below 1 does."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for (regime, policy), rows in _by_curve(records).items():
        full = rows[-1]  # fraction 1.0: nothing dropped
        out.setdefault(regime, {})[policy] = {
            "bpb_within": _holds_from(rows, "bpb", at_most=full["bpb"] * (1 + tolerance)),
            "recall_holds": _holds_from(rows, "recall", at_least=full["recall"] * recall_share),
            "name_accuracy_holds": _holds_from(
                rows, "name_accuracy", at_least=full["name_accuracy"] * recall_share),
            "far_copy_holds": _holds_from(rows, "far_copy",
                                          at_least=full["far_copy"] * recall_share),
        }
    return out


def _by_curve(records: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    curves: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        curves.setdefault((r["regime"], r["policy"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["fraction"]) for k, v in curves.items()
            if v and max(r["fraction"] for r in v) == 1.0}


def _holds_from(rows: list[dict], key: str, at_most: float = math.inf,
                at_least: float = -math.inf) -> float | None:
    """The smallest fraction from which row[key] stays within [at_least, at_most] for it and
    every larger one (None: only the full cache)."""
    holds = None
    for r in reversed(rows):
        if not at_least <= r[key] <= at_most:
            break
        holds = r["fraction"]
    return holds if holds is not None and holds < 1.0 else None
