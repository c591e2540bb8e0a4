"""A correct alternative to solutions/card06_positions/alibi.py: the same katas, other algebra.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every card06 test to pass. Here the slopes are computed as BLOOM's build_alibi_tensor does (powers
of a base), and the decode step measures distances from one past the new key (T + 1 .. 1, not T .. 0):
a bias that moves every score of a head by the same amount leaves its softmax unchanged.
"""

from __future__ import annotations

import math

import torch

REPLACES = "solutions/card06_positions/alibi.py"


def alibi_slopes(n_heads: int) -> list[float]:
    closest = 2 ** int(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != n_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** p for p in range(1, 1 + 2 * (n_heads - closest), 2)]
    return slopes


def alibi_cached_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slopes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k_all, v_all = torch.cat((k_cache, k), dim=-2), torch.cat((v_cache, v), dim=-2)  # (B, H, T + 1, D)
    n = k_all.shape[-2]
    distance = n - torch.arange(n, dtype=torch.float32)  # T + 1 .. 1: one more than the true distance, for every key
    bias = -slopes.float().view(-1, 1, 1) * distance  # (H, 1, T + 1)
    scores = torch.einsum("bhsd,bhtd->bhst", q.float(), k_all.float()) / math.sqrt(q.shape[-1]) + bias
    out = torch.softmax(scores, dim=-1) @ v_all.float()
    return out.to(q.dtype), k_all, v_all
