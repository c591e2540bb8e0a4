"""A correct alternative to solutions/card07_distributed/sharding.py: each replicated head's moves handed to its
holders in turn (round robin per head), another balanced choice the docstring allows.

Only what it writes differently is here: the check runs the solution, then these definitions
over it (EXTENDS, checks/test_alternatives.py).
"""

from __future__ import annotations

EXTENDS = "solutions/card07_distributed/sharding.py"


def reshard_plan(n_kv_heads: int, tp_from: int, tp_to: int) -> list[tuple[int, int, int]]:
    holders = {h: [g for g in range(tp_from) if h in kv_heads_of_rank(n_kv_heads, tp_from, g)] for h in range(n_kv_heads)}
    turn = {h: 0 for h in holders}  # each head's holders take its moves in turn
    plan = []
    for dst in range(tp_to):
        held = kv_heads_of_rank(n_kv_heads, tp_from, dst) if dst < tp_from else []
        for h in kv_heads_of_rank(n_kv_heads, tp_to, dst):
            if h not in held:
                src = holders[h][turn[h] % len(holders[h])]
                turn[h] += 1
                plan.append((h, src, dst))
    return plan


