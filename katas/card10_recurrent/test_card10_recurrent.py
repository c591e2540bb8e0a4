"""card10: the fundamental assumption breaker.

The recurrent step is checked against kvref's parallel causal form of linear attention (itself
checked against PyTorch's scaled_dot_product_attention in checks/test_kvref_recurrent.py); the scan
against the step-by-step recurrence, and its depth by counting the torch operations it runs; the
bytes against `.nbytes` of the states kvref's recurrence builds and of an allocated KV cache; the
capacity against the recall kvref measures, pair by pair, on a fixed-size state.
"""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import kvkata
from kvkata.check import Shown, call_str, expect, expect_close, expect_equal, expect_tensor, first_where, plural
from kvref.config import PRESETS, ModelConfig, preset
from kvref.measure import kv_cache_bytes_measured
from kvref.recurrent import linear_attention_parallel, model_states, recall_curve, ssm_recurrence, states_nbytes
from kvref.strategies import GQA_PRESET_NAMES, model_configs

impl = kvkata.load("card10_recurrent.recurrent")

DIMS = st.integers(1, 6)
SMALL = ModelConfig(vocab_size=16, n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, head_dim=6, d_ff=16)


def qkv(B, H, T, D, Dv, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (scale * torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, torch.randn(B, H, T, Dv, generator=gen, dtype=torch.float64)


def run_steps(q, k, v):
    """The learner's step over every position from an empty state: outputs [B, H, T, Dv] and the states seen."""
    B, H, T, D = q.shape
    S = torch.zeros(B, H, D, v.shape[-1], dtype=q.dtype)
    z = torch.zeros(B, H, D, dtype=q.dtype)
    outs, states = [], []
    for t in range(T):
        result = impl.linear_attention_step(S, z, q[:, :, t], k[:, :, t], v[:, :, t])
        expect(isinstance(result, tuple) and len(result) == 3, call_str("linear_attention_step", S, z, q[:, :, t],
               k[:, :, t], v[:, :, t]), result, "a tuple (out, S, z)")
        out, S, z = result
        outs.append(out)
        states.append((S, z))
    return torch.stack(outs, dim=2), states


# --- the recurrent step --------------------------------------------------------------------------

@pytest.mark.kata("linear_attention_step")
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 9), D=DIMS, Dv=DIMS, seed=st.integers(0, 99))
@example(B=2, H=3, T=9, D=4, Dv=2, seed=0)
@example(B=1, H=1, T=1, D=1, Dv=1, seed=1)
def test_linear_attention_step_run_over_a_sequence_gives_the_parallel_causal_outputs(B, H, T, D, Dv, seed):
    q, k, v = qkv(B, H, T, D, Dv, seed)
    got, _ = run_steps(q, k, v)
    want = linear_attention_parallel(q, k, v)
    expect_close(f"linear_attention_step over {plural(T, 'position')} from S = 0, z = 0 (outputs stacked)", got, want,
                 axes=("batch", "head", "position", "value dim"), atol=1e-10, rtol=1e-9,
                 layout="[B, H, T, Dv]")


@pytest.mark.kata("linear_attention_step")
def test_linear_attention_step_averages_the_values_so_constant_values_come_back_unchanged():
    """Every value 3.0: a weighted average of them is 3.0 at every step, however many tokens came before."""
    q, k, _ = qkv(1, 2, 40, 4, 3, seed=5, scale=2.0)
    v = torch.full((1, 2, 40, 3), 3.0, dtype=torch.float64)
    got, _ = run_steps(q, k, v)
    expect_close("linear_attention_step over 40 positions whose values are all 3.0", got, v,
                 axes=("batch", "head", "position", "value dim"), atol=1e-10, rtol=1e-10, layout="[B, H, T, Dv]")


@pytest.mark.kata("linear_attention_step")
def test_linear_attention_step_of_the_first_token_returns_its_own_value():
    q, k, v = qkv(2, 2, 1, 3, 5, seed=7)
    S, z = torch.zeros(2, 2, 3, 5, dtype=torch.float64), torch.zeros(2, 2, 3, dtype=torch.float64)
    out, _, _ = impl.linear_attention_step(S, z, q[:, :, 0], k[:, :, 0], v[:, :, 0])
    expect_close(call_str("linear_attention_step", S, z, q[:, :, 0], k[:, :, 0], v[:, :, 0]) + " on an empty state",
                 out, v[:, :, 0], axes=("batch", "head", "value dim"), atol=1e-12, rtol=1e-12, layout="[B, H, Dv]")


@pytest.mark.kata("linear_attention_step")
@given(T=st.integers(2, 12), D=DIMS, Dv=DIMS)
@example(T=12, D=3, Dv=5)
def test_linear_attention_step_keeps_a_state_whose_bytes_do_not_grow_with_the_tokens(T, D, Dv):
    q, k, v = qkv(2, 3, T, D, Dv, seed=T)
    S0, z0 = torch.zeros(2, 3, D, Dv, dtype=torch.float64), torch.zeros(2, 3, D, dtype=torch.float64)
    S0_before, z0_before = S0.clone(), z0.clone()
    _, states = run_steps(q, k, v)
    impl.linear_attention_step(S0, z0, q[:, :, 0], k[:, :, 0], v[:, :, 0])
    expect(torch.equal(S0, S0_before) and torch.equal(z0, z0_before), "linear_attention_step(S, z, ...)",
           Shown("its result, but it also changed the S and z passed in (in place: S += ..., or S.add_)"),
           "S and z passed in left as they were (return new ones): a caller may still hold the old state")
    first = states[0][0].nbytes + states[0][1].nbytes
    for t, (S, z) in enumerate(states):
        call = f"linear_attention_step at position {t} (S and z returned)"
        expect_tensor(call + ", S", S, (2, 3, D, Dv), torch.float64, layout="[B, H, D, Dv]")
        expect_tensor(call + ", z", z, (2, 3, D), torch.float64, layout="[B, H, D]")
        expect_equal(call + ": S.nbytes + z.nbytes", S.nbytes + z.nbytes, first,
                     f"{first:,} B, the state after the first token: the state replaces the cache, it must not grow")


# --- the scan -------------------------------------------------------------------------------

@st.composite
def gates(draw):
    """a in [0, 1] with exact zeros (resets) and tiny values, u Gaussian."""
    B, T, N = draw(st.integers(1, 2), label="B"), draw(st.integers(1, 40), label="T"), draw(st.integers(1, 4), label="N")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 999), label="seed"))
    a = torch.rand(B, T, N, generator=gen, dtype=torch.float64)
    a = torch.where(a < 0.1, torch.zeros_like(a), a)  # a reset gate: the state forgets everything
    return a, torch.randn(B, T, N, generator=gen, dtype=torch.float64)


@pytest.mark.kata("selective_scan")
@given(au=gates())
def test_selective_scan_gives_the_step_by_step_recurrence(au):
    a, u = au
    got = impl.selective_scan(a, u)
    expect_close(call_str("selective_scan", a, u), got, ssm_recurrence(a, u), axes=("batch", "t", "channel"),
                 atol=1e-10, rtol=1e-9, layout="[B, T, N]")


@pytest.mark.kata("selective_scan")
def test_selective_scan_survives_resets_and_decays_that_underflow():
    """a = 0 at some steps and 1e-3 elsewhere: the product of 300 a's is 0 in float64; h stays finite."""
    gen = torch.Generator().manual_seed(3)
    a = torch.full((1, 300, 3), 1e-3, dtype=torch.float64)
    a[:, ::37] = 0.0
    a[:, :, 2] = 0.999  # a slow channel beside the fast ones
    u = torch.randn(1, 300, 3, generator=gen, dtype=torch.float64)
    expect_close(call_str("selective_scan", a, u) + " with a = 0 every 37 steps", impl.selective_scan(a, u),
                 ssm_recurrence(a, u), axes=("batch", "t", "channel"), atol=1e-10, rtol=1e-9, layout="[B, T, N]")


ESCAPES = {"numpy", "tolist", "item", "__iter__", "__array__"}  # ways out of torch into Python or NumPy


class CountOps(TorchFunctionMode):
    """Counts torch operations, the elements they produce, and any way out of torch."""

    def __init__(self):
        super().__init__()
        self.n, self.elements, self.escapes = 0, 0, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += 1
        name = getattr(func, "__name__", str(func))
        if name in ESCAPES:
            self.escapes.add(name)
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.elements += t.numel()
        return out


@pytest.mark.kata("selective_scan")
def test_selective_scan_runs_a_number_of_torch_operations_that_grows_like_log_t():
    counts = {}
    for T in (8, 1024):
        a = torch.full((1, T, 2), 0.5, dtype=torch.float64)
        u = torch.ones(1, T, 2, dtype=torch.float64)
        with CountOps() as mode:
            impl.selective_scan(a, u)
        counts[T] = mode.n
        call = call_str("selective_scan", Shown(f"a [1, {T}, 2]"), Shown(f"u [1, {T}, 2]"))
        expect(not mode.escapes, call, Shown(f"a scan that left torch (Tensor.{', Tensor.'.join(sorted(mode.escapes))})"),
               "whole-tensor torch operations only: a loop over t in NumPy or Python is still the step form, T "
               "dependent steps")
        budget = 64 * T * 2 * max(1, math.ceil(math.log2(T)))  # elements: a constant x B·T·N per round, log2 T rounds
        expect(mode.elements <= budget, call, Shown(f"{mode.elements:,} elements produced by its torch operations"),
               f"at most {budget:,} (64 x B·T·N x log2 T): each round of the scan touches every position a fixed "
               "number of times; a T x T matrix of products is quadratic work, not a scan")
    expect(counts[1024] <= 5 * max(counts[8], 1), call_str("selective_scan", Shown("a [1, 1024, 2]"), Shown("u [1, 1024, 2]")),
           Shown(f"after {counts[1024]:,} torch operations ({counts[8]:,} at T = 8)"),
           "at most 5 x the operations at T = 8: 128 times the positions is 7 more rounds of a log-depth scan "
           "(10 rounds against 3), while a loop over t runs 128 x more operations")


# --- state bytes against cache bytes ---------------------------------------------------------------

@pytest.mark.kata("linear_state_bytes")
@given(cfg=model_configs(), batch=st.integers(1, 3), seq_len=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
@example(cfg=SMALL, batch=3, seq_len=2, dtype=torch.bfloat16)
@settings(max_examples=min(settings().max_examples, 40))
def test_linear_state_bytes_match_nbytes_of_the_states_kvref_builds(cfg, batch, seq_len, dtype):
    got = impl.linear_state_bytes(cfg, batch, dtype)
    want = states_nbytes(model_states(cfg, batch, seq_len, dtype))
    expect_equal(call_str("linear_state_bytes", cfg, batch, dtype), got, want,
                 f".nbytes of S [B, Hkv, D, D] and z [B, Hkv, D] in each of the {plural(cfg.n_layers, 'layer')} after "
                 f"{plural(seq_len, 'token')} of kvref's recurrence, {cfg.n_kv_heads} KV heads")


@pytest.mark.kata("linear_state_bytes")
def test_linear_state_bytes_of_llama_3_8b_against_its_cache_at_4096_tokens():
    cfg = preset("llama-3-8b")
    got = impl.linear_state_bytes(cfg, 1, torch.bfloat16)
    state = states_nbytes(model_states(cfg, 1, 1, torch.bfloat16))
    cache = kv_cache_bytes_measured(cfg, 1, 4096, torch.bfloat16)
    expect_equal(call_str("linear_state_bytes", preset("llama-3-8b"), 1, torch.bfloat16), got, state,
                 f".nbytes of the states of 32 layers x 8 KV heads, {state:,} B, whatever the length; the bf16 KV "
                 f"cache of 4,096 tokens holds {cache:,} B ({cache / state:.1f} x more)")


@pytest.mark.kata("cache_outgrows_state_at")
@given(cfg=model_configs(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), batch=st.integers(1, 2))
@example(cfg=SMALL, dtype=torch.float32, batch=1)
@settings(max_examples=min(settings().max_examples, 30))
def test_cache_outgrows_state_at_the_first_length_whose_measured_cache_is_bigger(cfg, dtype, batch):
    got = impl.cache_outgrows_state_at(cfg)
    call = call_str("cache_outgrows_state_at", cfg)
    expect(isinstance(got, int) and not isinstance(got, bool) and got >= 1, call, got, "a length, an int >= 1")
    state = states_nbytes(model_states(cfg, batch, 1, dtype))
    at = kv_cache_bytes_measured(cfg, batch, got, dtype)
    before = kv_cache_bytes_measured(cfg, batch, got - 1, dtype) if got > 1 else 0
    if not at > state >= before:
        want = first_where(lambda t: kv_cache_bytes_measured(cfg, batch, t, dtype) > state)
        expect_equal(call, got, want,
                     f"the first T whose cache is bigger than the state's {state:,} B (.nbytes, {batch} x {dtype}): "
                     f"the cache (.nbytes) holds {kv_cache_bytes_measured(cfg, batch, want - 1, dtype):,} B at "
                     f"T = {want - 1} and {kv_cache_bytes_measured(cfg, batch, want, dtype):,} B at T = {want}; "
                     f"{before:,} B at your T - 1 = {got - 1} and {at:,} B at T = {got}")


@pytest.mark.kata("cache_outgrows_state_at")
def test_cache_outgrows_state_at_for_real_presets_with_128_dim_heads():
    for name in GQA_PRESET_NAMES:
        cfg = PRESETS[name]
        got = impl.cache_outgrows_state_at(cfg)
        state = cfg.n_layers * cfg.n_kv_heads * (cfg.head_dim ** 2 + cfg.head_dim) * 2
        expect_equal(call_str("cache_outgrows_state_at", preset(name)), got, 65,
                     f"65: the bf16 state is {state:,} B and one token's K/V {2 * cfg.n_layers * cfg.n_kv_heads * 256:,} B; "
                     "64 tokens are 2·64·128 = 16,384 elements per KV head against 128·128 + 128 = 16,512")


# --- what a fixed state cannot recall -----------------------------------------------------------

@pytest.mark.kata("recall_capacity")
@given(d_key=st.integers(1, 12), d_value=st.integers(1, 12))
@example(d_key=8, d_value=2)
@example(d_key=3, d_value=9)
@settings(max_examples=min(settings().max_examples, 20))
def test_recall_capacity_is_where_the_measured_recall_of_a_fixed_state_falls_off(d_key, d_value):
    got = impl.recall_capacity(d_key, d_value)
    call = call_str("recall_capacity", d_key, d_value)
    expect(isinstance(got, int) and not isinstance(got, bool) and got >= 1, call, got, "a number of pairs, an int >= 1")
    at, past = recall_curve("projection state", d_key, d_value, [got, got + 1], trials=2)
    expect(at == 1.0, call, got,
           f"a number of pairs the state gives back exactly: kvref's fixed-size state [{d_key}, {d_value}] read back "
           f"{at:.0%} of {plural(got, 'pair')} exactly (measured over 2 draws)")
    expect(past < 1.0, call, got,
           f"the most pairs recalled exactly: kvref's state [{d_key}, {d_value}] still read back all {got + 1} pairs exactly")


@pytest.mark.kata("recall_capacity")
def test_recall_capacity_of_a_64_by_8_state_against_a_softmax_cache():
    got = impl.recall_capacity(64, 8)
    past = got + 1 if isinstance(got, int) and 0 < got < 10_000 else 65
    fixed = recall_curve("projection state", 64, 8, [past], trials=1)[0]
    cache = recall_curve("softmax cache", 64, 8, [4 * past], trials=1)[0]
    expect_equal(call_str("recall_capacity", 64, 8), got, 64,
                 f"64 pairs: measured, the state recalls {fixed:.1%} of {past} pairs exactly, while softmax over a cache of "
                 f"{4 * past} pairs recalls {cache:.0%} of them (the cache grows, the state does not; the 8 value "
                 "dims do not limit it, nor is it the state's 512 entries)")
