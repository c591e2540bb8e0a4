"""A correct alternative to solutions/card06_positions/rope.py: inverse frequencies from Python's float pow, and
the relative score with both vectors rotated at absolute positions.

Only what it writes differently is here: the check runs the solution, then these definitions
over it (EXTENDS, checks/test_alternatives.py).
"""

from __future__ import annotations


import torch


EXTENDS = "solutions/card06_positions/rope.py"


def rope_rotate(x: torch.Tensor, input_pos: torch.Tensor, theta: float = 10000.0, convention: str = "half",
                rotary_dim: int | None = None) -> torch.Tensor:
    r = x.shape[-1] if rotary_dim is None else rotary_dim
    inv_freq = torch.tensor([theta ** (-2 * i / r) for i in range(r // 2)], dtype=torch.float32)  # (r/2,)
    angles = input_pos.float()[:, None] * inv_freq  # (S, r/2)
    cos, sin = angles.cos(), angles.sin()
    xf = x.float()
    if convention == "half":  # dimension j pairs with j + r/2
        a, b = xf[..., : r // 2], xf[..., r // 2: r]  # (..., S, r/2) each
        out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    else:  # "interleaved": dimension 2j pairs with 2j + 1
        a, b = xf[..., 0:r:2], xf[..., 1:r:2]
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([out, xf[..., r:]], dim=-1).to(x.dtype)


def rope_relative_score(q: torch.Tensor, k: torch.Tensor, distance: int, theta: float = 10000.0,
                        convention: str = "half") -> torch.Tensor:
    n = max(0, -distance)  # a key position with the query's position m = n + distance >= 0
    q_at = rope_rotate(q.float()[:, None, :], torch.tensor([n + distance]), theta, convention)[:, 0]
    k_at = rope_rotate(k.float()[:, None, :], torch.tensor([n]), theta, convention)[:, 0]
    return (q_at * k_at).sum(-1)


