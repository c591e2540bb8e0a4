"""Spoiler for card06: rotary position embedding, both conventions, re-rotation (and the RoPE of kvref's model).

Half-split convention (GPT-NeoX, Hugging Face's Llama): dimension i of the first half pairs with
dimension i + r/2. Interleaved convention (GPT-J, the RoFormer paper, Meta's reference Llama,
whose `apply_rotary_emb` views adjacent pairs as complex numbers): dimension 2i pairs with
2i + 1. Either way pair i is rotated by the angle pos · θ^(-2i/r), where r is the number of
rotated dimensions (r = D, or r < D for partial rotary, whose last D - r dimensions pass
through unrotated). The two conventions give different numbers for the same weights: Hugging
Face's Llama conversion script permutes the rows of wq and wk so that its half-split
`rotate_half` computes what Meta's interleaved code does on the original checkpoint. A model is
"half-split" or "interleaved" only together with the layout of its weights.

`rope_cos_sin`, `rotate_half` and `apply_rope` are what kvref's model runs (half-split, all D
dimensions, in the activations' dtype). `rope_tables`, `rope_apply`, `rope_rotate` and
`rope_rerotate` add the GPT-J convention, partial rotary and a computation in at least fp32
whatever the input dtype; card06's katas ask for them.
"""

from __future__ import annotations

import torch

CONVENTIONS = ("half", "interleaved")


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


# --- both conventions, partial rotary, fp32 ---------------------------------------------------

def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """The interleaved partner of each element: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1)  # (..., r/2, 2)
    return pairs.flatten(-2)  # (..., r)


def _check(convention: str, rotary_dim: int, theta: float) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool) or rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even int (dimensions rotate in pairs), got {rotary_dim!r}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta!r}")


def rope_inv_freq(rotary_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[r/2]` angular frequencies θ^(-2i/r), i = 0 .. r/2 - 1, highest first (as Llama and GPT-J compute them)."""
    _check("half", rotary_dim, theta)
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=dtype) / rotary_dim)


def rope_tables(input_pos: torch.Tensor, rotary_dim: int, theta: float = 10000.0, convention: str = "half",
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[S, r]` for positions `input_pos` `[S]`, laid out for `convention`.

    Angles are pos · inv_freq in fp32 (positions as fp32, as Llama and GPT-J do: exact up to
    2^24). `dtype` float64 computes them in float64 instead.
    """
    _check(convention, rotary_dim, theta)
    if input_pos.ndim != 1 or input_pos.is_floating_point():
        raise ValueError(f"input_pos must be a 1-D integer tensor of positions, got {input_pos.dtype} {list(input_pos.shape)}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = rope_inv_freq(rotary_dim, theta, work)
    angles = input_pos.to(work)[:, None] * inv_freq[None, :]  # (S, r/2)
    if convention == "half":
        angles = torch.cat([angles, angles], dim=-1)  # (S, r): i pairs with i + r/2
    else:
        angles = angles.repeat_interleave(2, dim=-1)  # (S, r): 2i pairs with 2i + 1
    return angles.cos(), angles.sin()


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, convention: str = "half") -> torch.Tensor:
    """Rotate the first r = cos.shape[-1] dimensions of `x` `[..., S, D]`; the rest pass through.

    Computes in cos's dtype (fp32 or float64) and returns x's dtype. Only this function touches
    x's elements: 2 multiplies and 1 add per rotated element (the sign flip is not arithmetic).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    r = cos.shape[-1]
    if x.shape[-1] < r or cos.shape != sin.shape or x.shape[-2] != cos.shape[-2]:
        raise ValueError(f"x {list(x.shape)} needs S = {cos.shape[-2]} positions and at least {r} dimensions "
                         f"for tables {list(cos.shape)}")
    partner = rotate_half if convention == "half" else rotate_every_two
    xf = x.to(cos.dtype)
    x_rot, x_pass = xf[..., :r], xf[..., r:]
    out = x_rot * cos + partner(x_rot) * sin  # (..., S, r)
    return torch.cat([out, x_pass], dim=-1).to(x.dtype)


def rope_rotate(x: torch.Tensor, input_pos: torch.Tensor, theta: float = 10000.0, convention: str = "half",
                rotary_dim: int | None = None) -> torch.Tensor:
    """`x` `[..., S, D]` rotated by the positions `input_pos` `[S]`, computed in (at least) fp32, in x's dtype."""
    r = x.shape[-1] if rotary_dim is None else rotary_dim
    if r > x.shape[-1]:
        raise ValueError(f"rotary_dim {r} exceeds the head dim {x.shape[-1]}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = rope_tables(input_pos.to(x.device), r, theta, convention, dtype)
    return rope_apply(x, cos, sin, convention)


def rope_rerotate(k_rot: torch.Tensor, delta: int | torch.Tensor, theta: float = 10000.0, convention: str = "half",
                  rotary_dim: int | None = None) -> torch.Tensor:
    """Keys `[..., S, D]` already rotated at positions p, moved to p + delta: R(p + Δ) = R(Δ) R(p).

    `delta` is an int (every key moves by it) or a `[S]` integer tensor; negative moves keys back
    (what a cache with sinks does to the keys it keeps when it evicts the ones before them).
    """
    S = k_rot.shape[-2]
    delta = torch.full((S,), delta, dtype=torch.long) if isinstance(delta, int) else delta
    return rope_rotate(k_rot, delta, theta, convention, rotary_dim)
