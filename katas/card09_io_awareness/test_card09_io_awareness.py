"""card09: IO-awareness.

The intensity katas are checked against measurement: FLOPs counted by FlopCounterMode's formulas on kvref's
attention over real tensors, bytes by `.nbytes` of K and V allocated in the cache's dtype. The
merge is checked against PyTorch's scaled_dot_product_attention over every key at once, with the
partials computed here from the definition (float64), splits drawn ragged and sometimes empty.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvkata
from kvkata.check import call_str, expect, expect_close, expect_equal, expect_real, expect_tensor, first_where
from kvref.attention import attention
from kvref.config import ModelConfig, preset
from kvref.hardware import A100_80GB_SXM, H100_SXM, HARDWARE, Hardware
from kvref.measure import flops_of
from kvref.strategies import gqa_model_configs, hardware_presets, model_configs

impl = kvkata.load("card09_io_awareness.flash")

CONFIGS = st.one_of(model_configs(max_layers=1), gqa_model_configs(max_layers=2))
CACHE_DTYPES = st.sampled_from([torch.bfloat16, torch.float32, torch.float16, torch.float8_e4m3fn, torch.int8])
# Each example runs attention under FlopCounterMode: a few milliseconds.
MEASURED = settings(max_examples=min(settings().max_examples, 40))


def measured_intensity(cfg: ModelConfig, dtype: torch.dtype, S: int = 1, T: int = 5, B: int = 1) -> tuple[float, int, int]:
    """(FLOPs / bytes, FLOPs, bytes) of one layer's attention for S queries over T cached keys, measured.

    FLOPs: FlopCounterMode's formulas over kvref.attention on float32 tensors (the count does not depend on
    the dtype). Bytes: `.nbytes` of K and V allocated in `dtype`, the cache the step reads.
    """
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, S, D, generator=g)
    T_read = max(T, S)  # kvref's attention places the S queries at the last S of the cached positions
    k, v = torch.randn(B, Hkv, T_read, D, generator=g), torch.randn(B, Hkv, T_read, D, generator=g)
    flops = flops_of(attention, q, k, v)
    k_cache, v_cache = torch.zeros(B, Hkv, T_read, D, dtype=dtype), torch.zeros(B, Hkv, T_read, D, dtype=dtype)
    nbytes = k_cache.nbytes + v_cache.nbytes
    return flops.attention / nbytes, flops.attention, nbytes


def first_count_reaching(ridge: float, intensity) -> int:
    """The smallest S >= 1 with intensity(S) >= ridge, for an intensity that grows with S (more query
    tokens over the same K and V): doubling to pass the ridge, then halving the gap, so a few dozen
    measurements instead of one per count. S - 1 is measured below the ridge, whatever the search did."""
    hi = first_where(lambda s: intensity(s) >= ridge)
    assert hi == 1 or intensity(hi - 1) < ridge <= intensity(hi)
    return hi


# --- decode_attention_intensity ----------------------------------------------------------------

@MEASURED
@pytest.mark.kata("decode_attention_intensity")
@given(cfg=CONFIGS, dtype=CACHE_DTYPES, T=st.integers(1, 40), B=st.integers(1, 3))
@example(cfg=ModelConfig(vocab_size=8, n_layers=1, d_model=16, n_heads=8, n_kv_heads=2, head_dim=8, d_ff=8),
         dtype=torch.bfloat16, T=7, B=2)
def test_decode_attention_intensity_equals_counted_flops_over_the_bytes_of_k_and_v(cfg, dtype, T, B):
    got = impl.decode_attention_intensity(cfg, dtype)
    want, flops, nbytes = measured_intensity(cfg, dtype, 1, T, B)
    expect_real(call_str("decode_attention_intensity", cfg, dtype), got, want, rel=1e-12,
                why=f"FlopCounterMode's formulas counted {flops:,} FLOPs of q·kᵀ and p·v for {B} x {cfg.n_heads} query heads over "
                    f"{T} keys; K and V in {dtype}, [{B}, {cfg.n_kv_heads}, {T}, {cfg.head_dim}] each, have an "
                    f".nbytes of {nbytes:,} together")


@pytest.mark.kata("decode_attention_intensity")
def test_decode_attention_intensity_of_real_models_stays_far_below_every_ridge_at_every_head_dim():
    cases = [("llama-2-7b", torch.bfloat16), ("llama-3-8b", torch.bfloat16), ("llama-2-70b", torch.bfloat16),
             ("llama-2-70b", torch.float8_e4m3fn)]
    for name, dtype in cases:
        cfg = preset(name)
        for head_dim in (64, 128, 256, 1024):
            c = cfg.with_(head_dim=head_dim)
            got = impl.decode_attention_intensity(c, dtype)
            want, flops, nbytes = measured_intensity(c, dtype, 1, 4, 1)
            expect_real(call_str("decode_attention_intensity", f"{name} with head_dim={head_dim}", dtype), got, want,
                        rel=1e-12, why=f"{name}: {c.n_heads} query heads over {c.n_kv_heads} KV heads, measured "
                                       f"{flops:,} FLOPs over {nbytes:,} bytes; head_dim and T cancel")
            ridge = min(hw.ridge_point(dtype) for hw in HARDWARE.values() if hw.computes_in(dtype))
            expect(got < ridge / 10, call_str("decode_attention_intensity", name, dtype), got,
                   f"an intensity far below the lowest ridge point of kvref's devices in {dtype} ({ridge:.0f} "
                   f"FLOP/B): no head dim makes decode compute-bound")


# Pinned (issue 21): with G even and a 2-byte cache, 4·G / (2·itemsize) is a whole number, so an
# integer division passes; MHA (G = 1) and an odd G in float32 (4 bytes) are fractions.
FRACTIONAL = [(ModelConfig(vocab_size=8, n_layers=1, d_model=16, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=8),
               torch.float32, "MHA in float32: 4 FLOPs per 8 bytes"),
              (ModelConfig(vocab_size=8, n_layers=1, d_model=16, n_heads=6, n_kv_heads=2, head_dim=8, d_ff=8),
               torch.float32, "G = 3 in float32: 12 FLOPs per 8 bytes"),
              (ModelConfig(vocab_size=8, n_layers=1, d_model=16, n_heads=6, n_kv_heads=2, head_dim=8, d_ff=8),
               torch.int8, "G = 3 in int8: a whole number, still a float")]


@pytest.mark.kata("decode_attention_intensity")
def test_decode_attention_intensity_of_mha_and_odd_groups_is_a_float_fraction():
    for cfg, dtype, note in FRACTIONAL:
        got = impl.decode_attention_intensity(cfg, dtype)
        call = call_str("decode_attention_intensity", cfg, dtype)
        want, flops, nbytes = measured_intensity(cfg, dtype, 1, 6, 1)
        expect_real(call, got, want, rel=1e-12, why=f"{note}: FlopCounterMode's formulas counted {flops:,} FLOPs over {nbytes:,} "
                                                     "bytes of K and V; / not //")
        expect(isinstance(got, float), call, got, f"a Python float ({note}): no int() of a whole ratio")


# A fictional device with little compute per byte: ridge point 2 FLOP/B in bf16.
SLOW_COMPUTE = Hardware("slow-compute", {torch.bfloat16: 2e12}, 1e12, 10**10, "fictional, for tests")


# --- queries_to_reach_ridge ------------------------------------------------------------------------

@MEASURED
@pytest.mark.kata("queries_to_reach_ridge")
@given(cfg=CONFIGS, hw=hardware_presets, dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float16,
                                                                 torch.float8_e4m3fn]))
@example(cfg=ModelConfig(vocab_size=8, n_layers=1, d_model=16, n_heads=8, n_kv_heads=2, head_dim=8, d_ff=8),
         hw=H100_SXM, dtype=torch.bfloat16)
def test_queries_to_reach_ridge_is_the_first_count_whose_measured_intensity_reaches_it(cfg, hw, dtype):
    if not hw.computes_in(dtype):
        return  # fp8 has no peak on an A100
    call = call_str("queries_to_reach_ridge", cfg, hw, dtype)
    got = impl.queries_to_reach_ridge(cfg, hw, dtype)
    expect(isinstance(got, int) and not isinstance(got, bool) and got >= 1, call, got, "a number of tokens, an int >= 1")
    ridge = hw.ridge_point(dtype)
    at, flops, nbytes = measured_intensity(cfg, dtype, got, 2, 1)
    expect(at >= ridge, call, got,
           f"a count that reaches the ridge: with {got} queries over the same K and V, FlopCounterMode's formulas count {flops:,} "
           f"FLOPs over {nbytes:,} bytes of K and V = {at:.4g} FLOP/B, below {hw.name}'s ridge point in {dtype}, "
           f"{ridge:.4g} FLOP/B")
    if got > 1:
        below, flops, nbytes = measured_intensity(cfg, dtype, got - 1, 2, 1)
        expect(below < ridge, call, got,
               f"the fewest: {got - 1} queries already give {flops:,} FLOPs over {nbytes:,} bytes = {below:.4g} FLOP/B, "
               f"at least the ridge point {ridge:.4g}")


@pytest.mark.kata("queries_to_reach_ridge")
def test_queries_to_reach_ridge_of_llama_on_an_h100_and_an_a100():
    cases = [("llama-2-70b", H100_SXM, torch.bfloat16, "64 query heads over 8 KV heads: 8 FLOP/B per query token in "
              "bf16, against 989e12 / 3.35e12 = 295.2 FLOP/B: 37 tokens"),
             ("llama-3-8b", H100_SXM, torch.bfloat16, "32 over 8: 4 FLOP/B per query token, 74 tokens"),
             ("llama-2-7b", A100_80GB_SXM, torch.float16, "no GQA: 1 FLOP/B per query token in fp16 against "
              "312e12 / 2.039e12 = 153.0 FLOP/B: 154 tokens"),
             ("llama-3-8b", SLOW_COMPUTE, torch.bfloat16, "a device whose ridge is 2 FLOP/B: one query token (4 FLOP/B) "
              "is already past it"),
             ("llama-2-7b", SLOW_COMPUTE, torch.bfloat16, "no GQA: 1 FLOP/B per query token in bf16 against a ridge of "
              "exactly 2 FLOP/B: 2 tokens reach it (at least the ridge, not past it)")]
    for name, hw, dtype, why in cases:
        cfg = preset(name)
        got = impl.queries_to_reach_ridge(cfg, hw, dtype)
        want = first_count_reaching(hw.ridge_point(dtype), lambda s: measured_intensity(cfg.with_(head_dim=8), dtype, s, 1, 1)[0])
        expect_real(call_str("queries_to_reach_ridge", cfg, hw, dtype), got, want, rel=0, why=why)


@pytest.mark.kata("queries_to_reach_ridge")
def test_queries_to_reach_ridge_of_mha_and_odd_groups_in_float32():
    """Each query token adds 2·G / itemsize FLOP/B: 0.5 for MHA in float32 and 1.5 for G = 3, where an
    integer division gives 0 and 1."""
    cases = [(FRACTIONAL[0][0], H100_SXM, "MHA: 0.5 FLOP/B per query token against 67e12 / 3.35e12 = 20 FLOP/B"),
             (FRACTIONAL[1][0], A100_80GB_SXM, "G = 3: 1.5 FLOP/B per query token against 19.5e12 / 2.039e12 = "
              "9.56 FLOP/B")]
    for cfg, hw, why in cases:
        got = impl.queries_to_reach_ridge(cfg, hw, torch.float32)
        call = call_str("queries_to_reach_ridge", cfg, hw, torch.float32)
        want = next(s for s in range(1, 1000) if measured_intensity(cfg, torch.float32, s, 1, 1)[0]
                    >= hw.ridge_point(torch.float32))
        expect_equal(call, got, want, f"{why}: the first S whose measured FLOPs per byte of K and V reach the ridge")


# --- merge_split_partials --------------------------------------------------------------------------

def partials(q, k, v, bounds):
    """Split i's (out, lse) over keys bounds[i]:bounds[i + 1], from the definition in float64."""
    D = q.shape[-1]
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi == lo:
            outs.append(torch.zeros(q.shape[0], q.shape[1], D, dtype=torch.float64))
            lses.append(torch.full(q.shape[:2], -math.inf, dtype=torch.float64))
            continue
        s = (q.double() @ k[:, :, lo:hi].double().transpose(-2, -1))[:, :, 0] / math.sqrt(D)  # (B, H, n)
        lses.append(torch.logsumexp(s, dim=-1))
        outs.append(torch.einsum("bhn,bhnd->bhd", torch.softmax(s, dim=-1), v[:, :, lo:hi].double()))
    return torch.stack(outs), torch.stack(lses)


@st.composite
def split_bounds(draw, T):
    """Ragged split bounds over T keys, some splits empty (a short sequence's trailing splits are)."""
    n = draw(st.integers(1, 6), label="splits")
    cuts = sorted(draw(st.lists(st.integers(0, T), min_size=n - 1, max_size=n - 1), label="cuts"))
    return [0, *cuts, T]


AXES = ("batch", "head", "dim")


@pytest.mark.kata("merge_split_partials")
@given(B=st.integers(1, 2), H=st.integers(1, 4), D=st.sampled_from([4, 8, 16]), T=st.integers(1, 40),
       scale=st.sampled_from([1.0, 8.0]), data=st.data(), seed=st.integers(0, 99))
@example(B=1, H=2, D=8, T=12, scale=1.0, data=None, seed=0)
@example(B=2, H=1, D=4, T=9, scale=8.0, data=None, seed=1)  # the first two splits empty
def test_merge_split_partials_equals_sdpa_over_every_key(B, H, D, T, scale, data, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(B, H, 1, D, generator=g) * scale, torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    # Pinned: an empty split in the middle; two empty splits first (a merge that runs split by split from
    # split 0 then meets exp(-inf - (-inf)) = NaN unless it guards it).
    bounds = data.draw(split_bounds(T)) if data is not None else {0: [0, 5, 5, 12], 1: [0, 0, 0, 4, 9]}[seed]
    outs, lses = partials(q, k, v, bounds)
    outs, lses = outs.float(), lses.float()
    call = call_str("merge_split_partials", outs, lses)
    out, lse = impl.merge_split_partials(outs, lses)
    expect_tensor(call + " -> out", out, (B, H, D), torch.float32, layout="[B, H, D]")
    expect_tensor(call + " -> lse", lse, (B, H), torch.float32, layout="[B, H]")
    want = F.scaled_dot_product_attention(q, k, v)[:, :, 0]  # (B, H, D): all T keys at once
    expect_close(call + " -> out", out, want, AXES, atol=1e-5, rtol=1e-4,
                 why=f"PyTorch's scaled_dot_product_attention of the query over all {T} keys; the splits were keys "
                     f"{[f'{lo}:{hi}' for lo, hi in zip(bounds[:-1], bounds[1:])]}")
    all_scores = (q.double() @ k.double().transpose(-2, -1))[:, :, 0] / math.sqrt(D)
    expect_close(call + " -> lse", lse, torch.logsumexp(all_scores, dim=-1).float(), ("batch", "head"), atol=1e-5,
                 rtol=1e-5, why="the log-sum-exp of all T scaled scores, so that the result can be merged again")


@pytest.mark.kata("merge_split_partials")
def test_merge_split_partials_with_scores_in_the_thousands_and_empty_splits_in_fp16():
    # Two real splits whose log-sum-exps are 1000 and 999 (exp overflows every float type), two empty ones.
    o1, o2 = torch.tensor([1.0, 0.0, 2.0, -1.0]), torch.tensor([0.0, 1.0, -2.0, 3.0])
    zero = torch.zeros(4)
    outs = torch.stack([o1, zero, o2, zero]).view(4, 1, 1, 4).half()
    lses = torch.tensor([1000.0, -math.inf, 999.0, -math.inf]).view(4, 1, 1)
    call = call_str("merge_split_partials", outs, lses)
    out, lse = impl.merge_split_partials(outs, lses)
    w1 = 1 / (1 + math.exp(-1))  # exp(1000 - lse) with lse = 1000 + log(1 + e^-1)
    want = (w1 * o1 + (1 - w1) * o2).view(1, 1, 4)
    expect_tensor(call + " -> out", out, (1, 1, 4), torch.float16, layout="[B, H, D] in outs' dtype")
    expect(bool(torch.isfinite(out.float()).all()), call, out,
           "finite numbers, though one split's lse is 1000 and exp(1000) overflows float32")
    expect_close(call + " -> out", out.float(), want, AXES, atol=2e-3, rtol=2e-3,
                 why="split weights e^1000 : e^999 = 0.731 : 0.269; the empty splits (lse -inf) weigh nothing")
    expect_close(call + " -> lse", lse, torch.tensor([[1000 + math.log(1 + math.exp(-1))]]), ("batch", "head"),
                 atol=1e-4, rtol=0, why="log(e^1000 + e^999) = 1000 + log(1 + 1/e) = 1000.3133")


@pytest.mark.kata("merge_split_partials")
@given(T=st.integers(3, 30), seed=st.integers(0, 99), data=st.data())
def test_merge_split_partials_merged_twice_equals_merged_once(T, seed, data):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(1, 3, 1, 8, generator=g), torch.randn(1, 3, T, 8, generator=g), torch.randn(1, 3, T, 8, generator=g)
    bounds = data.draw(split_bounds(T))
    outs, lses = (x.float() for x in partials(q, k, v, bounds))
    once, lse_once = impl.merge_split_partials(outs, lses)
    cut = data.draw(st.integers(1, max(1, len(outs) - 1)), label="first group")
    if cut >= len(outs) or not (torch.isfinite(lses[:cut]).any() and torch.isfinite(lses[cut:]).any()):
        return  # each group needs a split with keys
    a, la = impl.merge_split_partials(outs[:cut], lses[:cut])
    b, lb = impl.merge_split_partials(outs[cut:], lses[cut:])
    call = call_str("merge_split_partials", torch.stack([a, b]), torch.stack([la, lb]))
    twice, lse_twice = impl.merge_split_partials(torch.stack([a, b]), torch.stack([la, lb]))
    expect_close(call, twice, once, AXES, atol=1e-5, rtol=1e-5,
                 why=f"splits 0..{cut - 1} merged, splits {cut}..{len(outs) - 1} merged, then the two merged: the same "
                     "as merging all at once (the returned lse is what makes this work)")
    expect_close(call + " -> lse", lse_twice, lse_once, ("batch", "head"), atol=1e-5, rtol=1e-6)


@pytest.mark.kata("merge_split_partials")
def test_merge_split_partials_of_bf16_outputs_returns_bf16():
    outs = torch.tensor([[1.0, -2.0], [3.0, 0.5]]).view(2, 1, 1, 2).bfloat16()
    lses = torch.tensor([0.0, math.log(3.0)]).view(2, 1, 1)  # split weights 1/4 and 3/4
    call = call_str("merge_split_partials", outs, lses)
    out, lse = impl.merge_split_partials(outs, lses)
    expect_tensor(call + " -> out", out, (1, 1, 2), torch.bfloat16, layout="[B, H, D] in outs' dtype")
    expect_tensor(call + " -> lse", lse, (1, 1), torch.float32, layout="[B, H] float32")
    expect_close(call + " -> out", out.float(), torch.tensor([[[2.5, -0.125]]]), AXES, atol=1e-2, rtol=1e-2,
                 why="1/4 · [1, -2] + 3/4 · [3, 0.5]: the splits weighted by exp(lse_i - lse)")
