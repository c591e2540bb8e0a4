"""A correct alternative to solutions/card00_cache_contract/cache.py: repeat_kv that returns its input untouched
for MHA, a torch.where mask, the softmax taken one query row at a time, a static cache written through an
ellipsis index, the logits squeezed rather than indexed.

Only what it writes differently is here: the check runs the solution, then these definitions
over it (EXTENDS, checks/test_alternatives.py).
"""

from __future__ import annotations

import math

import torch

EXTENDS = "solutions/card00_cache_contract/cache.py"


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    G = n_heads // x.shape[1]
    return x if G == 1 else x.repeat_interleave(G, dim=1)  # (B, H, T, D): heads hG .. hG+G-1 <- KV head h


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
    H, S, D = q.shape[1], q.shape[2], q.shape[3]
    T = k.shape[2]
    k, v = repeat_kv(k, H), repeat_kv(v, H)  # (B, H, T, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, S, T)
    if input_pos is None:
        input_pos = torch.arange(T - S, T, device=q.device)  # the last S of the T positions
    q_pos = input_pos[:, None]  # (S, 1): where each query sits
    k_pos = torch.arange(T, device=q.device)[None, :]  # (1, T): slot j holds position j
    scores = torch.where(k_pos > q_pos, float("-inf"), scores)  # a later slot: not yet, or stale
    return torch.cat([torch.softmax(scores[:, :, i:i + 1], dim=-1) @ v for i in range(S)], dim=2)


class StaticKVCache:
    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.k = torch.zeros(batch, n_kv_heads, max_seq_len, head_dim, dtype=dtype)
        self.v = torch.zeros(batch, n_kv_heads, max_seq_len, head_dim, dtype=dtype)
        self.end = None  # the last position written + 1, as a tensor; None before any write

    @property
    def seq_len(self) -> int:
        return 0 if self.end is None else int(self.end)  # the host reads it between steps, not in update

    def update(self, input_pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
        self.k[..., input_pos, :] = k_new  # (B, Hkv, S, D): entry i into slot input_pos[i]
        self.v[:, :, input_pos] = v_new
        self.end = input_pos.max() + 1  # the last position written ends the sequence; stays a tensor
        return self.k, self.v  # (B, Hkv, max_seq_len, D): the same shape at every step


def decode_step(model, ids: torch.Tensor, caches: list) -> torch.Tensor:
    input_pos = torch.tensor([caches[0].seq_len], device=ids.device)  # T cached: positions 0 .. T-1, the new one is T
    return model(ids, input_pos, caches).squeeze(1)
