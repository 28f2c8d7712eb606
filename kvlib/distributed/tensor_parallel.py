"""Tensor parallelism: one model's heads and MLP split over ranks, each caching only its KV heads.

Megatron-LM's split, as vLLM and SGLang run it. In each block, with `t` ranks:

- attention: the query projection is *column-parallel* -- rank r computes query heads
  r*H/t .. (r+1)*H/t - 1 -- and so are the key and value projections, for the KV heads those
  query heads read. Each rank attends with its own heads over its own cache: it stores only
  its KV heads, so the cache is split t ways with no communication at all. The output
  projection is *row-parallel*: rank r multiplies its heads' outputs by its rows of W_o,
  giving a partial sum of the block's output;
- one all-reduce adds the t partial sums, and every rank holds the whole (N, d) output again;
- the MLP likewise: gate and up column-parallel (ffn_dim / t columns each), down
  row-parallel, one all-reduce.

So a layer's forward pass costs two all-reduces of (N, d) (one per sub-block); embeddings,
norms and the LM head are replicated here (vLLM splits the vocabulary as well).

When ranks outnumber KV heads (t > Hkv, as Llama-3-70B's 8 KV heads on 16 GPUs), a KV head
cannot be split: each rank keeps the one KV head its query heads read, and each KV head is
stored t / Hkv times. The cache per rank stops shrinking at one head
(`kvlib.real_models.kv_heads_per_gpu`).

Worked example: 8 query heads over 2 KV heads (G = 4).

>>> plan = ShardPlan.make(num_heads=8, num_kv_heads=2, ffn_dim=64, rank=1, world_size=2)
>>> plan.heads, plan.kv_heads, plan.ffn, plan.replication
(range(4, 8), range(1, 2), range(32, 64), 1)
>>> ShardPlan.make(8, 2, 64, rank=3, world_size=4).kv_heads  # query heads 6, 7 read KV head 1
range(1, 2)
>>> ShardPlan.make(8, 2, 64, rank=3, world_size=4).replication
2

The sharded model is a `TransformerLM` of the rank's shape (its heads, its MLP columns) with
the original's weights sliced in, and each block's attention and MLP wrapped in `AllReduce`:
`kvlib/model.py` is unchanged, and the rank's model runs on any cache and in the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kvlib.config import ModelConfig
from kvlib.model import TransformerLM


@dataclass(frozen=True)
class ShardPlan:
    """Which query heads, KV heads and MLP columns rank `rank` of `world_size` holds, and
    how many ranks store each KV head (1 while the KV heads split, t / Hkv beyond)."""

    rank: int
    world_size: int
    heads: range
    kv_heads: range
    ffn: range
    replication: int = 1

    @staticmethod
    def make(num_heads: int, num_kv_heads: int, ffn_dim: int, rank: int,
             world_size: int) -> ShardPlan:
        t, H, Hkv = world_size, num_heads, num_kv_heads
        if not (isinstance(t, int) and t >= 1 and isinstance(rank, int) and 0 <= rank < t):
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {t}")
        if H % t or ffn_dim % t or (Hkv % t and t % Hkv):
            raise ValueError(f"{H} query heads, {Hkv} KV heads and ffn_dim {ffn_dim} cannot "
                             f"be split evenly over {t} ranks (t must divide H and ffn_dim, "
                             f"and divide Hkv or be a multiple of it)")
        h, f = H // t, ffn_dim // t
        if Hkv >= t:
            kv = range(rank * Hkv // t, (rank + 1) * Hkv // t)
        else:  # NOTE: the one KV head all this rank's query heads read (h divides H / Hkv)
            first = rank * h // (H // Hkv)
            kv = range(first, first + 1)
        return ShardPlan(rank, t, range(rank * h, (rank + 1) * h), kv,
                         range(rank * f, (rank + 1) * f), max(1, t // Hkv))


def shard_config(config: ModelConfig, plan: ShardPlan) -> ModelConfig:
    """The shape of one rank's model: its heads, its KV heads, its MLP columns."""
    return dataclasses.replace(config, num_heads=len(plan.heads),
                               num_kv_heads=len(plan.kv_heads), head_dim=config.head_dim,
                               ffn_dim=len(plan.ffn), name=f"{config.name} (tp rank "
                               f"{plan.rank} of {plan.world_size})")


class AllReduce(nn.Module):
    """A row-parallel sub-block: run it, then sum its partial output over the group.

    The one communication of a sub-block: after it every rank holds the full (N, d) output,
    exactly as one process would have computed it (up to the order of the additions)."""

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, *args) -> torch.Tensor:
        out = self.inner(*args)  # (N, d): this rank's partial sum
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(out, group=self.group)  # (N, d): the sum over ranks
        return out


@torch.no_grad()
def shard_model(model: TransformerLM, rank: int, world_size: int,
                group: dist.ProcessGroup | None = None) -> TransformerLM:
    """Rank `rank`'s part of `model`: a TransformerLM of the rank's shape holding slices of
    the original's weights, its attention and MLP wrapped in `AllReduce`."""
    cfg = model.config
    plan = ShardPlan.make(cfg.num_heads, cfg.num_kv_heads, cfg.ffn_dim, rank, world_size)
    weight = model.embed.weight
    local = TransformerLM(shard_config(cfg, plan)).to(dtype=weight.dtype, device=weight.device)
    D = cfg.head_dim
    q = slice(plan.heads.start * D, plan.heads.stop * D)  # rows of W_q, columns of W_o
    kv = slice(plan.kv_heads.start * D, plan.kv_heads.stop * D)  # rows of W_k and W_v
    f = slice(plan.ffn.start, plan.ffn.stop)
    local.embed.weight.copy_(model.embed.weight)
    local.norm.weight.copy_(model.norm.weight)
    local.lm_head.weight.copy_(model.lm_head.weight)  # (tied or not: a copy of the same)
    for mine, full in zip(local.layers, model.layers):
        mine.attn_norm.weight.copy_(full.attn_norm.weight)
        mine.mlp_norm.weight.copy_(full.mlp_norm.weight)
        a, b = mine.attn, full.attn
        a.q_proj.weight.copy_(b.q_proj.weight[q])  # (h*D, d): column-parallel
        a.k_proj.weight.copy_(b.k_proj.weight[kv])  # (hkv*D, d)
        a.v_proj.weight.copy_(b.v_proj.weight[kv])
        if cfg.qkv_bias:
            a.q_proj.bias.copy_(b.q_proj.bias[q])
            a.k_proj.bias.copy_(b.k_proj.bias[kv])
            a.v_proj.bias.copy_(b.v_proj.bias[kv])
        a.o_proj.weight.copy_(b.o_proj.weight[:, q])  # (d, h*D): row-parallel
        mine.mlp.gate_proj.weight.copy_(full.mlp.gate_proj.weight[f])  # (F/t, d)
        mine.mlp.up_proj.weight.copy_(full.mlp.up_proj.weight[f])
        mine.mlp.down_proj.weight.copy_(full.mlp.down_proj.weight[:, f])  # (d, F/t)
        mine.attn = AllReduce(mine.attn, group)
        mine.mlp = AllReduce(mine.mlp, group)
    local.attention = model.attention
    return local.eval()
