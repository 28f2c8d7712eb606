"""Disaggregated prefill and decode: two engines in two processes, the cache moved between them.

A prefill is one long compute-bound pass; a decode step is short and memory bound. On one GPU
they share every step, and a long prompt's prefill stretches the steps of every request
decoding beside it. DistServe, Splitwise and Mooncake run them on different GPUs instead: a
prefill engine computes the prompt and the first token, then hands the request -- its cache
blocks, its tokens, its random state -- to a decode engine, which goes on from there. The
price is the transfer: the prompt's cache, bytes over a link (kvlib.links prices it).

Here rank `PREFILL` runs one `BatchedInferenceEngine`, rank `DECODE` another, over
`torch.distributed` point-to-point messages (gloo on a CPU, NCCL on GPUs; vLLM moves the same
blocks with NIXL, Mooncake with its transfer engine). Per request:

    prefill -> decode: header (a JSON text: the request, its tokens, its blocks' table,
                       the shape and dtype of each group's data)
    decode -> prefill: ACCEPT, or REFUSE (block size, dtype, heads or groups do not match,
                       or the request could never fit); no answer yet while it has no room
    prefill -> decode: the blocks' data per cache group (codes and scales for an INT8 or
                       FP8 pool), and the random state
    decode -> prefill: IMPORTED, and the prefill engine frees the request's blocks

Either side changes nothing on a refusal: the prefill engine keeps the request and decodes it
itself. The decode engine takes blocks only once every byte has arrived (it receives into a
staging buffer, then imports), so a prefill process that dies mid-transfer costs it nothing.
(Engines that receive straight into reserved blocks -- NIXL's one-sided reads -- must free
them when the peer goes away.)

Seeded sampling needs no state to move: a request's random numbers are hashed from its seed
and the count of tokens it generated (`kvlib.sampling.sample`), so the decode engine draws what
the prefill engine would have, and every output equals what one engine alone would produce.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kvlib.cache.block_manager import SequenceBlocks
from kvlib.cache.groups import CacheGroup
from kvlib.cache.storage import BlockData
from kvlib.engine import BatchedInferenceEngine
from kvlib.model import TransformerLM
from kvlib.sampling import SamplingParams
from kvlib.scheduler import Handoff, Request

PREFILL, DECODE = 0, 1  # ranks
ACCEPT, REFUSE, IMPORTED = 1, 0, 2  # the decode side's answers
DTYPES = {str(t): t for t in (torch.float64, torch.float32, torch.bfloat16, torch.float16,
                               torch.int8, torch.float8_e4m3fn)}


def _parts(data: BlockData) -> tuple[torch.Tensor, ...]:
    """A group's exported blocks as the tensors that travel: the pool rows, and their
    scales beside them for a pool of INT8 or FP8 codes."""
    return (data,) if isinstance(data, torch.Tensor) else tuple(data)


@dataclass(frozen=True)
class EngineSpec:
    """How each rank builds its engine (the same model, its own memory)."""

    num_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = 256
    max_num_seqs: int = 256

    def build(self, model: TransformerLM) -> BatchedInferenceEngine:
        return BatchedInferenceEngine(model, self.num_blocks, self.block_size,
                                      self.max_num_batched_tokens, self.max_num_seqs)


@dataclass(frozen=True)
class Transfer:
    """One request moved: its prompt, the bytes sent (cache data; all of it), the wait for
    the decode side's answer (it answers between its steps, when it has room) and the time
    from the first byte of data to its IMPORTED (the transfer itself, import included)."""

    index: int
    prompt_len: int
    data_bytes: int
    total_bytes: int
    wait_s: float
    seconds: float
    accepted: bool


# -- the header: a request and its blocks as JSON (no pickle crosses the wire) -------------------
def header(handoff: Handoff, index: int) -> dict[str, Any]:
    r, b, s = handoff.request, handoff.blocks, handoff.request.sampling
    return {
        "kind": "request", "index": index,
        "request": {"prompt_ids": list(r.prompt_ids), "max_new_tokens": r.max_new_tokens,
                    "stop_token_ids": list(r.stop_token_ids),
                    "sampling": [s.temperature, s.top_k, s.top_p, s.seed]},
        "output_ids": list(handoff.output_ids),
        "blocks": {"length": b.length, "block_size": b.block_size,
                   "groups": [[list(g.layers), g.window, g.sink_tokens] for g in b.groups],
                   "block_ids": [list(ids) for ids in b.block_ids],
                   "token_ids": None if b.token_ids is None else list(b.token_ids),
                   "hashes": list(b.hashes)},
        "data": [[{"shape": list(t.shape), "dtype": str(t.dtype)} for t in _parts(d)]
                 for d in handoff.data],
    }


def _blocks(h: dict[str, Any]) -> SequenceBlocks:
    b = h["blocks"]
    return SequenceBlocks(
        b["length"], b["block_size"],
        tuple(CacheGroup(tuple(layers), window, sinks) for layers, window, sinks in b["groups"]),
        tuple(tuple(ids) for ids in b["block_ids"]),
        None if b["token_ids"] is None else tuple(b["token_ids"]), tuple(b["hashes"]))


def _request(h: dict[str, Any]) -> Request:
    r = h["request"]
    temperature, top_k, top_p, seed = r["sampling"]
    return Request(r["prompt_ids"], SamplingParams(temperature, top_k, top_p, seed),
                   r["max_new_tokens"], r["stop_token_ids"])


def check_header(engine: BatchedInferenceEngine, h: dict[str, Any]) -> list[int]:
    """Raise ValueError if this engine can never take the request (block size, groups,
    dtype, heads, a table longer than it allows); else the blocks each group needs."""
    blocks = _blocks(h)
    manager = engine.cache.manager
    storage = engine.cache.storage
    if blocks.block_size != manager.block_size or blocks.groups != manager.groups:
        raise ValueError(f"blocks of {blocks.block_size} tokens in groups "
                         f"{[g.kind for g in blocks.groups]} do not fit blocks of "
                         f"{manager.block_size} in {[g.kind for g in manager.groups]}")
    for g, parts in enumerate(h["data"]):
        n = sum(b is not None for b in blocks.block_ids[g])
        likes = [storage.pools[g]] + ([] if storage.scales is None else [storage.scales[g]])
        wanted = [{"shape": [t.shape[0], 2, n, *t.shape[3:]], "dtype": str(t.dtype)}
                  for t in likes]  # (L_g, 2, n, Hkv, BS, D), and (L_g, 2, n, Hkv, BS) scales
        if parts != wanted:
            raise ValueError(f"group {g}: blocks {parts} do not match this cache's {wanted}")
    needs = [sum(b is not None for b in ids) for ids in blocks.block_ids]
    for need, alloc in zip(needs, manager.allocators):
        if need > alloc.num_blocks:
            raise ValueError(f"{need} blocks needed, the whole pool has {alloc.num_blocks}")
    return needs


def _send_json(obj: dict[str, Any], dst: int) -> int:
    raw = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)  # (n,)
    dist.send(torch.tensor([raw.numel()], dtype=torch.int64), dst)
    dist.send(raw, dst)
    return 8 + raw.numel()


def _recv_json(src: int, length: torch.Tensor | None = None) -> dict[str, Any]:
    if length is None:
        length = torch.zeros(1, dtype=torch.int64)
        dist.recv(length, src)
    raw = torch.empty(int(length.item()), dtype=torch.uint8)  # (n,)
    dist.recv(raw, src)
    return json.loads(bytes(raw.tolist()).decode())


def _answer(code: int, dst: int) -> None:
    dist.send(torch.tensor([code], dtype=torch.int64), dst)


def _await_answer(src: int) -> int:
    answer = torch.zeros(1, dtype=torch.int64)
    dist.recv(answer, src)
    return int(answer.item())


# -- the two sides ------------------------------------------------------------------------------
def send_request(handoff: Handoff, index: int, dst: int = DECODE) -> Transfer:
    """Offer a request to the decode rank and, if accepted, send its blocks."""
    start = time.perf_counter()
    sent = _send_json(header(handoff, index), dst)
    accepted = _await_answer(dst) == ACCEPT
    answered = time.perf_counter()
    if accepted:
        for d in handoff.data:
            for t in _parts(d):
                dist.send(t.contiguous(), dst)
        accepted = _await_answer(dst) == IMPORTED
        sent += handoff.nbytes
    return Transfer(index, len(handoff.request.prompt_ids), handoff.nbytes, sent,
                    answered - start, time.perf_counter() - answered, accepted)


def receive_request(engine: BatchedInferenceEngine, h: dict[str, Any], src: int = PREFILL) -> int:
    """After ACCEPT: receive the blocks into a staging buffer, then import; the request's id
    in `engine`. A peer that fails mid-way raises here, and nothing was imported."""
    data = [tuple(torch.empty(t["shape"], dtype=DTYPES[t["dtype"]]) for t in parts)
            for parts in h["data"]]
    for parts in data:
        for t in parts:
            dist.recv(t, src)
    device = engine.model.embed.weight.device
    handoff = Handoff(_request(h), tuple(h["output_ids"]), _blocks(h),
                      tuple(_on(parts, device) for parts in data))
    return engine.import_request(handoff)


def prefill_side(engine: BatchedInferenceEngine, requests: Sequence[Request],
                 dst: int = DECODE) -> tuple[dict[int, list[int]], list[Transfer]]:
    """Run `requests` to their first token and hand each to the decode rank; those it
    refuses (and those done at their first token) finish here. Outputs by request index."""
    index = {engine.add_request(r): i for i, r in enumerate(requests)}
    outputs: dict[int, list[int]] = {}
    transfers: list[Transfer] = []
    while engine.has_unfinished:
        for rid in engine.step():
            outputs[index[rid]] = engine.output(rid).token_ids
        for rid, kind, _ in engine.metrics.steps[-1].events:
            if kind == "first_token" and index[rid] not in outputs:
                # NOTE: once per request; a refused one stays here and finishes here
                record = send_request(engine.export_request(rid), index[rid], dst)
                transfers.append(record)
                if record.accepted:
                    engine.remove_request(rid)
    _send_json({"kind": "done"}, dst)
    return outputs, transfers


def decode_side(engine: BatchedInferenceEngine, src: int = PREFILL) -> dict[int, list[int]]:
    """Take requests from the prefill rank while decoding those it has; outputs by index."""
    index: dict[int, int] = {}
    outputs: dict[int, list[int]] = {}
    pending: dict[str, Any] | None = None
    done = False
    length = torch.zeros(1, dtype=torch.int64)
    work = None  # the posted receive of the next header's length
    while not done or engine.has_unfinished:
        if pending is None and not done:
            # NOTE: posted only between requests: gloo matches messages from one peer in
            # order, so a receive posted early would take the next request's data instead
            work = dist.irecv(length, src) if work is None else work
            if not engine.has_unfinished or work.is_completed():
                work.wait()  # blocks only when there is nothing to decode meanwhile
                work = None
                message = _recv_json(src, length)
                done = message["kind"] == "done"
                pending = None if done else message
        if pending is not None:
            try:
                needs = check_header(engine, pending)
            except ValueError:
                _answer(REFUSE, src)
                pending = None
            else:
                allocs = engine.cache.manager.allocators
                fits = all(n <= a.num_free_blocks for n, a in zip(needs, allocs)) and (
                    len(engine.scheduler.running) < engine.scheduler.max_num_seqs)
                if fits:
                    _answer(ACCEPT, src)
                    index[receive_request(engine, pending, src)] = pending["index"]
                    _answer(IMPORTED, src)
                    pending = None
                elif not engine.has_unfinished:  # nothing will free blocks: it never fits
                    _answer(REFUSE, src)
                    pending = None
        if engine.has_unfinished:
            for rid in engine.step():
                outputs[index[rid]] = engine.output(rid).token_ids
    return outputs


def serve(rank: int, world_size: int, model: TransformerLM, requests: Sequence[Request],
          prefill: EngineSpec, decode: EngineSpec) -> dict[str, Any]:
    """The `run_ranks` worker: rank PREFILL prefills, rank DECODE decodes. Returns each
    side's outputs (by request index) and, on the prefill side, the transfers."""
    if world_size != 2:
        raise ValueError(f"disaggregated serving runs on 2 ranks, got {world_size}")
    with torch.no_grad():
        if rank == PREFILL:
            outputs, transfers = prefill_side(prefill.build(model), requests)
            return {"outputs": outputs, "transfers": transfers}
        return {"outputs": decode_side(decode.build(model)), "transfers": []}


def merged_outputs(results: Sequence[dict[str, Any]], num_requests: int) -> list[list[int]]:
    """Both ranks' outputs, in request order; each request finished on exactly one rank."""
    out: dict[int, list[int]] = {}
    for r in results:
        for i, tokens in r["outputs"].items():
            if i in out:
                raise ValueError(f"request {i} finished on both ranks")
            out[i] = tokens
    missing = sorted(set(range(num_requests)) - set(out))
    if missing:
        raise ValueError(f"requests {missing} finished on neither rank")
    return [out[i] for i in range(num_requests)]


def _on(parts: tuple[torch.Tensor, ...], device: torch.device) -> BlockData:
    """Received tensors as `read_blocks` gives them, on the engine's device."""
    moved = tuple(t.to(device) for t in parts)
    return moved[0] if len(moved) == 1 else moved
