"""Spoiler for card06: ALiBi slopes and biases (Press, Smith and Lewis 2022, "Train Short, Test Long", §3).

ALiBi adds no position to q or k. Query i's score against key j gets the bias -m_h · (i - j),
where m_h is head h's slope; keys in the cache are stored raw, so a cache shifted or windowed
keeps every entry valid: only distances matter, and they are computed at attention time.

Slopes: for n a power of two, the geometric sequence starting at and stepping by 2^(-8/n)
(8 heads: 1/2, 1/4, ..., 1/256). For other n, the paper's reference code (and BLOOM's
`build_alibi_tensor`) takes the 2^⌊log2 n⌋ slopes of the nearest lower power of two, then the
first n - 2^⌊log2 n⌋ of every other slope (indices 0, 2, 4, ...) of the 2·2^⌊log2 n⌋ sequence.
"""

from __future__ import annotations

import math

import torch


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """`[H]` fp32 slopes m_h, head 0 first (the steepest)."""
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
    low = 2 ** math.floor(math.log2(n_heads))
    slopes = _power_of_two_slopes(low) + _power_of_two_slopes(2 * low)[0::2][: n_heads - low]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """`[H, S, T]` biases -m_h · (q_pos[i] - k_pos[j]) (fp32) for queries `[S]` and keys `[T]` at those positions.

    Keys after a query get a positive bias here: the causal mask, not ALiBi, removes them.
    """
    if slopes.ndim != 1 or q_pos.ndim != 1 or k_pos.ndim != 1:
        raise ValueError("slopes, q_pos and k_pos must be 1-D")
    distance = (q_pos[:, None] - k_pos[None, :]).to(torch.float32)  # (S, T)
    return -slopes.to(torch.float32)[:, None, None] * distance[None]  # (H, S, T)


def alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                    q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention `[B, H, S, D]` with ALiBi, for queries and keys at the given positions.

    q `[B, H, S, D]`, k and v `[B, H, T, D]` (raw keys: no rotation); a key is visible to a query
    when k_pos <= q_pos. Scores are scaled by 1/sqrt(D) as in BLOOM; softmax in fp32.
    """
    B, H, S, D = q.shape
    if k.shape[:2] != (B, H) or k.shape != v.shape or k.shape[-1] != D or slopes.shape != (H,):
        raise ValueError(f"shapes do not match: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, "
                         f"slopes {list(slopes.shape)}")
    if q_pos.shape != (S,) or k_pos.shape != (k.shape[2],):
        raise ValueError(f"q_pos must be [{S}] and k_pos [{k.shape[2]}]")
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(D)  # (B, H, S, T)
    scores = scores + alibi_bias(slopes, q_pos, k_pos)
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)  # (B, H, S, D)
