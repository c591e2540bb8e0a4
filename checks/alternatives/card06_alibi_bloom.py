"""A correct alternative to solutions/card06_positions/alibi.py: BLOOM's build_alibi_tensor form of the slopes (a
base and its powers), and the bias passed to SDPA as a float mask.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.
"""

from __future__ import annotations

import math

import torch

REPLACES = "solutions/card06_positions/alibi.py"


def alibi_slopes(n_heads: int) -> list[float]:
    # BLOOM's build_alibi_tensor: a base and its powers.
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != n_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** p for p in range(1, 2 * (n_heads - closest), 2)]
    return [float(s) for s in slopes]


def alibi_cached_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slopes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k_cache, v_cache = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)  # (B, H, T + 1, D)
    T1 = k_cache.shape[2]
    distance = (T1 - 1) - torch.arange(T1)  # (T + 1,): the new key is at distance 0
    bias = -slopes.float().view(1, -1, 1, 1) * distance.float()  # (1, H, 1, T + 1)
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k_cache.float(), v_cache.float(), attn_mask=bias)
    return out.to(q.dtype), k_cache, v_cache
