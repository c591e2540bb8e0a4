"""Rotary position embedding, half-split convention (Llama, GPT-NeoX, Hugging Face).

Dimension i of the first half pairs with dimension i + D/2; the pair is rotated by angle
pos · θ^(-2i/D). (The interleaved convention of GPT-J pairs 2i with 2i+1 instead and gives
different numbers for the same weights.)
"""

from __future__ import annotations

import torch


def rope_cos_sin(input_pos: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `[S, D]` for absolute positions `input_pos` `[S]`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=input_pos.device) / head_dim)
    angles = input_pos.float()[:, None] * inv_freq[None, :]  # (S, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, D): both halves of a pair share an angle
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, H, S, D]` by the angles of its S positions."""
    return x * cos + rotate_half(x) * sin
