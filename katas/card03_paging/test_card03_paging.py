"""card03: slot reservation and fragmentation.

The references are measurements. Static waste: a real `[B, Hkv, max_seq_len, D]` cache filled
with NaN, each request's positions written, the NaN slots counted. Paged waste and block counts:
kvref's block allocator (kvref.paging.BlockAllocator) holding the same trace, one token at a
time. Bytes: K/V block pools allocated on the meta device for every layer of real presets,
`.nbytes` per block. The allocator kata is driven through random sequences of allocate, append
and free, side by side with kvref's allocator, and checked against the invariants every paged
cache must keep.
"""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvkata
from kvkata.check import call_str, expect, expect_equal, expect_real, plural
from kvref.config import PRESETS, preset
from kvref.paging import BlockAllocator, OutOfBlocks, block_nbytes_measured, paged_waste_measured, static_waste_measured

impl = kvkata.load("card03_paging.paging")

REAL = [name for name, cfg in PRESETS.items() if not cfg.is_mla]
BLOCK_SIZES = st.sampled_from([1, 2, 3, 8, 16, 32])
# A trace in the spirit of PagedAttention's: lengths log-uniform from 16 to 2,048 tokens
# (deterministic quantiles), reserved at 2,048 each. Its mean length is about 2,032 / ln(128) = 419.
TRACE = [round(16 * 128 ** ((i + 0.5) / 200)) for i in range(200)]


class Shown:
    """An argument shown by name in failure messages."""
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def lengths_up_to(max_len: int, max_size: int = 12):
    return st.lists(st.integers(1, max_len), min_size=1, max_size=max_size)


# --- static reservation ------------------------------------------------------------------------

@pytest.mark.kata("static_slot_waste")
@given(data=st.data(), max_seq_len=st.integers(1, 300))
@example(data=None, max_seq_len=8192)
def test_static_slot_waste_is_the_share_of_a_reserved_cache_never_written(data, max_seq_len):
    lengths = [1, 512, 8192] if data is None else data.draw(lengths_up_to(max_seq_len), label="lengths")
    got = impl.static_slot_waste(max_seq_len, lengths)
    measured = static_waste_measured(max_seq_len, lengths)
    expect_real(call_str("static_slot_waste", max_seq_len, lengths), got, measured, rel=1e-9, abs=1e-12,
                why=f"the share of reserved slots never written, measured: kvref reserves {plural(len(lengths), 'request')} "
                    f"x {max_seq_len:,} slots (filled with NaN), each request writes its own tokens "
                    f"({sum(lengths):,} in all), and the slots still NaN are counted")


def extremal_trace(n: int, n_short: int, short_max: int, max_seq_len: int) -> list[int]:
    return [short_max] * n_short + [max_seq_len] * (n - n_short)


@pytest.mark.kata("reservation_waste_bound")
@given(max_seq_len=st.integers(2, 4096), n=st.sampled_from([10, 20]), data=st.data())
@example(max_seq_len=8192, n=10, data=None)
@example(max_seq_len=8192, n=20, data=None)
def test_reservation_waste_bound_is_what_the_fullest_matching_trace_wastes(max_seq_len, n, data):
    if data is None:
        n_short, short_max = n * 9 // 10, 512
    else:
        n_short = data.draw(st.integers(0, n), label="short requests")
        short_max = data.draw(st.integers(1, max_seq_len), label="short_max")
    frac = n_short / n
    got = impl.reservation_waste_bound(max_seq_len, frac, short_max)
    trace = extremal_trace(n, n_short, short_max, max_seq_len)
    measured = static_waste_measured(max_seq_len, trace)
    expect_real(call_str("reservation_waste_bound", max_seq_len, frac, short_max), got, measured, rel=1e-9,
                abs=1e-12, why=f"the measured waste of the trace that fills its reservations most: {n_short} of {n} "
                f"requests at exactly {short_max:,} tokens, the rest at {max_seq_len:,} (NaN slots of a real cache)")


@pytest.mark.kata("reservation_waste_bound")
@given(max_seq_len=st.integers(2, 2048), data=st.data())
def test_reservation_waste_bound_is_never_above_a_trace_that_matches_the_facts(max_seq_len, data):
    n = 10
    n_short = data.draw(st.integers(0, n), label="short requests")
    short_max = data.draw(st.integers(1, max_seq_len), label="short_max")
    trace = (data.draw(st.lists(st.integers(1, short_max), min_size=n_short, max_size=n_short), label="short")
             + data.draw(st.lists(st.integers(1, max_seq_len), min_size=n - n_short, max_size=n - n_short), label="long"))
    got = impl.reservation_waste_bound(max_seq_len, n_short / n, short_max)
    measured = static_waste_measured(max_seq_len, trace)
    expect(isinstance(got, float) and got <= measured + 1e-12, call_str("reservation_waste_bound", max_seq_len,
           n_short / n, short_max), got, f"a float no larger than {measured:.6g}, the waste measured on the trace "
           f"{trace} that matches the facts: a floor must hold for every such trace")


# --- blocks --------------------------------------------------------------------------------------

@pytest.mark.kata("blocks_for_tokens")
@given(n_tokens=st.integers(0, 200), block_size=BLOCK_SIZES)
@example(n_tokens=70, block_size=16)
@example(n_tokens=64, block_size=16)
@example(n_tokens=65, block_size=16)
@example(n_tokens=0, block_size=16)
def test_blocks_for_tokens_are_the_blocks_kvrefs_allocator_holds(n_tokens, block_size):
    alloc = BlockAllocator(n_tokens + 1, block_size)
    if n_tokens:
        alloc.allocate(0, [0])
        for _ in range(n_tokens - 1):
            alloc.append(0)
    got = impl.blocks_for_tokens(n_tokens, block_size)
    expect_equal(call_str("blocks_for_tokens", n_tokens, block_size), got, alloc.num_used_blocks,
                 f"kvref's allocator holds {plural(alloc.num_used_blocks, 'block')} after a sequence grew to "
                 f"{plural(n_tokens, 'token')} one at a time in blocks of {block_size}")


# --- the allocator kata --------------------------------------------------------------------------

def check_tables(mine, lengths: dict, num_blocks: int, block_size: int) -> None:
    """Every live sequence holds just enough blocks, no block is held twice, the rest are free."""
    held = []
    for seq, n in lengths.items():
        table = mine.block_table(seq)
        need = math.ceil(n / block_size)
        expect(isinstance(table, list) and len(table) == need, f"block_table({seq!r})", table,
               f"a list of {plural(need, 'block')} for a sequence of {plural(n, 'token')} in blocks of {block_size} "
               f"(fewer than one block of waste per sequence)")
        held += table
    expect(len(set(held)) == len(held) and all(0 <= b < num_blocks for b in held), "block_table(...) of every sequence",
           held, f"distinct block ids in 0 .. {num_blocks - 1}: no block may be held by two sequences")
    expect_equal("num_free_blocks", mine.num_free_blocks, num_blocks - len(held),
                 f"{num_blocks} blocks, {len(held)} held by the live sequences")


OPS = st.lists(st.one_of(st.tuples(st.just("allocate"), st.integers(1, 40)),
                         st.tuples(st.just("append"), st.integers(0, 7)),
                         st.tuples(st.just("free"), st.integers(0, 7))), min_size=1, max_size=40)


@pytest.mark.kata("PagedBlockTable")
@given(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 4, 16]), ops=OPS)
def test_paged_table_kata_keeps_the_invariants_through_random_allocate_append_free(num_blocks, block_size, ops):
    mine, ref = impl.PagedBlockTable(num_blocks, block_size), BlockAllocator(num_blocks, block_size)
    lengths: dict[int, int] = {}
    next_id, log = 0, []
    for op, arg in ops:
        live = sorted(lengths)
        if op == "allocate":
            seq, next_id = next_id, next_id + 1
            log.append(f"allocate({seq}, {arg})")
            try:
                ref.allocate(seq, [0] * arg)
            except OutOfBlocks:
                with pytest.raises(MemoryError):
                    mine.allocate(seq, arg)
                check_tables(mine, lengths, num_blocks, block_size)
                continue
            table = mine.allocate(seq, arg)
            lengths[seq] = arg
            expect_equal(f"after {'; '.join(log)}: allocate({seq}, {arg})", table, mine.block_table(seq),
                         "allocate returns the new sequence's block table")
        elif op == "append" and live:
            seq = live[arg % len(live)]
            log.append(f"append({seq})")
            try:
                ref.append(seq)
            except OutOfBlocks:
                with pytest.raises(MemoryError):
                    mine.append(seq)
                check_tables(mine, lengths, num_blocks, block_size)
                continue
            slot = mine.append(seq)
            p = lengths[seq]
            lengths[seq] += 1
            table = mine.block_table(seq)
            want = table[p // block_size] * block_size + p % block_size if p // block_size < len(table) else None
            expect_equal(f"after {'; '.join(log[:-1])}: append({seq})", slot, want,
                         f"the slot of position {p}: block_table[{p} // {block_size}] · {block_size} + {p} % {block_size}")
        elif op == "free" and live:
            seq = live[arg % len(live)]
            log.append(f"free({seq})")
            ref.free_seq(seq)
            mine.free(seq)
            del lengths[seq]
        check_tables(mine, lengths, num_blocks, block_size)
        expect_equal(f"after {'; '.join(log)}: num_free_blocks", mine.num_free_blocks, ref.num_free_blocks,
                     "the free blocks of kvref's allocator after the same operations")
    for seq in list(lengths):
        mine.free(seq)
    expect_equal(f"after {'; '.join(log)} and freeing every sequence: num_free_blocks", mine.num_free_blocks, num_blocks,
                 "every block back on the free list: no leak")


@pytest.mark.kata("PagedBlockTable")
def test_paged_table_kata_worked_example_70_tokens_in_blocks_of_16():
    mine = impl.PagedBlockTable(8, 16)
    table = mine.allocate("a", 70)
    expect(isinstance(table, list) and len(table) == 5, "allocate('a', 70)", table, "a block table of 5 blocks: 70 = 4·16 + 6")
    expect_equal("num_free_blocks", mine.num_free_blocks, 3, "8 blocks, 5 held")
    slots = [mine.append("a") for _ in range(11)]  # positions 70 .. 80: 10 fill block 4, the 11th needs block 5
    table = mine.block_table("a")
    want = [table[p // 16] * 16 + p % 16 for p in range(70, 81)]
    expect_equal("append('a') at positions 70 .. 80", slots, want, "block_table[p // 16] · 16 + p % 16")
    expect_equal("num_free_blocks", mine.num_free_blocks, 2, "81 tokens hold 6 blocks of 8")
    with pytest.raises(MemoryError):
        mine.allocate("b", 33)  # 3 blocks, 2 free
    expect_equal("num_free_blocks after a refused allocate", mine.num_free_blocks, 2, "a refused allocate changes nothing")
    mine.allocate("b", 32)
    expect(set(mine.block_table("b")).isdisjoint(table), "block_table('b')", mine.block_table("b"),
           f"blocks not held by 'a' ({table})")
    mine.free("a")
    expect_equal("num_free_blocks after free('a')", mine.num_free_blocks, 6, "b's 2 blocks held, 6 free")


# --- paged against static ------------------------------------------------------------------------

@pytest.mark.kata("paged_slot_waste")
@settings(max_examples=min(settings().max_examples, 250))
@given(lengths=lengths_up_to(200), block_size=BLOCK_SIZES)
@example(lengths=[16, 32, 64], block_size=16)
@example(lengths=[17], block_size=16)
@example(lengths=[1, 2, 3], block_size=1)
def test_paged_slot_waste_is_what_kvrefs_allocator_leaves_empty_in_its_blocks(lengths, block_size):
    got = impl.paged_slot_waste(lengths, block_size)
    measured, held = paged_waste_measured(lengths, block_size)
    expect_real(call_str("paged_slot_waste", lengths, block_size), got, measured, rel=1e-9, abs=1e-12,
                why=f"kvref's allocator holds {plural(held, 'block')} of {block_size} slots for {sum(lengths):,} tokens: "
                    "the empty slots over the slots held")


@pytest.mark.kata("paged_slot_waste")
def test_paged_slot_waste_on_a_long_tailed_trace_is_under_4_percent_where_static_wastes_most():
    got = impl.paged_slot_waste(TRACE, 16)
    measured, held = paged_waste_measured(TRACE, 16)
    static = static_waste_measured(2048, TRACE)
    assert measured < 0.04 < 0.6 < static, "the trace no longer shows PagedAttention's headline"
    expect_real(call_str("paged_slot_waste", Shown("TRACE"), 16), got, measured, rel=1e-9,
                why=f"TRACE is 200 requests, log-uniform from 16 to 2,048 tokens; kvref's allocator holds {held:,} "
                    f"blocks of 16 for them; reserving 2,048 slots each wastes {static:.1%} of the cache")


def measured_waste_bytes(lengths, block_size, per_block) -> int:
    _, held = paged_waste_measured(lengths, block_size)
    unused_slots = held * block_size - sum(lengths)
    return unused_slots * per_block // block_size


@pytest.mark.kata("paged_waste_bytes")
@settings(max_examples=min(settings().max_examples, 200))  # long traces: the deep profile stays under the timeout
@given(name=st.sampled_from(REAL), lengths=lengths_up_to(5000, 6), block_size=BLOCK_SIZES,
       dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float8_e4m3fn]))
@example(name="llama-2-70b", lengths=[70], block_size=16, dtype=torch.bfloat16)
@example(name="llama-2-7b", lengths=[1, 4096], block_size=16, dtype=torch.bfloat16)
def test_paged_waste_bytes_are_the_empty_slots_of_kvrefs_blocks_in_every_layer(name, lengths, block_size, dtype):
    cfg = preset(name)
    got = impl.paged_waste_bytes(cfg, lengths, block_size, dtype)
    per_block = block_nbytes_measured(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, block_size, dtype)
    measured = measured_waste_bytes(lengths, block_size, per_block)
    expect_equal(call_str("paged_waste_bytes", preset(name), lengths, block_size, dtype), got, measured,
                 f"the empty slots of the blocks kvref's allocator holds, times {per_block // block_size:,} bytes a slot: "
                 f".nbytes of one block's K and V pools over {plural(cfg.n_layers, 'layer')}, "
                 f"{plural(cfg.n_kv_heads, 'KV head')} of {cfg.head_dim}, on the meta device, over {block_size} slots")
