"""card02: memory versus compute.

Bytes are checked against `.nbytes` of real caches and weights: filled by a real prefill for
small configs, allocated on the meta device (shapes and dtypes, no storage) for real presets.
The roofline's inputs are measured too: FLOPs by FlopCounterMode's formulas on kvref's forward
pass run for real (for real presets, kvref.roofline's count, which the maintainers' checks prove
equal to that measurement on the meta device), bytes by `.nbytes` of the weight matrices and
cache entries. What cannot be measured (a GPU's time) is tested by the laws a roofline must
obey: units, monotonicity, scaling, limits, and worked numbers. Draws of real models respect
their context length and the device's memory.
"""

import dataclasses
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvkata
from kvkata.check import (PARAMETER_FIELDS, Shown, call_str, describe, describe_config, expect, expect_equal,
                          expect_real, plural)
from kvref.config import PRESETS, ModelConfig, preset
from kvref.hardware import H100_SXM, H200, HARDWARE, Hardware
from kvref.measure import (cache_nbytes, kv_bytes_per_token_measured, kv_cache_bytes_measured, kv_recompute_flops_measured,
                           meta_model, step_flops_measured, weight_bytes_read, weight_nbytes)
from kvref.model import build_model
from kvref.roofline import forward_flops as roofline_forward_flops
from kvref.strategies import (DENSE_PRESET_NAMES, GQA_PRESET_NAMES, compute_dtypes, gqa_model_configs, hardware_presets,
                              kv_dtypes, model_configs)

impl = kvkata.load("card02_memory_vs_compute.costs")


@st.composite
def varied_configs(draw) -> ModelConfig:
    """Small configs, GQA or not, with a SwiGLU or a GELU MLP and tied embeddings or not."""
    cfg = draw(st.one_of(model_configs(), gqa_model_configs()), label="config")
    return cfg.with_(mlp=draw(st.sampled_from(["swiglu", "gelu"]), label="mlp"),
                     tie_embeddings=draw(st.booleans(), label="tie_embeddings"))


CONFIGS = varied_configs()
# A measured example costs tens of milliseconds (a model built, a forward pass counted): a deep
# run caps these tests at 80 examples, so that each stays far under the kata timeout.
MEASURED = settings(max_examples=min(settings().max_examples, 80))
BATCHES = st.integers(1, 3)
GQA = ModelConfig(vocab_size=64, n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=32)
GELU = GQA.with_(mlp="gelu", tie_embeddings=True)
MOE = GQA.with_(n_experts=4, experts_per_token=2)
# d_model (32) is neither Hkv·D (12) nor H·D (36): "2 · L · d_model · bytes per token" holds only for MHA.
NARROW_KV = ModelConfig(vocab_size=64, n_layers=3, d_model=32, n_heads=6, n_kv_heads=2, head_dim=6, d_ff=32)
# A device with almost no compute and a different peak per dtype: every toy step on it is
# compute-bound, so a step's FLOPs and the peak of its dtype decide its time.
STARVED = Hardware("compute-starved", {torch.bfloat16: 1e9, torch.float16: 2e9, torch.float32: 0.25e9,
                                       torch.float8_e4m3fn: 4e9}, 1e12, 10**9, "fictional, for tests")
DEVICES = st.one_of(hardware_presets, st.just(STARVED))
# Wide KV heads on a tiny residual stream: few weights to recompute, many cache bytes to read.
RECOMPUTE_WINS = ModelConfig(vocab_size=8, n_layers=1, d_model=8, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=8,
                             max_seq_len=4096)
FLOAT_DTYPES = st.sampled_from([torch.bfloat16, torch.float32, torch.float16, torch.float8_e4m3fn, torch.float64])


def shown(x) -> Shown:
    return Shown(describe_config(x, *PARAMETER_FIELDS) if isinstance(x, ModelConfig) else describe(x))


def prompt_ids(cfg, batch, length, seed=0):
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_peak(hw: Hardware, dtype: torch.dtype) -> st.SearchStrategy:
    return st.just(dtype) if hw.computes_in(dtype) else st.just(torch.bfloat16)


def step_flops(cfg, batch, n_new, n_cached):
    """FLOPs of one forward pass: counted by FlopCounterMode's formulas on kvref's model run for real
    for small configs; kvref.roofline's count for real presets, which checks/test_kvref_roofline.py
    proves equal to that count on the meta device (measuring a preset here would add about 1.3 s to
    every run of this card: PyTorch's meta kernels import torch._dynamo on their first use)."""
    if cfg.name:
        return roofline_forward_flops(cfg, batch, n_new, n_cached)
    return step_flops_measured(cfg, batch, n_new, n_cached, device="cpu").total


def measured_step(cfg, batch, seq_len, dtype, use_cache):
    """FLOPs (step_flops) and bytes (.nbytes) of one decode step after seq_len tokens."""
    weights = weight_bytes_read(meta_model(cfg, dtype))
    if use_cache:
        flops = step_flops(cfg, batch, 1, seq_len)
        return flops, weights + kv_cache_bytes_measured(cfg, batch, seq_len + 1, dtype)  # read seq_len, write 1
    return step_flops(cfg, batch, seq_len + 1, 0), weights


def roofline(flops, bytes_, hw, dtype):
    return max(flops / hw.peak_flops(dtype), bytes_ / hw.mem_bandwidth)


# --- bytes of the cache ------------------------------------------------------------------------

@MEASURED
@pytest.mark.kata("kv_cache_bytes")
@given(cfg=CONFIGS, batch=BATCHES, seq_len=st.integers(1, 8), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       kind=st.sampled_from(["growing", "static"]))
@example(cfg=GQA, batch=2, seq_len=5, dtype=torch.bfloat16, kind="growing")
def test_kv_cache_bytes_match_nbytes_of_a_filled_cache(cfg, batch, seq_len, dtype, kind):
    got = impl.kv_cache_bytes(cfg, batch, seq_len, dtype)
    model = build_model(cfg, dtype=dtype)
    caches = model.new_caches(kind, batch, seq_len)  # a static cache sized to exactly seq_len
    with torch.no_grad():
        model.prefill(prompt_ids(cfg, batch, seq_len), caches)
    expect_equal(call_str("kv_cache_bytes", shown(cfg), batch, seq_len, dtype), got, cache_nbytes(caches),
                 f".nbytes of K and V summed over the {plural(cfg.n_layers, 'layer')} of a {kind} cache filled with "
                 f"{plural(batch, 'sequence')} of {plural(seq_len, 'token')} in {dtype}")


@pytest.mark.kata("kv_cache_bytes")
@given(cfg=CONFIGS, batch=BATCHES, seq_len=st.integers(1, 8), dtype=kv_dtypes)
@example(cfg=GQA, batch=2, seq_len=3, dtype=torch.int8)
@example(cfg=GQA, batch=1, seq_len=1, dtype=torch.uint8)
@example(cfg=GQA, batch=3, seq_len=2, dtype=torch.float64)
@example(cfg=NARROW_KV, batch=2, seq_len=4, dtype=torch.float16)
def test_kv_cache_bytes_of_integer_and_wide_element_types_match_an_allocated_cache(cfg, batch, seq_len, dtype):
    got = impl.kv_cache_bytes(cfg, batch, seq_len, dtype)
    expect_equal(call_str("kv_cache_bytes", shown(cfg), batch, seq_len, dtype), got,
                 kv_cache_bytes_measured(cfg, batch, seq_len, dtype),
                 f".nbytes of a {dtype} cache, {plural(dtype.itemsize, 'byte')} per element: INT8 caches are common, "
                 "and torch.finfo does not know integer dtypes")


@pytest.mark.kata("kv_cache_bytes")
def test_kv_cache_bytes_of_40_layers_of_32_heads_at_4000_tokens_hold_k_and_v():
    """A widely shared answer puts one user's cache at 1.3 GB for 40 layers x 32 heads x 4k tokens x 128 x fp16."""
    cfg = ModelConfig(vocab_size=32000, n_layers=40, d_model=4096, n_heads=32, n_kv_heads=32, head_dim=128)
    for batch in (1, 100):
        got = impl.kv_cache_bytes(cfg, batch, 4000, torch.float16)
        measured = kv_cache_bytes_measured(cfg, batch, 4000, torch.float16)
        expect_equal(call_str("kv_cache_bytes", shown(cfg), batch, 4000, torch.float16), got, measured,
                     f".nbytes of a cache of {plural(batch, 'sequence')} of 4000 fp16 positions in every layer, "
                     f"{measured / 1e9:.3g} GB; the widely quoted 1.3 GB per user counts K alone")


# --- bytes per token ---------------------------------------------------------------------------

@pytest.mark.kata("kv_bytes_per_token")
@given(cfg=CONFIGS, dtype=kv_dtypes)
@example(cfg=GQA, dtype=torch.int8)
@example(cfg=GQA, dtype=torch.float8_e4m3fn)
@example(cfg=GQA, dtype=torch.float64)
@example(cfg=NARROW_KV, dtype=torch.bfloat16)
def test_kv_bytes_per_token_match_a_one_token_cache(cfg, dtype):
    got = impl.kv_bytes_per_token(cfg, dtype)
    expect_equal(call_str("kv_bytes_per_token", shown(cfg), dtype), got, kv_bytes_per_token_measured(cfg, dtype),
                 f".nbytes of K and V of a one-token cache in {dtype}, every layer ({plural(dtype.itemsize, 'byte')}, "
                 f"{dtype.itemsize * 8} bits per element)")


@pytest.mark.kata("kv_bytes_per_token")
def test_kv_bytes_per_token_of_every_real_preset_match_a_one_token_cache():
    for name in GQA_PRESET_NAMES:
        for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int8):
            got = impl.kv_bytes_per_token(PRESETS[name], dtype)
            expect_equal(call_str("kv_bytes_per_token", preset(name), dtype), got,
                         kv_bytes_per_token_measured(PRESETS[name], dtype),
                         "the .nbytes of a one-token cache of the real shapes (meta device)")


@pytest.mark.kata("kv_bytes_per_token")
def test_llama_2_70b_bytes_per_token_against_a_widely_shared_figure_for_1000_tokens():
    cfg = preset("llama-2-70b")
    per_token = impl.kv_bytes_per_token(cfg, torch.bfloat16)
    measured = kv_cache_bytes_measured(cfg, 1, 1000, torch.bfloat16)
    expect_equal(f"1000 * {call_str('kv_bytes_per_token', preset('llama-2-70b'), torch.bfloat16)}",
                 1000 * per_token if isinstance(per_token, int) else per_token, measured,
                 ".nbytes of a 1000-token bf16 cache: 0.33 GB. A widely shared answer says 1.2 GB: one of K and V "
                 "with all 64 heads gives 1.31e9 bytes, 1.22 GiB (GQA keeps 8 KV heads, and both K and V are cached)")


@pytest.mark.kata("kv_bytes_per_token")
def test_kv_bytes_per_token_of_mqa_are_those_of_mha_over_the_head_count():
    mha = preset("llama-2-7b")  # 32 heads, 32 KV heads
    mqa = mha.with_(n_kv_heads=1)
    got = impl.kv_bytes_per_token(mqa, torch.bfloat16)
    measured = kv_bytes_per_token_measured(mqa, torch.bfloat16)
    expect_equal(call_str("kv_bytes_per_token", shown(mqa), torch.bfloat16), got, measured,
                 f"a one-token cache's .nbytes: MQA cuts Llama-2-7B's {kv_bytes_per_token_measured(mha, torch.bfloat16):,} B "
                 "by its 32 heads, not by 8")


# --- does it fit -------------------------------------------------------------------------------

@MEASURED
@pytest.mark.kata("fits_in_memory")
@given(cfg=st.one_of(CONFIGS, st.just(MOE), st.just(GELU)), hw=hardware_presets, batch=st.integers(1, 4),
       seq_len=st.integers(1, 64), dtype=FLOAT_DTYPES)
@example(cfg=GQA, hw=H100_SXM, batch=3, seq_len=7, dtype=torch.bfloat16)
@example(cfg=GELU, hw=H100_SXM, batch=2, seq_len=5, dtype=torch.float32)
@example(cfg=MOE, hw=H100_SXM, batch=2, seq_len=5, dtype=torch.bfloat16)
def test_fits_in_memory_draws_the_line_at_measured_weights_plus_cache(cfg, hw, batch, seq_len, dtype):
    weights = weight_nbytes(meta_model(cfg, dtype))
    need = weights + kv_cache_bytes_measured(cfg, batch, seq_len, dtype)
    for memory, fits in ((need, True), (need - 1, False)):
        device = dataclasses.replace(hw, memory_bytes=memory)
        got = impl.fits_in_memory(cfg, device, batch, seq_len, dtype)
        expect_equal(call_str("fits_in_memory", shown(cfg), Shown(f"{hw.name} with {memory:,} B"), batch, seq_len, dtype),
                     got, fits, f"{fits}: the model's parameters take {weights:,} B (.nbytes on the meta device, once "
                     f"whatever the batch) and the cache {need - weights:,} B (.nbytes), {need:,} B in all")


@pytest.mark.kata("fits_in_memory")
def test_fits_in_memory_of_real_models_on_real_devices():
    cases = [  # name, device, batch, seq_len, dtype, why
        ("llama-2-70b", H100_SXM, 1, 4096, torch.bfloat16, "138 GB of bf16 weights against the 85.5 GB (81,559 MiB) an H100 reports"),
        ("llama-2-70b", H100_SXM.tensor_parallel(2), 1, 4096, torch.bfloat16, "two H100s hold 171 GB"),
        ("llama-2-70b", H200, 1, 4096, torch.bfloat16, "an H200 holds 150.8 GB"),
        ("llama-2-70b", H200, 64, 4096, torch.bfloat16, "64 sequences of 4096 tokens add 86 GB of K/V"),
        ("mixtral-8x7b", H100_SXM, 1, 4096, torch.bfloat16, "all 8 experts are stored: 93.4 GB, though a token uses 2"),
        ("gpt-3-175b", H100_SXM.tensor_parallel(8), 1, 2048, torch.float16, "349 GB of fp16 weights on 684 GB"),
        ("gpt-3-175b", H100_SXM.tensor_parallel(8), 1, 2048, torch.float32, "698 GB of fp32 weights on 684 GB"),
    ]
    for name, hw, batch, seq_len, dtype, why in cases:
        cfg = PRESETS[name]
        weights = weight_nbytes(meta_model(cfg, torch.bfloat16)) // 2 * dtype.itemsize  # one dtype for every parameter
        fits = weights + kv_cache_bytes_measured(cfg, batch, seq_len, dtype) <= hw.memory_bytes
        expect_equal(call_str("fits_in_memory", preset(name), shown(hw), batch, seq_len, dtype),
                     impl.fits_in_memory(cfg, hw, batch, seq_len, dtype), fits, why)


# --- the roofline of a decode step ---------------------------------------------------------------

@st.composite
def measured_draws(draw):
    hw = draw(DEVICES, label="hw")
    return dict(cfg=draw(CONFIGS, label="cfg"), hw=hw, batch=draw(BATCHES, label="batch"),
                seq_len=draw(st.integers(1, 63), label="seq_len"),
                dtype=draw(compute_dtypes.flatmap(lambda d: with_peak(hw, d)), label="dtype"),
                use_cache=draw(st.booleans(), label="use_cache"))


@MEASURED
@pytest.mark.kata("roofline_step_time")
@given(draw=measured_draws())
@example(draw=dict(cfg=GQA, hw=STARVED, batch=2, seq_len=6, dtype=torch.bfloat16, use_cache=True))  # compute-bound
@example(draw=dict(cfg=GQA, hw=STARVED, batch=2, seq_len=6, dtype=torch.float32, use_cache=False))
@example(draw=dict(cfg=GELU, hw=H100_SXM, batch=2, seq_len=6, dtype=torch.bfloat16, use_cache=True))  # memory-bound
# Memory-bound in 4-byte elements: weights and cache bytes counted in the dtype's own size, not in fp16's 2.
@example(draw=dict(cfg=GQA, hw=H100_SXM, batch=3, seq_len=6, dtype=torch.float32, use_cache=True))
@example(draw=dict(cfg=GQA, hw=H100_SXM, batch=1, seq_len=63, dtype=torch.float32, use_cache=False))
@example(draw=dict(cfg=GQA, hw=H100_SXM, batch=2, seq_len=3, dtype=torch.bfloat16, use_cache=False))  # memory-bound: weights only
def test_roofline_step_time_is_the_roofline_of_measured_flops_and_bytes(draw):
    cfg, hw, batch, seq_len, dtype, use_cache = draw.values()
    got = impl.roofline_step_time(cfg, hw, batch, seq_len, dtype, use_cache)
    flops, bytes_ = measured_step(cfg, batch, seq_len, dtype, use_cache)
    want = roofline(flops, bytes_, hw, dtype)
    expect_real(call_str("roofline_step_time", shown(cfg), shown(hw), batch, seq_len, dtype, use_cache), got, want,
                why=f"{want:.6g} s = max({flops:,} FLOPs / {hw.peak_flops(dtype):.4g} FLOP/s in {dtype}, "
                    f"{bytes_:,} B / {hw.mem_bandwidth:.4g} B/s): FLOPs counted by FlopCounterMode's formulas, bytes by .nbytes of "
                    "the weight matrices" + (" and of the cache entries read and written" if use_cache else " (no cache)"))


@pytest.mark.kata("roofline_step_time")
def test_roofline_step_time_uses_the_peak_of_the_dtype_it_computes_in():
    """Llama-3-8B without a cache at 2k tokens on an H100: compute-bound, 989 TFLOP/s in bf16, 67 in fp32."""
    cfg = preset("llama-3-8b")
    dtypes = (torch.bfloat16, torch.float32, torch.float8_e4m3fn)
    gots = [impl.roofline_step_time(cfg, H100_SXM, 1, 2047, dtype, False) for dtype in dtypes]  # before counting FLOPs
    flops = step_flops(cfg, 1, 2048, 0)
    for dtype, got in zip(dtypes, gots):
        want = roofline(flops, weight_bytes_read(meta_model(cfg, torch.bfloat16)) // 2 * dtype.itemsize, H100_SXM, dtype)
        expect_real(call_str("roofline_step_time", preset("llama-3-8b"), H100_SXM, 1, 2047, dtype,
                             False), got, want,
                    why=f"{flops:,} FLOPs (kvref.roofline's count, equal to FlopCounterMode's formulas') at the H100's dense {dtype} peak, "
                        f"{H100_SXM.peak_flops(dtype) / 1e12:.4g} TFLOP/s (fp32 matmuls do not use TF32 by default)")


@pytest.mark.kata("roofline_step_time")
def test_roofline_step_time_of_llama_2_70b_on_devices_it_fits():
    """Worked numbers, bf16, 4096 positions: Llama-2-70B's 138 GB of weights need two H100s or an H200.

    Tensor parallelism is modelled as one device with n times the bandwidth and FLOP/s,
    communication ignored: optimistic.
    """
    cfg = preset("llama-2-70b")
    devices = (H100_SXM.tensor_parallel(2), H200)
    gots = [impl.roofline_step_time(cfg, hw, 1, 4095, torch.bfloat16, True) for hw in devices]  # before measuring
    weights = weight_bytes_read(meta_model(cfg, torch.bfloat16))
    bytes_ = weights + kv_cache_bytes_measured(cfg, 1, 4096, torch.bfloat16)  # .nbytes: read 4,095 positions, write one
    for hw, got in zip(devices, gots):
        want = bytes_ / hw.mem_bandwidth  # 1.5e11 FLOPs would take 0.08 ms at 2 x 989 TFLOP/s: memory-bound
        expect_real(call_str("roofline_step_time", preset("llama-2-70b"), shown(hw), 1, 4095, torch.bfloat16,
                             True), got, want,
                    why=f"{want * 1e3:.4g} ms: {bytes_ / 1e9:.4g} GB (.nbytes of the weight matrices and of 4,096 positions "
                        f"of K/V) at {hw.mem_bandwidth / 1e12:.3g} TB/s; the step's 1.5e11 FLOPs take under 0.2 ms")
    # 64 sequences add 86 GB of K/V: 224 GB fit four H100s (342 GB), not an H200.
    got = impl.roofline_step_time(cfg, H100_SXM.tensor_parallel(4), 64, 4095, torch.bfloat16, True)
    expect_real(call_str("roofline_step_time", preset("llama-2-70b"), H100_SXM.tensor_parallel(4), 64, 4095,
                         torch.bfloat16, True), got, 0.016666, rel=1e-3,
                why="about 16.67 ms: 137.4 GB of weight matrices and 85.9 GB of K/V at 4 x 3.35 TB/s")


@st.composite
def deployments(draw):
    """A dense real model on n devices that hold it, at a context within its length and the memory."""
    name = draw(st.sampled_from(DENSE_PRESET_NAMES), label="name")
    cfg = PRESETS[name]
    base = draw(hardware_presets, label="device")
    dtype = draw(compute_dtypes.flatmap(lambda d: with_peak(base, d)), label="dtype")
    batch = draw(st.integers(1, 64), label="batch")
    weights = cfg.n_params * dtype.itemsize  # the published total, only to keep draws on real hardware
    per_token = kv_bytes_per_token_measured(cfg, torch.int8) * dtype.itemsize
    n = next(n for n in (1, 2, 4, 8, 16, 32) if weights + batch * 2 * per_token <= 0.95 * n * base.memory_bytes)
    hw = base.tensor_parallel(n) if n > 1 else base
    room = int((0.95 * hw.memory_bytes - weights) // (batch * per_token))  # positions per sequence that fit
    seq_len = draw(st.integers(1, max(1, min(cfg.max_seq_len, room) - 1)), label="seq_len")
    return name, hw, batch, seq_len, dtype


@pytest.mark.kata("roofline_step_time")
@given(draw=deployments())
@example(draw=("llama-2-70b", H100_SXM.tensor_parallel(2), 1, 4095, torch.bfloat16))
@example(draw=("llama-3-8b", HARDWARE["A100-40GB"], 64, 1, torch.float32))
@example(draw=("llama-2-7b", H100_SXM, 1, 2, torch.float32))
@example(draw=("mistral-7b", H200, 8, 20000, torch.bfloat16))
def test_roofline_step_time_obeys_the_roofline_laws_on_real_presets(draw):
    name, hw, batch, seq_len, dtype = draw
    cfg = PRESETS[name]

    def t(hw_=hw, seq_len_=seq_len, use_cache=True):
        return impl.roofline_step_time(cfg, hw_, batch, seq_len_, dtype, use_cache)

    call = call_str("roofline_step_time", preset(name), shown(hw), batch, seq_len, dtype, True)
    cached, uncached = t(), t(use_cache=False)
    expect(isinstance(cached, float) and 0 < cached < 1, call, cached,
           "seconds: a positive float under 1 s, since a step that fits reads at most the device's memory once "
           f"({hw.memory_bytes / hw.mem_bandwidth * 1e3:.3g} ms here) and computes 2 FLOPs per weight per sequence")
    if 2 * seq_len + 1 <= cfg.max_seq_len:
        longer_c, longer_u = t(seq_len_=2 * seq_len), t(seq_len_=2 * seq_len, use_cache=False)
        window = cfg.sliding_window
        if window and seq_len + 1 >= window:
            expect(math.isclose(longer_c, cached, rel_tol=1e-9), call, cached,
                   f"{longer_c:.6g} s, the same as after {2 * seq_len:,} tokens: past its {window:,}-token sliding window "
                   f"a step reads {window:,} positions, however long the sequence")
        else:
            expect(longer_c > cached and longer_u >= uncached, call, cached,
                   f"no step to get cheaper after {2 * seq_len:,} tokens (cached {longer_c:.4g} s, uncached "
                   f"{longer_u:.4g} s), and the cached one to read more K/V")
    # A cached step does 2·B FLOPs per weight it reads (and 2·G per K/V element): below the ridge
    # point of its dtype, bandwidth alone decides its time.
    ridge = hw.ridge_point(dtype)
    if 2 * max(batch, cfg.group_size) / dtype.itemsize < ridge / 2:
        slower_memory, faster_compute = hw.scaled(bandwidth=0.5), hw.scaled(flops=2)
        expect(math.isclose(t(hw_=slower_memory), 2 * cached, rel_tol=1e-9)
               and math.isclose(t(hw_=faster_compute), cached, rel_tol=1e-9), call, cached,
               "a memory-bound time: doubled by half the bandwidth, unchanged by twice the FLOP/s")
    # The uncached step does 2 FLOPs per weight for each of its B·(T+1) tokens and reads each weight
    # once: past B·(T+1) = 2 · itemsize · ridge it is compute-bound.
    if batch * (seq_len + 1) >= 2 * dtype.itemsize * ridge:
        expect(math.isclose(t(hw_=hw.scaled(flops=2), use_cache=False), uncached / 2, rel_tol=1e-9), call, uncached,
               f"the uncached step over {seq_len + 1:,} tokens x {batch} to be compute-bound: twice the FLOP/s halves it")
        expect(cached < uncached, call, cached, f"less than the uncached step's {uncached:.4g} s: on a real model, "
               "once recomputing needs real compute, reading a past token's K/V is cheaper")


@pytest.mark.kata("roofline_step_time")
def test_roofline_step_time_of_mistral_7b_reads_its_window_and_no_further():
    """Mistral-7B's 4096-token sliding window: a rolling buffer, and a step that stops growing."""
    cfg = preset("mistral-7b")
    devices = (H100_SXM, STARVED)
    answers = [impl.roofline_step_time(cfg, hw, 8, 4095, torch.bfloat16, True) for hw in devices]  # before measuring
    flops, bytes_ = measured_step(cfg, 8, 4095, torch.bfloat16, True)
    # On the H100 the step is memory-bound (the window caps its reads); on STARVED, compute-bound (it caps its scores).
    for hw, at_window in zip(devices, answers):
        call = call_str("roofline_step_time", preset("mistral-7b"), shown(hw), 8, 4095, torch.bfloat16, True)
        expect_real(call, at_window, roofline(flops, bytes_, hw, torch.bfloat16),
                    why="the measured step whose token attends to exactly 4,096 positions")
        for seq_len in (4096, 10_000, 32_767):
            got = impl.roofline_step_time(cfg, hw, 8, seq_len, torch.bfloat16, True)
            expect_real(call.replace("4095", f"{seq_len}"), got, at_window,
                        why=f"{at_window:.6g} s, as at 4,095: past the window a token scores 4,096 keys and the step "
                            "reads 4,096 positions of K/V per sequence")
    # Without a cache, the step computes the whole [T, T] rectangle of scores (kvref masks afterwards):
    # doubling T more than doubles its compute-bound time, window or not.
    short, long = (impl.roofline_step_time(cfg, H100_SXM, 1, n, torch.bfloat16, False) for n in (8191, 16383))
    expect(long > 2.2 * short, call_str("roofline_step_time", preset("mistral-7b"), H100_SXM, 1, 16383,
                                        torch.bfloat16, False), long,
           f"more than 2.2 x the {short:.4g} s at 8,191: each of the 16,384 fed tokens scores all 16,384 positions "
           "(the uncached forward computes the whole rectangle and masks it; the window caps only the cached step)")


@pytest.mark.kata("roofline_step_time")
def test_where_recompute_beats_the_cache_it_does_only_at_short_lengths():
    """A toy with wide KV heads and almost no weights, and a real model, in bf16."""
    call = f"roofline_step_time({shown(RECOMPUTE_WINS)}, H100-SXM, 1, seq_len, torch.bfloat16, use_cache)"
    short = {uc: impl.roofline_step_time(RECOMPUTE_WINS, H100_SXM, 1, 8, torch.bfloat16, uc) for uc in (True, False)}
    expect(short[False] < short[True], call + " at seq_len=8", short,
           "the uncached step faster: re-running a few tokens through 8k weights beats reading 1 KB of K/V per token")
    long = {uc: impl.roofline_step_time(RECOMPUTE_WINS, H100_SXM, 1, 4095, torch.bfloat16, uc) for uc in (True, False)}
    expect(long[True] < long[False], call + " at seq_len=4095", long,
           "the cached step faster: recomputing the scores of every past query grows with the square of the length")
    # A real model at a very short context, on a device it fits: both steps wait for 137 GB of
    # weights, and the uncached one's extra FLOPs fit in the idle compute. The cache only adds its own bytes.
    cfg = preset("llama-2-70b")
    real = {uc: impl.roofline_step_time(cfg, H200, 1, 8, torch.bfloat16, uc) for uc in (True, False)}
    weights = weight_bytes_read(meta_model(cfg, torch.bfloat16))
    expect_real(call_str("roofline_step_time", cfg, H200, 1, 8, torch.bfloat16, False), real[False],
                weights / H200.mem_bandwidth, why=f"the time to read the weight matrices' {weights:,} B (.nbytes); "
                "9 tokens' FLOPs fit under it")
    expect(real[False] < real[True] < real[False] * 1.0001, call_str("roofline_step_time", cfg, H200, 1, 8,
           torch.bfloat16, True), real[True],
           f"a hair above the uncached {real[False]:.6g} s: 9 tokens of K/V on top of the same weights")


# --- recompute or read ---------------------------------------------------------------------------

@st.composite
def ratio_draws(draw):
    hw = draw(DEVICES, label="hw")
    return dict(cfg=draw(st.one_of(CONFIGS, st.sampled_from(DENSE_PRESET_NAMES).map(PRESETS.get)), label="cfg"), hw=hw,
                dtype=draw(compute_dtypes.flatmap(lambda d: with_peak(hw, d)), label="dtype"),
                seq_lens=draw(st.lists(st.integers(1, 10**6), min_size=2, max_size=4), label="seq_lens"))


@pytest.mark.kata("recompute_to_read_ratio")
@given(draw=ratio_draws())
@example(draw=dict(cfg=GQA, hw=H100_SXM, dtype=torch.bfloat16, seq_lens=[1, 4096, 10**6]))
def test_recompute_to_read_ratio_does_not_depend_on_sequence_length_and_scales_with_the_hardware(draw):
    cfg, hw, dtype, seq_lens = draw.values()

    def r(seq_len, hw_=hw):
        return impl.recompute_to_read_ratio(cfg, hw_, seq_len, dtype)

    first = r(seq_lens[0])
    call = call_str("recompute_to_read_ratio", shown(cfg), shown(hw), seq_lens[0], dtype)
    for n in seq_lens[1:]:
        expect_real(call_str("recompute_to_read_ratio", shown(cfg), shown(hw), n, dtype), r(n), first,
                    why=f"{first:.6g}, its value at seq_len={seq_lens[0]}: recompute and reading both grow linearly "
                        "in the tokens")
    n = seq_lens[0]
    expect_real(call + " on twice the bandwidth", r(n, hw_=hw.scaled(bandwidth=2)), 2 * first,
                why="twice the ratio: reading gets cheaper")
    expect_real(call + " on twice the FLOP/s", r(n, hw_=hw.scaled(flops=2)), first / 2,
                why="half the ratio: recomputing gets cheaper")


@pytest.mark.kata("recompute_to_read_ratio")
def test_recompute_to_read_ratio_halves_with_elements_twice_as_wide_at_the_same_peak():
    even = Hardware("even", {torch.float32: 1e14, torch.bfloat16: 1e14, torch.float8_e4m3fn: 1e14}, 1e12, 10**9, "fictional")
    for cfg in (GQA, GELU, preset("llama-3-8b")):
        bf16 = impl.recompute_to_read_ratio(cfg, even, 64, torch.bfloat16)
        for dtype, factor in ((torch.float32, 0.5), (torch.float8_e4m3fn, 2)):
            expect_real(call_str("recompute_to_read_ratio", shown(cfg), Shown("a device with one peak for every dtype"),
                                 64, dtype), impl.recompute_to_read_ratio(cfg, even, 64, dtype), factor * bf16,
                        why=f"{factor} x the bf16 ratio {bf16:.6g}: {plural(dtype.itemsize, 'byte')} per element to read, the same "
                            "FLOPs to recompute at the same peak")


@MEASURED
@pytest.mark.kata("recompute_to_read_ratio")
@given(cfg=CONFIGS, hw=DEVICES, seq_len=st.integers(1, 16), dtype=compute_dtypes)
@example(cfg=GQA, hw=H100_SXM, seq_len=3, dtype=torch.bfloat16)
@example(cfg=GELU, hw=STARVED, seq_len=2, dtype=torch.float32)
def test_recompute_to_read_ratio_matches_measured_flops_and_cache_bytes(cfg, hw, seq_len, dtype):
    dtype = dtype if hw.computes_in(dtype) else torch.bfloat16
    got = impl.recompute_to_read_ratio(cfg, hw, seq_len, dtype)
    recompute = kv_recompute_flops_measured(cfg, seq_len, device="cpu").projections  # the nn.Linear matmuls that rebuild K/V
    read = kv_cache_bytes_measured(cfg, 1, seq_len, dtype)
    want = (recompute / hw.peak_flops(dtype)) / (read / hw.mem_bandwidth)
    expect_real(call_str("recompute_to_read_ratio", shown(cfg), shown(hw), seq_len, dtype), got, want,
                why=f"{want:.6g} = ({recompute:,} FLOPs (FlopCounterMode's formulas) in the nn.Linear matmuls that rebuild every "
                    f"layer's K and V for {plural(seq_len, 'token')}: every layer below the last, then the last one's k and "
                    f"v projections, no lm_head / {hw.peak_flops(dtype):.4g} FLOP/s) / ({read:,} B of their cache "
                    f"(.nbytes) / {hw.mem_bandwidth:.4g} B/s)")


@pytest.mark.kata("recompute_to_read_ratio")
def test_no_real_preset_would_rather_recompute_on_any_gpu():
    for name in DENSE_PRESET_NAMES:
        for hw in HARDWARE.values():
            for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
                if not hw.computes_in(dtype):
                    continue
                got = impl.recompute_to_read_ratio(PRESETS[name], hw, 4096, dtype)
                expect(isinstance(got, float) and got > 1,
                       call_str("recompute_to_read_ratio", preset(name), shown(hw), 4096, dtype), got,
                       "a ratio above 1: billions of weights per token against kilobytes of K/V")
    # Worked number: 2 x 67.61e9 FLOPs / 989 TFLOP/s = 136.7 µs against 327,680 B / 3.35 TB/s = 97.8 ns.
    got = impl.recompute_to_read_ratio(preset("llama-2-70b"), H100_SXM, 4096, torch.bfloat16)
    expect_real(call_str("recompute_to_read_ratio", preset("llama-2-70b"), H100_SXM, 4096,
                         torch.bfloat16), got, 1397.83, rel=1e-4,
                why="about 1,397.8: 79 whole layers and the last one's k and v projections, 67.61e9 weights per "
                    "token (2 x 68.71e9 with lm_head and the whole last layer would give 1,420.6)")


@pytest.mark.kata("recompute_to_read_ratio")
def test_a_toy_with_wide_kv_heads_and_few_weights_would_rather_recompute():
    for hw in HARDWARE.values():
        for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
            if not hw.computes_in(dtype):
                continue
            got = impl.recompute_to_read_ratio(RECOMPUTE_WINS, hw, 64, dtype)
            expect(isinstance(got, float) and got < 1,
                   call_str("recompute_to_read_ratio", shown(RECOMPUTE_WINS), shown(hw), 64, dtype), got,
                   f"a ratio below 1: one layer, so rebuilding a token's K/V is its k and v projections alone, "
                   f"2 x 4,096 FLOPs, against {512 * dtype.itemsize:,} B of K/V, with a ridge point of "
                   f"{hw.ridge_point(dtype):.0f} FLOP/B in {dtype}")
