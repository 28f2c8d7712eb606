"""kvlib.experiments.shrink: a model read through a shrunken cache, in one pass per layer,
equals decoding it token by token through a cache that really drops what the policy drops:
kvlib's paged cache with a window and sinks (whose blocks are freed), and, for eviction by
score, a plain step-by-step decoder written here from the definitions."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import unit_scale_model

from kvlib.cache.paged import PagedKVCache
from kvlib.cache.quantize import fake_quantize
from kvlib.experiments import shrink
from kvlib.model import TransformerLM, apply_rotary, rotary_cos_sin

pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = dict(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
              max_seq_len=64)
S = 30


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    return unit_scale_model(5, random_norms=True, **FIELDS).double()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 50, (S,), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", list(shrink.POLICIES))
def test_nothing_evicted_is_the_model_itself(model, ids, name):
    policy = shrink.POLICIES[name]
    regime = "prompt" if policy.shared_blocks else "decode"
    run = shrink.run(model, ids, policy, S, regime, prompt_len=S // 2)
    assert torch.allclose(run.logits, model(ids[None])[0], atol=1e-9)
    assert bool(run.kept.all())


def test_sinks_and_a_window_equal_the_paged_cache_that_frees_blocks(model, ids):
    W, k = 9, 3
    windowed = unit_scale_model(5, random_norms=True, sliding_window=W, sink_tokens=k,
                                **FIELDS).double()
    cache = PagedKVCache(windowed.cache_config(1, 64, block_size=4), num_blocks=16)
    steps = [windowed.prefill(ids[None, :1], cache)]
    steps += [windowed.decode_step(ids[t:t + 1], cache) for t in range(1, S)]
    run = shrink.run(model, ids, shrink.Policy("s", "window", sink_tokens=k), W + k)
    assert torch.allclose(run.logits.float(), torch.cat(steps), atol=1e-5)  # fp32 logits
    assert cache.num_used_blocks <= 2 * (1 + -(-W // 4) + 1)  # sinks, window, the step


def decode_by_hand(model, ids, budget, *, scorer=None, sinks=0, cache_positions=False,
                   rest=None):
    """Token by token, each layer's KV heads holding lists of kept positions.

    scorer None: keep the sinks and the most recent; "h2o": accumulate each key's attention
    and, once B keys are held, drop the lowest-scored key older than the last B/2. With
    cache_positions, keys are rotated at their slot in the list (StreamingLLM). With `rest`,
    dropped keys stay, quantized."""
    cfg = model.config
    H, Hkv, D, G = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.queries_per_kv
    L = cfg.num_layers
    keys = [[] for _ in range(L)]  # per layer: (Hkv, D) unrotated keys, by position
    values = [[] for _ in range(L)]
    kept = [[[] for _ in range(Hkv)] for _ in range(L)]
    score = [[{} for _ in range(Hkv)] for _ in range(L)]
    logits = []

    def rot(x, pos):
        cos, sin = rotary_cos_sin(torch.tensor([pos]), D, cfg.rope_theta, x.dtype)
        return apply_rotary(x, cos[0], sin[0])

    for t, token in enumerate(ids.tolist()):
        x = model.embed(torch.tensor([token]))[0]  # (d,)
        for i, block in enumerate(model.layers):
            a, h = block.attn, block.attn_norm(x)
            q = a.q_proj(h).view(H, D)
            keys[i].append(a.k_proj(h).view(Hkv, D))
            values[i].append(a.v_proj(h).view(Hkv, D))
            out = torch.zeros(H, D, dtype=x.dtype)
            for kv in range(Hkv):
                kept[i][kv].append(t)
                held = kept[i][kv]
                seen = list(range(t + 1)) if rest is not None else held
                for g in range(G):
                    head = kv * G + g
                    qpos = len(held) - 1 if cache_positions else t
                    qr = rot(q[head], qpos)
                    logit = []
                    for j in seen:
                        kpos = held.index(j) if cache_positions else j
                        kj = rot(keys[i][j][kv], kpos)
                        vj = values[i][j][kv]
                        if j not in held:  # the quantized rest (per-token scales)
                            kj = fake_quantize(_rotated_all(keys[i], kv, cfg)[None], rest)[0, j]
                            vj = fake_quantize(torch.stack([v[kv] for v in values[i]])[None],
                                               rest)[0, j]
                        logit.append((float(qr @ kj) / math.sqrt(D), vj))
                    top = max(s for s, _ in logit)
                    w = [math.exp(s - top) for s, _ in logit]
                    z = sum(w)
                    out[head] = sum(wj / z * vj for wj, (_, vj) in zip(w, logit))
                    if scorer == "h2o":
                        for j, wj in zip(seen, w):
                            score[i][kv][j] = score[i][kv].get(j, 0.0) + wj / z
                if len(held) < budget:
                    continue
                if scorer == "h2o":
                    old = [j for j in held if j <= t - budget // 2]
                    held.remove(min(old, key=lambda j: (score[i][kv][j], j)))
                else:  # drop the oldest non-sink
                    held.remove(next(j for j in held if j >= sinks))
            x = x + a.o_proj(out.reshape(H * D))
            x = x + block.mlp(block.mlp_norm(x))
        logits.append(model.lm_head(model.norm(x)))
    return torch.stack(logits)  # (S, V)


def _rotated_all(keys, kv, cfg):
    """(t + 1, D) the stored keys of one KV head, each rotated at its own position."""
    k = torch.stack([key[kv] for key in keys])  # (n, D)
    cos, sin = rotary_cos_sin(torch.arange(k.shape[0]), cfg.head_dim, cfg.rope_theta, k.dtype)
    return apply_rotary(k, cos, sin)


@torch.no_grad()
def test_h2o_equals_decoding_by_hand(model, ids):
    run = shrink.run(model, ids, shrink.POLICIES["H2O"], 10)
    assert torch.allclose(run.logits, decode_by_hand(model, ids, 10, scorer="h2o"), atol=1e-9)


@torch.no_grad()
def test_cache_positions_equal_decoding_by_hand(model, ids):
    policy = shrink.POLICIES["sinks + window, cache positions"]
    run = shrink.run(model, ids, policy, 10)
    by_hand = decode_by_hand(model, ids, 10, sinks=4, cache_positions=True)
    # rotary angles are float32 (as in the model): rotating the window's keys at their slots
    # instead of their positions moves the scores by ~1e-7, the same distances otherwise
    assert torch.allclose(run.logits, by_hand, atol=1e-5)
    original = shrink.run(model, ids, shrink.POLICIES["sinks + window"], 10)
    assert not torch.allclose(original.logits, by_hand, atol=1e-3)  # positions matter


@torch.no_grad()
def test_a_quantized_rest_equals_decoding_by_hand(model, ids):
    policy = shrink.POLICIES["sinks + window, INT4 rest"]
    run = shrink.run(model, ids, policy, 10)
    by_hand = decode_by_hand(model, ids, 10, sinks=4, rest=policy.rest)
    assert torch.allclose(run.logits, by_hand, atol=1e-6)


@pytest.mark.parametrize("name", ["window", "H2O", "SnapKV", "SnapKV, whole blocks"])
def test_the_prompt_regime_cuts_the_prompt_once(model, ids, name):
    policy, P = shrink.POLICIES[name], 20
    run = shrink.run(model, ids, policy, 16, "prompt", P)
    full = model(ids[None])[0]
    assert torch.allclose(run.logits[:P], full[:P], atol=1e-9)  # the prefill saw everything
    assert int(run.kept[..., :P].sum(-1).max()) <= 16
    assert bool(run.kept[..., P:].all())  # what follows the prompt is all kept


def test_full_budget_for_a_quantized_rest():
    int4 = shrink.POLICIES["sinks + window, INT4 rest"]
    assert int4.bytes_ratio(64) == pytest.approx(5 / 16)
    assert shrink.full_budget(int4, 0.2, 1000, 64) is None  # below the INT4 floor
    # 0.5 of the bytes: B full tokens + (1000 - B) at 5/16: B = 1000 (0.5 - 5/16) / (11/16)
    assert shrink.full_budget(int4, 0.5, 1000, 64) == 273
    assert shrink.full_budget(shrink.POLICIES["H2O"], 0.2, 1000, 64) == 200


def test_bad_runs_are_refused(model, ids):
    with pytest.raises(ValueError, match="regime"):
        shrink.run(model, ids, shrink.POLICIES["window"], 8, "chunked")
    with pytest.raises(ValueError, match="prompt_len"):
        shrink.run(model, ids, shrink.POLICIES["window"], 8, "prompt")
    with pytest.raises(ValueError, match="regime='prompt'"):
        shrink.run(model, ids, shrink.POLICIES["SnapKV, whole blocks"], 8)
    with pytest.raises(ValueError, match="sinks"):
        shrink.Policy("x", "h2o", sink_tokens=2)


def test_metrics():
    logits = torch.tensor([[0.0, 0.0], [5.0, -5.0], [0.0, 0.0]])  # (S, V)
    ids = [0, 0, 1]
    nats = shrink.token_nats(logits, ids, 0)
    assert nats[0] == pytest.approx(math.log(2))
    assert shrink.bits_per_byte(logits, ids, num_bytes=2, start=0) == pytest.approx(
        float(nats.sum()) / math.log(2) / 2)
    assert shrink.agreement(logits, logits, 0) == 1.0


def test_copying_heads_read_the_models_own_attention(model):
    """Against the attention recomputed from what the model's own forward feeds each layer."""
    heads = shrink.copying_heads(model, length=12, seed=4)
    R = torch.randint(50 // 8, 50, (12,), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([torch.zeros(1, dtype=torch.int64), R, R])  # (25,)
    inputs = {}
    hooks = [block.attn.register_forward_hook(
        lambda m, args, out, i=i: inputs.__setitem__(i, args[0])) for i, block in
        enumerate(model.layers)]
    with torch.no_grad():
        model(ids[None])
    for h in hooks:
        h.remove()
    cfg, S = model.config, ids.shape[0]
    cos, sin = rotary_cos_sin(torch.arange(S), cfg.head_dim, cfg.rope_theta, torch.float64)
    for i, block in enumerate(model.layers):
        a, x = block.attn, inputs[i]  # (S, d)
        q = apply_rotary(a.q_proj(x).view(S, 4, -1), cos[:, None], sin[:, None])  # (S, H, D)
        k = apply_rotary(a.k_proj(x).view(S, 2, -1), cos[:, None], sin[:, None])  # (S, Hkv, D)
        scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, 1)) / math.sqrt(
            cfg.head_dim)
        probs = scores.masked_fill(torch.ones(S, S).triu(1).bool(), -math.inf).softmax(-1)
        prev = torch.stack([probs[:, t, t - 1] for t in range(1, S)], -1).mean(-1)  # (H,)
        ind = torch.stack([probs[:, t, t - 11] for t in range(14, S)], -1).mean(-1)  # (H,)
        torch.testing.assert_close(heads.previous[i], prev.detach())
        torch.testing.assert_close(heads.induction[i], ind.detach())
    assert heads.previous.shape == heads.induction.shape == (2, 4)
