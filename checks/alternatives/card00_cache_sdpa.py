"""A correct alternative to solutions/card00_cache_contract/cache.py: repeat_kv by index_select, attend through
PyTorch's SDPA with a boolean mask from the positions, a growing cache that counts its positions, a static
cache that writes with index_put_ and keeps its length as a 0-d tensor from the start, decode_step's position
from the last layer's cache.

Only what it writes differently is here: the check runs the solution, then these definitions
over it (EXTENDS, checks/test_alternatives.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXTENDS = "solutions/card00_cache_contract/cache.py"


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    G = n_heads // x.shape[1]
    return torch.index_select(x, 1, torch.arange(n_heads, device=x.device) // G)  # (B, H, T, D): heads hG .. hG+G-1 <- KV head h


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
    S, T = q.shape[2], k.shape[2]
    if input_pos is None:
        input_pos = torch.arange(T - S, T, device=q.device)  # the last S of the T positions
    q_pos = input_pos[:, None]  # (S, 1): where each query sits
    k_pos = torch.arange(T, device=q.device)[None, :]  # (1, T): slot j holds position j
    # PyTorch's fused attention with a boolean mask (True = may read); enable_gqa shares each KV head.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos, enable_gqa=True)  # (B, H, S, D)


class GrowingKVCache:
    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.n = 0

    @property
    def seq_len(self) -> int:
        return self.n

    def update(self, input_pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
        if self.k is None:
            self.k, self.v = k_new, v_new
        else:
            self.k = torch.cat([self.k, k_new], dim=2)  # (B, Hkv, T + S, D)
            self.v = torch.cat([self.v, v_new], dim=2)
        self.n += k_new.shape[2]
        return self.k, self.v


class StaticKVCache:
    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.k = torch.zeros(batch, n_kv_heads, max_seq_len, head_dim, dtype=dtype)
        self.v = torch.zeros(batch, n_kv_heads, max_seq_len, head_dim, dtype=dtype)
        self.end = torch.zeros((), dtype=torch.long)  # position written + 1, as a tensor; None before any write

    @property
    def seq_len(self) -> int:
        return 0 if self.end is None else int(self.end)  # the host reads it between steps, not in update

    def update(self, input_pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
        self.k.index_put_((torch.arange(self.k.shape[0])[:, None, None], torch.arange(self.k.shape[1])[None, :, None], input_pos[None, None, :]), k_new)  # (B, Hkv, S, D): entry i into slot input_pos[i]
        self.v[:, :, input_pos] = v_new
        self.end = input_pos.max() + 1  # the last position written ends the sequence; stays a tensor
        return self.k, self.v  # (B, Hkv, max_seq_len, D): the same shape at every step


def decode_step(model, ids: torch.Tensor, caches: list) -> torch.Tensor:
    input_pos = torch.arange(caches[-1].seq_len, caches[-1].seq_len + 1)  # T cached: positions 0 .. T-1, the new one is T
    return model(ids, input_pos, caches)[:, -1]
