"""A correct alternative to solutions/card08_eviction/eviction.py: a ring buffer that keeps its slot positions in
a tensor and counts what it holds, StreamingLLM as a keep-mask over every position with in-cache positions
from a cumulative sum and SDPA, H2O's heavy hitters by heapq.nlargest, the negative distances by a loop.

checks/test_alternatives.py puts this module in place of the solution (`REPLACES`) and requires
every test of the card to pass.

The solution's docstring follows.

card08: the eviction strategy dilemma.

A cache with a fixed number of slots must drop entries once the context outgrows it. Which entries
(policy), and at which positions the kept keys then sit (scheme), are separate questions. Evicting
removes information; it cannot show a query anything from its future. What can is the position
bookkeeping: a key rotated by its original position, read by a query rotated by its index in a
compacted cache, sits at a negative distance.

RoPE here is the half-split convention (Llama): for a vector x of even length D, pair i
(i < D/2) is (x[i], x[i + D/2]), rotated by the angle p · theta^(-2i/D) at position p:
    x'[i] = x[i]·cos - x[i + D/2]·sin,   x'[i + D/2] = x[i + D/2]·cos + x[i]·sin,
computed in float32. Shapes: B batch, H query heads, Hkv KV heads (query head h reads KV head
h // (H // Hkv)), T positions, D head dim. Attention scales scores by 1 / sqrt(D).
"""

from __future__ import annotations

import heapq
import math

import torch

REPLACES = "solutions/card08_eviction/eviction.py"


class RingBufferCache:
    """Mistral's rolling buffer cache for one layer: `window` slots, allocated once, reused forever.

    `__init__(window, batch, n_kv_heads, head_dim, dtype)` allocates `k` and `v`,
    `[batch, n_kv_heads, window, head_dim]`, and nothing grows afterwards.
    `update(pos, k_new, v_new)` stores the key and value `[B, Hkv, 1, D]` of the token at absolute
    position `pos` (called with pos = 0, 1, 2, ... in order; keys arrive already rotated by RoPE at
    `pos`, as Mistral caches them) in slot `pos % window`, overwriting the oldest entry once the
    buffer is full. It returns `(k, v, key_pos)`: the occupied slots IN SLOT ORDER, `k` and `v`
    `[B, Hkv, n, D]` with n = min(pos + 1, window), and `key_pos`, a list of n Python ints: the
    absolute position each of those slots holds (slot index is not position once the buffer wraps).
    `k` and `v` may be views of the buffer (no copy: attention reads them at once); `key_pos` is
    the caller's own list, which it may change without changing the cache.
    A query at `pos` attending over the returned keys sees exactly the last `window` positions,
    its own included: the buffer's convention, and transformers'. (Mistral §2 writes the window as
    positions pos - window .. pos, window + 1 of them, as its reference prefill mask does; a
    buffer of `window` slots holds `window`.)
    """

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
    """One decode step of StreamingLLM: attention sinks plus a window, under in-cache positions.

    `q` `[B, H, 1, D]` is the query of the newest token, at absolute position T - 1; `k` and `v`
    `[B, Hkv, T, D]` are the keys and values of all positions 0 .. T - 1, the newest included,
    all BEFORE RoPE (StreamingLLM caches keys unrotated). The cache keeps the first `n_sinks`
    positions (the sinks) and the last `window` positions (the newest token counts as one of them),
    each position once: everything when T <= n_sinks + window.
    Positions are in-cache: the n kept keys, in order of position, are rotated to positions 0 .. n-1
    and the query to n - 1 (its own key is the newest kept one), so no distance exceeds n - 1.
    Rotate with half-split RoPE (`theta`), attend with scores scaled by 1 / sqrt(D), softmax over the
    kept keys. Returns `(out, kept)`: `out` `[B, H, 1, D]` and `kept`, the sorted list of the absolute
    positions kept (Python ints).
    """
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
    """Which slots H2O (heavy-hitter oracle) keeps when the cache must shrink to `budget` entries.

    `slot_pos[s]` is the absolute position slot s holds (-1: empty slot, never kept); `acc[s]` is the
    attention slot s's key has received, summed over every query so far. The `recent` occupied slots
    holding the LATEST positions are kept whatever their score (a new token has had few queries to
    collect attention); the remaining `budget - recent` places go to the other occupied slots with the
    largest `acc` (on a tie, the later position). If at most `budget` slots are occupied, all are kept.
    0 <= recent <= budget. Returns the kept slot indices, sorted ascending (Python ints).
    """
    occupied = sorted((s for s, p in enumerate(slot_pos) if p >= 0), key=lambda s: slot_pos[s])  # oldest first
    if len(occupied) <= budget:
        return sorted(occupied)
    newest = occupied[len(occupied) - recent:] if recent else []
    older = occupied[:len(occupied) - recent]
    heavy = heapq.nlargest(budget - recent, older, key=lambda s: (acc[s], slot_pos[s]))
    return sorted(newest + heavy)


def negative_distance_keys(slot_pos: list[int], query_pos: int) -> list[int]:
    """The slots whose key a query at `query_pos` would see at a negative relative distance.

    `slot_pos[s]` is the position RoPE gave slot s's key (-1: empty slot); `query_pos` is the
    position RoPE gives the query. The relative distance is query_pos - slot_pos[s]; it must be
    >= 0 for every key (0 is the query's own key). Return the slots where it is negative, sorted
    ascending (Python ints); [] for a causal-safe cache.
    """
    ahead = []
    for slot, p in enumerate(slot_pos):
        if p > query_pos:  # an empty slot's -1 never is
            ahead.append(slot)
    return ahead
