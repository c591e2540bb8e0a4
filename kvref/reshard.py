"""Spoiler for card07: preemption on one tensor-parallel layout and resume on another, moving KV heads (read it after you pass).

Preemption and resume on another layout: `reshard_worker` decodes on tp = a, moves each KV head
a GPU of the tp = b layout lacks from an old GPU that holds it (isend / irecv, one message per
head, layer and K or V; messages and bytes counted on both ends), and resumes decoding on tp = b.
GPU g is rank g in both layouts; a plan that loses, duplicates or misroutes a head is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvref.cache import GrowingKVCache
from kvref.config import ModelConfig
from kvref.measure import cache_nbytes
from kvref.model import build_model
from kvref.tensor_parallel import TPAttention, decode_steps, tp_kv_heads

# --- preemption and resume on another layout ---------------------------------------------------

def reshard_plan(cfg: ModelConfig, tp_from: int, tp_to: int) -> list[tuple[int, int, int]]:
    """(head, source GPU, destination GPU) for every KV head a GPU lacks in the new layout.

    GPU g is rank g in both layouts (a scale-up adds GPUs tp_from .. tp_to-1; a scale-down
    drops the highest ones). A head a GPU already holds stays where it is; any other is sent
    once, from a GPU that held it. When several old GPUs hold a head (replicated, Hkv < tp_from),
    its sends are spread over them, each to the one that has sent the fewest so far: no GPU
    sends more than it must.
    """
    for tp in (tp_from, tp_to):
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp must be a positive int, got {tp!r}")
    holders = {h: [g for g in range(tp_from) if h in tp_kv_heads(cfg, tp_from, g)] for h in range(cfg.n_kv_heads)}
    sends = [0] * tp_from
    plan = []
    for dst in range(tp_to):
        held = tp_kv_heads(cfg, tp_from, dst) if dst < tp_from else []
        for h in tp_kv_heads(cfg, tp_to, dst):
            if h not in held:
                src = min(holders[h], key=lambda g: (sends[g], g))
                sends[src] += 1
                plan.append((h, src, dst))
    return plan


def check_reshard_plan(cfg: ModelConfig, tp_from: int, tp_to: int, plan) -> None:
    """Raise ValueError naming the first move of `plan` that loses, duplicates or misroutes a head."""
    seen = set()
    for move in plan:
        if not (isinstance(move, tuple) and len(move) == 3 and all(isinstance(x, int) for x in move)):
            raise ValueError(f"a move must be a (head, source, destination) tuple of ints, got {move!r}")
        h, src, dst = move
        if not (0 <= src < tp_from and 0 <= dst < tp_to):
            raise ValueError(f"move {move}: GPUs of tp = {tp_from} are 0..{tp_from - 1}, of tp = {tp_to} 0..{tp_to - 1}")
        if h not in tp_kv_heads(cfg, tp_from, src):
            raise ValueError(f"move {move}: GPU {src} does not hold KV head {h} on tp = {tp_from}")
        if h not in tp_kv_heads(cfg, tp_to, dst):
            raise ValueError(f"move {move}: rank {dst} of tp = {tp_to} does not cache KV head {h}")
        if dst < tp_from and h in tp_kv_heads(cfg, tp_from, dst):
            raise ValueError(f"move {move}: GPU {dst} already holds KV head {h}")
        if (h, dst) in seen:
            raise ValueError(f"move {move}: KV head {h} is sent to GPU {dst} twice")
        seen.add((h, dst))
    for dst in range(tp_to):
        held = tp_kv_heads(cfg, tp_from, dst) if dst < tp_from else []
        for h in tp_kv_heads(cfg, tp_to, dst):
            if h not in held and (h, dst) not in seen:
                raise ValueError(f"GPU {dst} needs KV head {h} on tp = {tp_to} and nothing sends it")


@dataclass
class ReshardReport:
    """What one GPU measured in a reshard: messages and bytes it sent and received, and the rest of the run."""
    rank: int
    kv_heads: list[int]            # the KV heads its new cache holds, as the engine assigned them ([] if it left)
    cache_nbytes: int              # .nbytes of its new caches
    k_layer0: object               # numpy (B, Hkv_r, T, D): layer 0's cached keys after the reshard (None if it left)
    logits: object                 # numpy: every step this GPU took part in, before and after the reshard
    messages_sent: int
    bytes_sent: int
    messages_received: int
    bytes_received: int


def reshard_worker(rank: int, world: int, jobs: list) -> list:
    """Run each (cfg, seed, ids, n_prompt, n_before, tp_from, tp_to, plan) job: decode the prompt and
    `n_before` tokens on GPUs 0 .. tp_from-1, move the K/V of every head in `plan` (None: reshard_plan's)
    with point-to-point sends, one message per (head, layer, K or V), then decode the rest on GPUs
    0 .. tp_to-1. `world` must be max(tp_from, tp_to). The plan is checked first (check_reshard_plan)."""
    reports = []
    for cfg, seed, ids, n_prompt, n_before, tp_from, tp_to, plan in jobs:
        if world != max(tp_from, tp_to):
            raise ValueError(f"world = {world} must be max(tp_from, tp_to) = {max(tp_from, tp_to)}")
        plan = reshard_plan(cfg, tp_from, tp_to) if plan is None else [tuple(m) for m in plan]
        check_reshard_plan(cfg, tp_from, tp_to, plan)
        reports.append(_reshard_one(rank, cfg, seed, torch.as_tensor(ids), n_prompt, n_before, tp_from, tp_to, plan))
    return reports


def _reshard_one(rank, cfg, seed, ids, n_prompt, n_before, tp_from, tp_to, plan) -> ReshardReport:
    steps = list(decode_steps(ids, n_prompt))
    old_group = dist.new_group(list(range(tp_from)))  # every rank takes part in making every group
    new_group = dist.new_group(list(range(tp_to)))
    logits, caches = [], None
    with torch.no_grad():
        if rank < tp_from:
            model = build_model(cfg, seed)
            for layer in model.layers:
                layer.self_attn = TPAttention(layer.self_attn, cfg, tp_from, rank, old_group)
            caches = [GrowingKVCache() for _ in model.layers]
            for new, pos in steps[:1 + n_before]:
                logits.append(model(new, pos, caches)[:, -1])
        old_heads = tp_kv_heads(cfg, tp_from, rank) if rank < tp_from else []
        B, T, D = ids.shape[0], n_prompt + n_before, cfg.head_dim
        received, ops = {}, []
        sent = [0, 0]
        got = [0, 0]
        for h, src, dst in plan:
            for i in range(cfg.n_layers):
                for name in ("k", "v"):
                    if rank == src:
                        t = getattr(caches[i], name)[:, old_heads.index(h)].contiguous()  # (B, T, D)
                        ops.append(dist.isend(t, dst))
                        sent[0] += 1
                        sent[1] += t.nbytes
                    elif rank == dst:
                        t = torch.empty(B, T, D)
                        received[h, i, name] = t
                        ops.append(dist.irecv(t, src))
                        got[0] += 1
                        got[1] += t.nbytes
        for op in ops:
            op.wait()
        if rank >= tp_to:  # this GPU leaves the job
            return ReshardReport(rank, [], 0, None, torch.stack(logits).numpy(), *sent, *got)
        new_heads = tp_kv_heads(cfg, tp_to, rank)
        new_caches = []
        for i in range(cfg.n_layers):
            c = GrowingKVCache()
            for name in ("k", "v"):
                parts = [getattr(caches[i], name)[:, old_heads.index(h)] if h in old_heads else received[h, i, name]
                         for h in new_heads]
                setattr(c, name, torch.stack(parts, dim=1))  # (B, Hkv_r, T, D)
            new_caches.append(c)
        model = build_model(cfg, seed)
        for layer in model.layers:
            layer.self_attn = TPAttention(layer.self_attn, cfg, tp_to, rank, new_group)
        for new, pos in steps[1 + n_before:]:
            logits.append(model(new, pos, new_caches)[:, -1])
    return ReshardReport(rank, new_heads, cache_nbytes(new_caches), new_caches[0].k.numpy().copy(),
                         torch.stack(logits).numpy(), *sent, *got)


def reshard_message_nbytes_meta(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """`.nbytes` of one reshard message (one head's K, or V, in one layer: `[B, T, D]`), on the meta device."""
    return torch.empty(batch, seq_len, cfg.head_dim, dtype=dtype, device="meta").nbytes
