"""A correct alternative to solutions/card06_positions/rope.py: Hugging Face's rotate_half form for the half
convention, Meta's complex multiplication for the interleaved one, inverse frequencies in float64, angles by
torch.outer, the relative score with the key rotated back instead of the query forward, decode attention
through SDPA, the re-rotation's positions by expand, the FLOPs counted per pair.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The solution's docstring follows.

card06: rotary position embedding (RoPE) and the KV cache.

RoPE puts a token's position into its query and key by rotating them: dimensions are taken
in pairs, and pair i of a vector at position p is rotated by the angle p · θ^(-2i/r), where
θ is the base (`theta`, 10000 in Llama-2, 500000 in Llama-3) and r the number of rotated
dimensions (`rotary_dim`: all D by default; "partial rotary" rotates only the first r and
lets the other D - r dimensions pass through unchanged). Frequencies fall with i: pair 0
turns fastest, by 1 radian per position.

Which dimensions form a pair is a convention, and the two conventions give different numbers
for the same vector:
- "half" (half-split; Llama, GPT-NeoX, Hugging Face): dimension j pairs with j + r/2, for
  j < r/2, and that pair is pair j;
- "interleaved" (GPT-J, the RoFormer paper): dimension 2j pairs with 2j + 1, pair j.
A pair (a, b) rotated by angle φ becomes (a·cos φ - b·sin φ, a·sin φ + b·cos φ), the first
element of the pair being the lower dimension.

Precision: compute the angles, their cos and sin and the rotation in fp32 whatever the input
dtype (bf16, fp16, fp32), and return a tensor of the input's dtype. Positions are integers.

Shapes: B batch, H heads, S positions, T cached positions, D head dim. q, k, v of one layer
are `[B, H, S, D]` (the same H for queries and keys here), positions `[S]`.
"""

from __future__ import annotations

import math

import torch

from kvref.config import ModelConfig

REPLACES = "solutions/card06_positions/rope.py"


def rope_rotate(x: torch.Tensor, input_pos: torch.Tensor, theta: float = 10000.0, convention: str = "half",
                rotary_dim: int | None = None) -> torch.Tensor:
    """`x` `[..., S, D]` with row s rotated by position `input_pos[s]` (`input_pos`: `[S]` integers).

    `convention` is "half" or "interleaved" (see the module docstring); `rotary_dim` (even,
    at most D; None means D) is how many leading dimensions rotate. Pair i turns by
    input_pos[s] · theta^(-2i/rotary_dim). Compute in fp32; return x's shape and dtype.
    """
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
    """The scores q_m · k_n, `[N]` fp32, of N query/key pairs `[N, D]` for query position m and key position n.

    The claim to make concrete: with RoPE the score depends on the positions only through
    `distance` = m - n (positive: the key is in the query's past). Return the score that
    every (m, n) with m - n = distance gives, for each of the N pairs (row i of q with row i
    of k), both vectors rotated over all D dimensions in `convention` with base `theta`.
    """
    # The same score with the query at 0 and the key at -distance.
    k_at = rope_rotate(k[:, None, :], torch.tensor([-distance]), theta, convention)[:, 0]  # (N, D)
    return torch.einsum('nd,nd->n', q.float(), k_at.float())


def rope_cached_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, pos: int, theta: float = 10000.0,
                       convention: str = "half") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step of one attention layer whose cache holds keys already rotated. Returns (out, k_cache, v_cache).

    q, k, v `[B, H, 1, D]`: the new token's query, key and value, as projected (not rotated),
    at absolute position `pos` (an int). k_cache, v_cache `[B, H, T, D]`: the keys and values
    of the T positions just before it, pos - T .. pos - 1, in that order; each key was rotated
    once, by its own absolute position, when it was written (T may be 0, and T may be less
    than pos: a sliding window drops the oldest entries, so a slot index is not a position).

    Rotate what needs rotating (convention and theta as given, all D dimensions), append the
    new key and value, and attend: out `[B, H, 1, D]` = softmax(q · kᵀ / sqrt(D)) · v over
    the T + 1 keys, softmax in fp32, out in q's dtype. Return the caches `[B, H, T + 1, D]`:
    the old entries unchanged, then the new one.
    """
    where = torch.tensor([pos])
    q, k = rope_rotate(q, where, theta, convention), rope_rotate(k, where, theta, convention)
    k_cache, v_cache = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)  # (B, H, T + 1, D)
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k_cache.float(), v_cache.float())  # (B, H, 1, D)
    return out.to(q.dtype), k_cache, v_cache


def rope_rerotate(k_rot: torch.Tensor, delta: int, theta: float = 10000.0, convention: str = "half",
                  rotary_dim: int | None = None) -> torch.Tensor:
    """Keys `[..., S, D]` that were rotated at positions p (whatever they were), moved to positions p + delta.

    A cache that evicts tokens and renumbers the ones it keeps (StreamingLLM's "positions
    within the cache") must move each kept key from its old position to its new one without
    the raw key, which it no longer has. `delta` is an int, negative to move keys back. The
    result must equal the raw key rotated at p + delta. Same convention, theta and
    rotary_dim as the keys were rotated with; fp32 computation, k_rot's dtype.
    """
    return rope_rotate(k_rot, torch.tensor([delta]).expand(k_rot.shape[-2]), theta, convention, rotary_dim)


def rope_decode_flops(cfg: ModelConfig, batch: int, rotary_dim: int | None = None) -> int:
    """FLOPs that RoPE adds to one cached decode step of the whole model (one new token per sequence).

    Count multiplies and adds on the elements of the vectors being rotated, in every layer,
    for every sequence of the batch (rotary_dim: the rotated dimensions of each head, None
    meaning cfg.head_dim; pass-through dimensions cost nothing). A rotated element costs what
    x·cos ± partner·sin costs; the partner's sign flip is not arithmetic. The cos/sin tables
    depend only on the position: an engine builds them once per step for all layers and
    heads, or once for all positions; do not count them. Which vectors are rotated at a
    decode step with a cache: the new token's queries and keys, or the cached ones too?
    Check: Llama-3-8B (32 layers, 32 query heads, 8 KV heads, head dim 128), batch 1.

    Closed form: measuring it (running a model or a cache, FlopCounterMode, hooks, kvref's answers) is refused.
    """
    r = cfg.head_dim if rotary_dim is None else rotary_dim
    pairs = r // 2 * (cfg.n_heads + cfg.n_kv_heads)  # per layer per sequence
    return batch * cfg.n_layers * pairs * 6  # each pair: 4 multiplies, 2 adds
