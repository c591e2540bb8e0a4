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
from kvkata.check import Mismatch, Shown, call_str, expect, expect_equal, expect_real, plural
from kvref.config import PRESETS, ModelConfig, preset
from kvref.paging import BlockAllocator, OutOfBlocks, block_nbytes_measured, paged_waste_measured, static_waste_measured

impl = kvkata.load("card03_paging.paging")

REAL = [name for name, cfg in PRESETS.items() if not cfg.is_mla]
BLOCK_SIZES = st.sampled_from([1, 2, 3, 8, 16, 32])
# A trace in the spirit of PagedAttention's: lengths log-uniform from 16 to 2,048 tokens
# (deterministic quantiles), reserved at 2,048 each. Its mean length is about 2,032 / ln(128) = 419.
TRACE = [round(16 * 128 ** ((i + 0.5) / 200)) for i in range(200)]


# Gemma-7B's attention shape (its config.json: hidden_size 3072, 16 heads and 16 KV heads of head_dim 256,
# 28 layers): each head is wider than d_model / n_heads = 192, so a slot's bytes need the config's head_dim.
WIDE_HEADS = ModelConfig(vocab_size=256, n_layers=28, d_model=3072, n_heads=16, n_kv_heads=16, head_dim=256, d_ff=64,
                         name="gemma-7b-shaped")


def lengths_up_to(max_len: int, max_size: int = 12):
    return st.lists(st.integers(1, max_len), min_size=1, max_size=max_size)


# --- static reservation ------------------------------------------------------------------------

@pytest.mark.kata("static_slot_waste")
@given(data=st.data(), max_seq_len=st.integers(1, 300))
@example(data=None, max_seq_len=8192)
@example(data=None, max_seq_len=2048)  # TRACE: its longest request (2,043) is not max_seq_len
def test_static_slot_waste_is_the_share_of_a_reserved_cache_never_written(data, max_seq_len):
    pinned = {8192: [1, 512, 8192], 2048: TRACE}
    lengths = pinned[max_seq_len] if data is None else data.draw(lengths_up_to(max_seq_len), label="lengths")
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
@example(n_tokens=48, block_size=16)  # 3 full blocks: an odd quotient, where rounding n / B + 0.5 half-to-even gives 4
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
    try:
        got = mine.block_table("b")
    except KeyError:
        pass
    else:
        raise Mismatch(f"called block_table('b') after allocate('b', 33) was refused: returned {got!r}; expected KeyError: "
                       "a refused allocate changes nothing, so 'b' was never started (check the free blocks before "
                       "recording the sequence)")
    mine.allocate("b", 32)
    expect(set(mine.block_table("b")).isdisjoint(table), "block_table('b')", mine.block_table("b"),
           f"blocks not held by 'a' ({table})")
    mine.free("a")
    expect_equal("num_free_blocks after free('a')", mine.num_free_blocks, 6, "b's 2 blocks held, 6 free")


# --- PagedBlockTable: pinned scenarios for what random draws rarely reach (issue 21) ---------------
# The kata profile draws 15 examples: a refused append at a block boundary, a caller changing a
# returned table, or a lookup after free may not come up. Each scenario below is fixed.

def expect_int_table(call: str, table, n_blocks: int) -> None:
    """A block table is a list of Python ints (a list of 0-d tensors compares equal to one)."""
    expect(isinstance(table, list) and len(table) == n_blocks, call, table, f"a list of {plural(n_blocks, 'block')}")
    for i, b in enumerate(table):
        expect(type(b) is int, f"{call}[{i}]", b, f"a Python int block id, not a {type(b).__name__}: int(b) "
               "if the free list holds tensors")


@pytest.mark.kata("PagedBlockTable")
def test_paged_table_kata_returns_tables_the_caller_may_change_without_touching_the_allocator():
    mine = impl.PagedBlockTable(4, 2)
    table = mine.allocate("a", 3)  # 2 blocks of 2 slots
    expect_int_table("allocate('a', 3)", table, 2)
    kept = list(table)
    table.append(99), table.reverse()  # the caller's list now: changing it must not change the allocator's
    expect_equal("block_table('a') after the caller changed the list allocate('a', 3) returned",
                 mine.block_table("a"), kept, "the table as allocated: return a copy (list(...)), not the list you keep")
    looked_up = mine.block_table("a")
    expect_int_table("block_table('a')", looked_up, 2)
    looked_up.clear()
    expect_equal("block_table('a') after the caller cleared the list block_table('a') returned",
                 mine.block_table("a"), kept, "the table as allocated: return a copy (list(...)), not the list you keep")
    slot = mine.append("a")  # position 3: the second slot of block kept[1]
    expect_equal("append('a') at position 3", slot, kept[1] * 2 + 1,
                 f"block_table[3 // 2] · 2 + 3 % 2 with the table {kept}: the caller's changes did not reach it")


@pytest.mark.kata("PagedBlockTable")
def test_paged_table_kata_refused_append_changes_nothing_and_append_works_after_a_free():
    mine = impl.PagedBlockTable(3, 2)
    mine.allocate("a", 4)  # 2 full blocks
    mine.allocate("b", 2)  # the last block, full
    before = mine.block_table("a")
    for attempt in (1, 2):  # refused twice: a count bumped before the check would move the next slot
        try:
            got = mine.append("a")  # position 4 needs a third block; none is free
        except MemoryError:
            pass
        except Exception as exc:  # noqa: BLE001 - a learner's slip shown as what it is
            raise Mismatch(f"called append('a') after {plural(attempt - 1, 'refused append')} with every block held: "
                           f"raised {type(exc).__name__}: {exc}; expected MemoryError again (a refused append must "
                           "leave the sequence's length as it was)") from None
        else:
            raise Mismatch(f"called append('a') with every block held ({plural(attempt - 1, 'earlier refusal')}): "
                           f"returned {got!r}; expected MemoryError: position 4 needs a third block and none is free")
        expect_equal(f"num_free_blocks after {plural(attempt, 'refused append')}", mine.num_free_blocks, 0,
                     "a refused append changes nothing")
        expect_equal(f"block_table('a') after {plural(attempt, 'refused append')}", mine.block_table("a"), before,
                     "a refused append changes nothing")
    freed = mine.block_table("b")
    mine.free("b")
    slot = mine.append("a")  # position 4 again: offset 0 of the block b gave back
    expect_equal("append('a') after 2 refused appends and free('b')", slot, freed[0] * 2,
                 f"the slot of position 4 (still the 5th token: refused appends added none), offset 0 of block "
                 f"{freed[0]}, the one b freed: block_table[4 // 2] · 2 + 4 % 2")
    expect_equal("block_table('a')", mine.block_table("a"), before + freed, "a's 2 blocks, then the one b freed")
    expect_equal("append('a') at position 5", mine.append("a"), freed[0] * 2 + 1, "offset 1 of the same block")
    with pytest.raises(MemoryError):
        mine.allocate("c", 1)  # every block held again
    expect_equal("num_free_blocks after a refused allocate", mine.num_free_blocks, 0, "nothing changed")


@pytest.mark.kata("PagedBlockTable")
def test_paged_table_kata_forgets_a_freed_sequence_and_can_allocate_its_id_again():
    mine = impl.PagedBlockTable(4, 4)
    held = mine.allocate("a", 5)  # 2 blocks
    mine.allocate("b", 4)  # 1 block
    mine.free("a")
    expect_equal("num_free_blocks after free('a')", mine.num_free_blocks, 3,
                 "a's 2 blocks back on the free list, b's held")
    for what, op in (("block_table('a')", lambda: mine.block_table("a")), ("append('a')", lambda: mine.append("a")),
                     ("free('a')", lambda: mine.free("a"))):
        try:
            got = op()
        except KeyError:
            continue
        twice = " (a second free would give its blocks back twice)" if what.startswith("free") else ""
        raise Mismatch(f"called {what} after free('a'): returned {got!r}; expected KeyError: a freed sequence is gone "
                       f"(delete its table and length, not only return its blocks){twice}")
    expect_equal("num_free_blocks after the calls on a freed sequence", mine.num_free_blocks, 3,
                 "3: no block returned twice, none taken")
    again = mine.allocate("a", 12)  # 3 blocks: every free block, a's old ones included
    expect_int_table("allocate('a', 12) after free('a')", again, 3)
    expect(set(held) <= set(again) and mine.num_free_blocks == 0, "allocate('a', 12) after free('a')", again,
           f"a new table of the 3 free blocks, a's old blocks {held} among them, and none left free")
    every = sorted(again + mine.block_table("b"))
    expect(every == [0, 1, 2, 3], "block_table('a') + block_table('b') with every block held", every,
           "the physical block ids 0 .. 3 of PagedBlockTable(4, 4), each held once")
    with pytest.raises(MemoryError):
        mine.append("a")  # position 12 needs a 4th block; the only other one is b's


# --- paged against static ------------------------------------------------------------------------

@pytest.mark.kata("paged_slot_waste")
@settings(max_examples=min(settings().max_examples, 250))
@given(lengths=lengths_up_to(200), block_size=BLOCK_SIZES)
@example(lengths=[16, 32, 64], block_size=16)
@example(lengths=[17], block_size=16)
@example(lengths=[1, 2, 3], block_size=1)
@example(lengths=[17, 1], block_size=16)  # blocks per request, not for the trace's total; slots pooled, not averaged
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
@example(name=WIDE_HEADS, lengths=[70], block_size=16, dtype=torch.float32)  # D = 256, d_model / H = 192
def test_paged_waste_bytes_are_the_empty_slots_of_kvrefs_blocks_in_every_layer(name, lengths, block_size, dtype):
    cfg = preset(name) if isinstance(name, str) else name
    got = impl.paged_waste_bytes(cfg, lengths, block_size, dtype)
    per_block = block_nbytes_measured(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, block_size, dtype)
    measured = measured_waste_bytes(lengths, block_size, per_block)
    expect_equal(call_str("paged_waste_bytes", cfg, lengths, block_size, dtype), got, measured,
                 f"the empty slots of the blocks kvref's allocator holds, times {per_block // block_size:,} bytes a slot: "
                 f".nbytes of one block's K and V pools over {plural(cfg.n_layers, 'layer')}, "
                 f"{plural(cfg.n_kv_heads, 'KV head')} of {cfg.head_dim}, on the meta device, over {block_size} slots")
