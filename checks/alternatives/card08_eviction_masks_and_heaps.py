"""A correct alternative to solutions/card08_eviction/eviction.py: a ring buffer that keeps its slot positions in
a tensor and counts what it holds, StreamingLLM as a keep-mask over every position with in-cache positions
from a cumulative sum and SDPA, H2O's heavy hitters by heapq.nlargest, the negative distances by a loop.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.
"""

from __future__ import annotations

import heapq
import math

import torch

REPLACES = "solutions/card08_eviction/eviction.py"


class RingBufferCache:
    def __init__(self, window: int, batch: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.k = torch.zeros(batch, n_kv_heads, window, head_dim, dtype=dtype)  # (B, Hkv, W, D)
        self.v = torch.zeros_like(self.k)
        self.slot_pos = torch.full((window,), -1, dtype=torch.long)  # -1: empty
        self.written = 0

    def update(self, pos: int, k_new: torch.Tensor, v_new: torch.Tensor):
        window = self.k.shape[2]
        slot = pos % window
        self.k[:, :, slot:slot + 1] = k_new  # (B, Hkv, 1, D)
        self.v[:, :, slot:slot + 1] = v_new
        self.slot_pos[slot] = pos
        self.written = min(self.written + 1, window)
        n = self.written
        return self.k.narrow(2, 0, n), self.v.narrow(2, 0, n), self.slot_pos[:n].tolist()


def sink_window_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_sinks: int, window: int,
                       theta: float = 10000.0):
    def rope(x, positions):  # (…, S, D) at positions (S,): half-split, fp32
        inv_freq = theta ** (-torch.arange(0, x.shape[-1], 2, dtype=torch.float32) / x.shape[-1])  # (D/2,)
        angles = positions.float()[:, None] * inv_freq[None, :]  # (S, D/2)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()], -1).to(x.dtype)

    T = k.shape[2]
    # A keep-mask over all T positions; each kept key's in-cache position is how many kept keys precede it.
    pos = torch.arange(T)
    keep = (pos < n_sinks) | (pos >= T - window)  # (T,)
    in_cache = torch.cumsum(keep.long(), 0) - 1  # (T,)
    n = int(keep.sum())
    k_rot = rope(k, in_cache)  # (B, Hkv, T, D): the dropped ones are masked below
    q_rot = rope(q, torch.tensor([n - 1]))
    out = torch.nn.functional.scaled_dot_product_attention(q_rot, k_rot, v, attn_mask=keep[None, :], enable_gqa=True)
    return out, [int(p) for p in pos[keep]]


def heavy_hitter_keep(acc: list[float], slot_pos: list[int], budget: int, recent: int) -> list[int]:
    occupied = sorted((s for s, p in enumerate(slot_pos) if p >= 0), key=lambda s: slot_pos[s])  # oldest first
    if len(occupied) <= budget:
        return sorted(occupied)
    newest = occupied[len(occupied) - recent:] if recent else []
    older = occupied[:len(occupied) - recent]
    heavy = heapq.nlargest(budget - recent, older, key=lambda s: (acc[s], slot_pos[s]))
    return sorted(newest + heavy)


def negative_distance_keys(slot_pos: list[int], query_pos: int) -> list[int]:
    ahead = []
    for slot, p in enumerate(slot_pos):
        if p > query_pos:  # an empty slot's -1 never is
            ahead.append(slot)
    return ahead
