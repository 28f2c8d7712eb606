"""Tensor parallelism over two processes (gloo), bounded in time: every rank's logits equal
the single-process model's, the engine over a rank's shard generates what the whole model
does (greedy and seeded), and each rank caches only its KV heads -- split while there are
enough, replicated when ranks outnumber them, as `real_models` sizes it.
"""

from __future__ import annotations

import pytest
import torch
from test_engine_caches import random_requests

from kvlib import real_models
from kvlib.config import ModelConfig
from kvlib.distributed.launch import run_ranks
from kvlib.distributed.tensor_parallel import ShardPlan, shard_config, shard_model
from kvlib.experiments.beyond import tp_check
from kvlib.model import TransformerLM
from kvlib.scheduler import Request

TIMEOUT_S = 240


def model(num_kv_heads: int, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4,
                      num_kv_heads=num_kv_heads, ffn_dim=64, max_seq_len=96, qkv_bias=True)
    return TransformerLM(cfg).double().eval()


def _both(rank, world_size, split, replicated, requests):
    return [tp_check(rank, world_size, split, requests),
            tp_check(rank, world_size, replicated, requests)]


def test_two_ranks_match_one_process_split_and_replicated():
    prompts, lengths, samplings = random_requests(4, seed=8, max_prompt=16, max_new=6)
    requests = [Request(p, s, n) for p, n, s in zip(prompts, lengths, samplings)]
    split, replicated = model(num_kv_heads=2), model(num_kv_heads=1, seed=1)
    results = run_ranks(_both, 2, (split, replicated, requests), timeout_s=TIMEOUT_S)
    for rank, (s, r) in enumerate(results):
        for check, m in ((s, split), (r, replicated)):
            assert check["max_logit_diff"] < 1e-10, check
            assert all(check["outputs_equal"]), check
            per_gpu = real_models.cache_bytes(m.config, 1, dtype=torch.float64, tp=2)
            assert check["cache_bytes_per_token"] == per_gpu
        assert s["kv_heads"] == [rank] and s["replication"] == 1
        assert s["cache_bytes_per_token"] * 2 == s["whole_cache_bytes_per_token"]
        assert r["kv_heads"] == [0] and r["replication"] == 2  # both ranks keep KV head 0
        assert r["cache_bytes_per_token"] == r["whole_cache_bytes_per_token"]


@pytest.mark.parametrize(("H", "Hkv", "t"), [(8, 8, 4), (8, 2, 2), (8, 2, 4), (8, 2, 8),
                                             (32, 8, 16), (4, 1, 4)])
def test_plans_cover_every_head_once_and_read_the_right_kv_head(H, Hkv, t):
    plans = [ShardPlan.make(H, Hkv, 64, r, t) for r in range(t)]
    assert sorted(h for p in plans for h in p.heads) == list(range(H))
    assert sorted(i for p in plans for i in p.ffn) == list(range(64))
    group = H // Hkv
    for p in plans:
        assert {h // group for h in p.heads} <= set(p.kv_heads), "a query head's KV head"
        assert len(p.kv_heads) == max(Hkv // t, 1)
        assert p.replication == max(1, t // Hkv)
    counts = [sum(k in p.kv_heads for p in plans) for k in range(Hkv)]
    assert counts == [max(1, t // Hkv)] * Hkv
    for name in ("llama-3-70b", "llama-3-8b"):
        cfg = real_models.REAL_MODELS[name]
        if cfg.num_heads % t == 0:
            plan = ShardPlan.make(cfg.num_heads, cfg.num_kv_heads, cfg.ffn_dim, 0, t)
            assert len(plan.kv_heads) == real_models.kv_heads_per_gpu(cfg, t)


@pytest.mark.parametrize(("H", "Hkv", "ffn", "t"), [(6, 2, 64, 4), (8, 4, 60, 8), (8, 4, 64, 3)])
def test_uneven_splits_are_refused(H, Hkv, ffn, t):
    with pytest.raises(ValueError, match="split evenly"):
        ShardPlan.make(H, Hkv, ffn, 0, t)


def test_one_rank_is_the_model_itself():
    whole = model(num_kv_heads=2)
    local = shard_model(whole, 0, 1)
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    assert torch.equal(local(tokens), whole(tokens))
    assert shard_config(whole.config, ShardPlan.make(4, 2, 64, 0, 2)).num_kv_heads == 1
