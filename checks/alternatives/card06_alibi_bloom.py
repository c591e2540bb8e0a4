"""A correct alternative to solutions/card06_positions/alibi.py: BLOOM's build_alibi_tensor form of the slopes (a
base and its powers), and the bias passed to SDPA as a float mask.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The solution's docstring follows.

card06: ALiBi (attention with linear biases) and the KV cache.

ALiBi puts no position into q or k. Instead, query i's score against key j gets a bias
-m_h · (i - j) that grows linearly with their distance, with one slope m_h per head h (Press,
Smith and Lewis 2022, "Train Short, Test Long", §3). Keys are cached raw.

Slopes, for n heads, head 0 first: when n is a power of two, the geometric sequence whose
first term and ratio are both 2^(-8/n) (8 heads: 1/2, 1/4, ..., 1/256). When it is not, the
paper's code (and BLOOM's `build_alibi_tensor`) takes the slopes of the nearest lower power
of two, p = 2^⌊log2 n⌋, then the first n - p of the slopes at even indices (0, 2, 4, ...) of
the 2p-head sequence.

Shapes: B batch, H heads, T cached positions, D head dim; q, k, v `[B, H, 1, D]`.
"""

from __future__ import annotations

import math

import torch

REPLACES = "solutions/card06_positions/alibi.py"


def alibi_slopes(n_heads: int) -> list[float]:
    """The ALiBi slope of each of `n_heads` heads, head 0 first, as Python floats.

    Check: 8 heads give 0.5, 0.25, ..., 1/256. What do 12 heads (not a power of two) give?

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
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
    """One decode step of one ALiBi attention layer. Returns (out, k_cache, v_cache).

    q, k, v `[B, H, 1, D]`: the new token's projections. k_cache, v_cache `[B, H, T, D]`: the
    T positions just before the new token, oldest first (T may be 0; a sliding window may
    have dropped older positions, so the cache need not start at position 0, and nobody
    tells you where it starts). slopes `[H]` fp32.

    Attend the new query over the T cached keys and its own key with scores
    q · kᵀ / sqrt(D) - slope_h · distance (softmax in fp32, out `[B, H, 1, D]` in q's dtype).
    Return the caches `[B, H, T + 1, D]` with the new key and value appended as they came.
    """
    k_cache, v_cache = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)  # (B, H, T + 1, D)
    T1 = k_cache.shape[2]
    distance = (T1 - 1) - torch.arange(T1)  # (T + 1,): the new key is at distance 0
    bias = -slopes.float().view(1, -1, 1, 1) * distance.float()  # (1, H, 1, T + 1)
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k_cache.float(), v_cache.float(), attn_mask=bias)
    return out.to(q.dtype), k_cache, v_cache
