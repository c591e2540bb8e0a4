"""kvref.eviction under stateful tests: a sequence of decode steps and hand evictions is the input.

After every step, for every policy under both position schemes:
- the output equals attention over the kept subset computed from scratch (keys rotated from the raw
  tensors the test kept, by the positions the scheme declares), by kvref.attention and by torch SDPA;
- no key sits at a negative distance, and each kept key's distance, measured from the rotated tensors
  themselves (the score q·k matched against a table of scores at known distances), is the declared one;
- memory never exceeds the budget, the storage is never reallocated, and freed slots are reused;
- the attention mass of the full cache that the kept set misses is never below the oracle's.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvref.attention import attention, repeat_kv
from kvref.eviction import (POLICIES, SCHEMES, EvictingKVCache, dropped_mass, negative_distance_slots,
                            oracle_dropped_mass, rotate)

B, H, HKV, D = 1, 4, 2, 8
THETA = 10000.0
ATOL = 1e-5


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def measured_distance(q_raw, k_raw, q_rot, k_rot, max_d):
    """The distance d at which RoPE placed k relative to q, read off the rotated vectors: the d whose
    score rotate(q, d)·k (k at 0) equals q_rot·k_rot. Scores at distinct d differ for random vectors."""
    ds = torch.arange(-max_d, max_d + 1)
    table = (rotate(q_raw.expand(len(ds), -1)[None, None].double(), ds, THETA) * k_raw.double()).sum(-1)[0, 0]
    got = (q_rot.double() * k_rot.double()).sum()
    return int(ds[(table - got).abs().argmin()])


class EvictionMachine(RuleBasedStateMachine):
    @initialize(policy=st.sampled_from(POLICIES), scheme=st.sampled_from(SCHEMES), n_slots=st.integers(2, 7),
                data=st.data())
    def setup(self, policy, scheme, n_slots, data):
        extra = {}
        if policy == "sinks":
            extra["n_sinks"] = data.draw(st.integers(0, n_slots - 1), label="n_sinks")
        if policy == "h2o":
            extra["recent"] = data.draw(st.integers(0, n_slots - 1), label="recent")
        self.cache = EvictingKVCache(n_slots, B, HKV, D, policy=policy, scheme=scheme, **extra)
        self.storage = (self.cache.k.data_ptr(), self.cache.v.data_ptr())
        self.raw = {}  # position -> (k, v) before RoPE: what the test recomputes from
        self.pos = 0

    @rule(seed=st.integers(0, 2**16), skip=st.integers(0, 2))
    def decode(self, seed, skip):
        c = self.cache
        pos = self.pos + skip  # positions may jump (a token whose K/V went elsewhere), never go back
        # Disjoint seed streams: a query equal to a key (seed s + 1 after seed s) would make the score symmetric
        # in the distance, q.R(d)q = q.R(-d)q, and the measured distance's sign ambiguous (found under deep).
        q, k, v = (rand(B, H, 1, D, seed=3 * seed), rand(B, HKV, 1, D, seed=3 * seed + 1),
                   rand(B, HKV, 1, D, seed=3 * seed + 2))
        free_before = set((c.slot_pos < 0).nonzero().flatten().tolist())
        full_before = {p: kv for p, kv in self.raw.items()}
        out = c.step(pos, q, k, v)
        self.raw[pos] = (k, v)
        self.pos = pos + 1
        slot = int((c.slot_pos == pos).nonzero())
        if free_before:
            assert slot in free_before, f"position {pos} went to slot {slot}, not one of the free {free_before}"
        kept = c.slot_pos[c.slots()].tolist()  # positions, oldest first
        assert len(kept) <= c.n_slots and pos in kept
        # From scratch: the scheme's positions, kvref's attention and PyTorch's SDPA over the kept subset.
        key_pos = torch.tensor(kept) if c.scheme == "original" else torch.arange(len(kept))
        q_pos = pos if c.scheme == "original" else len(kept) - 1
        k_raw = torch.cat([self.raw[p][0] for p in kept], dim=2)  # (B, Hkv, n, D)
        v_kept = torch.cat([self.raw[p][1] for p in kept], dim=2)
        k_rot, q_rot = rotate(k_raw, key_pos, THETA), rotate(q, torch.tensor([q_pos]), THETA)
        torch.testing.assert_close(out, attention(q_rot, k_rot, v_kept), atol=ATOL, rtol=ATOL)
        sdpa = F.scaled_dot_product_attention(q_rot, repeat_kv(k_rot, H), repeat_kv(v_kept, H))
        torch.testing.assert_close(out, sdpa, atol=ATOL, rtol=ATOL)
        # Distances: declared by the scheme, >= 0, and where the rotated tensors put them.
        declared = [pos - p for p in kept] if c.scheme == "original" else [len(kept) - 1 - i for i in range(len(kept))]
        assert c.distances(pos).tolist() == declared and min(declared) >= 0
        assert negative_distance_slots(c.slot_pos.tolist(), pos) == []
        k_cached, _, _ = c.keys()
        for i in range(len(kept)):
            d = measured_distance(q[0, 0, 0], k_raw[0, 0, i], q_rot[0, 0, 0], k_cached[0, 0, i], max_d=pos + 2)
            assert d == declared[i], f"key at position {kept[i]}: measured distance {d}, declared {declared[i]}"
        # The oracle: full-cache weights (nothing evicted, original positions) and the same budget.
        full = sorted(full_before) + [pos]
        k_full = rotate(torch.cat([self.raw[p][0] for p in full], dim=2), torch.tensor(full), THETA)
        q_full = rotate(q, torch.tensor([pos]), THETA)
        w = torch.softmax((q_full @ repeat_kv(k_full, H).transpose(-2, -1))[:, :, 0] / math.sqrt(D), dim=-1)
        kept_mask = torch.tensor([p in kept for p in full])
        policy_drop, oracle_drop = dropped_mass(w, kept_mask), oracle_dropped_mass(w, c.n_slots)
        assert (policy_drop >= oracle_drop - 1e-6).all(), (policy_drop, oracle_drop)
        if c.scheme == "original":  # renormalised weights over the kept set: the error is bounded by the mass
            o_full = w[:, :, None] @ repeat_kv(torch.cat([self.raw[p][1] for p in full], dim=2), H)
            err = (out - o_full).norm(dim=-1)[:, :, 0]
            vmax = torch.cat([self.raw[p][1] for p in full], dim=2).norm(dim=-1).max()
            assert (err <= 2 * policy_drop * vmax + 1e-5).all()

    @precondition(lambda self: hasattr(self, "cache") and bool((self.cache.slot_pos >= 0).any()))
    @rule(data=st.data())
    def evict_by_hand(self, data):
        occupied = (self.cache.slot_pos >= 0).nonzero().flatten().tolist()
        slot = data.draw(st.sampled_from(occupied), label="slot")
        self.cache.evict(slot)
        assert self.cache.slot_pos[slot] == -1

    @invariant()
    def memory_stays_within_budget(self):
        if not hasattr(self, "cache"):
            return
        c = self.cache
        assert c.k.shape[2] == c.v.shape[2] == c.n_slots
        assert (c.k.data_ptr(), c.v.data_ptr()) == self.storage, "the cache reallocated its storage"
        assert int((c.slot_pos >= 0).sum()) <= c.n_slots
        occupied = c.slot_pos[c.slot_pos >= 0].tolist()
        assert len(set(occupied)) == len(occupied), "a position is cached twice"


# kata/ci profiles: the profile's examples (at most 30) of 12 steps; deep: all 500, of 30 steps (wraps and
# evictions of every slot many times over).
_deep = settings().max_examples > 100
EvictionMachine.TestCase.settings = settings(max_examples=settings().max_examples if _deep else min(settings().max_examples, 30),
                                             stateful_step_count=30 if _deep else 12)
TestEviction = EvictionMachine.TestCase


def test_window_policy_is_mistral_rolling_buffer_equal_to_sliding_window_sdpa():
    """Position p lands in slot p % W, and the outputs equal full-sequence SDPA with a sliding-window mask."""
    W, T = 4, 11
    c = EvictingKVCache(W, B, HKV, D, policy="window")
    q, k, v = rand(B, H, T, D, seed=1), rand(B, HKV, T, D, seed=2), rand(B, HKV, T, D, seed=3)
    outs = []
    for p in range(T):
        outs.append(c.step(p, q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1]))
        assert c.slot_pos[p % W] == p
    pos = torch.arange(T)
    qr, kr = rotate(q, pos, THETA), rotate(k, pos, THETA)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - W)  # the last W positions, self included
    want = F.scaled_dot_product_attention(qr, repeat_kv(kr, H), repeat_kv(v, H), attn_mask=mask)
    torch.testing.assert_close(torch.cat(outs, dim=2), want, atol=ATOL, rtol=ATOL)


def test_sinks_policy_keeps_the_first_tokens_through_every_wrap():
    c = EvictingKVCache(6, B, HKV, D, policy="sinks", scheme="in_cache")  # 4 sinks by default, window of 2
    for p in range(20):
        c.step(p, rand(B, H, 1, D, seed=p), rand(B, HKV, 1, D, seed=p + 99), rand(B, HKV, 1, D, seed=p + 7))
        assert c.slot_pos[c.slots()].tolist() == list(range(min(p + 1, 4))) + list(range(max(4, p - 1), p + 1))
    assert c.distances(19).tolist() == [5, 4, 3, 2, 1, 0]


def test_mixed_scheme_is_caught_by_the_negative_distance_checker():
    """Keys rotated by original position, query by its in-cache index: the bug card08 is about."""
    c = EvictingKVCache(6, B, HKV, D, policy="sinks", scheme="original")
    for p in range(20):
        c.step(p, rand(B, H, 1, D, seed=p), rand(B, HKV, 1, D, seed=p + 99), rand(B, HKV, 1, D, seed=p + 7))
    mixed_query_pos = int((c.slot_pos >= 0).sum()) - 1  # 5: its index in the compacted cache
    bad = negative_distance_slots(c.slot_pos.tolist(), mixed_query_pos)
    assert sorted(c.slot_pos[bad].tolist()) == [18, 19]
    assert negative_distance_slots(c.slot_pos.tolist(), 19) == []


def test_h2o_keeps_the_recent_window_and_evicts_the_least_attended_older_key():
    c = EvictingKVCache(4, B, HKV, D, policy="h2o", recent=2)
    for p in range(4):
        c.step(p, rand(B, H, 1, D, seed=p), rand(B, HKV, 1, D, seed=p + 50), rand(B, HKV, 1, D, seed=p + 9))
    order = c.slots()
    older = order[:2]
    want = int(older[c.acc[older].argmin()])
    victim_pos = int(c.slot_pos[want])
    c.step(4, rand(B, H, 1, D, seed=4), rand(B, HKV, 1, D, seed=54), rand(B, HKV, 1, D, seed=13))
    assert victim_pos not in c.slot_pos.tolist() and {2, 3, 4} <= set(c.slot_pos.tolist())


def test_an_h2o_cache_refuses_a_batch_whose_sequences_would_share_one_score():
    with pytest.raises(ValueError, match="h2o cache holds one sequence .* batch 2"):
        EvictingKVCache(4, 2, HKV, D, policy="h2o", recent=2)
    EvictingKVCache(4, 2, HKV, D, policy="sinks", n_sinks=1)  # a position rule: the same for every sequence


def test_top_k_weights_minimise_dropped_mass_not_output_error():
    """The oracle's optimality is about attention mass: a counterexample for the output error."""
    w = torch.tensor([[[0.5, 0.3, 0.2]]])
    v = torch.tensor([0.0, 1.0, 0.6])
    o_full = float(w[0, 0] @ v)  # 0.42
    errors = {i: abs(float(v[i]) - o_full) for i in range(3)}  # keep one key: its value, renormalised
    assert float(oracle_dropped_mass(w, 1)) == min(float(dropped_mass(w, torch.eye(3)[i].bool())) for i in range(3))
    assert min(errors, key=errors.get) == 2 and errors[0] > errors[2]  # top-1 keeps key 0, key 2 errs less


@given(st.sampled_from(POLICIES), st.sampled_from(SCHEMES))
def test_every_policy_refuses_bad_arguments(policy, scheme):
    c = EvictingKVCache(3, B, HKV, D, policy=policy, scheme=scheme, n_sinks=1, recent=1)
    c.step(5, rand(B, H, 1, D, seed=0), rand(B, HKV, 1, D, seed=1), rand(B, HKV, 1, D, seed=2))
    try:
        c.step(5, rand(B, H, 1, D, seed=0), rand(B, HKV, 1, D, seed=1), rand(B, HKV, 1, D, seed=2))
    except ValueError as exc:
        assert "increase" in str(exc)
    else:
        raise AssertionError("a repeated position was accepted")
