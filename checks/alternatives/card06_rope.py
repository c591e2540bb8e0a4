"""A correct alternative to solutions/card06_positions/rope.py: the same katas, other algebra.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every card06 test to pass. Here the frequencies come from exp/log, the half-split rotation is
written as Hugging Face writes it (x·cos + rotate_half(x)·sin with cos and sin repeated), the
interleaved one with complex numbers; the relative score rotates q and k at m = distance + 3 and
n = 3; cached decoding writes its softmax by hand; re-rotation passes one position that broadcasts
over the rows; the FLOPs are counted per pair (6 a pair: 4 multiplies, 2 adds).
"""

from __future__ import annotations

import math

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card06_positions/rope.py"


def _cos_sin(input_pos: torch.Tensor, r: int, theta: float):
    i = torch.arange(r // 2, dtype=torch.float32)
    inv_freq = torch.exp(-math.log(theta) * (2 * i / r))  # theta^(-2i/r), (r/2,)
    angles = torch.outer(input_pos.to(torch.float32), inv_freq)  # (S, r/2)
    return angles.cos(), angles.sin()


def rope_rotate(x: torch.Tensor, input_pos: torch.Tensor, theta: float = 10000.0, convention: str = "half",
                rotary_dim: int | None = None) -> torch.Tensor:
    r = rotary_dim or x.shape[-1]
    rot, rest = x[..., :r].to(torch.float32), x[..., r:]
    cos, sin = _cos_sin(input_pos, r, theta)
    if convention == "interleaved":
        z = torch.view_as_complex(rot.unflatten(-1, (r // 2, 2)).contiguous())  # (..., S, r/2) complex
        out = torch.view_as_real(z * torch.complex(cos, sin)).flatten(-2)
    else:
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # (S, r)
        rotate_half = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], dim=-1)
        out = rot * cos + rotate_half * sin
    return torch.cat([out.to(x.dtype), rest], dim=-1)


def rope_relative_score(q: torch.Tensor, k: torch.Tensor, distance: int, theta: float = 10000.0,
                        convention: str = "half") -> torch.Tensor:
    n = 3
    q_m = rope_rotate(q.float().unsqueeze(-2), torch.tensor([n + distance]), theta, convention).squeeze(-2)
    k_n = rope_rotate(k.float().unsqueeze(-2), torch.tensor([n]), theta, convention).squeeze(-2)
    return torch.einsum("nd,nd->n", q_m, k_n)


def rope_cached_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, pos: int, theta: float = 10000.0,
                       convention: str = "half") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    at = torch.tensor([pos])
    k_new = rope_rotate(k, at, theta, convention)
    k_all = torch.cat((k_cache, k_new), dim=-2)  # (B, H, T + 1, D)
    v_all = torch.cat((v_cache, v), dim=-2)
    q32 = rope_rotate(q.float(), at, theta, convention)
    scores = torch.einsum("bhsd,bhtd->bhst", q32, k_all.float()) * q.shape[-1] ** -0.5  # (B, H, 1, T + 1)
    w = (scores - scores.amax(-1, keepdim=True)).exp()
    out = torch.einsum("bhst,bhtd->bhsd", w / w.sum(-1, keepdim=True), v_all.float())
    return out.to(q.dtype), k_all, v_all


def rope_rerotate(k_rot: torch.Tensor, delta: int, theta: float = 10000.0, convention: str = "half",
                  rotary_dim: int | None = None) -> torch.Tensor:
    return rope_rotate(k_rot, torch.tensor([delta]), theta, convention, rotary_dim)  # one angle for every row


def rope_decode_flops(cfg: ModelConfig, batch: int, rotary_dim: int | None = None) -> int:
    pairs = (rotary_dim if rotary_dim is not None else cfg.head_dim) // 2
    vectors = batch * cfg.n_layers * (cfg.n_heads + cfg.n_kv_heads)  # the new q and k heads, every layer
    return vectors * pairs * 6
