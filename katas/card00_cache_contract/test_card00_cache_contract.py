"""card00: the cache contract.

The references here are measurements, not second copies of the answers: PyTorch's
`scaled_dot_product_attention` for attention, and the `kvref` model run without any cache
(every position recomputed) for cached decoding. kvref itself is checked against PyTorch and
Hugging Face `transformers` in checks/.

The explicit examples reach the edges that a handful of random draws may miss: GQA with
1 < Hkv < H (where repeat and repeat_interleave differ), 8 query heads per KV head
(Llama-2-70B's group), head dims that are not powers of two (6, 80, 96), batch 4, and a
decode of 32 steps.

The static cache is held to what CUDA-graph engines need (gpt-fast's KVCache, transformers'
StaticCache): `update` returns the whole buffers, the same shape at every step, and reads no
tensor value back to the host. On the CPU there is no device to wait for, so the tests refuse
the operations that would wait on a GPU: they watch every torch call `update` makes (a
TorchFunctionMode for `.item()`, `int()`, `bool()`, `.tolist()`, ..., a TorchDispatchMode for
the kernels whose result size or Python value depends on the data, such as `nonzero`).
"""

import contextlib
import traceback

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import kvkata
from kvkata.check import (Mismatch, call_str, expect, expect_close, expect_equal, expect_tensor, expect_tensor_equal,
                          plural)
from kvref.cache import GrowingKVCache as RefGrowingKVCache
from kvref.config import ModelConfig
from kvref.model import Transformer, build_model
from kvref.opcount import InstrumentMode
from kvref.strategies import attention_shapes, model_configs
from kvref.weight_quant import quantize_weights_int8, weight_bytes
from torch.overrides import TorchFunctionMode

impl = kvkata.load("card00_cache_contract.cache")

REF_PREFILL, REF_DECODE_STEP = Transformer.prefill, Transformer.decode_step
BHTD = ("batch", "head", "position", "dim")
LAYOUT = "[B, H, T, D]"
# fp32 attention through different kernels (ours vs SDPA) differs by rounding only.
ATOL = RTOL = 1e-5
PROMPT_LENS = st.integers(1, 6)
NEW_TOKENS = st.integers(1, 5)
BATCHES = st.integers(1, 4)
# Scores q·k/sqrt(D) in the hundreds, as real attention logits reach: exp() overflows float32
# above 88.7, so only a softmax that subtracts each row's maximum first stays finite.
LOUD = 20.0  # q and k scaled by LOUD: scores ~ N(0, 400²)
# Scores near 1000 carry fp32 rounding of about 1e-4 (1000 · 2^-23, a few times over), and a
# near-one-hot softmax passes it on to the weights: the worst of 300 draws differed from SDPA
# by 7e-5; 1e-3 leaves a margin.
LOUD_TOL = 1e-3
# A tiny model with Llama-2-70B's group (8 query heads per KV head) and a head dim of 6.
GQA8 = ModelConfig(vocab_size=64, n_layers=2, d_model=16, n_heads=16, n_kv_heads=2, head_dim=6, d_ff=32,
                   max_seq_len=64)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def random_qkv(s, seed=0):
    q = rand(s["B"], s["H"], s["S"], s["D"], seed=seed)
    k = rand(s["B"], s["Hkv"], s["T"], s["D"], seed=seed + 1)
    v = rand(s["B"], s["Hkv"], s["T"], s["D"], seed=seed + 2)
    return q, k, v


def sdpa_mask(S, T):
    """The last S of T positions: query i may read keys 0 .. T - S + i (True = may read)."""
    return torch.ones(S, T, dtype=torch.bool).tril(diagonal=T - S)


def prompt_ids(cfg, batch, length, seed=0):
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def held_tensors(obj, path="cache", depth=4):
    """Every tensor `obj` holds, through attributes, lists, tuples and dicts: (access path, tensor)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif depth == 0 or isinstance(obj, (str, bytes, int, float, type)):
        return
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            yield from held_tensors(x, f"{path}[{i}]", depth - 1)
    elif isinstance(obj, dict):
        for key, x in obj.items():
            yield from held_tensors(x, f"{path}[{key!r}]", depth - 1)
    else:
        slots = [s for cls in type(obj).__mro__ for s in getattr(cls, "__slots__", ()) if hasattr(obj, s)]
        for name, x in [*getattr(obj, "__dict__", {}).items(), *((s, getattr(obj, s)) for s in slots)]:
            yield from held_tensors(x, f"{path}.{name}", depth - 1)


def greedy_decode(model, prompt, n_new, caches, prefill, decode_step):
    """Prefill, then n_new - 1 decode steps; yields (ids so far, logits [B, V]) after each call."""
    ids = prompt
    logits = prefill(model, prompt, caches)
    yield ids, logits
    for _ in range(n_new - 1):
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        logits = decode_step(model, ids[:, -1:], caches)
        yield ids, logits


# --- GQA: which KV head each query head reads -------------------------------------------

@pytest.mark.kata("repeat_kv")
@given(s=attention_shapes())
@example(s=dict(B=1, H=4, Hkv=2, T=3, S=3, D=4))  # 1 < Hkv < H: repeat and repeat_interleave differ
@example(s=dict(B=4, H=24, Hkv=3, T=2, S=2, D=80))  # groups of 8
def test_repeat_kv_gives_each_query_head_the_kv_head_of_its_group(s):
    x = rand(s["B"], s["Hkv"], s["T"], s["D"])
    got = impl.repeat_kv(x, s["H"])
    call = call_str("repeat_kv", x, n_heads=s["H"])
    expect_tensor(call, got, (s["B"], s["H"], s["T"], s["D"]), x.dtype, layout=LAYOUT)
    G = s["H"] // s["Hkv"]
    for h in range(s["H"]):
        expect_tensor_equal(f"{call}[:, {h}] (query head {h} of group {h // G})",
                            got[:, h], x[:, h // G], ("batch", "position", "dim"))


@pytest.mark.kata("repeat_kv")
@given(s=attention_shapes())
@example(s=dict(B=2, H=6, Hkv=3, T=5, S=5, D=8))
@example(s=dict(B=1, H=16, Hkv=2, T=4, S=4, D=96))
def test_attention_over_repeated_kv_matches_sdpa_with_enable_gqa(s):
    q, k, v = random_qkv(s)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    got = F.scaled_dot_product_attention(q, impl.repeat_kv(k, s["H"]), impl.repeat_kv(v, s["H"]))
    expect_close(f"sdpa(q, repeat_kv(k, {s['H']}), repeat_kv(v, {s['H']}))", got, want, BHTD, ATOL, RTOL)


@pytest.mark.kata("repeat_kv")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_repeat_kv_of_half_precision_keys_keeps_their_dtype(dtype):
    x = rand(2, 2, 3, 4, seed=4).to(dtype)
    got = impl.repeat_kv(x, 6)
    call = call_str("repeat_kv", x, n_heads=6)
    expect_tensor(call, got, (2, 6, 3, 4), dtype, layout=LAYOUT + " in x's dtype: copies of the KV heads")
    expect_tensor_equal(call, got, x.repeat_interleave(3, dim=1), BHTD, LAYOUT)


# --- attention of the new queries over the cache ------------------------------------------

@pytest.mark.kata("attend")
@given(s=attention_shapes())
@example(s=dict(B=1, H=4, Hkv=2, T=4, S=4, D=4))
@example(s=dict(B=4, H=16, Hkv=2, T=7, S=7, D=80))
def test_attend_over_a_whole_prompt_matches_causal_sdpa(s):
    s = dict(s, S=s["T"])
    q, k, v = random_qkv(s)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expect_close(call_str("attend", q, k, v), impl.attend(q, k, v), want, BHTD, ATOL, RTOL, LAYOUT)


@pytest.mark.kata("attend")
@given(s=attention_shapes())
@example(s=dict(B=1, H=2, Hkv=1, T=5, S=1, D=4))
@example(s=dict(B=3, H=24, Hkv=3, T=11, S=1, D=96))
def test_attend_one_decode_query_reads_every_cached_position(s):
    s = dict(s, S=1)
    q, k, v = random_qkv(s)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # no mask: everything is in the past
    expect_close(call_str("attend", q, k, v), impl.attend(q, k, v), want, BHTD, ATOL, RTOL, LAYOUT)


@pytest.mark.kata("attend")
@given(s=attention_shapes())
@example(s=dict(B=1, H=2, Hkv=2, T=6, S=3, D=4))  # a chunk: the queries are the last 3 of 6
@example(s=dict(B=2, H=8, Hkv=1, T=9, S=4, D=6))
def test_attend_a_chunk_of_queries_sits_at_the_last_positions(s):
    q, k, v = random_qkv(s)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(s["S"], s["T"]), enable_gqa=True)
    expect_close(call_str("attend", q, k, v), impl.attend(q, k, v), want, BHTD, ATOL, RTOL, LAYOUT)


@pytest.mark.kata("attend")
@given(s=attention_shapes(), data=st.data())
@example(s=dict(B=1, H=2, Hkv=1, T=4, S=4, D=2), data=None)
def test_attend_never_reads_a_later_key(s, data):
    s = dict(s, S=s["T"])
    q, k, v = random_qkv(s)
    j = data.draw(st.integers(0, s["T"] - 1), label="changed position") if data else 1
    k2, v2 = k.clone(), v.clone()
    k2[:, :, j], v2[:, :, j] = 100.0, -100.0  # a loud change at position j
    before, after = impl.attend(q, k, v), impl.attend(q, k2, v2)
    # Queries at positions before j must not notice.
    expect_close(f"attend(q, k, v) with position {j} changed, rows < {j}", after[:, :, :j], before[:, :, :j],
                 BHTD, ATOL, RTOL)


@pytest.mark.kata("attend")
@given(s=attention_shapes())
@example(s=dict(B=2, H=4, Hkv=2, T=6, S=3, D=6))
def test_attend_stays_exact_when_scores_reach_the_hundreds(s):
    q, k, v = random_qkv(s)
    q, k = q * LOUD, k * LOUD  # (B, H, S, D), (B, Hkv, T, D)
    got = impl.attend(q, k, v)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(s["S"], s["T"]), enable_gqa=True)
    top = (q @ k.repeat_interleave(s["H"] // s["Hkv"], dim=1).transpose(-2, -1)).abs().max() / s["D"] ** 0.5
    call = call_str("attend", q, k, v) + f" with |q·k|/sqrt(D) up to {top:.0f}"
    if isinstance(got, torch.Tensor) and got.is_floating_point() and not bool(torch.isfinite(got).all()):
        call += " (exp overflows float32 past 88.7)"  # said only where it shows: a wrong mask fails here too
    expect_close(call, got, want, BHTD, LOUD_TOL, LOUD_TOL, LAYOUT)


# Slots past the queries' positions in the tests below: stale values this loud (finite: a masked
# slot's weight is exactly 0, and 0 x inf would be NaN whatever the mask) make any read of them plain.
STALE = 1e4


@pytest.mark.kata("attend")
@given(s=attention_shapes(), stale=st.integers(1, 4), data=st.data())
@example(s=dict(B=1, H=2, Hkv=1, T=5, S=3, D=4), stale=3, data=None)  # queries at positions [4, 2, 3]
@example(s=dict(B=2, H=16, Hkv=2, T=6, S=1, D=6), stale=2, data=None)  # a decode step over a static buffer
def test_attend_over_a_static_buffer_masks_by_the_query_positions(s, stale, data):
    B, H, Hkv, T, S, D = s["B"], s["H"], s["Hkv"], s["T"], s["S"], s["D"]
    # The queries are the last S of T positions, given in some order; T + stale slots, the last `stale` stale.
    order = data.draw(st.permutations(range(S)), label="query order") if data else [S - 1, *range(S - 1)]
    input_pos = torch.tensor(order) + (T - S)  # (S,)
    q, k, v = random_qkv(s)
    k_buf = torch.cat([k, rand(B, Hkv, stale, D, seed=7)], dim=2)  # (B, Hkv, T + stale, D)
    v_buf = torch.cat([v, torch.full((B, Hkv, stale, D), STALE)], dim=2)
    allowed = torch.arange(T)[None, :] <= input_pos[:, None]  # (S, T): slot j holds position j
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    call = (call_str("attend", q, k_buf, v_buf, input_pos=input_pos)
            + f" (slots {T} .. {T + stale - 1} hold stale values of {STALE:g}: no query may read them)")
    expect_close(call, impl.attend(q, k_buf, v_buf, input_pos), want, BHTD, ATOL, RTOL, LAYOUT)


# --- the growing cache ------------------------------------------------------------------

@pytest.mark.kata("GrowingKVCache")
@given(s=attention_shapes(), chunks=st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_growing_cache_update_returns_everything_cached_in_order(s, chunks):
    cache = impl.GrowingKVCache()
    expect_equal("GrowingKVCache().seq_len", cache.seq_len, 0, "an empty cache")
    ks, vs, t = [], [], 0
    for i, n in enumerate(chunks):
        k_new = rand(s["B"], s["Hkv"], n, s["D"], seed=2 * i)
        v_new = rand(s["B"], s["Hkv"], n, s["D"], seed=2 * i + 1)
        ks.append(k_new), vs.append(v_new)
        k, v = cache.update(torch.arange(t, t + n), k_new, v_new)
        t += n
        call = call_str("update", torch.arange(t - n, t), k_new, v_new) + f" after {t - n} cached"
        expect_tensor_equal(call + " -> k", k, torch.cat(ks, dim=2), BHTD, "[B, Hkv, T, D]")
        expect_tensor_equal(call + " -> v", v, torch.cat(vs, dim=2), BHTD, "[B, Hkv, T, D]")
        expect_equal(call + "; then seq_len", cache.seq_len, t)


@pytest.mark.kata("GrowingKVCache")
def test_growing_cache_of_bf16_keys_stores_and_returns_them_in_bf16():
    """K/V come in the activation dtype (bf16 in most serving): the cache stores exactly what it is given."""
    cache = impl.GrowingKVCache()
    ks = [rand(2, 2, n, 4, seed=10 + n).bfloat16() for n in (3, 1)]
    vs = [rand(2, 2, n, 4, seed=20 + n).bfloat16() for n in (3, 1)]
    t = 0
    for k_new, v_new in zip(ks, vs):
        n = k_new.shape[2]
        call = call_str("GrowingKVCache.update", torch.arange(t, t + n), k_new, v_new) + f" after {t} cached"
        k, v = cache.update(torch.arange(t, t + n), k_new, v_new)
        t += n
        want_k, want_v = torch.cat(ks, dim=2)[:, :, :t], torch.cat(vs, dim=2)[:, :, :t]
        expect_tensor_equal(call + " -> k", k, want_k, BHTD, "[B, Hkv, T, D] in bf16, as given")
        expect_tensor_equal(call + " -> v", v, want_v, BHTD, "[B, Hkv, T, D] in bf16, as given")


@pytest.mark.kata("GrowingKVCache")
@given(cfg=model_configs(), batch=BATCHES, p=PROMPT_LENS, n=NEW_TOKENS)
def test_growing_cache_grows_by_one_position_per_generated_token_in_every_layer(cfg, batch, p, n):
    model = build_model(cfg)
    caches = [impl.GrowingKVCache() for _ in range(cfg.n_layers)]
    for step, (ids, _) in enumerate(greedy_decode(model, prompt_ids(cfg, batch, p), n, caches,
                                                  REF_PREFILL, REF_DECODE_STEP)):
        T = p + step
        for layer, c in enumerate(caches):
            where = f"layer {layer} after prefill({p}) and {plural(step, 'decode step')}"
            expect_equal(f"GrowingKVCache.seq_len in {where}", c.seq_len, T)
            expect_tensor(f"GrowingKVCache.k in {where}", c.k, (batch, cfg.n_kv_heads, T, cfg.head_dim),
                          layout="[B, Hkv, T, D]")


@pytest.mark.kata("GrowingKVCache")
@given(cfg=model_configs(), batch=BATCHES, p=PROMPT_LENS, n=NEW_TOKENS)
def test_growing_cache_in_a_model_gives_the_logits_of_full_recompute(cfg, batch, p, n):
    model = build_model(cfg)
    caches = [impl.GrowingKVCache() for _ in range(cfg.n_layers)]
    with torch.no_grad():
        for step, (ids, logits) in enumerate(greedy_decode(model, prompt_ids(cfg, batch, p), n, caches,
                                                           REF_PREFILL, REF_DECODE_STEP)):
            want = model(ids)[:, -1]  # no cache: every position recomputed
            expect_close(f"model with GrowingKVCache, step {step} (T={ids.shape[1]})", logits, want,
                         ("batch", "vocab"), 1e-4, 1e-4)


@pytest.mark.kata("GrowingKVCache")
@given(cfg=model_configs(), p=PROMPT_LENS, n=st.integers(2, 5))
def test_growing_cache_keeps_past_entries_bit_identical(cfg, p, n):
    model = build_model(cfg)
    caches = [impl.GrowingKVCache() for _ in range(cfg.n_layers)]
    with torch.no_grad():
        steps = greedy_decode(model, prompt_ids(cfg, 2, p), n, caches, REF_PREFILL, REF_DECODE_STEP)
        next(steps)
        first = [(c.k[:, :, :p].clone(), c.v[:, :, :p].clone()) for c in caches]
        for _ in steps:
            pass
    for layer, (c, (k0, v0)) in enumerate(zip(caches, first)):
        expect_tensor_equal(f"layer {layer} k[:, :, :{p}] after {plural(n - 1, 'decode step')}", c.k[:, :, :p], k0, BHTD)
        expect_tensor_equal(f"layer {layer} v[:, :, :{p}] after {plural(n - 1, 'decode step')}", c.v[:, :, :p], v0, BHTD)


@pytest.mark.kata("GrowingKVCache")
@given(cfg=model_configs().filter(lambda c: c.n_kv_heads < c.n_heads), batch=BATCHES, p=PROMPT_LENS)
@example(cfg=GQA8, batch=2, p=3)
def test_growing_cache_exposes_k_and_v_and_holds_nothing_query_shaped(cfg, batch, p):
    model = build_model(cfg)
    ids = prompt_ids(cfg, batch, p)
    caches, ref = [impl.GrowingKVCache() for _ in range(cfg.n_layers)], model.new_caches("growing")
    with torch.no_grad():
        model.prefill(ids, caches)
        model.prefill(ids, ref)
    for layer, (c, r) in enumerate(zip(caches, ref)):
        where = f"layer {layer} after a prompt of {p}"
        expect_tensor_equal(f"GrowingKVCache.k in {where}", c.k, r.k, BHTD, "[B, Hkv, T, D]")
        expect_tensor_equal(f"GrowingKVCache.v in {where}", c.v, r.v, BHTD, "[B, Hkv, T, D]")
        for path, x in held_tensors(c):
            expect(x.ndim != 4 or x.shape[1] == cfg.n_kv_heads, f"{path} in {where}", x,
                   f"only K/V-shaped tensors [B, Hkv={cfg.n_kv_heads}, T, D]: a query [B, H={cfg.n_heads}, S, D] "
                   f"is used once and never cached, and K/V expanded to H heads cost G times the memory")


@pytest.mark.kata("GrowingKVCache")
@given(cfg=model_configs(), p=PROMPT_LENS)
def test_int8_weights_do_not_shrink_the_kv_cache(cfg, p):
    """The trap: K/V are activations, computed in the activation dtype, whatever the weights' storage."""
    model = build_model(cfg)
    quantized = quantize_weights_int8(model)
    assert weight_bytes(quantized) < weight_bytes(model), "int8 weights should take fewer bytes"
    sizes = []
    for m in (model, quantized):
        cache_list = [impl.GrowingKVCache() for _ in range(cfg.n_layers)]
        with torch.no_grad():
            m.prefill(prompt_ids(cfg, 1, p), cache_list)
        sizes.append(sum(c.k.nbytes + c.v.nbytes for c in cache_list))
    expect_equal("KV bytes with int8 weights", sizes[1], sizes[0], "the same as with fp32 weights")


# --- the static cache -------------------------------------------------------------------

@contextlib.contextmanager
def garbage_in_fresh_memory():
    """torch.empty and friends return NaN-filled floats while active: uninitialised memory, made visible."""
    def poisoned(make):
        def wrapper(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return wrapper

    saved = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}
    saved_new = torch.Tensor.new_empty
    try:
        for name, make in saved.items():
            setattr(torch, name, poisoned(make))
        torch.Tensor.new_empty = poisoned(saved_new)
        yield
    finally:
        for name, make in saved.items():
            setattr(torch, name, make)
        torch.Tensor.new_empty = saved_new


class HostRead(Exception):
    """The code under test asked for a tensor's value on the host."""


# What each Python-level read of a tensor's value looks like in the code.
HOST_READ_CALLS = {
    "item": "t.item()", "tolist": "t.tolist()", "numpy": "t.numpy()", "cpu": "t.cpu()",
    "__bool__": "bool(t), `if t` or `while t` on a tensor", "__int__": "int(t)", "__float__": "float(t)",
    "__index__": "a tensor used as a Python int (a slice bound, range(t), a size)",
}
# Kernels that hand a Python value back, or whose output size depends on the data: on a GPU
# each one waits for the device. (The Python-level reads above all end in _local_scalar_dense.)
HOST_READ_KERNELS = {
    "aten._local_scalar_dense": "a tensor's value converted to a Python number",
    "aten.equal": "torch.equal (it returns a Python bool)", "aten.is_nonzero": "bool(t)",
    "aten.nonzero": "nonzero (how many it returns depends on the values)",
    "aten.masked_select": "masked_select (its size depends on the values)",
    "aten._unique2": "torch.unique", "aten.unique_dim": "torch.unique", "aten.unique_consecutive": "torch.unique_consecutive",
}


def _where_in_the_kata() -> str:
    """The line of the learner's cache.py that made the read, if it is on the stack."""
    frames = [f for f in traceback.extract_stack() if f.filename.replace("\\", "/").endswith("card00_cache_contract/cache.py")]
    return f" at cache.py line {frames[-1].lineno}: `{frames[-1].line}`" if frames else ""


class _RefuseHostReadCalls(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READ_CALLS:
            raise HostRead(HOST_READ_CALLS[name] + _where_in_the_kata())
        return func(*args, **(kwargs or {}))


class _RefuseHostReadKernels(InstrumentMode):  # a TorchDispatchMode that does not import torch._dynamo
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in HOST_READ_KERNELS:
            raise HostRead(f"{HOST_READ_KERNELS[name]} ({name})" + _where_in_the_kata())
        if name in ("aten.index", "aten.index_put", "aten.index_put_"):
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or []):
                raise HostRead(f"indexing with a boolean mask (how many it selects depends on the values) ({name})"
                               + _where_in_the_kata())
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads_refused():
    """Every torch call inside fails with HostRead if it would need a tensor's value on the host."""
    with _RefuseHostReadCalls(), _RefuseHostReadKernels():
        yield


@pytest.mark.kata("StaticKVCache")
@given(s=attention_shapes(), extra=st.integers(0, 3), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_static_cache_writes_by_position_into_one_allocation(s, extra, dtype):
    B, Hkv, T, D = s["B"], s["Hkv"], s["T"], s["D"]
    max_len = T + 1 + extra
    with garbage_in_fresh_memory():  # so `torch.empty` for "zeros" fails every time, not when memory happens to be 0
        cache = impl.StaticKVCache(B, Hkv, max_len, D, dtype)
    call = call_str("StaticKVCache", B, Hkv, max_len, D, dtype)
    expect_tensor(call + ".k", cache.k, (B, Hkv, max_len, D), dtype, "[B, Hkv, max_seq_len, D]")
    expect_tensor(call + ".v", cache.v, (B, Hkv, max_len, D), dtype, "[B, Hkv, max_seq_len, D]")
    expect_equal(call + ".seq_len", cache.seq_len, 0, "nothing written yet")
    ptr = cache.k.data_ptr()
    k_all, v_all = rand(B, Hkv, T + 1, D, seed=1).to(dtype), rand(B, Hkv, T + 1, D, seed=2).to(dtype)
    # A prompt of T positions, then one decode position.
    for pos in (torch.arange(T), torch.tensor([T])):
        k, v = cache.update(pos, k_all[:, :, pos], v_all[:, :, pos])
        end = int(pos[-1]) + 1
        ucall = call_str("StaticKVCache.update", pos, k_all[:, :, pos], v_all[:, :, pos])
        for name, got in (("k", k), ("v", v)):
            expect(isinstance(got, torch.Tensor) and got.shape == (B, Hkv, max_len, D)
                   and got.data_ptr() == getattr(cache, name).data_ptr(), f"{ucall} -> {name}", got,
                   f"the whole buffer {name} [B, Hkv, max_seq_len, D] = {[B, Hkv, max_len, D]}, the same shape at every "
                   "step: a prefix whose length follows the positions changes shape, which a CUDA graph cannot replay "
                   "(the attention masks the slots past each query)")
        expect_tensor_equal(ucall + f" -> k[:, :, :{end}]", k[:, :, :end], k_all[:, :, :end], BHTD, "[B, Hkv, T, D]")
        expect_tensor_equal(ucall + f" -> v[:, :, :{end}]", v[:, :, :end], v_all[:, :, :end], BHTD, "[B, Hkv, T, D]")
        expect_equal(ucall + "; then seq_len", cache.seq_len, end)
    expect_equal("StaticKVCache.k.data_ptr() after updates", cache.k.data_ptr(), ptr,
                 "the same storage: a static cache never reallocates")
    expect_tensor_equal(f"StaticKVCache.k[:, :, {T + 1}:], the positions never written (position 0 below is {T + 1}), "
                        "zeros since the constructor (a masked slot's weight is 0, and 0 x NaN is NaN)", cache.k[:, :, T + 1:],
                        torch.zeros(B, Hkv, extra, D, dtype=dtype), BHTD)


@pytest.mark.kata("StaticKVCache")
@given(s=attention_shapes(), data=st.data())
@example(s=dict(B=1, H=2, Hkv=2, T=4, S=4, D=4), data=None)  # a prompt written as [2, 0, 3, 1], then [5, 4]
def test_static_cache_writes_positions_given_in_any_order(s, data):
    B, Hkv, T, D = s["B"], s["Hkv"], s["T"], s["D"]
    prompt = data.draw(st.permutations(range(T)), label="prompt positions") if data else [2, 0, 3, 1]
    chunk = data.draw(st.permutations(range(T, T + 2)), label="chunk positions") if data else [T + 1, T]
    cache = impl.StaticKVCache(B, Hkv, T + 2, D)
    k_all, v_all = rand(B, Hkv, T + 2, D, seed=1), rand(B, Hkv, T + 2, D, seed=2)  # position j's K and V
    for pos in (torch.tensor(prompt), torch.tensor(chunk)):
        k, v = cache.update(pos, k_all[:, :, pos], v_all[:, :, pos])
        end = int(pos.max()) + 1
        ucall = call_str("StaticKVCache.update", pos, k_all[:, :, pos], v_all[:, :, pos])
        why = f"entry i in slot input_pos[i] (here {pos.tolist()}), not one slice in the order given"
        expect_tensor_equal(ucall + f" -> k[:, :, :{end}] ({why})", k[:, :, :end], k_all[:, :, :end], BHTD, "[B, Hkv, T, D]")
        expect_tensor_equal(ucall + f" -> v[:, :, :{end}] ({why})", v[:, :, :end], v_all[:, :, :end], BHTD, "[B, Hkv, T, D]")
        expect_equal(ucall + "; then seq_len", cache.seq_len, end, "the highest position this update wrote + 1")


@pytest.mark.kata("StaticKVCache")
def test_static_cache_update_reads_no_tensor_value_back_to_the_host():
    """A prompt, a decode step and a rollback, each `update` watched for reads of a tensor's value."""
    B, Hkv, T, D = 2, 2, 5, 4
    cache = impl.StaticKVCache(B, Hkv, T + 2, D)
    for pos in (torch.arange(T), torch.tensor([T]), torch.tensor([3, 2])):  # the last: a rejected draft's rewrite
        k_new, v_new = rand(B, Hkv, len(pos), D, seed=int(pos[0])), rand(B, Hkv, len(pos), D, seed=int(pos[0]) + 9)
        call = call_str("StaticKVCache.update", pos, k_new, v_new)
        try:
            with host_reads_refused():
                cache.update(pos, k_new, v_new)
        except HostRead as read:
            raise Mismatch(f"called {call}: it read a tensor's value back to the host: {read}; expected no such read in "
                           "update. On a GPU each one waits for the device, which a CUDA graph cannot capture: the write "
                           "and the length can both stay tensors on the device, and only reading seq_len may convert "
                           "(kvkata hint StaticKVCache)") from None


@pytest.mark.kata("StaticKVCache")
@given(s=attention_shapes(), data=st.data())
@example(s=dict(B=2, H=2, Hkv=2, T=5, S=5, D=4), data=None)  # rewrite positions 1, 2 of 0 .. 4
def test_static_cache_rewriting_earlier_positions_rolls_back_to_the_last_one_written(s, data):
    B, Hkv, T, D = s["B"], s["Hkv"], s["T"], s["D"]
    j = data.draw(st.integers(0, T - 1), label="first rewritten position") if data else 1
    m = data.draw(st.integers(1, T - j), label="positions rewritten") if data else 2
    cache = impl.StaticKVCache(B, Hkv, T + 2, D)
    k_old, v_old = rand(B, Hkv, T, D, seed=1), rand(B, Hkv, T, D, seed=2)
    cache.update(torch.arange(T), k_old, v_old)  # positions 0 .. T-1
    pos, k_new, v_new = torch.arange(j, j + m), rand(B, Hkv, m, D, seed=3), rand(B, Hkv, m, D, seed=4)
    k, v = cache.update(pos, k_new, v_new)
    call = call_str("StaticKVCache.update", pos, k_new, v_new) + f" after positions 0 .. {T - 1} were written"
    why = "the last position written + 1: a rewrite rolls back what followed it"
    expect_equal(call + "; then seq_len", cache.seq_len, j + m, why)
    expect_tensor_equal(call + f" -> k[:, :, :{j + m}]", k[:, :, :j + m], torch.cat([k_old[:, :, :j], k_new], dim=2),
                        BHTD, "[B, Hkv, T, D]")
    expect_tensor_equal(call + f" -> v[:, :, :{j + m}]", v[:, :, :j + m], torch.cat([v_old[:, :, :j], v_new], dim=2),
                        BHTD, "[B, Hkv, T, D]")


@pytest.mark.kata("StaticKVCache")
@given(cfg=model_configs(), batch=BATCHES, p=PROMPT_LENS, n=st.integers(2, 5), data=st.data())
@example(cfg=GQA8, batch=2, p=4, n=4, data=None)  # re-feed position 2 of 0 .. 6
def test_static_cache_rolled_back_in_a_model_gives_the_logits_of_the_new_sequence(cfg, batch, p, n, data):
    model = build_model(cfg)
    caches = [impl.StaticKVCache(batch, cfg.n_kv_heads, p + n, cfg.head_dim) for _ in range(cfg.n_layers)]
    with torch.no_grad():
        *_, (ids, _) = greedy_decode(model, prompt_ids(cfg, batch, p), n, caches, REF_PREFILL, REF_DECODE_STEP)
        # ids holds positions 0 .. p + n - 2, all cached; re-feed one at least two before the end.
        r = data.draw(st.integers(0, p + n - 3), label="re-fed position") if data else 2
        token = (ids[:, r:r + 1] + 1) % cfg.vocab_size  # (B, 1): a different token at position r
        ids = torch.cat([ids[:, :r], token], dim=1)  # the new sequence, positions 0 .. r
        # Re-feed position r (the stale keys past it stay in the buffers: the mask hides them),
        # then a decode step, which takes its position from seq_len: r + 1 after the rollback.
        for step in range(2):
            if step == 0:
                where = f"model(ids, tensor([{r}]), caches) after {p + n - 1} cached (a rollback to {r})"
                got = model(ids[:, -1:], torch.tensor([r]), caches)[:, -1]
            else:
                where = (f"Transformer.decode_step after {p + n - 1} cached and a rollback to {r}: it feeds position "
                         f"caches[0].seq_len, which should be {r + 1}")
                got = REF_DECODE_STEP(model, ids[:, -1:], caches)
            expect_close(where, got, model(ids)[:, -1], ("batch", "vocab"), 1e-4, 1e-4, "[B, V]")
            ids = torch.cat([ids, got.argmax(-1, keepdim=True)], dim=1)


@pytest.mark.kata("StaticKVCache")
@given(cfg=model_configs(), batch=BATCHES, p=PROMPT_LENS, n=NEW_TOKENS)
def test_static_and_growing_caches_give_identical_logits(cfg, batch, p, n):
    # float64: the static cache attends over its whole buffer under a mask, the growing one over its prefix, so
    # in float32 the two sum in different orders (1e-6 apart); in float64 any gap this test allows is a real one.
    model = build_model(cfg).double()
    prompt = prompt_ids(cfg, batch, p)
    static = [impl.StaticKVCache(batch, cfg.n_kv_heads, p + n, cfg.head_dim, torch.float64)
              for _ in range(cfg.n_layers)]
    growing = [RefGrowingKVCache() for _ in range(cfg.n_layers)]
    with torch.no_grad():
        runs = [list(greedy_decode(model, prompt, n, c, REF_PREFILL, REF_DECODE_STEP))
                for c in (static, growing)]
    for step, ((ids_s, got), (ids_g, want)) in enumerate(zip(*runs)):
        expect_close(f"model with StaticKVCache, step {step}", got, want, ("batch", "vocab"), 1e-6, 1e-6)
    for layer, c in enumerate(static):
        expect_equal(f"StaticKVCache.seq_len in layer {layer} after prefill({p}) and {plural(n - 1, 'step')}",
                     c.seq_len, p + n - 1)


# --- prefill and decode_step --------------------------------------------------------------

@pytest.mark.kata("prefill")
@given(cfg=model_configs(), batch=BATCHES, p=PROMPT_LENS)
@example(cfg=GQA8, batch=2, p=5)
def test_prefill_writes_every_prompt_position_and_returns_the_last_logits(cfg, batch, p):
    model = build_model(cfg)
    prompt = prompt_ids(cfg, batch, p)
    caches = model.new_caches("static", batch, p + 2)
    with torch.no_grad():
        got = impl.prefill(model, prompt, caches)
        want = model(prompt)[:, -1]
    call = call_str("prefill", model, prompt, caches)
    expect_close(call, got, want, ("batch", "vocab"), 1e-5, 1e-5, "[B, V]")
    for layer, c in enumerate(caches):
        expect_equal(f"{call}; then caches[{layer}].seq_len", c.seq_len, p, "one position per prompt token")


@pytest.mark.kata("decode_step")
@given(cfg=model_configs(), batch=BATCHES, p=PROMPT_LENS, n=st.integers(2, 6), kind=st.sampled_from(["static", "growing"]))
@example(cfg=ModelConfig(vocab_size=64, n_layers=1, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=32),
         batch=1, p=1, n=3, kind="static")  # a one-token prompt, MQA
@example(cfg=GQA8, batch=4, p=3, n=32, kind="static")  # a few dozen steps
def test_cached_decode_matches_full_recompute(cfg, batch, p, n, kind):
    model = build_model(cfg)
    caches = model.new_caches(kind, batch, p + n)
    with torch.no_grad():
        for step, (ids, logits) in enumerate(greedy_decode(model, prompt_ids(cfg, batch, p), n, caches,
                                                           REF_PREFILL, impl.decode_step)):
            want = model(ids)[:, -1]  # no cache: the whole sequence recomputed
            expect_close(f"decode_step with a {kind} cache, step {step} (T={ids.shape[1]})", logits, want,
                         ("batch", "vocab"), 1e-4, 1e-4, "[B, V]")


@pytest.mark.kata("decode_step")
@given(cfg=model_configs(), batch=BATCHES, p=PROMPT_LENS, n=st.integers(2, 5))
def test_decode_step_appends_exactly_one_position_per_layer(cfg, batch, p, n):
    model = build_model(cfg)
    caches = model.new_caches("growing")
    with torch.no_grad():
        logits = model.prefill(prompt_ids(cfg, batch, p), caches)
        for step in range(1, n):
            ids = logits.argmax(-1, keepdim=True)
            logits = impl.decode_step(model, ids, caches)
            expect_tensor(call_str("decode_step", model, ids, caches), logits, (batch, cfg.vocab_size), layout="[B, V]")
            for layer, c in enumerate(caches):
                expect_equal(f"caches[{layer}].seq_len after prefill({p}) and {plural(step, 'decode_step call')}",
                             c.seq_len, p + step)
