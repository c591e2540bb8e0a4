"""Spoiler for card07: tensor-parallel decoding on torch.distributed, and which heads each rank holds (read it after you pass).

Tensor parallelism (Megatron-style attention, as vLLM shards it). With tp ranks, rank r owns
the contiguous query heads r·H/tp .. (r+1)·H/tp - 1 and the KV heads those query heads read
(query head h reads KV head h // G). So when Hkv >= tp each rank holds Hkv / tp KV heads; when
Hkv < tp each rank holds one, KV head r // (tp / Hkv), and every KV head is replicated
tp / Hkv times (vLLM's rule for GQA under TP). A rank slices q/k/v_proj's rows and o_proj's
columns out of the full model's weights, caches only its own KV heads, and all-reduces (sums)
o_proj's partial outputs. The MLP, embedding, norms and lm_head are replicated, not sharded:
every rank computes them in full (simple, and exact).

`single_process` runs the same steps on the unsharded model: the reference every layout is checked against.
The ranks are started by kvref/launch.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from kvref.attention import attention
from kvref.cache import GrowingKVCache, StaticKVCache
from kvref.config import ModelConfig
from kvref.measure import cache_nbytes
from kvref.model import build_model
from kvref.rope import apply_rope, rope_cos_sin

# --- tensor parallelism ------------------------------------------------------------------------

def _check_tp_rank(tp, rank) -> None:
    for name, value in (("tp", tp), ("rank", rank)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if tp < 1:
        raise ValueError(f"tp must be >= 1 ranks, got {tp}")
    if not 0 <= rank < tp:
        raise ValueError(f"rank must be in 0 .. tp - 1 = {tp - 1}, got {rank}")


def tp_query_heads(cfg: ModelConfig, tp: int, rank: int) -> range:
    """The query heads rank `rank` owns: a contiguous H / tp of them."""
    _check_tp_rank(tp, rank)
    if cfg.n_heads % tp:
        raise ValueError(f"tp = {tp} must divide n_heads = {cfg.n_heads}")
    per = cfg.n_heads // tp
    return range(rank * per, (rank + 1) * per)


def tp_kv_heads(cfg: ModelConfig, tp: int, rank: int) -> list[int]:
    """The KV heads rank `rank` caches: those its query heads read (head h reads KV head h // G)."""
    _check_tp_rank(tp, rank)
    if cfg.n_kv_heads % tp and tp % cfg.n_kv_heads:
        raise ValueError(f"tp = {tp} and n_kv_heads = {cfg.n_kv_heads}: one must divide the other")
    return sorted({h // cfg.group_size for h in tp_query_heads(cfg, tp, rank)})


class TPAttention(nn.Module):
    """One rank's shard of an attention layer: its query heads, their KV heads, o_proj's columns."""

    def __init__(self, full: nn.Module, cfg: ModelConfig, tp: int, rank: int, group) -> None:
        super().__init__()
        D = cfg.head_dim
        self.cfg, self.group = cfg, group
        self.q_heads = tp_query_heads(cfg, tp, rank)
        self.kv_heads = tp_kv_heads(cfg, tp, rank)
        q_rows = slice(self.q_heads.start * D, self.q_heads.stop * D)
        kv_rows = slice(self.kv_heads[0] * D, (self.kv_heads[-1] + 1) * D)
        self.q_w = full.q_proj.weight[q_rows].clone()    # (H/tp · D, d)
        self.k_w = full.k_proj.weight[kv_rows].clone()   # (Hkv_r · D, d)
        self.v_w = full.v_proj.weight[kv_rows].clone()
        self.o_w = full.o_proj.weight[:, q_rows].clone()  # (d, H/tp · D)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, cache=None) -> torch.Tensor:
        B, S, _ = x.shape
        H, Hkv, D = len(self.q_heads), len(self.kv_heads), self.cfg.head_dim
        q = (x @ self.q_w.T).view(B, S, H, D).transpose(1, 2)    # (B, H/tp, S, D)
        k = (x @ self.k_w.T).view(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv_r, S, D)
        v = (x @ self.v_w.T).view(B, S, Hkv, D).transpose(1, 2)
        cos, sin = rope_cos_sin(input_pos, D, self.cfg.rope_theta, dtype=x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # (B, Hkv_r, T, D): only this rank's KV heads
        y = attention(q, k, v, None if cache is None else input_pos)  # (B, H/tp, S, D): masked by position
        partial = y.transpose(1, 2).reshape(B, S, H * D) @ self.o_w.T  # (B, S, d): this rank's share
        dist.all_reduce(partial, group=self.group)  # the sum over ranks is the full o_proj output
        return partial


@dataclass
class RankReport:
    """What one rank measured: its KV heads, its caches' bytes, layer 0's K, and the logits it computed."""
    rank: int
    kv_heads: list[int]            # as the engine assigned them
    cache_nbytes: int              # .nbytes of K and V over every layer this rank caches
    k_layer0: object               # numpy (B, Hkv_r, T, D): layer 0's cached keys
    logits: object                 # numpy (N + 1, B, V): after the prompt, then after each decode step
    bytes_sent: list[int] = field(default_factory=list)  # pipeline: bytes this rank sent, per step


def decode_steps(ids: torch.Tensor, n_prompt: int):
    """The forward calls of a prefill and its decode steps: (new ids, their positions)."""
    yield ids[:, :n_prompt], torch.arange(n_prompt)
    for t in range(n_prompt, ids.shape[1]):
        yield ids[:, t:t + 1], torch.tensor([t])


def tp_worker(rank: int, world: int, jobs: list) -> list:
    """Run each (cfg, seed, tp, ids, n_prompt) job on ranks 0 .. tp-1 of a group made for it."""
    reports = []
    for cfg, seed, tp, ids, n_prompt in jobs:
        group = dist.new_group(list(range(tp)))  # every rank must take part in making every group
        if rank >= tp:
            reports.append(None)
            continue
        model = build_model(cfg, seed)
        for layer in model.layers:
            layer.self_attn = TPAttention(layer.self_attn, cfg, tp, rank, group)
        caches = [GrowingKVCache() for _ in model.layers]
        logits = []
        with torch.no_grad():
            for new, pos in decode_steps(torch.as_tensor(ids), n_prompt):
                logits.append(model(new, pos, caches)[:, -1])
        reports.append(RankReport(rank, tp_kv_heads(cfg, tp, rank), cache_nbytes(caches), caches[0].k.numpy().copy(),
                                  torch.stack(logits).numpy()))
    return reports


def tp_cache_nbytes_meta(cfg: ModelConfig, tp: int, rank: int, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """`.nbytes` of the caches rank `rank` allocates under TP, on the meta device (real presets cost nothing)."""
    heads = len(tp_kv_heads(cfg, tp, rank))
    caches = [StaticKVCache(batch, heads, seq_len, cfg.head_dim, dtype, device="meta") for _ in range(cfg.n_layers)]
    return cache_nbytes(caches)


def heads_in_cache(k_rank, k_full) -> list[int]:
    """Which of the full model's KV heads a rank's cached K holds, found by comparing values.

    `k_rank` is `[B, Hkv_r, T, D]` from one rank, `k_full` `[B, Hkv, T, D]` from the single-process
    model (numpy or tensors). Slot i holds head j when the two agree to fp32 rounding.
    """
    k_rank, k_full = torch.as_tensor(k_rank), torch.as_tensor(k_full)
    held = []
    for i in range(k_rank.shape[1]):
        match = [j for j in range(k_full.shape[1]) if torch.allclose(k_rank[:, i], k_full[:, j], atol=1e-5, rtol=1e-5)]
        if len(match) != 1:
            raise ValueError(f"cached slot {i} matches {len(match)} of the model's KV heads, not exactly one")
        held += match
    return held



# --- the reference: the same steps on one process --------------------------------------------

def single_process(cfg: ModelConfig, seed: int, ids, n_prompt: int):
    """The same steps on the unsharded model: (logits (N + 1, B, V), layer 0's K (B, Hkv, T, D), caches' bytes)."""
    model = build_model(cfg, seed)
    caches = model.new_caches()
    logits = []
    with torch.no_grad():
        for new, pos in decode_steps(torch.as_tensor(ids), n_prompt):
            logits.append(model(new, pos, caches)[:, -1])
    return torch.stack(logits).numpy(), caches[0].k.numpy().copy(), cache_nbytes(caches)
