"""A correct alternative to solutions/card07_distributed/sharding.py: the same katas, other derivations.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every card07 test to pass. Here a rank's KV heads are derived from the query heads it owns (with
the fewest query heads that make the layout valid), replication is a ceiling division, bytes are
counted per held head, the pipeline stage holds the whole cache over the stages, and the reshard
picks a replicated head's source by the destination's index modulo the holders (balanced on every
valid layout: destinations of one head are consecutive ranks) and prices it per GPU with counters.
"""

from __future__ import annotations

from collections import Counter

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card07_distributed/sharding.py"


def kv_heads_of_rank(n_kv_heads: int, tp: int, rank: int) -> list[int]:
    n_heads = n_kv_heads * max(1, tp // n_kv_heads)  # any valid H gives the same map; take the fewest
    group, per_rank = n_heads // n_kv_heads, n_heads // tp
    return sorted({h // group for h in range(rank * per_rank, (rank + 1) * per_rank)})


def kv_replication(n_kv_heads: int, tp: int) -> int:
    return -(-tp // n_kv_heads)  # ceil: tp / Hkv ranks share a head, or 1 when Hkv >= tp


def kv_bytes_per_rank(cfg: ModelConfig, tp: int, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    per_head = 2 * batch * seq_len * cfg.head_dim * dtype.itemsize  # K and V of one head, one layer
    return len(kv_heads_of_rank(cfg.n_kv_heads, tp, tp - 1)) * per_head * cfg.n_layers


def pipeline_kv_bytes_per_stage(cfg: ModelConfig, stages: int, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    whole = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * batch * seq_len * dtype.itemsize
    return whole // stages


def pipeline_bytes_sent_per_step(cfg: ModelConfig, batch: int, dtype: torch.dtype) -> int:
    return dtype.itemsize * cfg.d_model * batch  # one new token's hidden state per sequence


def reshard_plan(n_kv_heads: int, tp_from: int, tp_to: int) -> list[tuple[int, int, int]]:
    old = {g: set(kv_heads_of_rank(n_kv_heads, tp_from, g)) for g in range(tp_from)}
    plan = []
    for dst in range(tp_to):
        for h in sorted(set(kv_heads_of_rank(n_kv_heads, tp_to, dst)) - old.get(dst, set())):
            holders = [g for g in range(tp_from) if h in old[g]]
            plan.append((h, holders[dst % len(holders)], dst))
    return plan


def reshard_seconds(cfg: ModelConfig, tp_from: int, tp_to: int, batch: int, seq_len: int, dtype: torch.dtype,
                    alpha: float, beta: float) -> float:
    plan = reshard_plan(cfg.n_kv_heads, tp_from, tp_to)
    sent, received = Counter(s for _, s, _ in plan), Counter(d for _, _, d in plan)
    per_move = 2 * cfg.n_layers  # K and V, one message each per layer
    nbytes = batch * seq_len * cfg.head_dim * dtype.itemsize
    busiest = max([*sent.values(), *received.values()], default=0)
    return busiest * per_move * alpha + busiest * per_move * nbytes / beta
