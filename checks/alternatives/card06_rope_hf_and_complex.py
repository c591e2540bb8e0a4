"""A correct alternative to solutions/card06_positions/rope.py: Hugging Face's rotate_half form for the half
convention, Meta's complex multiplication for the interleaved one, inverse frequencies in float64, angles by
torch.outer, the relative score with the key rotated back instead of the query forward, decode attention
through SDPA, the re-rotation's positions by expand, the FLOPs counted per pair.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

Which dimensions form a pair is a convention, and the two conventions give different numbers
for the same vector:
- "half" (half-split; Llama, GPT-NeoX, Hugging Face): dimension j pairs with j + r/2, for
  j < r/2, and that pair is pair j;
- "interleaved" (GPT-J, the RoFormer paper): dimension 2j pairs with 2j + 1, pair j.
A pair (a, b) rotated by angle φ becomes (a·cos φ - b·sin φ, a·sin φ + b·cos φ), the first
element of the pair being the lower dimension.
"""

from __future__ import annotations

import math

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card06_positions/rope.py"


def rope_rotate(x: torch.Tensor, input_pos: torch.Tensor, theta: float = 10000.0, convention: str = "half",
                rotary_dim: int | None = None) -> torch.Tensor:
    r = x.shape[-1] if rotary_dim is None else rotary_dim
    inv_freq = (theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)).float()  # (r/2,)
    angles = torch.outer(input_pos.to(torch.float32), inv_freq)  # (S, r/2)
    cos, sin = angles.cos(), angles.sin()
    xf = x.float()
    if convention == "half":  # dimension j pairs with j + r/2
        # Hugging Face's form: x·cos + rotate_half(x)·sin, with each angle repeated over both halves.
        cos2, sin2 = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)  # (S, r)
        rot = xf[..., :r]
        rotated_half = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], dim=-1)
        out = rot * cos2 + rotated_half * sin2
    else:  # "interleaved": dimension 2j pairs with 2j + 1
        # Meta's Llama code: pairs as complex numbers, times e^(i·angle).
        pairs = torch.view_as_complex(xf[..., :r].reshape(*xf.shape[:-1], r // 2, 2).contiguous())  # (..., S, r/2)
        out = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    return torch.cat([out, xf[..., r:]], dim=-1).to(x.dtype)


def rope_relative_score(q: torch.Tensor, k: torch.Tensor, distance: int, theta: float = 10000.0,
                        convention: str = "half") -> torch.Tensor:
    # The same score with the query at 0 and the key at -distance.
    k_at = rope_rotate(k[:, None, :], torch.tensor([-distance]), theta, convention)[:, 0]  # (N, D)
    return torch.einsum('nd,nd->n', q.float(), k_at.float())


def rope_cached_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, pos: int, theta: float = 10000.0,
                       convention: str = "half") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    where = torch.tensor([pos])
    q, k = rope_rotate(q, where, theta, convention), rope_rotate(k, where, theta, convention)
    k_cache, v_cache = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)  # (B, H, T + 1, D)
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k_cache.float(), v_cache.float())  # (B, H, 1, D)
    return out.to(q.dtype), k_cache, v_cache


def rope_rerotate(k_rot: torch.Tensor, delta: int, theta: float = 10000.0, convention: str = "half",
                  rotary_dim: int | None = None) -> torch.Tensor:
    return rope_rotate(k_rot, torch.tensor([delta]).expand(k_rot.shape[-2]), theta, convention, rotary_dim)


def rope_decode_flops(cfg: ModelConfig, batch: int, rotary_dim: int | None = None) -> int:
    r = cfg.head_dim if rotary_dim is None else rotary_dim
    pairs = r // 2 * (cfg.n_heads + cfg.n_kv_heads)  # per layer per sequence
    return batch * cfg.n_layers * pairs * 6  # each pair: 4 multiplies, 2 adds
