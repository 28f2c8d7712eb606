"""A mixed serving step on a GPU: prompt chunks beside decodes, paged kernel against SDPA.

One layer, one step: `chunks` sequences each feed a chunk of T new tokens at the end of S
(a prompt when T = S, a chunked prefill otherwise) and `decodes` sequences feed one token
after S_dec. Every key is already stored, in a paged pool with the blocks scattered, and
also contiguous for SDPA. Three ways to attend:

    prefill     kvlib's `paged_prefill_triton`, the whole step in one launch
    two_launch  the chunks through `paged_prefill_triton`, the decodes through the split
                decode kernel (`paged_decode_triton`)
    sdpa        torch's SDPA on contiguous tensors: each chunk causal from its offset
                (lower-right aligned, K and V expanded to H heads beforehand, not timed),
                the decodes in one batched call (enable_gqa): SDPA's best case, no paging

Legend: N packed query tokens, B sequences, H query heads, Hkv KV heads, D head dim,
BS block size, T chunk length, S context length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from kvlib.experiments.gpu import median, time_ms
from kvlib.kernels.paged_decode import paged_decode_triton
from kvlib.kernels.paged_prefill import PrefillLaunch, paged_prefill_triton
from kvlib.kernels.reference import paged_attention_ref

# (chunks as (T, S) pairs, decodes, decode context): Llama-3-8B's attention, bf16, BS 16.
MIXED_ROWS = (
    {"chunks": ((2048, 4096),), "decodes": 32, "decode_len": 4096},
    {"chunks": ((4096, 4096),), "decodes": 64, "decode_len": 2048},
    {"chunks": ((512, 512),) * 4, "decodes": 128, "decode_len": 1024},
)


@dataclass(frozen=True)
class MixedCase:
    q: torch.Tensor  # (N, H, D) packed: chunks first, then decodes
    k_pool: torch.Tensor  # (NB, Hkv, BS, D)
    v_pool: torch.Tensor
    block_tables: torch.Tensor  # (B, M) int32
    context_lens: torch.Tensor  # (B,) int32
    cu_query_lens: torch.Tensor  # (B+1,) int32
    chunks: tuple[tuple[int, int], ...]  # (T, S) per chunk row
    dense: tuple  # per chunk: (k, v) (1, H, S, D); then decodes' (k, v) (Bd, Hkv, S, D)

    @property
    def num_decodes(self) -> int:
        return self.context_lens.shape[0] - len(self.chunks)

    def flops(self) -> float:
        """FLOPs of attention over the visible keys (causal), 4 D per (query, key, head)."""
        H, D = self.q.shape[1:]
        keys = sum(T * (S - T) + T * (T + 1) // 2 for T, S in self.chunks)
        keys += self.num_decodes * int(self.context_lens[-1])
        return 4.0 * D * H * keys


def make_mixed_case(chunks, decodes: int, decode_len: int, *, H: int = 32, Hkv: int = 8,
                    D: int = 128, BS: int = 16, dtype: torch.dtype = torch.bfloat16,
                    device: str = "cuda", seed: int = 0) -> MixedCase:
    gen = torch.Generator(device=device).manual_seed(seed)
    lens = [S for _, S in chunks] + [decode_len] * decodes
    qlens = [T for T, _ in chunks] + [1] * decodes
    M = max(-(-n // BS) for n in lens)
    B, NB = len(lens), len(lens) * M
    order = torch.randperm(NB, device=device, generator=gen).view(B, M)  # scattered blocks
    k_pool = torch.randn(NB, Hkv, BS, D, device=device, dtype=dtype, generator=gen)
    v_pool = torch.randn(NB, Hkv, BS, D, device=device, dtype=dtype, generator=gen)
    q = torch.randn(sum(qlens), H, D, device=device, dtype=dtype, generator=gen)  # (N, H, D)
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)  # (B+1,)

    def contiguous(pool, b, S):  # (Hkv, S, D): row b's keys as SDPA wants them
        return pool[order[b, :-(-S // BS)].long()].transpose(0, 1).reshape(Hkv, -1, D)[:, :S]

    dense = []
    for b, (_, S) in enumerate(chunks):
        k, v = (contiguous(p, b, S).repeat_interleave(H // Hkv, 0)[None] for p in
                (k_pool, v_pool))  # (1, H, S, D)
        dense.append((k.contiguous(), v.contiguous()))
    rows = range(len(chunks), B)
    dense.append(tuple(torch.stack([contiguous(p, b, decode_len) for b in rows]).contiguous()
                       for p in (k_pool, v_pool)))  # (Bd, Hkv, S, D) each
    return MixedCase(q, k_pool, v_pool, order.to(torch.int32),
                     torch.tensor(lens, dtype=torch.int32, device=device), cu,
                     tuple(chunks), tuple(dense))


def mixed_paths(case: MixedCase, launch: PrefillLaunch | None = None,
                ) -> dict[str, Callable[[], torch.Tensor]]:
    """The three ways to attend, each returning (N, H, D)."""
    c = case
    n_chunk = int(sum(T for T, _ in c.chunks))
    Bc = len(c.chunks)

    def prefill():
        return paged_prefill_triton(c.q, c.k_pool, c.v_pool, c.block_tables, c.context_lens,
                                    c.cu_query_lens, launch=launch)

    def two_launch():
        out = torch.empty_like(c.q)  # (N, H, D)
        out[:n_chunk] = paged_prefill_triton(c.q[:n_chunk], c.k_pool, c.v_pool,
                                             c.block_tables[:Bc], c.context_lens[:Bc],
                                             c.cu_query_lens[:Bc + 1], launch=launch)
        out[n_chunk:] = paged_decode_triton(c.q[n_chunk:], c.k_pool, c.v_pool,
                                            c.block_tables[Bc:], c.context_lens[Bc:])
        return out

    def sdpa():
        out = torch.empty_like(c.q)  # (N, H, D)
        start = 0
        for (T, S), (k, v) in zip(c.chunks, c.dense):
            qc = c.q[start:start + T].transpose(0, 1)[None]  # (1, H, T, D)
            out[start:start + T] = F.scaled_dot_product_attention(
                qc, k, v, attn_mask=_lower_right(T, S, c.q.device))[0].transpose(0, 1)
            start += T
        k, v = c.dense[-1]
        qd = c.q[n_chunk:, :, None]  # (Bd, H, 1, D)
        out[n_chunk:] = F.scaled_dot_product_attention(qd, k, v, enable_gqa=True)[:, :, 0]
        return out

    return {"prefill": prefill, "two_launch": two_launch, "sdpa": sdpa}


def _lower_right(T: int, S: int, device):
    """Causal mask of T queries at the end of S keys: torch's lower-right CausalBias (flash or
    efficient kernels) where it exists, else the boolean (T, S) mask."""
    try:
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(T, S)
    except ImportError:  # pragma: no cover - torch < 2.3
        keys = torch.arange(S, device=device)
        return keys[None, :] <= (S - T + torch.arange(T, device=device))[:, None]  # (T, S)


def time_mixed_row(spec: dict, *, rounds: int = 1, device: str = "cuda",
                   launch: PrefillLaunch | None = None, **shape) -> dict:
    """Errors (against the fp32 reference, first chunk and decodes) and median ms of each path."""
    case = make_mixed_case(spec["chunks"], spec["decodes"], spec["decode_len"], device=device,
                           **shape)
    dev = torch.device(device)
    c = case
    ref = paged_attention_ref(c.q.float(), c.k_pool.float(), c.v_pool.float(), c.block_tables,
                              c.context_lens, c.cu_query_lens)  # (N, H, D)
    paths = mixed_paths(case, launch)
    row = {"chunks": [list(x) for x in c.chunks], "decodes": c.num_decodes,
           "decode_len": spec["decode_len"], "N": c.q.shape[0],
           "GFLOP": round(case.flops() / 1e9, 2)}
    for name, fn in paths.items():
        row[f"{name}_max_err"] = round(float((fn().float() - ref).abs().max()), 5)
    times = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            times[name].append(time_ms(fn, dev))
    for name, ms in times.items():
        row[f"{name}_ms"] = round(median(ms), 4)
        row[f"{name}_TFLOPs"] = round(case.flops() / (median(ms) * 1e-3) / 1e12, 1)
    row["prefill_over_sdpa"] = round(row["sdpa_ms"] / row["prefill_ms"], 3)
    row["two_launch_over_sdpa"] = round(row["sdpa_ms"] / row["two_launch_ms"], 3)
    return row


def sweep_prefill(spec: dict, launches: list[PrefillLaunch], *, device: str = "cuda",
                  rep_ms: int = 20, **shape) -> dict:
    """{"ms": {launch.key: ms}, "errors": {key: str}} of the one-launch path per launch."""
    case = make_mixed_case(spec["chunks"], spec["decodes"], spec["decode_len"], device=device,
                           **shape)
    dev = torch.device(device)
    result = {"ms": {}, "errors": {}}
    for launch in launches:
        fn = mixed_paths(case, launch)["prefill"]
        try:
            fn()
            result["ms"][launch.key] = round(time_ms(fn, dev, rep_ms=rep_ms), 4)
        except Exception as exc:  # noqa: BLE001 - one bad config costs one entry
            result["errors"][launch.key] = f"{type(exc).__name__}: {exc}"[:300]
    return result
