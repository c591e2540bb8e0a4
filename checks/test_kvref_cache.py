"""kvref.cache: the growing and the static KV cache keep one contract.

Slot j of what `update` returns holds position j. The reference for both is the list of chunks
written: after each update, the first `seq_len` slots returned are exactly those chunks
concatenated along the sequence axis, bit for bit. The growing cache returns those T slots and
no more; the static cache returns its whole buffers, the same shape at every step, and reads no
tensor value back to the host: it runs on the meta device, whose tensors have no values to read.
"""

import re

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from kvref.attention import attention
from kvref.cache import GrowingKVCache, StaticKVCache
from kvref.config import ModelConfig
from kvref.model import build_model

KINDS = ("growing", "static")
CACHE_SHAPES = st.fixed_dictionaries(dict(B=st.integers(1, 3), Hkv=st.integers(1, 3), D=st.sampled_from([2, 4, 8])))
# S of each update in turn: the first is a prefill, the rest decode steps (1) or chunks (> 1).
CHUNK_LENS = st.lists(st.integers(1, 4), min_size=1, max_size=6)
SLACK = st.integers(0, 3)  # static positions left unused at the end
MAX_SEQ_LEN = 8  # the static cache of the single-example tests


def new_cache(kind, B=1, Hkv=2, D=4, max_seq_len=MAX_SEQ_LEN, dtype=torch.float32):
    if kind == "growing":
        return GrowingKVCache()
    return StaticKVCache(B, Hkv, max_seq_len, D, dtype=dtype)


def chunks(s, lens, seed=0):
    """(input_pos, k_new, v_new) for consecutive chunks of the given lengths."""
    gen, start = torch.Generator().manual_seed(seed), 0
    for S in lens:
        k = torch.randn(s["B"], s["Hkv"], S, s["D"], generator=gen)  # (B, Hkv, S, D)
        v = torch.randn(s["B"], s["Hkv"], S, s["D"], generator=gen)
        yield torch.arange(start, start + S), k, v
        start += S


def kv(S, B=1, Hkv=2, D=4, dtype=torch.float32, seed=0):
    """k_new and v_new `[B, Hkv, S, D]` for the single-example tests."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hkv, S, D, generator=gen).to(dtype),
            torch.randn(B, Hkv, S, D, generator=gen).to(dtype))


def filled(kind, n):
    """A cache of the default shape holding positions 0 .. n - 1."""
    cache = new_cache(kind)
    cache.update(torch.arange(n), *kv(n))
    return cache


# --- one contract, two forms -------------------------------------------------------------

@given(s=CACHE_SHAPES, lens=CHUNK_LENS, slack=SLACK)
@example(s=dict(B=2, Hkv=3, D=4), lens=[3, 1, 1, 2], slack=0)  # fills the static cache exactly
def test_growing_and_static_caches_hold_identical_keys_and_values_at_every_step(s, lens, slack):
    growing = GrowingKVCache()
    static = StaticKVCache(s["B"], s["Hkv"], sum(lens) + slack, s["D"])
    for step, (pos, k, v) in enumerate(chunks(s, lens)):
        kg, vg = growing.update(pos, k, v)
        ks, vs = static.update(pos, k, v)
        T = int(pos[-1]) + 1
        assert growing.seq_len == static.seq_len == T
        assert kg.shape[2] == T and ks.shape[2] == sum(lens) + slack, f"step {step}: the static cache returns all its slots"
        assert torch.equal(kg, ks[:, :, :T]) and torch.equal(vg, vs[:, :, :T]), f"step {step} (input_pos {pos.tolist()})"


@pytest.mark.parametrize("kind", KINDS)
@given(s=CACHE_SHAPES, lens=CHUNK_LENS)
def test_a_cache_holds_exactly_the_keys_and_values_written_so_far(kind, s, lens):
    cache = new_cache(kind, s["B"], s["Hkv"], s["D"], max_seq_len=sum(lens))
    written_k, written_v = [], []
    for pos, k, v in chunks(s, lens):
        written_k.append(k)
        written_v.append(v)
        got_k, got_v = cache.update(pos, k, v)
        T = cache.seq_len
        assert torch.equal(got_k[:, :, :T], torch.cat(written_k, dim=2)), f"keys after writing {pos.tolist()}"
        assert torch.equal(got_v[:, :, :T], torch.cat(written_v, dim=2)), f"values after writing {pos.tolist()}"


@pytest.mark.parametrize("kind", KINDS)
@given(s=CACHE_SHAPES, lens=CHUNK_LENS)
def test_positions_returned_earlier_stay_bit_identical_as_the_cache_grows(kind, s, lens):
    # The static cache returns its buffers themselves: later writes must land past what was written.
    cache = new_cache(kind, s["B"], s["Hkv"], s["D"], max_seq_len=sum(lens))
    returned, snapshots = [], []
    for pos, k, v in chunks(s, lens):
        got = cache.update(pos, k, v)
        T = cache.seq_len
        returned.append((T, got))
        snapshots.append(tuple(t[:, :, :T].clone() for t in got))
    for step, ((T, (k, v)), (k0, v0)) in enumerate(zip(returned, snapshots)):
        assert torch.equal(k[:, :, :T], k0) and torch.equal(v[:, :, :T], v0), f"what step {step} returned was changed later"


@given(s=CACHE_SHAPES, lens=CHUNK_LENS)
def test_static_cache_returns_its_own_buffers_the_same_shape_at_every_step(s, lens):
    cache = StaticKVCache(s["B"], s["Hkv"], sum(lens), s["D"])
    k_buf, v_buf = cache.k, cache.v
    k_ptr, v_ptr = k_buf.data_ptr(), v_buf.data_ptr()
    for pos, k, v in chunks(s, lens):
        got_k, got_v = cache.update(pos, k, v)
        assert cache.k is k_buf and cache.v is v_buf
        assert (cache.k.data_ptr(), cache.v.data_ptr()) == (k_ptr, v_ptr), "a static cache never reallocates"
        assert got_k is k_buf and got_v is v_buf, "update returns the buffers themselves, whatever the positions"


@given(s=CACHE_SHAPES, data=st.data())
@example(s=dict(B=1, Hkv=2, D=4), data=None)  # a prompt written as [2, 0, 3, 1], then the chunk [5, 4]
def test_static_cache_writes_each_entry_at_its_own_position_in_any_order(s, data):
    T = data.draw(st.integers(1, 6), label="prompt length") if data else 4
    prompt = data.draw(st.permutations(range(T)), label="prompt positions") if data else [2, 0, 3, 1]
    chunk = data.draw(st.permutations(range(T, T + 2)), label="chunk positions") if data else [T + 1, T]
    gen = torch.Generator().manual_seed(0)
    k_all = torch.randn(s["B"], s["Hkv"], T + 2, s["D"], generator=gen)  # position j's key at [:, :, j]
    v_all = torch.randn(s["B"], s["Hkv"], T + 2, s["D"], generator=gen)
    cache = StaticKVCache(s["B"], s["Hkv"], T + 2, s["D"])
    for pos in (torch.tensor(prompt), torch.tensor(chunk)):
        k, v = cache.update(pos, k_all[:, :, pos], v_all[:, :, pos])
        end = int(pos.max()) + 1
        assert cache.seq_len == end
        assert torch.equal(k[:, :, :end], k_all[:, :, :end]) and torch.equal(v[:, :, :end], v_all[:, :, :end]), \
            f"input_pos {pos.tolist()}: entry i belongs in slot input_pos[i]"


def test_a_static_cache_step_runs_on_the_meta_device_where_no_value_can_be_read():
    """A meta tensor has a shape and no values: any read of a position (int(), .item(), a comparison
    turned into a bool, a slice bound) raises, so a step that runs there reads none: the update,
    and the attention masked by position over the whole buffers (4 query heads on 2 KV heads)."""
    cache = StaticKVCache(2, 2, MAX_SEQ_LEN, 4, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        int(torch.tensor([3], device="meta").max())  # what a host read of a meta position does
    for pos in ([0, 1, 2, 3], [4], [3, 2]):  # a prompt, a decode step, a rewrite of a rejected draft
        k, v = torch.zeros(2, 2, len(pos), 4, device="meta"), torch.zeros(2, 2, len(pos), 4, device="meta")
        input_pos = torch.tensor(pos, device="meta")
        got_k, got_v = cache.update(input_pos, k, v)
        assert got_k.shape == got_v.shape == (2, 2, MAX_SEQ_LEN, 4)
        q = torch.zeros(2, 4, len(pos), 4, device="meta")  # (B, H, S, D)
        assert attention(q, got_k, got_v, input_pos=input_pos).shape == (2, 4, len(pos), 4)


@given(s=CACHE_SHAPES, lens=CHUNK_LENS, slack=st.integers(1, 3), H_per_kv=st.integers(1, 3))
@example(s=dict(B=1, Hkv=2, D=4), lens=[3, 1, 2], slack=2, H_per_kv=2)
def test_attention_masked_by_position_over_a_static_cache_equals_attention_over_a_growing_one(s, lens, slack, H_per_kv):
    """Whatever the slots past the queries hold (zeros never written, or loud stale values), the mask hides them."""
    growing = GrowingKVCache()
    static = StaticKVCache(s["B"], s["Hkv"], sum(lens) + slack, s["D"])
    static.k[:, :, sum(lens):] = 1e4  # slots never written this run, made loud
    static.v[:, :, sum(lens):] = -1e4
    gen = torch.Generator().manual_seed(1)
    for step, (pos, k, v) in enumerate(chunks(s, lens)):
        q = torch.randn(s["B"], s["Hkv"] * H_per_kv, len(pos), s["D"], generator=gen)  # (B, H, S, D)
        want = attention(q, *growing.update(pos, k, v))
        got = attention(q, *static.update(pos, k, v), input_pos=pos)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"step {step}, input_pos {pos.tolist()}")


def test_attention_after_a_rollback_reads_no_stale_key():
    """Positions 0 .. 5 written, then 2 and 3 rewritten (a rejected draft): the queries at 2 and 3
    must see the new keys at 2 and 3 and nothing of the stale 4 and 5 still in the buffers."""
    cache = new_cache("static")
    cache.update(torch.arange(6), *kv(6, seed=0))
    k_new, v_new = kv(2, seed=1)
    k_buf, v_buf = cache.update(torch.tensor([3, 2]), k_new[:, :, [1, 0]], v_new[:, :, [1, 0]])
    q = torch.randn(1, 4, 2, 4, generator=torch.Generator().manual_seed(2))  # (B, H, S, D): positions 2, 3
    fresh = GrowingKVCache()  # the sequence as it now stands: positions 0, 1 old, 2, 3 new
    fresh.update(torch.arange(2), *(t[:, :, :2] for t in kv(6, seed=0)))
    want = attention(q, *fresh.update(torch.tensor([2, 3]), k_new, v_new))
    torch.testing.assert_close(attention(q, k_buf, v_buf, input_pos=torch.tensor([2, 3])), want, rtol=1e-6, atol=1e-6)
    assert cache.seq_len == 4


# --- clear errors, for both forms ----------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_update_rejects_keys_that_are_not_4d_naming_the_layout(kind):
    k = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=re.escape("k_new must be [B, Hkv, S, D], got shape [2, 3, 4]")):
        new_cache(kind).update(torch.arange(3), k, k)


@pytest.mark.parametrize("kind", KINDS)
def test_update_rejects_values_shaped_unlike_the_keys_naming_the_expected_shape(kind):
    k, v = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5)
    with pytest.raises(ValueError, match=re.escape("v_new must be [B, Hkv, S, D] = [1, 2, 3, 4], got shape [1, 2, 3, 5]")):
        new_cache(kind).update(torch.arange(3), k, v)


@pytest.mark.parametrize("kind", KINDS)
def test_update_rejects_values_of_another_dtype_than_the_keys(kind):
    k, v = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="v_new must have dtype torch.float32, got torch.float64"):
        new_cache(kind).update(torch.arange(3), k, v)


@pytest.mark.parametrize("kind", KINDS)
def test_update_rejects_keys_of_another_dtype_than_the_cache_holds(kind):
    cache = filled(kind, 2)  # float32
    with pytest.raises(TypeError, match="k_new must have dtype torch.float32, got torch.bfloat16"):
        cache.update(torch.tensor([2]), *kv(1, dtype=torch.bfloat16))


@pytest.mark.parametrize("kind", KINDS)
def test_update_rejects_keys_with_other_heads_than_the_cache_holds_naming_the_expected_shape(kind):
    cache = filled(kind, 2)  # [1, 2, *, 4]
    with pytest.raises(ValueError, match=re.escape("k_new must be [B, Hkv, S, D] = [1, 2, *, 4], got shape [1, 3, 1, 4]")):
        cache.update(torch.tensor([2]), *kv(1, Hkv=3))


@pytest.mark.parametrize("kind", KINDS)
def test_update_rejects_float_positions(kind):
    with pytest.raises(TypeError, match="input_pos must hold integer positions, got dtype torch.float32"):
        new_cache(kind).update(torch.tensor([0.0, 1.0]), *kv(2))


@pytest.mark.parametrize("kind", KINDS)
def test_update_rejects_positions_whose_count_is_not_S(kind):
    with pytest.raises(ValueError, match=re.escape("input_pos must be [S] = [3], got shape [2]")):
        new_cache(kind).update(torch.arange(2), *kv(3))


@pytest.mark.parametrize("kind", KINDS)
def test_update_rejects_positions_that_are_not_a_tensor(kind):
    with pytest.raises(TypeError, match="input_pos must be a torch.Tensor, got list"):
        new_cache(kind).update([0, 1], *kv(2))


@pytest.mark.parametrize("kind", KINDS)
def test_a_rejected_update_leaves_the_cache_unchanged(kind):
    cache = filled(kind, 3)
    before = (cache.seq_len, cache.k.clone(), cache.v.clone())
    with pytest.raises(ValueError):
        cache.update(torch.tensor([MAX_SEQ_LEN + 1]), *kv(1))  # past the end, or not the next position
    assert cache.seq_len == before[0]
    assert torch.equal(cache.k, before[1]) and torch.equal(cache.v, before[2])


# --- the growing cache appends -------------------------------------------------------------

@pytest.mark.parametrize("cached, input_pos, expected", [
    pytest.param(0, [1], [0], id="first-write-not-at-0"),
    pytest.param(3, [4], [3], id="skips-a-position"),
    pytest.param(3, [2], [3], id="rewrites-the-last-position"),
    pytest.param(3, [3, 5], [3, 4], id="gap-inside-the-chunk"),
    pytest.param(3, [4, 3], [3, 4], id="out-of-order"),
])
def test_growing_cache_rejects_positions_other_than_the_next_ones_naming_them(cached, input_pos, expected):
    cache = filled("growing", cached) if cached else GrowingKVCache()
    with pytest.raises(ValueError, match=re.escape(f"input_pos must be {expected}")):
        cache.update(torch.tensor(input_pos), *kv(len(input_pos)))


# --- the static cache writes by position -----------------------------------------------------

@pytest.mark.parametrize("input_pos", [[MAX_SEQ_LEN], [-1], [0, MAX_SEQ_LEN]])
def test_static_cache_rejects_positions_outside_its_length(input_pos):
    with pytest.raises(ValueError, match=re.escape(f"input_pos must lie in [0, {MAX_SEQ_LEN}), got {input_pos}")):
        new_cache("static").update(torch.tensor(input_pos), *kv(len(input_pos)))


def test_static_cache_refuses_a_bool_for_a_size():
    with pytest.raises(ValueError, match="max_seq_len must be a positive int, got True"):
        StaticKVCache(1, 2, True, 4)


def test_static_cache_rejects_positions_that_leave_a_gap_after_the_cached_ones():
    with pytest.raises(ValueError, match=re.escape("input_pos [3] leaves a gap after the 2 cached positions")):
        filled("static", 2).update(torch.tensor([3]), *kv(1))


@pytest.mark.parametrize("rewrite", [[2], [1, 2], [2, 1], [4]], ids=["one-earlier", "a-chunk-earlier", "out-of-order", "the-last"])
def test_static_cache_rewriting_earlier_positions_rolls_back_to_the_last_one_written(rewrite):
    cache = filled("static", 5)
    k_new, v_new = kv(len(rewrite), seed=1)
    got_k, got_v = cache.update(torch.tensor(rewrite), k_new, v_new)
    last = max(rewrite)
    assert cache.seq_len == last + 1, "seq_len is the last position written + 1, not a running maximum"
    assert got_k.shape[2] == got_v.shape[2] == MAX_SEQ_LEN, "the whole buffers, the same shape as before the rewrite"
    for i, p in enumerate(rewrite):
        assert torch.equal(got_k[:, :, p], k_new[:, :, i]) and torch.equal(got_v[:, :, p], v_new[:, :, i])


def test_static_cache_rejects_a_position_written_twice_in_one_update():
    with pytest.raises(ValueError, match=re.escape("input_pos [0, 1, 1] writes a position twice")):
        new_cache("static").update(torch.tensor([0, 1, 1]), *kv(3))


def test_static_cache_rejects_more_new_positions_than_it_holds():
    with pytest.raises(ValueError, match=f"9 new positions do not fit a cache of {MAX_SEQ_LEN}"):
        new_cache("static").update(torch.arange(9), *kv(9))


def test_static_cache_rejects_a_chunk_with_a_gap_inside_it():
    cache = new_cache("static")
    try:
        cache.update(torch.tensor([0, 2]), *kv(2))
    except ValueError:
        return
    raise AssertionError(f"accepted input_pos [0, 2]: seq_len is now {cache.seq_len}, position 1 was never written")


@pytest.mark.parametrize("name", ["batch", "n_kv_heads", "max_seq_len", "head_dim"])
def test_static_cache_rejects_sizes_below_one_naming_the_size(name):
    sizes = dict(batch=1, n_kv_heads=2, max_seq_len=8, head_dim=4) | {name: 0}
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got 0"):
        StaticKVCache(**sizes)


@pytest.mark.parametrize("input_pos, error, message", [
    pytest.param(torch.tensor([3, 4, 5]), ValueError, re.escape("input_pos must be [S] = [2], got shape [3]"), id="not-S"),
    pytest.param(torch.tensor([3.0, 4.0]), TypeError, "input_pos must hold integer positions, got dtype torch.float32",
                 id="float"),
])
def test_attention_over_a_static_cache_rejects_positions_that_do_not_fit_the_queries(input_pos, error, message):
    q, k = torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, MAX_SEQ_LEN, 4)  # (B, H, S, D), (B, Hkv, Tmax, D)
    with pytest.raises(error, match=message):
        attention(q, k, k, input_pos=input_pos)


def test_a_windowed_model_refuses_a_static_cache_longer_than_its_window_and_runs_one_within_it():
    # The model checks the shape it attends over, never a position's value: no sync, and meta-safe.
    cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=16, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=32,
                      max_seq_len=64, sliding_window=4)
    model, ids = build_model(cfg), torch.arange(3)[None, :]  # (1, 3)
    with pytest.raises(ValueError, match="5 cache slots exceed this model's window of 4"):
        model.prefill(ids, model.new_caches("static", 1, 5))
    with torch.no_grad():
        got = model.prefill(ids, model.new_caches("static", 1, 4))
        torch.testing.assert_close(got, model(ids)[:, -1], rtol=1e-5, atol=1e-5)
