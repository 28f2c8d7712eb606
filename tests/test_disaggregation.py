"""Disaggregated prefill and decode in two processes (gloo), bounded in time: outputs equal
one engine's, greedy and seeded; a refused or interrupted transfer changes nothing on either
side. And moving a request between two engines in one process, with every bad import refused.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from test_engine_caches import SETUPS, make_model, random_requests

from kvlib.distributed import disaggregation as dg
from kvlib.distributed.launch import run_ranks
from kvlib.engine import BatchedInferenceEngine
from kvlib.model import TransformerLM
from kvlib.scheduler import Request

TIMEOUT_S = 240  # two spawned processes on a loaded 2-core machine; the run ends by itself


def requests(n=6, seed=5):
    prompts, lengths, samplings = random_requests(n, seed=seed, max_prompt=20, max_new=8)
    lengths[0] = 1  # done at its first token: never moves
    return [Request(p, s, m) for p, m, s in zip(prompts, lengths, samplings)]


def alone(model, reqs):
    return [model.generate(torch.tensor([r.prompt_ids]), r.max_new_tokens,
                           sampling=r.sampling).tokens[0].tolist() for r in reqs]


def test_two_processes_decode_what_one_engine_would():
    model = make_model(SETUPS["gemma-style"])  # two cache groups move
    reqs = requests()
    spec = dg.EngineSpec(num_blocks=40, block_size=4, max_num_batched_tokens=32)
    small = dg.EngineSpec(num_blocks=12, block_size=4)  # decode side must wait for room
    results = run_ranks(dg.serve, 2, (model, reqs, spec, small), timeout_s=TIMEOUT_S)
    assert dg.merged_outputs(results, len(reqs)) == alone(model, reqs)
    transfers = results[0]["transfers"]
    assert len(transfers) == len(reqs) - 1 and all(t.accepted for t in transfers)
    assert set(results[1]["outputs"]) == {t.index for t in transfers}
    assert all(t.data_bytes > 0 and t.total_bytes > t.data_bytes for t in transfers)


def _refusing(rank, world_size, model, reqs):
    """A decode engine with blocks of 8 against a prefill engine's blocks of 4."""
    with torch.no_grad():
        if rank == dg.PREFILL:
            engine = dg.EngineSpec(num_blocks=40, block_size=4).build(model)
            outputs, transfers = dg.prefill_side(engine, reqs)
            return {"outputs": outputs, "transfers": transfers,
                    "used": engine.cache.num_used_blocks}
        engine = dg.EngineSpec(num_blocks=40, block_size=8).build(model)
        return {"outputs": dg.decode_side(engine), "used": engine.cache.num_used_blocks}


def _dying(rank, world_size, model, reqs):
    """The prefill process sends one request's header, is accepted, and dies before its
    blocks arrive."""
    with torch.no_grad():
        if rank == dg.PREFILL:
            engine = dg.EngineSpec(num_blocks=40, block_size=4).build(model)
            rid = engine.add_request(reqs[1])
            while not engine.metrics.steps or all(
                    kind != "first_token" for _, kind, _ in engine.metrics.steps[-1].events):
                engine.step()
            handoff = engine.export_request(rid)
            dg._send_json(dg.header(handoff, 1), dg.DECODE)
            assert dg._await_answer(dg.DECODE) == dg.ACCEPT
            os._exit(3)  # the decode side is waiting for the blocks
        engine = dg.EngineSpec(num_blocks=40, block_size=4).build(model)
        try:
            dg.decode_side(engine)
        except RuntimeError as err:
            engine.cache.check_invariants()
            return {"error": str(err)[:200], "used": engine.cache.num_used_blocks,
                    "requests": len(engine.scheduler.running)}
        return {"error": None}


def test_refused_transfers_change_nothing_and_finish_on_the_prefill_side():
    model = make_model(SETUPS["paged"])
    reqs = requests(4, seed=6)
    results = run_ranks(_refusing, 2, (model, reqs), timeout_s=TIMEOUT_S)
    assert results[1]["outputs"] == {} and results[1]["used"] == 0
    assert results[0]["used"] == 0 and not any(t.accepted for t in results[0]["transfers"])
    assert dg.merged_outputs(results, len(reqs)) == alone(model, reqs)


def test_a_peer_dying_mid_transfer_leaks_no_block():
    model = make_model(SETUPS["paged"])
    reqs = [Request(list(range(1, 14)), dg.SamplingParams(temperature=1.0, seed=3), 6)] * 2
    results = run_ranks(_dying, 2, (model, reqs), timeout_s=TIMEOUT_S, may_exit={0})
    assert results[0] is None
    assert results[1]["error"] is not None, "the decode side noticed the peer's death"
    assert results[1]["used"] == 0 and results[1]["requests"] == 0


# -- in one process: the engine's export and import, and what import refuses -------------------
@pytest.fixture(scope="module")
def model():
    return make_model(SETUPS["paged"])


def _handoff(model, request, **engine_args):
    engine = BatchedInferenceEngine(model, **{"num_blocks": 20, "block_size": 4, **engine_args})
    rid = engine.add_request(request)
    engine.step()
    return engine, rid, engine.export_request(rid)


def test_moving_a_seeded_request_between_engines_keeps_its_output(model):
    request = Request([3, 1, 4, 1, 5, 9, 2, 6, 5], dg.SamplingParams(temperature=1.0, seed=7),
                      max_new_tokens=10)
    src, rid, handoff = _handoff(model, request)
    dst = BatchedInferenceEngine(model, num_blocks=20, block_size=4)
    new = dst.import_request(handoff)
    src.remove_request(rid)
    assert src.cache.num_used_blocks == 0 and not src.has_unfinished
    dst.run(show_progress=False)
    assert dst.output(new).token_ids == alone(model, [request])[0]
    assert dst.cache.num_used_blocks == 0


@pytest.mark.parametrize("bad", ["no room", "block size", "dtype", "heads", "seq count"])
def test_bad_imports_are_refused_and_change_nothing(model, bad):
    request = Request(list(range(20)), max_new_tokens=4)
    src, rid, handoff = _handoff(model, request)
    if bad == "no room":
        dst = BatchedInferenceEngine(model, num_blocks=8, block_size=4)
        dst.add_request(Request(list(range(24)), max_new_tokens=4))
        dst.step()  # 24 tokens: 6 of its 8 blocks taken; the handoff needs 5
    elif bad == "block size":
        dst = BatchedInferenceEngine(model, num_blocks=20, block_size=8)
    elif bad == "dtype":
        dst = BatchedInferenceEngine(make_model(SETUPS["paged"]).float(), num_blocks=20,
                                     block_size=4)
    elif bad == "heads":
        other = dataclasses.replace(model.config, num_kv_heads=4)
        dst = BatchedInferenceEngine(TransformerLM(other).double(), num_blocks=20,
                                     block_size=4)
    else:
        dst = BatchedInferenceEngine(model, num_blocks=20, block_size=4, max_num_seqs=1)
        dst.add_request(Request([1, 2], max_new_tokens=4))
        dst.step()
    used, running = dst.cache.num_used_blocks, len(dst.scheduler.running)
    with pytest.raises(ValueError):
        dst.import_request(handoff)
    assert dst.cache.num_used_blocks == used and len(dst.scheduler.running) == running
    dst.cache.check_invariants()
    assert src.cache.num_used_blocks == 5 and src.has_unfinished  # the sender still has it
    src.cache.check_invariants()


def test_a_handoff_that_does_not_add_up_is_refused(model):
    src, rid, handoff = _handoff(model, Request(list(range(9)), max_new_tokens=4))
    dst = BatchedInferenceEngine(model, num_blocks=20, block_size=4)
    wrong = dg.Handoff(handoff.request, handoff.output_ids + (1,), handoff.blocks,
                       handoff.data)
    with pytest.raises(ValueError, match="holds"):
        dst.import_request(wrong)
    assert dst.cache.num_used_blocks == 0


def test_header_round_trips(model):
    _, _, handoff = _handoff(model, Request(list(range(9)), dg.SamplingParams(0.7, 5, 0.9, 11), 4))
    h = dg.header(handoff, 3)
    assert dg._blocks(h) == handoff.blocks and dg._request(h) == handoff.request


def test_an_int8_cache_moves_its_codes_and_scales(model):
    """A pool of INT8 codes hands over (codes, scales) per group; an engine of the same
    encoding takes them and decodes what the sender would have; a full-precision engine's
    header check refuses them."""
    request = Request(list(range(12)), max_new_tokens=6)
    src, rid, handoff = _handoff(model, request, kv_cache_dtype="int8")
    assert all(isinstance(d, tuple) and d[0].dtype == torch.int8 for d in handoff.data)
    assert handoff.nbytes == sum(t.nbytes for d in handoff.data for t in d)
    h = dg.header(handoff, 0)
    plain = BatchedInferenceEngine(model, num_blocks=20, block_size=4)
    with pytest.raises(ValueError, match="do not match"):
        dg.check_header(plain, h)
    dst = BatchedInferenceEngine(model, num_blocks=20, block_size=4, kv_cache_dtype="int8")
    assert dg.check_header(dst, h) == [len(handoff.blocks.block_ids[0])]
    new = dst.import_request(handoff)
    dst.run(show_progress=False)
    src.run(show_progress=False)
    assert dst.output(new).token_ids == src.output(rid).token_ids
    assert dst.cache.num_used_blocks == 0
