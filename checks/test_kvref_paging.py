"""kvref.paging against its invariants (hypothesis stateful testing) and against PyTorch's SDPA.

The state machine drives one allocator with prefix caching through random prompts, appends,
forks and frees, writing every token's K/V into real block pools. Each token's K/V is a fixed
function of the whole prefix up to it (as a real model's are), so a block reused through the
prefix cache must hold the same bytes as recomputing the new sequence from scratch; a key that
ignored the parent would hand out the wrong bytes and fail.
"""

import hashlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, precondition, rule

from kvref.attention import attention
from kvref.config import ModelConfig
from kvref.model import build_model
from kvref.paging import (BlockAllocator, OutOfBlocks, copy_block, gather_kv, paged_attention, paged_kv_cache,
                          paged_waste_measured, prefix_keys, static_waste_measured, write_slots)

HKV, D = 2, 3
TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=9)  # a 3-token vocabulary: prefixes repeat often


def kv_of(prefix: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The K/V `[Hkv, D]` of the last token of `prefix`: a fixed function of the whole prefix."""
    seed = int.from_bytes(hashlib.sha256(repr(prefix).encode()).digest()[:6], "little")
    kv = torch.randn(2, HKV, D, generator=torch.Generator().manual_seed(seed))
    return kv[0], kv[1]


class PagedCacheMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    @initialize(block_size=st.integers(1, 4), num_blocks=st.integers(1, 14))
    def start(self, block_size, num_blocks):
        self.alloc = BlockAllocator(num_blocks, block_size, prefix_caching=True)
        self.k, self.v = paged_kv_cache(num_blocks, block_size, HKV, D)
        self.model: dict[int, list[int]] = {}  # seq -> tokens
        self.next_id = 0

    def _write(self, seq, positions):
        toks = self.model[seq]
        slots = self.alloc.slot_mapping(seq)
        for p in positions:
            k, v = kv_of(tuple(toks[:p + 1]))
            write_slots(self.k, self.v, [slots[p]], k[None], v[None])

    @rule(target=seqs, tokens=TOKENS)
    def new_sequence(self, tokens):
        seq, self.next_id = self.next_id, self.next_id + 1
        hits_before, free_before = self.alloc.hits, self.alloc.num_free_blocks
        try:
            self.alloc.allocate(seq, tokens)
        except OutOfBlocks:
            assert self.alloc.num_free_blocks == free_before and seq not in self.alloc.block_tables
            return None
        self.model[seq] = list(tokens)
        hit = self.alloc.hits - hits_before
        bs = self.alloc.block_size
        # A hit covers whole leading blocks; their bytes are read, not written, below.
        self._write(seq, range(hit * bs, len(tokens)))
        return seq

    @rule(seq=seqs, token=st.integers(0, 2))
    def append_token(self, seq, token):
        if seq not in self.model:
            return
        try:
            slot, copy = self.alloc.append(seq, token)
        except OutOfBlocks:
            return
        if copy is not None:
            src, dst = copy
            assert self.alloc.refcount[src] >= 1 and self.alloc.refcount[dst] == 1
            copy_block(self.k, self.v, src, dst)
        self.model[seq].append(token)
        assert slot == self.alloc.slot_mapping(seq)[-1]
        self._write(seq, [len(self.model[seq]) - 1])

    @rule(target=seqs, seq=seqs)
    def fork_sequence(self, seq):
        if seq not in self.model:
            return None
        child, self.next_id = self.next_id, self.next_id + 1
        self.alloc.fork(seq, child)
        self.model[child] = list(self.model[seq])
        return child

    @rule(seq=consumes(seqs))
    def free_sequence(self, seq):
        if seq in self.model:
            self.alloc.free_seq(seq)
            del self.model[seq]

    @invariant()
    def refcounts_are_exact_and_the_free_list_is_the_rest(self):
        if not hasattr(self, "alloc"):
            return
        held = [0] * self.alloc.num_blocks
        for table in self.alloc.block_tables.values():
            assert len(set(table)) == len(table), f"a block twice in one table: {table}"
            for b in table:
                held[b] += 1
        assert held == self.alloc.refcount
        assert set(self.alloc.free) == {b for b in range(self.alloc.num_blocks) if held[b] == 0}

    @invariant()
    def a_block_is_held_twice_only_when_both_sequences_agree_on_its_tokens(self):
        if not hasattr(self, "alloc"):
            return
        bs, owner = self.alloc.block_size, {}
        for seq, table in self.alloc.block_tables.items():
            toks = self.model[seq]
            for i, b in enumerate(table):
                content = (i, tuple(toks[:(i + 1) * bs]))  # the prefix through this block decides its K/V
                if b in owner and owner[b] != content:
                    # a shared partial block is fine only while both hold the same tokens in it
                    raise AssertionError(f"block {b} is held by sequences that disagree on it: {owner[b]} vs {content}")
                owner[b] = content

    @invariant()
    def every_sequence_wastes_under_one_block_and_reads_its_own_kv(self):
        if not hasattr(self, "alloc"):
            return
        bs = self.alloc.block_size
        for seq, toks in self.model.items():
            waste = self.alloc.waste_slots(seq)
            assert 0 <= waste < bs, f"sequence {seq}: {waste} unused slots, block size {bs}"
            k, v = gather_kv(self.k, self.v, self.alloc.block_tables[seq], len(toks))  # (1, Hkv, T, D)
            want = [kv_of(tuple(toks[:p + 1])) for p in range(len(toks))]
            want_k = torch.stack([w[0] for w in want], 1)[None]
            want_v = torch.stack([w[1] for w in want], 1)[None]
            assert torch.equal(k, want_k) and torch.equal(v, want_v), f"sequence {seq} reads K/V it did not write"

    @invariant()
    def cached_keys_name_blocks_that_hold_them(self):
        if not hasattr(self, "alloc"):
            return
        assert {b: k for k, b in self.alloc.cached.items()} == self.alloc.key_of

    def teardown(self):
        if not hasattr(self, "alloc"):
            return
        for seq in list(self.model):
            self.alloc.free_seq(seq)
        assert self.alloc.num_free_blocks == self.alloc.num_blocks, "blocks leaked after every sequence ended"
        assert not any(self.alloc.refcount)


TestPagedCacheMachine = PagedCacheMachine.TestCase


def test_prefix_keys_chain_the_parent_so_a_shared_later_block_alone_does_not_hit():
    a, b = [1, 2, 3, 4], [9, 9, 3, 4]  # same second block, different first block
    assert prefix_keys(a, 2)[1] != prefix_keys(b, 2)[1]
    alloc = BlockAllocator(8, 2, prefix_caching=True)
    alloc.allocate("a", a)
    alloc.allocate("b", b)
    assert (alloc.hits, alloc.misses) == (0, 4)
    alloc.allocate("c", [1, 2, 3, 4, 5])
    assert (alloc.hits, alloc.misses) == (2, 4)
    assert alloc.block_tables["c"][:2] == alloc.block_tables["a"][:2]


def test_unreferenced_cached_blocks_are_evicted_least_recently_freed_first():
    alloc = BlockAllocator(4, 2, prefix_caching=True)
    alloc.allocate("a", [1, 1, 1, 1])
    alloc.free_seq("a")
    alloc.allocate("b", [2, 2, 2, 2])
    alloc.free_seq("b")
    assert len(alloc.cached) == 4 and alloc.num_free_blocks == 4
    alloc.allocate("c", [3, 3])  # takes the least recently freed block: a's last block (freed first)
    assert alloc.evictions == 1
    alloc.allocate("d", [2, 2, 2, 2])  # b's prefix is still cached
    assert alloc.hits == 2
    alloc.free_seq("c")
    alloc.free_seq("d")
    alloc.allocate("e", [1, 1, 1, 1])  # a's first block survived, its second was evicted
    assert alloc.hits == 3  # and its new second block evicted another cached block


def test_copy_on_write_gives_the_writer_a_private_block_and_keeps_the_other_reading_the_old_one():
    alloc = BlockAllocator(4, 4)
    alloc.allocate("p", [5, 6])
    alloc.fork("p", "c")
    shared = alloc.block_tables["p"][0]
    assert alloc.refcount[shared] == 2
    slot, copy = alloc.append("p", 7)
    assert copy == (shared, alloc.block_tables["p"][0]) and alloc.block_tables["c"] == [shared]
    assert alloc.refcount[shared] == 1 and slot == alloc.block_tables["p"][0] * 4 + 2
    assert alloc.append("c", 8) == (shared * 4 + 2, None)  # now unshared: written in place


def test_out_of_blocks_changes_nothing():
    alloc = BlockAllocator(2, 2)
    alloc.allocate("a", [1, 2, 3])
    with pytest.raises(OutOfBlocks):
        alloc.allocate("b", [1, 2, 3])
    assert alloc.num_free_blocks == 0 and list(alloc.block_tables) == ["a"]
    with pytest.raises(ValueError):
        BlockAllocator(0, 16)


def test_releasing_a_free_block_raises_even_without_asserts():
    """The refcount invariant is a raise, not an assert, so `python -O` still catches the bookkeeping bug."""
    alloc = BlockAllocator(2, 2)
    with pytest.raises(RuntimeError, match="block 0 released more often than held"):
        alloc._release(0)
    assert alloc.refcount == [0, 0] and alloc.num_free_blocks == 2


def sdpa_causal(q, k, v):
    """PyTorch's SDPA over the contiguous cache, queries at the last S of T positions."""
    s, t = q.shape[2], k.shape[2]
    allowed = torch.arange(t)[None, :] <= torch.arange(t - s, t)[:, None]  # (S, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)


@given(data=st.data(), block_size=st.sampled_from([1, 2, 3, 16]), hkv=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 3]), batch=st.integers(1, 3), s=st.integers(1, 3))
def test_paged_attention_equals_sdpa_over_the_contiguous_cache(data, block_size, hkv, group, batch, s):
    lens = data.draw(st.lists(st.integers(s, 40), min_size=batch, max_size=batch), label="seq_lens")
    need = [-(-n // block_size) for n in lens]
    gen = torch.Generator().manual_seed(sum(lens))
    perm = torch.randperm(sum(need) + 3, generator=gen).tolist()  # scattered physical blocks
    tables = [perm[sum(need[:b]):sum(need[:b + 1])] for b in range(batch)]
    k_cache, v_cache = paged_kv_cache(len(perm), block_size, hkv, 4)
    k_cache.normal_(generator=gen)
    v_cache.normal_(generator=gen)
    q = torch.randn(batch, hkv * group, s, 4, generator=gen)
    got = paged_attention(q, k_cache, v_cache, tables, lens)
    for b in range(batch):
        k, v = gather_kv(k_cache, v_cache, tables[b], lens[b])
        bs = block_size
        k_manual = torch.stack([k_cache[tables[b][p // bs], p % bs] for p in range(lens[b])], 1)[None]
        assert torch.equal(k, k_manual)
        torch.testing.assert_close(got[b:b + 1], sdpa_causal(q[b:b + 1], k, v), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[b:b + 1], attention(q[b:b + 1], k, v), atol=1e-6, rtol=1e-6)


def test_a_prefix_hit_on_the_kvref_model_returns_the_bytes_a_recompute_gives():
    cfg = ModelConfig(vocab_size=32, n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_ff=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    bs = 4
    a = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    b = a[:8] + [7, 7, 7]  # shares two full blocks with a
    alloc = BlockAllocator(16, bs, prefix_caching=True)
    pools = [paged_kv_cache(16, bs, cfg.n_kv_heads, cfg.head_dim) for _ in range(cfg.n_layers)]

    def run(ids):
        caches = model.new_caches("growing")
        with torch.no_grad():
            model.prefill(torch.tensor([ids]), caches)
        return [(c.k[0].transpose(0, 1), c.v[0].transpose(0, 1)) for c in caches]  # per layer (T, Hkv, D)

    alloc.allocate("a", a)
    for (k, v), (kc, vc) in zip(run(a), pools):
        write_slots(kc, vc, alloc.slot_mapping("a"), k, v)
    alloc.allocate("b", b)
    assert alloc.hits == 2 and alloc.block_tables["b"][:2] == alloc.block_tables["a"][:2]
    for layer, ((k, v), (kc, vc)) in enumerate(zip(run(b), pools)):
        kb, vb = gather_kv(kc, vc, alloc.block_tables["b"][:2], 2 * bs)  # (1, Hkv, 8, D)
        torch.testing.assert_close(kb[0].transpose(0, 1), k[:8], atol=0, rtol=0, msg=f"layer {layer} K")
        torch.testing.assert_close(vb[0].transpose(0, 1), v[:8], atol=0, rtol=0, msg=f"layer {layer} V")


def test_static_reservation_wastes_most_and_paging_under_one_block_per_sequence():
    lengths = [5, 17, 300, 2048, 1]
    assert static_waste_measured(2048, lengths) == pytest.approx(1 - sum(lengths) / (5 * 2048), rel=1e-12)
    waste, held = paged_waste_measured(lengths, 16)
    assert held == sum(-(-n // 16) for n in lengths)
    assert waste == pytest.approx(1 - sum(lengths) / (held * 16), rel=1e-12)
