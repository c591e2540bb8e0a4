"""card11: power and cost modeling.

Joules and dollars cannot be measured on this machine, but what they are made of can: a decode
step's FLOPs (FlopCounterMode's formulas on kvref's model) and bytes (`.nbytes` of the weight matrices and of
the K/V the step reads and writes), on small configs; on real presets the bytes are measured the
same way (meta device) and the FLOPs are kvref.roofline's count, which checks/test_kvref_roofline.py
matches to FlopCounterMode (counting an 80-layer model here would cost seconds per test). Energy is
those, times constants with named sources (`kvref.hardware.EnergyCosts`); the tests check the
answers against them and against the laws energy and cost must obey: units, monotonicity in batch
and context, scaling with the element width, the batch-1 limit, the crossover from its definition,
and worked numbers with the published constants.
"""

import dataclasses
import functools
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvkata
from kvkata.check import PARAMETER_FIELDS, Shown, call_str, describe, describe_config, expect, expect_equal, expect_real, plural
from kvref.config import PRESETS, ModelConfig, preset
from kvref.hardware import H100_SXM, H200, PUBLISHED_ENERGY, SOURCE_CARD_ENERGY, EnergyCosts, Hardware
from kvref.measure import kv_cache_bytes_measured, meta_model, step_flops_measured, weight_bytes_read
from kvref.roofline import forward_flops as kvref_forward_flops
from kvref.strategies import DENSE_PRESET_NAMES, gqa_model_configs, hardware_presets, model_configs

impl = kvkata.load("card11_energy.energy")

MEASURED = settings(max_examples=min(settings().max_examples, 60))
GQA = ModelConfig(vocab_size=64, n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=32)
GELU = GQA.with_(mlp="gelu", tie_embeddings=True)
# A made-up set where a bit costs as much as a multiply-add: no real memory is that cheap.
EVEN = EnergyCosts("even (made up)", 1.0, 1.0, "a test's own numbers")
COSTS = st.sampled_from([PUBLISHED_ENERGY, SOURCE_CARD_ENERGY, EVEN])
DTYPES = st.sampled_from([torch.bfloat16, torch.float32, torch.float16])
# A device with almost no compute: every toy step on it is compute-bound, so FLOPs decide its time.
STARVED = Hardware("compute-starved", {torch.bfloat16: 1e9, torch.float16: 1e9, torch.float32: 0.25e9}, 1e12, 10**9,
                   "fictional, for tests")
DEVICES = st.one_of(hardware_presets, st.just(STARVED))


def shown(x) -> Shown:
    if isinstance(x, Hardware):
        return Shown(x.name)
    if isinstance(x, EnergyCosts):
        return Shown(f"EnergyCosts({x.name!r}: {x.pj_per_bit:g} pJ/bit, {x.pj_per_fma:g} pJ/FMA)")
    return Shown(describe_config(x, *PARAMETER_FIELDS) if isinstance(x, ModelConfig) else describe(x))


@st.composite
def small_configs(draw) -> ModelConfig:
    cfg = draw(st.one_of(model_configs(), gqa_model_configs()), label="config")
    return cfg.with_(mlp=draw(st.sampled_from(["swiglu", "gelu"]), label="mlp"),
                     tie_embeddings=draw(st.booleans(), label="tie_embeddings"))


@functools.cache  # the same configs come back across examples and tests: count each step once
def step_flops(cfg, batch, n_new, n_cached):
    """FlopCounterMode's formulas' count on kvref's model for small configs; kvref.roofline's (checked against it) for presets."""
    if cfg.name:
        return kvref_forward_flops(cfg, batch, n_new, n_cached)
    return step_flops_measured(cfg, batch, n_new, n_cached, device="cpu").total


@functools.cache
def weights_read(cfg, dtype) -> int:
    """.nbytes of the weight matrices a step reads, on kvref's model built on the meta device (once per config)."""
    return weight_bytes_read(meta_model(cfg, dtype))


def measured_step(cfg, batch, seq_len, dtype):
    """FLOPs and bytes (.nbytes: weight matrices, seq_len + 1 positions of K/V) of a decode step."""
    flops = step_flops(cfg, batch, 1, seq_len)
    bytes_ = weights_read(cfg, dtype) + kv_cache_bytes_measured(cfg, batch, seq_len + 1, dtype)
    return flops, bytes_


def measured_bytes(cfg, batch, seq_len, dtype):
    """Bytes a decode step moves: .nbytes of the weight matrices and of seq_len + 1 positions of K/V per sequence."""
    return weights_read(cfg, dtype) + kv_cache_bytes_measured(cfg, batch, seq_len + 1, dtype)


# Real presets whose 4k context stays inside their window and their length (no MoE: a batch reads more experts).
LONG = [n for n in DENSE_PRESET_NAMES if PRESETS[n].max_seq_len >= 4096]


# --- memory energy ---------------------------------------------------------------------------

@MEASURED
@pytest.mark.kata("memory_energy_per_token")
@given(cfg=small_configs(), batch=st.integers(1, 8), seq_len=st.integers(1, 40), dtype=DTYPES, costs=COSTS)
@example(cfg=GQA, batch=3, seq_len=5, dtype=torch.bfloat16, costs=PUBLISHED_ENERGY)
@example(cfg=GELU, batch=1, seq_len=1, dtype=torch.float32, costs=SOURCE_CARD_ENERGY)
def test_memory_energy_per_token_is_the_measured_bytes_in_bits_at_pj_per_bit(cfg, batch, seq_len, dtype, costs):
    got = impl.memory_energy_per_token(cfg, batch, seq_len, dtype, costs)
    bytes_ = measured_bytes(cfg, batch, seq_len, dtype)
    want = bytes_ * 8 * costs.pj_per_bit * 1e-12 / batch
    expect_real(call_str("memory_energy_per_token", shown(cfg), batch, seq_len, dtype, shown(costs)), got, want,
                why=f"{want:.6g} J: {bytes_:,} B moved by the step (.nbytes of the weight matrices, once, and of "
                    f"{seq_len + 1} positions of K/V per sequence, read or written) x 8 bits x {costs.pj_per_bit:g} pJ/bit, "
                    f"over the {plural(batch, 'token')} the step generates")


@pytest.mark.kata("memory_energy_per_token")
def test_memory_energy_per_token_of_llama_2_70b_at_batch_1_with_published_constants():
    cfg = preset("llama-2-70b")
    got = impl.memory_energy_per_token(cfg, 1, 4095, torch.bfloat16, PUBLISHED_ENERGY)
    bytes_ = measured_bytes(cfg, 1, 4095, torch.bfloat16)
    want = bytes_ * 8 * 4e-12
    expect_real(call_str("memory_energy_per_token", shown(cfg), 1, 4095, torch.bfloat16, shown(PUBLISHED_ENERGY)), got,
                want, rel=1e-9,
                why=f"about 4.44 J: {bytes_ / 1e9:.4g} GB (137.4 GB of bf16 weight matrices and 1.34 GB of K/V: 4,096 "
                    "positions, 4,095 read and 1 written; .nbytes) x 8 bits x 4 pJ/bit" + ratio_hint(got, want, BYTES_2X))
    source = impl.memory_energy_per_token(cfg, 1, 4095, torch.bfloat16, SOURCE_CARD_ENERGY)
    expect_real(call_str("memory_energy_per_token", shown(cfg), 1, 4095, torch.bfloat16, shown(SOURCE_CARD_ENERGY)),
                source, got / 8, why="1/8 of the published figure: the source card's 0.5 pJ/bit against HBM2's 4")


@pytest.mark.kata("memory_energy_per_token")
@given(name=st.sampled_from(LONG), batch=st.integers(1, 256), seq_len=st.integers(1, 2047), costs=COSTS)
@example(name="llama-2-70b", batch=1, seq_len=2047, costs=PUBLISHED_ENERGY)
@example(name="mistral-7b", batch=8, seq_len=2047, costs=SOURCE_CARD_ENERGY)
def test_memory_energy_per_token_falls_with_the_batch_grows_with_the_context_and_the_element_width(name, batch, seq_len, costs):
    cfg = PRESETS[name]

    def e(batch_=batch, seq_len_=seq_len, dtype=torch.bfloat16, costs_=costs):
        return impl.memory_energy_per_token(cfg, batch_, seq_len_, dtype, costs_)

    call = call_str("memory_energy_per_token", shown(cfg), batch, seq_len, torch.bfloat16, shown(costs))
    base = e()
    expect(isinstance(base, float) and 0 < base < 100, call, base,
           "joules per token, a positive float well under 100 J: a step reads at most the device's memory, once")
    expect(e(batch_=2 * batch) < base, call, base,
           f"more than the {e(batch_=2 * batch):.6g} J at batch {2 * batch}: the weights are read once per step, "
           "whatever the batch, so each token's share falls")
    expect(e(seq_len_=2 * seq_len) > base, call, base,
           f"less than the {e(seq_len_=2 * seq_len):.6g} J after {2 * seq_len} tokens: each token reads its sequence's K/V")
    expect_real(call.replace("bfloat16", "float32"), e(dtype=torch.float32), 2 * base,
                why="twice the bf16 energy: 4 bytes per element instead of 2, every byte moved twice as many bits")
    doubled = dataclasses.replace(costs, pj_per_bit=2 * costs.pj_per_bit)
    expect_real(call_str("memory_energy_per_token", shown(cfg), batch, seq_len, torch.bfloat16, shown(doubled)),
                e(costs_=doubled), 2 * base, why="twice the energy at twice the pJ/bit")
    pricier_math = dataclasses.replace(costs, pj_per_fma=3 * costs.pj_per_fma)
    expect_real(call_str("memory_energy_per_token", shown(cfg), batch, seq_len, torch.bfloat16, shown(pricier_math)),
                e(costs_=pricier_math), base, why="the same energy: memory traffic does not depend on the cost of arithmetic")


@pytest.mark.kata("memory_energy_per_token")
def test_memory_energy_per_token_of_mistral_7b_stops_growing_past_its_window():
    cfg = preset("mistral-7b")
    at = impl.memory_energy_per_token(cfg, 4, 4095, torch.bfloat16, PUBLISHED_ENERGY)
    bytes_ = measured_bytes(cfg, 4, 4095, torch.bfloat16)
    expect_real(call_str("memory_energy_per_token", shown(cfg), 4, 4095, torch.bfloat16, shown(PUBLISHED_ENERGY)), at,
                bytes_ * 8 * 4e-12 / 4, why="the measured step whose tokens attend to exactly 4,096 positions"
                + ratio_hint(at, bytes_ * 8 * 4e-12 / 4, BYTES_2X))
    for seq_len in (100, 4094):  # inside the window: the new token and every cached one
        got = impl.memory_energy_per_token(cfg, 4, seq_len, torch.bfloat16, PUBLISHED_ENERGY)
        want = measured_bytes(cfg, 4, seq_len, torch.bfloat16) * 8 * 4e-12 / 4
        expect_real(call_str("memory_energy_per_token", shown(cfg), 4, seq_len, torch.bfloat16, shown(PUBLISHED_ENERGY)),
                    got, want, why=f"the measured step whose tokens attend to {seq_len + 1} positions, inside the window"
                    + ratio_hint(got, want, BYTES_2X))
    for seq_len in (4096, 20_000):
        got = impl.memory_energy_per_token(cfg, 4, seq_len, torch.bfloat16, PUBLISHED_ENERGY)
        expect_real(call_str("memory_energy_per_token", shown(cfg), 4, seq_len, torch.bfloat16, shown(PUBLISHED_ENERGY)),
                    got, at, why=f"{at:.6g} J, as at 4,095: past its 4,096-token sliding window a token reads 4,096 positions")


MULTIPLY_ADD = "a FLOP counted as a multiply-add, or a multiply-add as one FLOP"
BYTES_2X = "K without V (or both twice), or another dtype's bytes per element"


def ratio_hint(got, want, two: str = MULTIPLY_ADD) -> str:
    """A note when a wrong answer is off by a telling factor: 2 (`two` says the likely cause), 8 (bits and bytes)."""
    if not isinstance(got, (int, float)) or isinstance(got, bool) or not want or not got:
        return ""
    r = got / want
    for factor, words in ((2, two), (8, "bits and bytes exchanged")):
        for f, side in ((factor, f"{factor}x"), (1 / factor, f"1/{factor}")):
            if abs(r / f - 1) < 1e-3:
                return f" (yours is {side} the answer: {words}?)"
    return ""


# --- compute energy --------------------------------------------------------------------------

@MEASURED
@pytest.mark.kata("compute_energy_per_token")
@given(cfg=small_configs(), batch=st.integers(1, 8), seq_len=st.integers(1, 40), dtype=DTYPES, costs=COSTS)
@example(cfg=GQA, batch=3, seq_len=5, dtype=torch.bfloat16, costs=PUBLISHED_ENERGY)
@example(cfg=GELU, batch=2, seq_len=9, dtype=torch.float32, costs=SOURCE_CARD_ENERGY)
def test_compute_energy_per_token_is_the_measured_flops_as_multiply_adds_at_pj_each(cfg, batch, seq_len, dtype, costs):
    got = impl.compute_energy_per_token(cfg, batch, seq_len, dtype, costs)
    flops = step_flops(cfg, batch, 1, seq_len)  # a decode step's FLOPs, as measured_step counts them
    want = flops / 2 * costs.pj_per_fma * 1e-12 / batch
    expect_real(call_str("compute_energy_per_token", shown(cfg), batch, seq_len, dtype, shown(costs)), got, want,
                why=f"{want:.6g} J: {flops:,} FLOPs (FlopCounterMode's formulas on the step) are {flops // 2:,} multiply-adds "
                    f"x {costs.pj_per_fma:g} pJ, over the {plural(batch, 'token')} the step generates" + ratio_hint(got, want))


@pytest.mark.kata("compute_energy_per_token")
def test_compute_energy_per_token_of_llama_2_70b_with_both_constant_sets():
    cfg = preset("llama-2-70b")
    flops = step_flops(cfg, 1, 1, 4095)  # a decode step's FLOPs, as measured_step counts them
    for costs, joules in ((PUBLISHED_ENERGY, 0.1111), (SOURCE_CARD_ENERGY, 0.3704)):
        got = impl.compute_energy_per_token(cfg, 1, 4095, torch.bfloat16, costs)
        expect_real(call_str("compute_energy_per_token", shown(cfg), 1, 4095, torch.bfloat16, shown(costs)), got,
                    flops / 2 * costs.pj_per_fma * 1e-12,
                    why=f"about {joules} J: {flops / 1e9:.4g} GFLOPs (kvref.roofline, which matches FlopCounterMode) are {flops / 2e9:.4g} G multiply-adds "
                        f"at {costs.pj_per_fma:g} pJ each" + ratio_hint(got, flops / 2 * costs.pj_per_fma * 1e-12))
    for batch, dtype in ((64, torch.bfloat16), (1, torch.float32)):
        got = impl.compute_energy_per_token(cfg, batch, 4095, dtype, PUBLISHED_ENERGY)
        expect_real(call_str("compute_energy_per_token", shown(cfg), batch, 4095, dtype, shown(PUBLISHED_ENERGY)), got,
                    flops / 2 * 1.5e-12, why="the batch-1 bf16 figure: every token does the same arithmetic, whatever "
                    "the batch, and the constants fix the cost of one multiply-add")


@pytest.mark.kata("compute_energy_per_token")
@given(name=st.sampled_from(LONG), batch=st.integers(1, 64), seq_len=st.integers(1, 2047), costs=COSTS)
def test_compute_energy_per_token_grows_with_the_context_and_only_with_pj_per_fma(name, batch, seq_len, costs):
    cfg = PRESETS[name]
    call = call_str("compute_energy_per_token", shown(cfg), batch, seq_len, torch.bfloat16, shown(costs))
    base = impl.compute_energy_per_token(cfg, batch, seq_len, torch.bfloat16, costs)
    expect(isinstance(base, float) and 0 < base < 10, call, base, "joules per token, a positive float under 10 J")
    longer = impl.compute_energy_per_token(cfg, batch, 2 * seq_len, torch.bfloat16, costs)
    expect(longer > base, call, base, f"less than the {longer:.6g} J after {2 * seq_len} tokens: more scores per token")
    for field, factor, want in (("pj_per_fma", 2, 2 * base), ("pj_per_bit", 5, base)):
        changed = dataclasses.replace(costs, **{field: factor * getattr(costs, field)})
        expect_real(call_str("compute_energy_per_token", shown(cfg), batch, seq_len, torch.bfloat16, shown(changed)),
                    impl.compute_energy_per_token(cfg, batch, seq_len, torch.bfloat16, changed), want,
                    why=f"{want:.6g} J with {field} x {factor}")


@pytest.mark.kata("compute_energy_per_token")
def test_compute_energy_per_token_of_mistral_7b_scores_the_positions_of_its_window():
    cfg = preset("mistral-7b")
    for seq_len, seen in ((100, 101), (4094, 4095), (4095, 4096), (20_000, 4096)):
        got = impl.compute_energy_per_token(cfg, 2, seq_len, torch.bfloat16, PUBLISHED_ENERGY)
        want = step_flops(cfg, 2, 1, seq_len) / 2 * 1.5e-12 / 2
        expect_real(call_str("compute_energy_per_token", shown(cfg), 2, seq_len, torch.bfloat16, shown(PUBLISHED_ENERGY)),
                    got, want, why=f"after {seq_len} cached tokens each new token scores {seen} positions (its 4,096-token "
                                   "sliding window, itself included): kvref.roofline's FLOPs, which match FlopCounterMode"
                                   + ratio_hint(got, want))


@pytest.mark.kata("compute_energy_per_token")
def test_batch_1_is_memory_dominated_for_every_real_preset_under_both_constant_sets():
    for name in DENSE_PRESET_NAMES:
        cfg = PRESETS[name]
        seq_len = min(cfg.max_seq_len, 4096) - 1
        for costs in (PUBLISHED_ENERGY, SOURCE_CARD_ENERGY):
            memory = measured_bytes(cfg, 1, 1, torch.bfloat16) * 8 * costs.pj_per_bit * 1e-12
            got = impl.compute_energy_per_token(cfg, 1, 1, torch.bfloat16, costs)
            expect(isinstance(got, float) and got < memory,
                   call_str("compute_energy_per_token", shown(cfg), 1, 1, torch.bfloat16, shown(costs)), got,
                   f"less than the {memory:.4g} J of memory traffic per token (measured bytes x 8 x pJ/bit): at batch 1 "
                   "each weight is read for a single multiply-add")
            got_long = impl.compute_energy_per_token(cfg, 1, seq_len, torch.bfloat16, costs)
            expect(got_long >= got, call_str("compute_energy_per_token", shown(cfg), 1, seq_len, torch.bfloat16,
                                             shown(costs)), got_long, f"at least the {got:.4g} J after 1 token")


# --- where compute takes over ------------------------------------------------------------------

@MEASURED
@pytest.mark.kata("energy_crossover_batch")
@given(cfg=small_configs(), seq_len=st.integers(1, 30), dtype=DTYPES, costs=COSTS)
@example(cfg=GQA, seq_len=3, dtype=torch.bfloat16, costs=EVEN)
@example(cfg=GQA, seq_len=30, dtype=torch.float32, costs=PUBLISHED_ENERGY)
def test_energy_crossover_batch_is_the_first_batch_whose_measured_compute_energy_reaches_memory_energy(cfg, seq_len, dtype, costs):
    got = impl.energy_crossover_batch(cfg, seq_len, dtype, costs)
    call = call_str("energy_crossover_batch", shown(cfg), seq_len, dtype, shown(costs))
    flops1 = step_flops(cfg, 1, 1, seq_len)
    bytes1, bytes2 = measured_bytes(cfg, 1, seq_len, dtype), measured_bytes(cfg, 2, seq_len, dtype)
    kv = bytes2 - bytes1  # what one more sequence adds to the step: its K/V (.nbytes)
    weights = bytes1 - kv
    compute = flops1 / 2 * costs.pj_per_fma  # pJ per token, any batch

    def memory(b):  # pJ per token at batch b, from the measured bytes
        return (weights + b * kv) * 8 * costs.pj_per_bit / b

    if compute <= kv * 8 * costs.pj_per_bit:
        expect(got is None, call, got, f"None: a token's own K/V cost {kv * 8 * costs.pj_per_bit:.4g} pJ to move, at "
               f"least its {compute:.4g} pJ of arithmetic, so no batch makes compute catch up")
        return
    expect(isinstance(got, int) and not isinstance(got, bool) and got >= 1, call, got, "a batch size, an int >= 1")
    # An exact tie (integer bytes and FLOPs at 1 pJ each) may land either side once computed in joules:
    # within one part in 1e9, both batches count as the crossover.
    tie = 1e-9
    expect(compute >= memory(got) * (1 - tie), call, got,
           f"a batch where compute ({compute:.6g} pJ per token, measured FLOPs / 2 x pJ/FMA) is at least memory "
           f"({memory(got):.6g} pJ at batch {got}, measured bytes)")
    if got > 1:
        expect(compute < memory(got - 1) * (1 + tie), call, got,
               f"the smallest such batch: at batch {got - 1} compute ({compute:.6g} pJ) already reaches memory "
               f"({memory(got - 1):.6g} pJ)")


@pytest.mark.kata("energy_crossover_batch")
def test_energy_crossover_batch_of_real_presets_with_both_constant_sets():
    cases = [  # name, seq_len, costs, want, why
        ("llama-2-70b", 4095, PUBLISHED_ENERGY, 65, "65: 4.40 J of weights per step against 0.111 J of math and 0.043 J "
                                                    "of K/V per token"),
        ("llama-2-70b", 4095, SOURCE_CARD_ENERGY, 2, "2: the source card's constants make memory 8 x cheaper and math "
                                                     "3.3 x dearer, so compute takes over almost at once"),
        ("llama-2-70b", 1, PUBLISHED_ENERGY, 43, "43 at a 1-token context: 4.40 J of weights per step over 0.103 J of "
                                                "math per token, the K/V next to nothing"),
        ("llama-3-8b", 4095, PUBLISHED_ENERGY, None, "None: at 4k tokens a token's K/V (0.54 GB x 32 pJ/B) cost "
                                                     "more than its 0.013 J of math"),
        ("llama-2-7b", 4095, PUBLISHED_ENERGY, None, "None: MHA, 2 MB of K/V per token read for 0.012 J of math"),
    ]
    for name, seq_len, costs, want, why in cases:
        got = impl.energy_crossover_batch(PRESETS[name], seq_len, torch.bfloat16, costs)
        expect_equal(call_str("energy_crossover_batch", preset(name), seq_len, torch.bfloat16, shown(costs)),
                     got, want, why)


# --- dollars -------------------------------------------------------------------------------------

@MEASURED
@pytest.mark.kata("dollars_per_million_tokens")
@given(cfg=small_configs(), hw=DEVICES, n=st.sampled_from([1, 2, 8]), batch=st.integers(1, 8),
       seq_len=st.integers(1, 40), price=st.floats(0.5, 10), dtype=DTYPES)
@example(cfg=GQA, hw=H100_SXM, n=2, batch=3, seq_len=7, price=2.0, dtype=torch.bfloat16)  # memory-bound
@example(cfg=GQA, hw=STARVED, n=1, batch=5, seq_len=9, price=3.0, dtype=torch.bfloat16)  # compute-bound
@example(cfg=GQA, hw=STARVED, n=1, batch=5, seq_len=9, price=3.0, dtype=torch.float32)  # fp32: 4 x slower math
@example(cfg=GQA, hw=H100_SXM, n=2, batch=3, seq_len=7, price=2.0, dtype=torch.float32)  # fp32: 4-byte elements
def test_dollars_per_million_tokens_bill_every_device_for_the_measured_roofline_step(cfg, hw, n, batch, seq_len, price,
                                                                                     dtype):
    device = hw.tensor_parallel(n) if n > 1 else hw
    got = impl.dollars_per_million_tokens(cfg, device, batch, seq_len, dtype, price)
    flops, bytes_ = measured_step(cfg, batch, seq_len, dtype)
    step = max(flops / device.peak_flops(dtype), bytes_ / device.mem_bandwidth)
    want = price * n / 3600 * step / batch * 1e6
    expect_real(call_str("dollars_per_million_tokens", shown(cfg), shown(device), batch, seq_len, dtype, price),
                got, want, why=f"${want:.6g}: {n} device(s) x ${price:.4g}/h for the roofline step of {step:.4g} s "
                               f"(measured {flops:,} FLOPs, {bytes_:,} B), which generates {batch} tokens; x 1e6")


@pytest.mark.kata("dollars_per_million_tokens")
def test_dollars_per_million_tokens_of_llama_2_70b_on_two_and_four_h100s():
    cfg = preset("llama-2-70b")
    for n, batch, want, why in (
            (2, 1, 23.013, "about $23: a 20.7 ms memory-bound step (137.4 GB of weights and 1.3 GB of K/V at 6.7 TB/s) "
                           "bills 2 x $2/h for 1 token"),
            (2, 24, 1.1722, "about $1.17: 24 sequences are the most that fit two H100s; the step reads 32 GB of K/V "
                            "more, but 24 tokens share the weights"),
            (4, 64, 0.57868, "about $0.58: 64 sequences need four H100s; four devices bill for a quarter of the "
                             "memory-bound time each, so only the batch lowers the cost")):
        hw = H100_SXM.tensor_parallel(n)
        got = impl.dollars_per_million_tokens(cfg, hw, batch, 4095, torch.bfloat16, 2.0)
        expect_real(call_str("dollars_per_million_tokens", shown(cfg), shown(hw), batch, 4095, torch.bfloat16, 2.0), got,
                    want, rel=1e-4, why=why)
    one = impl.dollars_per_million_tokens(cfg, H200, 1, 4095, torch.bfloat16, 4.0)
    flops, bytes_ = measured_step(cfg, 1, 4095, torch.bfloat16)
    expect_real(call_str("dollars_per_million_tokens", shown(cfg), shown(H200), 1, 4095, torch.bfloat16, 4.0), one,
                4.0 / 3600 * bytes_ / H200.mem_bandwidth * 1e6,
                why=f"one H200 at $4/h for {bytes_ / H200.mem_bandwidth * 1e3:.4g} ms per token (measured bytes at 4.8 TB/s)")


@pytest.mark.kata("dollars_per_million_tokens")
@given(name=st.sampled_from(LONG), batch=st.integers(1, 16), seq_len=st.integers(1, 2047), price=st.floats(0.5, 10))
def test_dollars_per_million_tokens_scale_with_the_price_and_fall_with_the_batch(name, batch, seq_len, price):
    cfg = PRESETS[name]
    hw = H100_SXM.tensor_parallel(4)
    call = call_str("dollars_per_million_tokens", shown(cfg), shown(hw), batch, seq_len, torch.bfloat16, price)
    base = impl.dollars_per_million_tokens(cfg, hw, batch, seq_len, torch.bfloat16, price)
    expect_real(call + " at twice the price", impl.dollars_per_million_tokens(cfg, hw, batch, seq_len, torch.bfloat16,
                                                                           2 * price), 2 * base, why="twice the dollars")
    more = impl.dollars_per_million_tokens(cfg, hw, 2 * batch, seq_len, torch.bfloat16, price)
    expect(more < base, call, base, f"more than the ${more:.4g} at batch {2 * batch}: a memory-bound step costs "
           "nearly the same for twice the tokens")


# --- keep or recompute a prefix -------------------------------------------------------------------

def prefix_dollars(cfg, hw, prefix_len, dtype, price, gb_price, lifetime):
    """(recompute $, storage $) from measured FLOPs and bytes of a prefill of the prefix."""
    flops = step_flops(cfg, 1, prefix_len, 0)
    kv = kv_cache_bytes_measured(cfg, 1, prefix_len, dtype)
    bytes_ = weights_read(cfg, dtype) + kv
    recompute = max(flops / hw.peak_flops(dtype), bytes_ / hw.mem_bandwidth) * hw.n_devices * price / 3600
    return recompute, kv / 1e9 * gb_price * lifetime / 3600


@MEASURED
@pytest.mark.kata("keep_prefix_cache")
@given(cfg=st.one_of(small_configs(), st.sampled_from([preset("llama-3-8b"), preset("mistral-7b")])),
       hw=st.one_of(DEVICES, st.builds(lambda hw, n: hw.tensor_parallel(n), DEVICES, st.integers(2, 8))),
       prefix_len=st.integers(1, 64), lifetime=st.floats(1, 86400), gb_price=st.floats(1e-3, 1.0),
       price=st.floats(0.5, 10), dtype=DTYPES)
@example(cfg=GQA, hw=H100_SXM, prefix_len=16, lifetime=3600.0, gb_price=0.0234, price=2.0, dtype=torch.bfloat16)  # memory-bound
@example(cfg=GQA, hw=STARVED, prefix_len=40, lifetime=600.0, gb_price=0.5, price=2.0, dtype=torch.bfloat16)  # compute-bound
@example(cfg=GQA, hw=H100_SXM.tensor_parallel(4), prefix_len=16, lifetime=3600.0, gb_price=0.0234, price=2.0,
         dtype=torch.bfloat16)  # 4 devices billed
@example(cfg=GQA, hw=STARVED, prefix_len=40, lifetime=600.0, gb_price=0.5, price=2.0, dtype=torch.float32)  # fp32 math
@example(cfg=GQA, hw=H100_SXM, prefix_len=16, lifetime=3600.0, gb_price=0.0234, price=2.0, dtype=torch.float32)  # fp32 bytes
def test_keep_prefix_cache_flips_where_reuses_times_measured_recompute_cost_meet_storage_cost(cfg, hw, prefix_len,
                                                                                             lifetime, gb_price, price,
                                                                                             dtype):
    # Never reused, a prefix is not worth storing for a second: asked first, before FLOPs are counted.
    got = impl.keep_prefix_cache(cfg, hw, prefix_len, dtype, 0.0, lifetime, price, gb_price)
    expect_equal(call_str("keep_prefix_cache", shown(cfg), shown(hw), prefix_len, dtype, 0.0, lifetime, price,
                          gb_price), got, False, "False: 0 reuses save no prefill, and storing the K/V costs more than $0")
    recompute, storage = prefix_dollars(cfg, hw, prefix_len, dtype, price, gb_price, lifetime)
    threshold = storage / recompute
    for reuses, keep in ((threshold * 1.0001, True), (threshold * 0.9999, False)):  # 0.01% either side
        got = impl.keep_prefix_cache(cfg, hw, prefix_len, dtype, reuses, lifetime, price, gb_price)
        expect_equal(call_str("keep_prefix_cache", shown(cfg), shown(hw), prefix_len, dtype, reuses, lifetime,
                              price, gb_price), got, keep,
                     f"{keep}: {reuses:.6g} reuses x ${recompute:.4g} per prefill (roofline of its measured FLOPs and "
                     f"bytes, {hw.n_devices} device(s)) against ${storage:.4g} to store {prefix_len} tokens of K/V "
                     f"(.nbytes, per 10^9 bytes) for {lifetime:.6g} s: break-even at {threshold:.6g} reuses")


@pytest.mark.kata("keep_prefix_cache")
def test_keep_prefix_cache_of_a_2048_token_system_prompt_on_llama_3_8b():
    """An H100 at $2/h over its 85.5 GB: HBM at about 2.34 cents per GB-hour; the prefix held for one hour."""
    cfg, gb_price = preset("llama-3-8b"), 2.0 / (H100_SXM.memory_bytes / 1e9)
    recompute, storage = prefix_dollars(cfg, H100_SXM, 2048, torch.bfloat16, 2.0, gb_price, 3600.0)
    threshold = storage / recompute  # about 339 reuses an hour
    # 200 and 330 sit below it: K without V (half the storage, 170 reuses) or GiB for GB (316) would keep them.
    for reuses in (50, 200, 330, 350, 450, 5000):
        got = impl.keep_prefix_cache(cfg, H100_SXM, 2048, torch.bfloat16, reuses, 3600.0, 2.0, gb_price)
        expect_equal(call_str("keep_prefix_cache", shown(cfg), shown(H100_SXM), 2048, torch.bfloat16, reuses, 3600.0, 2.0,
                              gb_price), got, reuses > threshold,
                     f"{reuses > threshold}: a prefill of 2,048 tokens is compute-bound, {recompute * 1e6:.4g} micro-dollars; "
                     f"268 MB of K/V for an hour cost {storage * 1e3:.4g} milli-dollars, {threshold:.0f} reuses' worth")
    for lifetime in (60.0, 86400.0):
        got = impl.keep_prefix_cache(cfg, H100_SXM, 2048, torch.bfloat16, 400, lifetime, 2.0, gb_price)
        expect_equal(call_str("keep_prefix_cache", shown(cfg), shown(H100_SXM), 2048, torch.bfloat16, 400, lifetime, 2.0,
                              gb_price), got, lifetime < 3600,
                     "the longer a prefix waits for its reuses, the more its storage costs: keep it for a minute, "
                     "not for a day, at 400 reuses")
    call = call_str("keep_prefix_cache", shown(cfg), shown(H100_SXM), 2048, torch.bfloat16, 0, 3600.0, 2.0, 0.0)
    expect_equal(call, impl.keep_prefix_cache(cfg, H100_SXM, 2048, torch.bfloat16, 0, 3600.0, 2.0, 0.0), False,
                 "False: free storage and no reuse, $0 saved against $0 spent; keep only when reuse is worth strictly "
                 "more than storage")
