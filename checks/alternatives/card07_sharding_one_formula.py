"""A correct alternative to solutions/card07_distributed/sharding.py: one formula for a rank's KV heads (the head
of its first query head, then max(1, Hkv // tp) of them), the copies counted as the ranks that hold head 0, a
rank's bytes from the length of its head list, a stage's bytes as the whole cache over the stages, the bytes
sent as .nbytes of a meta hidden state, moves from the least-busy holder with ties to the highest GPU, the
busiest link from two Counters.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.
"""

from __future__ import annotations

import collections

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card07_distributed/sharding.py"


def kv_heads_of_rank(n_kv_heads: int, tp: int, rank: int) -> list[int]:
    first = rank * n_kv_heads // tp  # the KV head of the rank's first query head
    return list(range(first, first + max(1, n_kv_heads // tp)))


def kv_replication(n_kv_heads: int, tp: int) -> int:
    return sum(1 for r in range(tp) if 0 in kv_heads_of_rank(n_kv_heads, tp, r))  # the ranks holding head 0


def kv_bytes_per_rank(cfg: ModelConfig, tp: int, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    heads = len(kv_heads_of_rank(cfg.n_kv_heads, tp, 0))
    return 2 * cfg.n_layers * batch * seq_len * heads * cfg.head_dim * dtype.itemsize


def pipeline_kv_bytes_per_stage(cfg: ModelConfig, stages: int, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    whole = 2 * cfg.n_layers * batch * seq_len * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize
    return whole // stages


def pipeline_bytes_sent_per_step(cfg: ModelConfig, batch: int, dtype: torch.dtype) -> int:
    return torch.empty(batch, 1, cfg.d_model, dtype=dtype, device="meta").nbytes  # the hidden state of the new tokens


def reshard_plan(n_kv_heads: int, tp_from: int, tp_to: int) -> list[tuple[int, int, int]]:
    holders = {h: [g for g in range(tp_from) if h in kv_heads_of_rank(n_kv_heads, tp_from, g)] for h in range(n_kv_heads)}
    sends = [0] * tp_from
    plan = []
    for dst in range(tp_to):
        held = kv_heads_of_rank(n_kv_heads, tp_from, dst) if dst < tp_from else []
        for h in kv_heads_of_rank(n_kv_heads, tp_to, dst):
            if h not in held:
                src = min(holders[h], key=lambda g: (sends[g], -g))
                sends[src] += 1
                plan.append((h, src, dst))
    return plan


def reshard_seconds(cfg: ModelConfig, tp_from: int, tp_to: int, batch: int, seq_len: int, dtype: torch.dtype,
                    alpha: float, beta: float) -> float:
    message = batch * seq_len * cfg.head_dim * dtype.itemsize
    plan = reshard_plan(cfg.n_kv_heads, tp_from, tp_to)
    sent = collections.Counter(src for _, src, _ in plan)
    received = collections.Counter(dst for _, _, dst in plan)
    busiest = max([*sent.values(), *received.values(), 0])
    per_move = 2 * cfg.n_layers * alpha + 2 * cfg.n_layers * message / beta  # K and V of every layer
    return busiest * per_move
