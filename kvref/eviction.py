"""Spoiler for card08: eviction over a cache with a fixed number of slots, under two RoPE position schemes.

The cache holds `n_slots` entries of real tensors, `[B, Hkv, n_slots, D]`, allocated once. A slot is
a place in memory, not a position: `slot_pos[s]` says which token position slot s holds (-1: empty).
When a token arrives and no slot is free, the policy picks a victim and the new token reuses its slot.
With the "window" policy this is Mistral's rolling buffer: position p lands in slot p % n_slots.

Policies (which occupied slot to evict when a new token needs one):
- "window": the oldest position (sliding window of n_slots positions, the newest included);
- "sinks": the oldest position that is not one of the first `n_sinks` (StreamingLLM: 4 attention
  sinks plus a window of the most recent tokens; Xiao et al. 2023, §3);
- "h2o": heavy hitters (Zhang et al. 2023): the `recent` newest cached entries stay; among the others,
  the one with the least attention accumulated over all the queries so far goes (ties: the oldest).
  A simplification of H2O, which scores and evicts per head and per sequence: kvref keeps one score
  per slot, summed over the heads, so every head evicts the same slot; and it takes one sequence
  per cache (batch 1), so sequences never share a score.
The per-query oracle is not a cache policy (it needs every key): `oracle_dropped_mass`.

Position schemes, declared by the cache:
- "original": a key is rotated once, at write time, by its absolute position; the query by its own.
  A kept key at position n seen from a query at m sits at distance m - n, however much was evicted.
- "in_cache": keys are stored before RoPE and rotated at every step by their index in the cache,
  the kept keys in order of position getting 0 .. n-1 and the query (the newest, cached too) n - 1
  (StreamingLLM, §3.2: "positions within the cache rather than those in the original text").
  Distances stay below n_slots, inside the trained range.
Mixing them (keys by original position, query by its in-cache index) puts keys at negative distances:
`negative_distance_slots` finds them.
"""

from __future__ import annotations

import math

import torch

from kvref.attention import repeat_kv
from kvref.rope import apply_rope, rope_cos_sin
from kvref.validate import check_tensor

POLICIES = ("window", "sinks", "h2o")
SCHEMES = ("original", "in_cache")


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Half-split RoPE of `x` `[B, H, S, D]` at `positions` `[S]`, computed in fp32."""
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta)  # (S, D)
    return apply_rope(x.float(), cos, sin).to(x.dtype)


class EvictingKVCache:
    """One layer's cache of `n_slots` slots with an eviction `policy` and a position `scheme`.

    `step(pos, q, k, v)` decodes one token: q `[B, H, 1, D]`, k and v `[B, Hkv, 1, D]`, all before
    RoPE, at absolute position `pos` (larger than any position written before). It writes the key and
    value into a free slot (evicting one first if none is free), then returns the attention output of
    q over every occupied slot, `[B, H, 1, D]`. `evict(slot)` frees a slot by hand.
    """

    def __init__(self, n_slots: int, batch: int, n_kv_heads: int, head_dim: int, *, policy: str = "window",
                 scheme: str = "original", n_sinks: int = 4, recent: int | None = None, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if n_slots < 1 or head_dim % 2:
            raise ValueError(f"need n_slots >= 1 and an even head_dim, got {n_slots}, {head_dim}")
        recent = n_slots // 2 if recent is None else recent
        if policy == "sinks" and not 0 <= n_sinks < n_slots:
            raise ValueError(f"n_sinks ({n_sinks}) must leave at least one slot for the window ({n_slots} slots)")
        if policy == "h2o" and not 0 <= recent < n_slots:
            raise ValueError(f"recent ({recent}) must leave at least one slot for heavy hitters ({n_slots} slots)")
        if policy == "h2o" and batch != 1:
            raise ValueError(f"an h2o cache holds one sequence (batch 1), got batch {batch}: its attention score per "
                             "slot would mix the sequences, which would all evict the same slot")
        self.policy, self.scheme, self.n_sinks, self.recent, self.theta = policy, scheme, n_sinks, recent, theta
        self.k = torch.zeros(batch, n_kv_heads, n_slots, head_dim, dtype=dtype)  # (B, Hkv, n_slots, D)
        self.v = torch.zeros_like(self.k)
        self.slot_pos = torch.full((n_slots,), -1, dtype=torch.long)  # -1: empty
        self.acc = torch.zeros(n_slots, dtype=torch.float64)  # attention received, summed over H and queries (B = 1)
        self.last_pos = -1

    @property
    def n_slots(self) -> int:
        return self.k.shape[2]

    def slots(self) -> torch.Tensor:
        """The occupied slots, ordered by the positions they hold (so index i is in-cache position i)."""
        occupied = (self.slot_pos >= 0).nonzero().flatten()
        return occupied[self.slot_pos[occupied].argsort()]

    def evict(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots or self.slot_pos[slot] < 0:
            raise ValueError(f"slot {slot} is not an occupied slot of this {self.n_slots}-slot cache")
        self.slot_pos[slot] = -1
        self.acc[slot] = 0.0

    def victim(self) -> int:
        """The slot the policy frees when a new token finds the cache full."""
        order = self.slots()  # oldest first
        if self.policy == "window":
            return int(order[0])
        if self.policy == "sinks":
            return int(order[self.slot_pos[order] >= self.n_sinks][0])
        heavy = order[:len(order) - self.recent]  # the recent newest entries are never candidates
        return int(heavy[self.acc[heavy].argmin()])  # argmin returns the first minimum: the oldest

    def write(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Store the key (rotated at `pos` under "original", raw under "in_cache") and value; return the slot."""
        if pos <= self.last_pos:
            raise ValueError(f"positions must increase: got {pos} after {self.last_pos}")
        check_tensor("k", k, shape=(self.k.shape[0], self.k.shape[1], 1, self.k.shape[3]), dtype=self.k.dtype)
        check_tensor("v", v, shape=k.shape, dtype=self.k.dtype)
        free = (self.slot_pos < 0).nonzero().flatten()
        slot = int(free[0]) if len(free) else self.victim()
        if self.scheme == "original":
            k = rotate(k, torch.tensor([pos]), self.theta)
        self.k[:, :, slot:slot + 1] = k
        self.v[:, :, slot:slot + 1] = v
        self.slot_pos[slot], self.acc[slot], self.last_pos = pos, 0.0, pos
        return slot

    def key_positions(self, slots: torch.Tensor) -> torch.Tensor:
        """The positions RoPE gives the keys of `slots` (ordered by position) at this step."""
        return self.slot_pos[slots] if self.scheme == "original" else torch.arange(len(slots))

    def query_position(self, pos: int) -> int:
        """The position RoPE gives the query of the token at absolute position `pos` (the newest)."""
        return pos if self.scheme == "original" else int((self.slot_pos >= 0).sum()) - 1

    def distances(self, pos: int) -> torch.Tensor:
        """Relative distance, query minus key, of every occupied slot in position order: >= 0 always."""
        return self.query_position(pos) - self.key_positions(self.slots())

    def keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated keys and values of the occupied slots in position order, `[B, Hkv, n, D]`, and the slots."""
        slots = self.slots()
        k = self.k[:, :, slots]  # (B, Hkv, n, D)
        if self.scheme == "in_cache":
            k = rotate(k, self.key_positions(slots), self.theta)
        return k, self.v[:, :, slots], slots

    def step(self, pos: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.write(pos, k, v)
        check_tensor("q", q, shape=(self.k.shape[0], None, 1, self.k.shape[3]), dtype=self.k.dtype)
        q = rotate(q, torch.tensor([self.query_position(pos)]), self.theta)
        keys, values, slots = self.keys()
        H, D = q.shape[1], q.shape[3]
        scores = q @ repeat_kv(keys, H).transpose(-2, -1) / math.sqrt(D)  # (B, H, 1, n)
        weights = torch.softmax(scores.float(), dim=-1)
        self.acc[slots] += weights.sum(dim=(0, 1, 2)).double()  # H2O's score, pooled over heads: attention each key received
        return weights.to(q.dtype) @ repeat_kv(values, H)  # (B, H, 1, D)


def negative_distance_slots(slot_pos: list[int], query_pos: int) -> list[int]:
    """Slots whose key sits after the query (position > query_pos), i.e. at a negative distance; -1 is empty."""
    return [s for s, p in enumerate(slot_pos) if p >= 0 and p > query_pos]


def dropped_mass(weights: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Attention mass of the full cache that a kept set misses: 1 - Σ_{kept} w, per (B, H).

    `weights` `[B, H, T]` are one query's softmax weights over all T positions (nothing evicted);
    `kept` is a boolean `[T]` (shared by all heads, as a cache's slots are) or `[B, H, T]`.
    """
    return 1.0 - (weights * kept).sum(-1)


def oracle_dropped_mass(weights: torch.Tensor, budget: int) -> torch.Tensor:
    """The per-query oracle keeps, per (B, H), the `budget` largest weights: it drops the least mass.

    Of all sets of `budget` keys, the top-`budget` weights have the largest sum, so no policy's dropped
    mass for this query (at the same budget) is below this. That is the oracle's optimality; it does not
    bound the output error ||o_kept - o_full|| from below (see card08's notes), only from above:
    with renormalised weights over the kept set, ||o_kept - o_full|| <= 2 · dropped · max ||v||.
    """
    return 1.0 - weights.topk(min(budget, weights.shape[-1]), dim=-1).values.sum(-1)
