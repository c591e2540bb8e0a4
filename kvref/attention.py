"""Spoiler for card00: the `repeat_kv` and `attend` that card00's katas ask for (read it after you pass).

Causal attention with grouped KV heads (MHA, GQA, MQA), written out in full.

Shapes: q `[B, H, S, D]` holds S new positions; k and v `[B, Hkv, T, D]` hold T slots, slot j
holding position j. Without `input_pos`, the queries are the last S of the T positions (a
prompt, a chunk, or a decode step over a growing cache). With `input_pos` `[S]`, query i sits
at position input_pos[i], in any order, and k and v may be a static cache's whole buffers
(T = max_seq_len): slots past a query's position hold zeros never written or stale keys of a
rolled-back draft, and the mask, built from the positions, hides them. This is how gpt-fast
(`mask = causal_mask[None, None, input_pos]`) and transformers' StaticCache attend over a
buffer whose shape never changes. Query head h reads KV head h // G, where G = H // Hkv
(MHA: G = 1; MQA: Hkv = 1).
"""

from __future__ import annotations

import math

import torch

from kvref.validate import check_tensor


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Expand `[B, Hkv, T, D]` to `[B, H, T, D]` so that head h holds KV head h // G."""
    check_tensor("x", x, ndim=4)
    n_kv_heads = x.shape[1]
    if n_heads % n_kv_heads != 0:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of the KV heads in x ({n_kv_heads})")
    # repeat_interleave, not repeat: heads 0..G-1 share KV head 0, and so on.
    return x.repeat_interleave(n_heads // n_kv_heads, dim=1)  # (B, H, T, D)


def causal_mask(s: int, t: int, device=None) -> torch.Tensor:
    """`[S, T]` booleans, True where query i (at position t - s + i) may read key j."""
    if not 1 <= s <= t:
        raise ValueError(f"need 1 <= S <= T for S new queries over T keys, got S={s}, T={t}")
    q_pos = torch.arange(t - s, t, device=device)[:, None]  # (S, 1)
    k_pos = torch.arange(t, device=device)[None, :]  # (1, T)
    return k_pos <= q_pos  # (S, T)


def position_mask(input_pos: torch.Tensor, t: int) -> torch.Tensor:
    """`[S, T]` booleans, True where the query at position input_pos[i] may read slot j: j <= input_pos[i].

    Built on the positions' device from their values, without reading them back to the host.
    """
    check_tensor("input_pos", input_pos, ndim=1, layout="[S]")
    if input_pos.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_pos must hold integer positions, got dtype {input_pos.dtype}")
    k_pos = torch.arange(t, device=input_pos.device)[None, :]  # (1, T): slot j holds position j
    return k_pos <= input_pos[:, None]  # (S, T)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention of S new queries over T key slots.

    Without `input_pos`: the queries are the last S of the T positions. With `input_pos` `[S]`:
    query i sits at position input_pos[i] and reads slots 0 .. input_pos[i] only, so k and v
    may be a static cache's whole buffers.
    """
    check_tensor("q", q, ndim=4)
    B, H, S, D = q.shape
    check_tensor("k", k, shape=(B, None, None, D), dtype=q.dtype, device=q.device)
    Hkv, T = k.shape[1], k.shape[2]
    check_tensor("v", v, shape=(B, Hkv, T, D), dtype=q.dtype, device=q.device)
    if H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({Hkv})")
    if input_pos is None:
        allowed = causal_mask(S, T, q.device)  # (S, T)
    else:
        check_tensor("input_pos", input_pos, shape=(S,), device=q.device, layout="[S]")
        allowed = position_mask(input_pos, T)  # (S, T)
    k, v = repeat_kv(k, H), repeat_kv(v, H)  # (B, H, T, D)
    # Scaled after the product, in q's dtype: in fp16 a score can overflow (past 65504) before the
    # 1/sqrt(D); kernels that fold the scale into q first, or accumulate in fp32, avoid that.
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, S, T)
    # masked_fill, not an added -inf: a masked slot's weight is exactly 0 whatever its score.
    scores = scores.masked_fill(~allowed, float("-inf"))
    # torch.softmax subtracts each row's maximum before exp: scores reach the hundreds, exp(89) overflows fp32.
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v  # (B, H, S, D)
