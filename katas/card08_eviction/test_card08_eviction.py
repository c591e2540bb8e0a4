"""card08: the eviction strategy dilemma.

The references are measurements: PyTorch's SDPA over the whole sequence with a sliding-window
mask (the rolling buffer), kvref's EvictingKVCache run step by step on real tensors (sinks plus
window, H2O's choices), and distances read off rotated tensors (the score of a rotated query and
key matched against scores at known distances). kvref.eviction is checked against SDPA and
from-scratch attention in checks/test_kvref_eviction.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import kvkata
from kvkata.check import call_str, expect, expect_close, expect_equal, expect_tensor
from kvref.attention import repeat_kv
from kvref.eviction import EvictingKVCache, rotate

impl = kvkata.load("card08_eviction.eviction")

THETA = 10000.0
ATOL = RTOL = 1e-5  # fp32 attention through different kernels: rounding only
HEADS = st.sampled_from([(1, 1), (4, 2), (4, 1), (2, 2)])  # (H, Hkv): MHA, GQA, MQA
BHTD = ("batch", "head", "position", "dim")


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def measured_distance(q_raw, k_raw, score, max_d):
    """The distance at which RoPE placed a key relative to a query, read off their score: the d whose
    score rotate(q, d)·k (k at 0) equals `score`. Random vectors give a different score at every d."""
    ds = torch.arange(-max_d, max_d + 1)
    table = (rotate(q_raw.double().expand(len(ds), -1)[None, None], ds, THETA) * k_raw.double()).sum(-1)[0, 0]
    return int(ds[(table - score).abs().argmin()])


# --- RingBufferCache -----------------------------------------------------------------------------

def sliding_window_sdpa(q, k, v, W):
    """Every position's output over the last W positions (its own included), keys and queries rotated."""
    T, H = q.shape[2], q.shape[1]
    pos = torch.arange(T)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - W)  # (T, T)
    return F.scaled_dot_product_attention(rotate(q, pos, THETA), repeat_kv(rotate(k, pos, THETA), H),
                                          repeat_kv(v, H), attn_mask=mask)


def run_ring(W, T, H, Hkv, D, seed=0):
    q, k, v = rand(1, H, T, D, seed=seed), rand(1, Hkv, T, D, seed=seed + 1), rand(1, Hkv, T, D, seed=seed + 2)
    k_rot = rotate(k, torch.arange(T), THETA)  # Mistral caches keys rotated at their absolute position
    cache = impl.RingBufferCache(W, 1, Hkv, D)
    return q, k, v, k_rot, cache


@pytest.mark.kata("RingBufferCache")
@given(W=st.integers(1, 6), T=st.integers(1, 14), heads=HEADS)
@example(W=4, T=11, heads=(4, 2))
@example(W=1, T=3, heads=(1, 1))
def test_ring_buffer_decode_equals_sliding_window_sdpa_over_the_last_w_positions(W, T, heads):
    H, Hkv = heads
    D = 8
    q, k, v, k_rot, cache = run_ring(W, T, H, Hkv, D)
    want = sliding_window_sdpa(q, k, v, W)
    for p in range(T):
        call = call_str("RingBufferCache.update", p, k_rot[:, :, p:p + 1], v[:, :, p:p + 1])
        got = cache.update(p, k_rot[:, :, p:p + 1], v[:, :, p:p + 1])
        expect(isinstance(got, tuple) and len(got) == 3, call, got, "a tuple (k, v, key_pos)")
        kc, vc, key_pos = got
        n = min(p + 1, W)
        expect_tensor(call, kc, (1, Hkv, n, D), layout="k [B, Hkv, min(pos + 1, window), D]")
        expect_tensor(call, vc, (1, Hkv, n, D), layout="v [B, Hkv, min(pos + 1, window), D]")
        qp = rotate(q[:, :, p:p + 1], torch.tensor([p]), THETA)
        out = F.scaled_dot_product_attention(qp, repeat_kv(kc, H), repeat_kv(vc, H))
        expect_close(f"attention of the query at position {p} over the k, v that {call} returned", out,
                     want[:, :, p:p + 1], BHTD, atol=ATOL, rtol=RTOL,
                     why=f"PyTorch SDPA over the whole sequence with a sliding-window mask: position {p} "
                         f"reads positions {max(0, p - W + 1)} .. {p} (the last {W}, its own included)")


@pytest.mark.kata("RingBufferCache")
@given(W=st.integers(1, 6), T=st.integers(1, 14))
@example(W=3, T=8)
def test_ring_buffer_key_positions_are_the_positions_its_slots_hold(W, T):
    H = Hkv = 1
    D = 8
    q, k, v, k_rot, cache = run_ring(W, T, H, Hkv, D, seed=3)
    for p in range(T):
        kc, vc, key_pos = cache.update(p, k_rot[:, :, p:p + 1], v[:, :, p:p + 1])
        call = call_str("RingBufferCache.update", p, k_rot[:, :, p:p + 1], v[:, :, p:p + 1])
        # Which position's key each returned slot holds, identified by value.
        held = [int((k_rot[0, 0] - kc[0, 0, j]).abs().sum(-1).argmin()) for j in range(kc.shape[2])]
        expect_equal(call + "[2]", key_pos, held,
                     f"the absolute positions of the keys in the returned slots, in slot order (identified by "
                     f"value): position q sits in slot q % {W}, so after a wrap slot index is not position")
        expect_equal(call + " slot of the new key", held.index(p) if p in held else None, p % W,
                     f"Mistral's rolling buffer writes position {p} into slot {p} % {W} = {p % W}")


@pytest.mark.kata("RingBufferCache")
def test_ring_buffer_never_holds_more_than_window_positions():
    W, T, H, Hkv, D, B = 4, 40, 2, 2, 8, 2
    q, k, v, k_rot, _ = run_ring(W, T, H, Hkv, D, seed=5)
    k_rot, v = torch.cat([k_rot, -k_rot]), torch.cat([v, -v])  # two sequences: the batch axis is allocated too
    cache = impl.RingBufferCache(W, B, Hkv, D, torch.float16)  # the dtype argument is honoured, too
    for p in range(T):
        cache.update(p, k_rot[:, :, p:p + 1].half(), v[:, :, p:p + 1].half())
    tensors = {n: x for n, x in vars(cache).items() if isinstance(x, torch.Tensor) and x.is_floating_point()}
    held = sum(x.nbytes for x in tensors.values())
    found = ", ".join(f"{n}: {str(x.dtype).removeprefix('torch.')} {list(x.shape)}" for n, x in tensors.items()) or "none"
    want = 2 * B * Hkv * W * D * 2
    expect(held == want, f"RingBufferCache({W}, {B}, {Hkv}, {D}, torch.float16) after {T} updates",
           f"{held} bytes in floating-point tensors ({found})",
           f"K and V, float16 [{B}, {Hkv}, {W}, {D}] each: 2 · {B} · {Hkv} · {W} · {D} · 2 B = {want} bytes, "
           "allocated once in the dtype given, for every sequence of the batch. Any other floating-point tensor "
           "the cache keeps counts too: keep positions as Python ints or an integer tensor")


@pytest.mark.kata("RingBufferCache")
def test_ring_buffer_key_positions_are_the_callers_list_to_change():
    """key_pos is returned to the caller: a caller that edits it (say, to mask or renumber) must not
    change what the cache reports at the next step. k and v may be views (the docstring allows it)."""
    W, T, D = 3, 8, 8
    _, _, v, k_rot, cache = run_ring(W, T, 1, 1, D, seed=6)
    for p in range(T):
        call = call_str("RingBufferCache.update", p, k_rot[:, :, p:p + 1], v[:, :, p:p + 1])
        _, _, key_pos = cache.update(p, k_rot[:, :, p:p + 1], v[:, :, p:p + 1])
        slots = min(p + 1, W)
        want = [q for s in range(slots) for q in range(p + 1) if q % W == s and q > p - W]  # position of slot s
        expect_equal(call + "[2] after the caller changed the lists returned before", key_pos, want,
                     "the positions the slots hold, in slot order: return a new list (list(...) or a slice), not "
                     "one the cache keeps and updates")
        key_pos.append(-5)  # what a caller may do with its own list
        key_pos[0] = 10**6


# --- sink_window_decode --------------------------------------------------------------------------

def streaming_reference(q, k, v, n_sinks, window):
    """kvref's EvictingKVCache, sinks policy, in-cache positions, fed every position in order."""
    T = k.shape[2]
    cache = EvictingKVCache(n_sinks + window, k.shape[0], k.shape[1], k.shape[3], policy="sinks",
                            scheme="in_cache", n_sinks=n_sinks, theta=THETA)
    for p in range(T):
        qp = q if p == T - 1 else torch.zeros_like(q)
        out = cache.step(p, qp, k[:, :, p:p + 1], v[:, :, p:p + 1])
    return out, sorted(cache.slot_pos[cache.slot_pos >= 0].tolist())


@pytest.mark.kata("sink_window_decode")
@given(n_sinks=st.integers(0, 4), window=st.integers(1, 5), T=st.integers(1, 16), heads=HEADS)
@example(n_sinks=4, window=3, T=12, heads=(4, 2))
@example(n_sinks=4, window=3, T=7, heads=(1, 1))
@example(n_sinks=4, window=3, T=8, heads=(1, 1))
@example(n_sinks=2, window=2, T=3, heads=(2, 2))
def test_sink_window_decode_matches_a_streaming_cache_under_in_cache_positions(n_sinks, window, T, heads):
    H, Hkv = heads
    D = 8
    q, k, v = rand(1, H, 1, D, seed=T), rand(1, Hkv, T, D, seed=T + 1), rand(1, Hkv, T, D, seed=T + 2)
    want_out, want_kept = streaming_reference(q, k, v, n_sinks, window)
    call = call_str("sink_window_decode", q, k, v, n_sinks, window)
    got = impl.sink_window_decode(q, k, v, n_sinks, window)
    expect(isinstance(got, tuple) and len(got) == 2, call, got, "a tuple (out, kept)")
    out, kept = got
    expect_equal(call + "[1]", kept, want_kept,
                 f"the positions a {n_sinks + window}-slot StreamingLLM cache (kvref, {n_sinks} sinks, "
                 f"window {window}) holds after {T} tokens: the sinks stay through every wrap, the newest "
                 "token is part of the window, no position twice")
    expect_close(call + "[0]", out, want_out, BHTD, atol=ATOL, rtol=RTOL,
                 why=f"kvref's cache with keys stored before RoPE and rotated to in-cache positions "
                     f"0 .. {len(want_kept) - 1}, the query at {len(want_kept) - 1} (its own key is the newest)")


@pytest.mark.kata("sink_window_decode")
def test_sink_window_decode_with_room_for_every_token_is_plain_rope_attention_at_long_range():
    """Nothing evicted (T <= n_sinks + window): in-cache positions are the text's positions, and the
    step is RoPE attention over 512 positions at theta = 10,000 (the default), against PyTorch SDPA."""
    T, H, Hkv, D = 512, 2, 1, 64
    q, k, v = rand(1, H, 1, D, seed=11) * 3, rand(1, Hkv, T, D, seed=12) * 3, rand(1, Hkv, T, D, seed=13)
    pos = torch.arange(T)
    want = F.scaled_dot_product_attention(rotate(q, pos[-1:], THETA), repeat_kv(rotate(k, pos, THETA), H),
                                          repeat_kv(v, H))
    call = call_str("sink_window_decode", q, k, v, 4, 508)
    out, kept = impl.sink_window_decode(q, k, v, 4, 508)
    expect_equal(call + "[1]", kept, list(range(T)), "all 512 positions fit in 4 sinks + a window of 508")
    # fp32 angles near position 511 differ by rounding with the way theta^(-2i/D) is written (1 / theta^x
    # or theta^-x): outputs moved by 3e-5; theta = 10,001 moves them by 1e-2.
    expect_close(call + "[0]", out, want, BHTD, atol=5e-4, rtol=5e-4,
                 why="SDPA with q at 511 and keys at 0 .. 511, half-split RoPE with theta = 10,000: "
                     "angles p · theta^(-2i/D), fp32")


@pytest.mark.kata("sink_window_decode")
def test_sink_window_decode_reads_keys_at_in_cache_distances_measured_from_its_weights():
    """A query at position 39 with 4 sinks and a window of 3: the kept keys must sit at distances 6 .. 0
    (their in-cache positions 0 .. 6, the query at 6), not at 39 - position. One-hot values make the
    output the attention weights; the weights give the scores, the scores give the distances."""
    T, D, n_sinks, window = 40, 8, 4, 3
    q, k = rand(1, 1, 1, D, seed=1), rand(1, 1, T, D, seed=2)
    kept_pos = [0, 1, 2, 3, 37, 38, 39]
    v = torch.zeros(1, 1, T, D)
    for j, pos in enumerate(kept_pos):
        v[0, 0, pos, j] = 1.0  # out[j] = the weight of the j-th kept key
    call = call_str("sink_window_decode", q, k, v, n_sinks, window)
    out, kept = impl.sink_window_decode(q, k, v, n_sinks, window)
    expect_equal(call + "[1]", kept, kept_pos, "4 sinks and the last 3 of 40 positions")
    w = out[0, 0, 0, :len(kept_pos)].double()
    # The query's own key is at distance 0 in any causal scheme: its score is q·k. The others follow
    # from log-weight differences: s_j = s_own + sqrt(D) · (log w_j - log w_own).
    own = float(q[0, 0, 0].double() @ k[0, 0, T - 1].double())
    measured = [measured_distance(q[0, 0, 0], k[0, 0, pos], own + math.sqrt(D) * float(w[j].log() - w[-1].log()), T)
                for j, pos in enumerate(kept_pos)]
    expect_equal(call + ": distances read off the weights", measured, [6, 5, 4, 3, 2, 1, 0],
                 "in-cache positions put the 7 kept keys at distances 6 .. 0 from the query; original "
                 "positions would give [39, 38, 37, 36, 2, 1, 0], outside a cache-sized range")


# --- heavy_hitter_keep ---------------------------------------------------------------------------

@pytest.mark.kata("heavy_hitter_keep")
@given(n_slots=st.integers(3, 6), recent=st.integers(0, 2), T=st.integers(4, 16), seed=st.integers(0, 99))
@example(n_slots=4, recent=2, T=12, seed=0)
@example(n_slots=5, recent=1, T=16, seed=7)
def test_heavy_hitter_keep_picks_the_slots_an_h2o_cache_keeps_in_a_run(n_slots, recent, T, seed):
    recent = min(recent, n_slots - 2)
    H, Hkv, D = 4, 2, 8
    cache = EvictingKVCache(n_slots, 1, Hkv, D, policy="h2o", recent=recent)
    for p in range(T):
        full = bool((cache.slot_pos >= 0).all())
        acc, table = [float(a) for a in cache.acc], cache.slot_pos.tolist()
        cache.step(p, rand(1, H, 1, D, seed=seed + 3 * p) * 3, rand(1, Hkv, 1, D, seed=seed + 3 * p + 1) * 3,
                   rand(1, Hkv, 1, D, seed=seed + 3 * p + 2))
        if full:
            reused = int((cache.slot_pos == p).nonzero())
            want = sorted(s for s in range(n_slots) if s != reused)
            call = call_str("heavy_hitter_keep", acc, table, n_slots - 1, recent)
            expect_equal(call, impl.heavy_hitter_keep(acc, table, n_slots - 1, recent), want,
                         f"the slots kvref's H2O cache kept when position {p} arrived (it evicted slot {reused}, "
                         f"position {table[reused]}): the {recent} newest positions stay, the rest by the attention "
                         f"they accumulated; slot->position table {table}, accumulated {[round(a, 3) for a in acc]}")


@pytest.mark.kata("heavy_hitter_keep")
@given(data=st.data(), n=st.integers(1, 10))
def test_heavy_hitter_keep_keeps_the_recent_window_and_the_largest_scores_of_the_rest(data, n):
    positions = data.draw(st.permutations(list(range(3, 3 + n)) + [-1] * data.draw(st.integers(0, 2))), label="slot_pos")
    acc = data.draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=len(positions),
                             max_size=len(positions), unique=True), label="acc")
    budget = data.draw(st.integers(0, n + 1), label="budget")
    recent = data.draw(st.integers(0, min(budget, n)), label="recent")
    call = call_str("heavy_hitter_keep", acc, positions, budget, recent)
    got = impl.heavy_hitter_keep(acc, positions, budget, recent)
    occupied = [s for s, p in enumerate(positions) if p >= 0]
    newest = sorted(occupied, key=lambda s: positions[s])[len(occupied) - recent:] if recent else []
    expect(isinstance(got, list) and got == sorted(set(got)) and all(type(s) is int for s in got), call, got,
           "a sorted list of distinct slot indices (Python ints)")
    expect(set(got) <= set(occupied), call, got, f"only occupied slots (slot_pos >= 0): {occupied}")
    expect(len(got) == min(budget, len(occupied)), call, got, f"{min(budget, len(occupied))} slots (budget {budget})")
    if len(occupied) > budget:
        expect(set(newest) <= set(got), call, got,
               f"the {recent} slots holding the latest positions kept whatever their score: {sorted(newest)} "
               "(recency is the position a slot holds, not the slot index)")
        rest = [s for s in occupied if s not in newest]
        kept_rest, dropped = [s for s in rest if s in got], [s for s in rest if s not in got]
        expect(not kept_rest or not dropped or min(acc[s] for s in kept_rest) > max(acc[s] for s in dropped),
               call, got, "the other kept slots are the older ones with the largest accumulated attention")


@pytest.mark.kata("heavy_hitter_keep")
def test_heavy_hitter_keep_worked_example_with_a_wrapped_table():
    # Slots hold positions out of order after reuse; position 9 is newest, then 8.
    slot_pos = [9, 4, 8, 2, 5, -1]
    acc = [0.1, 3.0, 0.2, 0.5, 2.0, 0.0]
    call = call_str("heavy_hitter_keep", acc, slot_pos, 4, 2)
    expect_equal(call, impl.heavy_hitter_keep(acc, slot_pos, 4, 2), [0, 1, 2, 4],
                 "keep slots 0 and 2 (positions 9, 8: the recent window, though they collected little attention) "
                 "and slots 1 and 4 (accumulated 3.0 and 2.0); slot 3 (0.5) goes, slot 5 is empty")
    # The newest slot has also collected the most attention: it is kept once, as recent, and the
    # budget - recent other places still go to the older slots.
    acc = [5.0, 3.0, 0.2, 0.5, 2.0, 0.0]
    call = call_str("heavy_hitter_keep", acc, slot_pos, 4, 2)
    expect_equal(call, impl.heavy_hitter_keep(acc, slot_pos, 4, 2), [0, 1, 2, 4],
                 "keep slots 0 and 2 (positions 9, 8: the recent window) and the 2 older slots with the most "
                 "attention, slots 1 and 4 (3.0 and 2.0): slot 0's 5.0 does not count against the other places")


@pytest.mark.kata("heavy_hitter_keep")
def test_heavy_hitter_keep_breaks_a_tie_towards_the_later_position():
    # Slots 0, 1 and 2 tie at 1.0 and hold positions 3, 7 and 5; slot 4 (position 9) is the recent one.
    # Two places are left for three tied slots: the later positions, 7 and 5 (slots 1 and 2), win.
    # An earlier-position tie-break keeps slot 0, a slot-index tie-break keeps slots 0 and 1.
    slot_pos, acc = [3, 7, 5, 6, 9], [1.0, 1.0, 1.0, 0.2, 0.1]
    call = call_str("heavy_hitter_keep", acc, slot_pos, 3, 1)
    expect_equal(call, impl.heavy_hitter_keep(acc, slot_pos, 3, 1), [1, 2, 4],
                 "slot 4 (position 9, the recent window) and, of slots 0, 1, 2 tied at 1.0, the two holding the later "
                 "positions: slot 1 (position 7) and slot 2 (position 5); slot 0 (position 3) goes")
    # Only the three tied slots are older than the recent one: a top-k that breaks ties by index keeps the earliest.
    slot_pos, acc = [3, 7, 5, 9], [1.0, 1.0, 1.0, 0.1]
    call = call_str("heavy_hitter_keep", acc, slot_pos, 3, 1)
    expect_equal(call, impl.heavy_hitter_keep(acc, slot_pos, 3, 1), [1, 2, 3],
                 "slot 3 (position 9, the recent window) and, of slots 0, 1, 2 tied at 1.0, the two holding the later "
                 "positions: slot 1 (position 7) and slot 2 (position 5); slot 0 (position 3) goes")


# --- negative_distance_keys ----------------------------------------------------------------------

def rotated_scores(slot_pos, query_pos, D=8, seed=0):
    """Random raw q and keys, rotated as a cache would (key s at slot_pos[s], query at query_pos)."""
    q, k = rand(1, 1, 1, D, seed=seed), rand(1, 1, len(slot_pos), D, seed=seed + 1)
    pos = torch.tensor([max(p, 0) for p in slot_pos])
    scores = (rotate(q, torch.tensor([query_pos]), THETA) @ rotate(k, pos, THETA).transpose(-2, -1))[0, 0, 0]
    return q[0, 0, 0], k[0, 0], scores


@pytest.mark.kata("negative_distance_keys")
@given(data=st.data(), n=st.integers(1, 9))
@example(data=None, n=0)
def test_negative_distance_keys_are_those_measured_behind_the_query(data, n):
    if data is None:
        slot_pos, query_pos = [5, -1, 6, 7, 3], 6
    else:
        slot_pos = data.draw(st.lists(st.integers(-1, 12), min_size=n, max_size=n), label="slot_pos")
        query_pos = data.draw(st.integers(0, 12), label="query_pos")
    q, k, scores = rotated_scores(slot_pos, query_pos)
    want = [s for s, p in enumerate(slot_pos)
            if p >= 0 and measured_distance(q, k[s], float(scores[s]), 14) < 0]
    call = call_str("negative_distance_keys", slot_pos, query_pos)
    expect_equal(call, impl.negative_distance_keys(slot_pos, query_pos), want,
                 f"the occupied slots whose key a RoPE query at {query_pos} scores at a negative distance, "
                 "measured from the rotated vectors (0 is the query's own key, not the future; -1 is empty)")


@pytest.mark.kata("negative_distance_keys")
def test_negative_distance_keys_catch_a_query_at_its_slot_index_against_original_positions():
    """The card's bug: a compacted cache (4 sinks + window) with keys rotated once at their original
    positions, and a query rotated by its index in the cache instead of its own position."""
    c = EvictingKVCache(7, 1, 1, 8, policy="sinks", n_sinks=4, scheme="original")
    T = 30
    for p in range(T):
        c.step(p, rand(1, 1, 1, 8, seed=p), rand(1, 1, 1, 8, seed=100 + p), rand(1, 1, 1, 8, seed=200 + p))
    table = c.slot_pos.tolist()
    slot_index_query = int((c.slot_pos >= 0).sum()) - 1  # 6
    q = rand(1, 1, 1, 8, seed=T - 1)
    q_rot = rotate(q, torch.tensor([slot_index_query]), THETA)
    scores = (q_rot @ c.k.transpose(-2, -1))[0, 0, 0]
    k_raw = torch.cat([rand(1, 1, 1, 8, seed=100 + p) for p in table], dim=2)[0, 0]
    want = [s for s in range(len(table)) if measured_distance(q[0, 0, 0], k_raw[s], float(scores[s]), T) < 0]
    call = call_str("negative_distance_keys", table, slot_index_query)
    expect_equal(call, impl.negative_distance_keys(table, slot_index_query), want,
                 f"the window keys (positions {sorted(table)[4:]}) that a query rotated to its slot index "
                 f"{slot_index_query} meets at negative distances, measured from kvref's rotated cache")
    expect_equal(call_str("negative_distance_keys", table, T - 1), impl.negative_distance_keys(table, T - 1), [],
                 f"the query at its own position {T - 1}: every kept key is at distance >= 0")
