"""card13: sharing and tiering.

The references are measurements: kvref's block allocator (kvref.paging.BlockAllocator) with
prefix caching holding real request traces (its hits, blocks held and reference counts), block
pools allocated on the meta device for every layer of real presets (`.nbytes`), and the event
log of a simulated copy engine and compute engine streaming K/V layer by layer
(kvref.offload.simulate_offload).
"""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import kvkata
from kvkata.check import Shown, call_str, expect, expect_equal, expect_real, plural
from kvref.config import PRESETS, ModelConfig, preset
from kvref.measure import kv_cache_bytes_measured
from kvref.offload import compute_stall_seconds, simulate_offload, step_seconds
from kvref.paging import BlockAllocator, block_nbytes_measured

impl = kvkata.load("card13_prefix_sharing.sharing")

REAL = [name for name, cfg in PRESETS.items() if not cfg.is_mla]
BLOCK_SIZES = st.sampled_from([1, 2, 3, 4, 16])
# Gemma-7B's attention shape (its config.json: hidden_size 3072, 16 heads and 16 KV heads of head_dim 256,
# 28 layers): each head is wider than d_model / n_heads = 192, so bytes need the config's head_dim.
WIDE_HEADS = ModelConfig(vocab_size=256, n_layers=28, d_model=3072, n_heads=16, n_kv_heads=16, head_dim=256, d_ff=64,
                         name="gemma-7b-shaped")
SMALL_VOCAB = st.lists(st.integers(0, 2), min_size=0, max_size=16)  # prefixes and repeated blocks are common


# --- prefix keys ---------------------------------------------------------------------------------

def hits_in_kvref(first: list[int], second: list[int], block_size: int) -> int:
    """Blocks of `second` that kvref's allocator reuses from `first` through its prefix cache."""
    alloc = BlockAllocator(64, block_size, prefix_caching=True)
    if first:
        alloc.allocate("first", first)
    if second:
        alloc.allocate("second", second)
    return alloc.hits


@pytest.mark.kata("prefix_block_keys")
@given(a=SMALL_VOCAB, b=SMALL_VOCAB, block_size=BLOCK_SIZES)
@example(a=[1, 2, 3, 4], b=[9, 9, 3, 4], block_size=2)
@example(a=[1, 1, 1, 1, 1], b=[1, 1, 1, 1], block_size=2)
@example(a=[5, 6, 7], b=[5, 6, 7], block_size=2)
@example(a=[1, 2, 3], b=[1, 2, 0], block_size=2)  # the block agrees, the token after it does not
@example(a=[1, 2, 3, 4, 5, 6], b=[1, 2, 3, 4, 5, 0], block_size=2)  # only the last token of block 2 differs
@example(a=[1, 2, 3, 4, 5, 6], b=[9, 9, 3, 4, 5, 6], block_size=2)  # blocks 1 and 2 agree: a key chained to block 1 alone collides
@example(a=[1, 2, 3, 4], b=[2, 1, 3, 4], block_size=2)  # the same tokens in another order: a sum of ids collides
@example(a=[1, 12, 5, 5], b=[11, 2, 5, 5], block_size=2)  # ids joined without a separator collide: "112"
@example(a=[128000, 5, 7, 7], b=[0, 5, 7, 7], block_size=2)  # real vocabularies pass 255: bytes(ids) fails, ids % 256 collide
@example(a=[112, 3, 7, 7], b=[11, 203, 7, 7], block_size=2)  # ids zero-padded to 2 digits and joined collide: "11203"
def test_prefix_block_keys_match_exactly_where_the_whole_prefix_matches(a, b, block_size):
    ka, kb = impl.prefix_block_keys(a, block_size), impl.prefix_block_keys(b, block_size)
    for toks, keys in ((a, ka), (b, kb)):
        expect(isinstance(keys, list) and len(keys) == len(toks) // block_size, call_str("prefix_block_keys", toks, block_size),
               keys, f"a list of {len(toks) // block_size} keys, one per full block of {block_size} (a partial block has none)")
        expect(all(isinstance(k, bytes) for k in keys) and len({len(k) for k in keys}) <= 1,
               call_str("prefix_block_keys", toks, block_size), keys, "bytes digests, all of one length (a hash)")
    for i in range(min(len(ka), len(kb))):
        same_prefix = a[:(i + 1) * block_size] == b[:(i + 1) * block_size]
        expect((ka[i] == kb[i]) == same_prefix, f"{call_str('prefix_block_keys', a, block_size)}[{i}] == "
               f"{call_str('prefix_block_keys', b, block_size)}[{i}]", ka[i] == kb[i],
               f"{same_prefix}: the first {(i + 1) * block_size} tokens {'agree' if same_prefix else 'differ'}, and a "
               "block's K/V depends on every token before it, so its key must too")
    for keys, toks in ((ka, a), (kb, b)):
        expect(len(set(keys)) == len(keys), call_str("prefix_block_keys", toks, block_size), keys,
               "distinct keys within one prompt: block i and block j > i end different prefixes, even with equal tokens")
    hits = hits_in_kvref(a, b, block_size)
    leading = next((i for i in range(min(len(ka), len(kb))) if ka[i] != kb[i]), min(len(ka), len(kb)))
    expect_equal(f"leading equal keys of prefix_block_keys({a}, {block_size}) and ({b}, {block_size})", leading, hits,
                 f"kvref's allocator reused {plural(hits, 'block')} of the second prompt from the first")


# --- prefix sharing ------------------------------------------------------------------------------

def blocks_held(n_requests: int, prompt_len: int, block_size: int, prefix_caching: bool) -> int:
    """Blocks kvref's allocator holds for requests = the same prompt + one token of their own each."""
    need = n_requests * (prompt_len // block_size + 2)
    alloc = BlockAllocator(need, block_size, prefix_caching=prefix_caching)
    prompt = [7] * prompt_len
    for r in range(n_requests):
        alloc.allocate(r, prompt + [1000 + r])
    return alloc.num_used_blocks


@pytest.mark.kata("prefix_sharing_saved_bytes")
@given(name=st.sampled_from(REAL), n_requests=st.integers(1, 12), prompt_len=st.integers(1, 300),
       block_size=BLOCK_SIZES, dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float8_e4m3fn]))
@example(name="llama-2-70b", n_requests=100, prompt_len=1000, block_size=16, dtype=torch.bfloat16)
@example(name="llama-3-8b", n_requests=8, prompt_len=64, block_size=16, dtype=torch.bfloat16)
@example(name="llama-3-8b", n_requests=3, prompt_len=40, block_size=16, dtype=torch.float32)  # 4 bytes an element
@example(name=WIDE_HEADS, n_requests=3, prompt_len=40, block_size=16, dtype=torch.bfloat16)  # D = 256, d_model / H = 192
def test_prefix_sharing_saved_bytes_are_the_blocks_kvrefs_prefix_cache_holds_once(name, n_requests, prompt_len,
                                                                                  block_size, dtype):
    cfg = preset(name) if isinstance(name, str) else name
    got = impl.prefix_sharing_saved_bytes(cfg, n_requests, prompt_len, block_size, dtype)
    without = blocks_held(n_requests, prompt_len, block_size, False)
    with_cache = blocks_held(n_requests, prompt_len, block_size, True)
    per_block = block_nbytes_measured(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, block_size, dtype)
    expect_equal(call_str("prefix_sharing_saved_bytes", cfg, n_requests, prompt_len, block_size,
                          dtype), got, (without - with_cache) * per_block,
                 f"kvref's allocator held {without:,} blocks without prefix caching and {with_cache:,} with it, for "
                 f"{plural(n_requests, 'request')} = the prompt + a token of their own; one block is {per_block:,} bytes "
                 f"(.nbytes of its K and V pools in {plural(cfg.n_layers, 'layer')} on the meta device)")


# --- parallel sampling and copy-on-write ---------------------------------------------------------

def sample_in_kvref(prompt_len: int, n_samples: int, new_tokens: int, block_size: int):
    """(blocks held, refcounts of the prompt's original blocks) after forking and appending round-robin."""
    alloc = BlockAllocator(n_samples * (prompt_len // block_size + new_tokens + 2), block_size)
    prompt = alloc.allocate(0, list(range(prompt_len)))
    for s in range(1, n_samples):
        alloc.fork(0, s)
    for _ in range(new_tokens):
        for s in range(n_samples):
            alloc.append(s, 1)
    return alloc.num_used_blocks, [alloc.refcount[b] for b in prompt]


SAMPLING = dict(prompt_len=st.integers(1, 70), n_samples=st.integers(1, 6), new_tokens=st.integers(0, 40),
                block_size=BLOCK_SIZES)


@pytest.mark.kata("parallel_sampling_blocks")
@given(**SAMPLING)
@example(prompt_len=20, n_samples=4, new_tokens=1, block_size=16)
@example(prompt_len=32, n_samples=4, new_tokens=1, block_size=16)
@example(prompt_len=20, n_samples=4, new_tokens=0, block_size=16)
@example(prompt_len=20, n_samples=3, new_tokens=13, block_size=16)
@example(prompt_len=20, n_samples=3, new_tokens=12, block_size=16)  # 4 + 12 fills the copied block exactly: no extra block
def test_parallel_sampling_blocks_are_what_kvrefs_allocator_holds_after_fork_and_copy(prompt_len, n_samples,
                                                                                       new_tokens, block_size):
    got = impl.parallel_sampling_blocks(prompt_len, n_samples, new_tokens, block_size)
    held, _ = sample_in_kvref(prompt_len, n_samples, new_tokens, block_size)
    expect_equal(call_str("parallel_sampling_blocks", prompt_len, n_samples, new_tokens, block_size), got, held,
                 f"kvref's allocator held {plural(held, 'block')} after prefilling the prompt once, forking it into "
                 f"{plural(n_samples, 'sample')} and appending {plural(new_tokens, 'token')} to each, copying shared partly "
                 "filled blocks before writing")


@pytest.mark.kata("prompt_block_refcounts")
@given(**SAMPLING)
@example(prompt_len=20, n_samples=4, new_tokens=1, block_size=16)
@example(prompt_len=20, n_samples=4, new_tokens=0, block_size=16)
@example(prompt_len=48, n_samples=3, new_tokens=5, block_size=16)
def test_prompt_block_refcounts_are_kvrefs_after_copy_on_write(prompt_len, n_samples, new_tokens, block_size):
    got = impl.prompt_block_refcounts(prompt_len, n_samples, new_tokens, block_size)
    _, counts = sample_in_kvref(prompt_len, n_samples, new_tokens, block_size)
    expect_equal(call_str("prompt_block_refcounts", prompt_len, n_samples, new_tokens, block_size), got, counts,
                 f"the reference counts kvref's allocator keeps for the prompt's {plural(len(counts), 'block')} after "
                 f"{plural(n_samples, 'sample')} appended {new_tokens} tokens each (a writer to a shared partial block "
                 "takes a copy and drops its reference)")


# --- tiered offload ------------------------------------------------------------------------------

@pytest.mark.kata("layer_transfer_seconds")
@given(name=st.sampled_from(REAL), batch=st.integers(1, 64), seq_len=st.integers(1, 131072),
       dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float8_e4m3fn]),
       link=st.sampled_from([25e9, 64e9, 450e9]))
@example(name="llama-2-7b", batch=1, seq_len=4096, dtype=torch.bfloat16, link=64e9)
@example(name="llama-2-70b", batch=8, seq_len=32768, dtype=torch.bfloat16, link=64e9)
@example(name="llama-3-8b", batch=2, seq_len=1000, dtype=torch.float32, link=25e9)  # 4 bytes an element
@example(name=WIDE_HEADS, batch=1, seq_len=4096, dtype=torch.bfloat16, link=64e9)  # D = 256, d_model / H = 192
def test_layer_transfer_seconds_move_the_nbytes_of_one_layers_cache(name, batch, seq_len, dtype, link):
    cfg = preset(name) if isinstance(name, str) else name
    got = impl.layer_transfer_seconds(cfg, batch, seq_len, dtype, link)
    nbytes = kv_cache_bytes_measured(cfg.with_(n_layers=1), batch, seq_len, dtype)
    expect_real(call_str("layer_transfer_seconds", cfg, batch, seq_len, dtype, link), got,
                nbytes / link, rel=1e-9, why=f"{nbytes:,} bytes, .nbytes of one layer's K and V cache on the meta "
                f"device, over {link:.3g} B/s; the whole model holds {cfg.n_layers} such layers")


TIMES = st.floats(0.0, 1e-2, allow_nan=False, allow_infinity=False)


@pytest.mark.kata("offloaded_step_seconds")
@given(n_layers=st.integers(1, 96), compute_s=TIMES, transfer_s=TIMES)
@example(n_layers=32, compute_s=1.4e-4, transfer_s=1.05e-3)
@example(n_layers=32, compute_s=2e-3, transfer_s=1e-3)
@example(n_layers=1, compute_s=2e-3, transfer_s=1e-3)
@example(n_layers=4, compute_s=1e-3, transfer_s=1e-3)
def test_offloaded_step_seconds_are_when_the_simulated_compute_engine_finishes(n_layers, compute_s, transfer_s):
    got = impl.offloaded_step_seconds(n_layers, compute_s, transfer_s)
    log = simulate_offload(n_layers, compute_s, transfer_s)
    expect_real(call_str("offloaded_step_seconds", n_layers, compute_s, transfer_s), got, step_seconds(log), rel=1e-9,
                abs=1e-15, why=f"the last layer's compute ended then in a simulation of a copy engine and a compute "
                f"engine with two buffers; the compute engine sat idle {compute_stall_seconds(log):.6g} s waiting for K/V")


@pytest.mark.kata("offloaded_step_seconds")
@given(n_layers=st.integers(2, 96), compute_s=st.floats(1e-6, 1e-2), ratio=st.floats(0.0, 1.0))
def test_offloaded_step_seconds_expose_only_the_first_copy_when_compute_covers_each_transfer(n_layers, compute_s,
                                                                                             ratio):
    transfer_s = compute_s * ratio  # per-layer transfer no longer than per-layer compute
    got = impl.offloaded_step_seconds(n_layers, compute_s, transfer_s)
    stall = compute_stall_seconds(simulate_offload(n_layers, compute_s, transfer_s))
    expect_real(call_str("offloaded_step_seconds", n_layers, compute_s, transfer_s), got,
                n_layers * compute_s + stall, rel=1e-9, why=f"the simulated compute engine is busy "
                f"{n_layers} x {compute_s:.6g} s and waits only {stall:.6g} s, for the first layer's K/V: with compute "
                "at least as long as a transfer, every later transfer hides behind the layer before it")
