"""A correct alternative to solutions/card08_eviction/eviction.py: the same katas, written another way.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires every
card08 test to pass. Here the ring buffer keeps its slot -> position table in an integer tensor and
returns copies of the occupied slots; sink_window_decode rotates with complex numbers (RoPE as a
multiplication by e^{i·angle}, pairs (x[i], x[i + D/2]) as real and imaginary parts) and lets SDPA do
the grouped-query attention; heavy_hitter_keep ranks every occupied slot once by (recent?, acc,
position); negative_distance_keys compares positions directly.

Shapes: B batch, H query heads, Hkv KV heads, T positions, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REPLACES = "solutions/card08_eviction/eviction.py"


class RingBufferCache:
    """Mistral's rolling buffer cache for one layer: `window` slots, allocated once, reused forever."""

    def __init__(self, window: int, batch: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.k = torch.empty(batch, n_kv_heads, window, head_dim, dtype=dtype)  # (B, Hkv, W, D)
        self.v = torch.empty(batch, n_kv_heads, window, head_dim, dtype=dtype)
        self.positions = torch.full((window,), -1, dtype=torch.long)  # slot -> position, -1 empty
        self.written = 0

    def update(self, pos: int, k_new: torch.Tensor, v_new: torch.Tensor):
        slot = pos % self.positions.numel()
        self.k[:, :, slot:slot + 1].copy_(k_new)
        self.v[:, :, slot:slot + 1].copy_(v_new)
        self.positions[slot] = pos
        self.written = min(self.written + 1, self.positions.numel())
        n = self.written
        return self.k[:, :, :n].clone(), self.v[:, :, :n].clone(), self.positions[:n].tolist()


def sink_window_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_sinks: int, window: int,
                       theta: float = 10000.0):
    """One decode step of StreamingLLM: attention sinks plus a window, under in-cache positions."""
    def rope(x, positions):  # half-split RoPE as a complex rotation, fp32
        D = x.shape[-1]
        inv_freq = 1.0 / theta ** (torch.arange(D // 2, dtype=torch.float32) * 2 / D)  # (D/2,)
        rot = torch.polar(torch.ones(len(positions), D // 2), positions.float()[:, None] * inv_freq)  # (S, D/2)
        z = torch.complex(x[..., : D // 2].float(), x[..., D // 2:].float()) * rot
        return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)

    T = k.shape[2]
    kept = [p for p in range(T) if p < n_sinks or p >= T - window]
    idx = torch.tensor(kept)
    n = len(kept)
    k_rot = rope(k.index_select(2, idx), torch.arange(n))  # (B, Hkv, n, D)
    q_rot = rope(q, torch.tensor([n - 1]))  # (B, H, 1, D)
    out = F.scaled_dot_product_attention(q_rot, k_rot, v.index_select(2, idx), enable_gqa=True)  # (B, H, 1, D)
    return out, kept


def heavy_hitter_keep(acc: list[float], slot_pos: list[int], budget: int, recent: int) -> list[int]:
    """Which slots H2O keeps when the cache must shrink to `budget` entries."""
    occupied = [s for s, p in enumerate(slot_pos) if p >= 0]
    by_age = sorted(occupied, key=lambda s: -slot_pos[s])  # newest first
    protected = set(by_age[:recent])
    ranked = sorted(occupied, key=lambda s: (s in protected, acc[s], slot_pos[s]), reverse=True)
    return sorted(ranked[:budget])


def negative_distance_keys(slot_pos: list[int], query_pos: int) -> list[int]:
    """The slots whose key a query at `query_pos` would see at a negative relative distance."""
    return [s for s in range(len(slot_pos)) if slot_pos[s] > query_pos]
