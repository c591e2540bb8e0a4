"""kvref.roofline and kvref.hardware: the cost model's inputs against measurement, its outputs against its laws.

FLOPs and bytes of a step are measured (FlopCounterMode on kvref's forward on the meta device,
.nbytes of weight matrices and caches); the time a GPU would take cannot be, so the roofline
is held to its laws: units, limits, monotonicity, scaling, and worked numbers from CARDS.md.
"""

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvref import hardware as hwm
from kvref import roofline as rl
from kvref.config import PRESETS, ModelConfig, preset
from kvref.hardware import H100_SXM, H200, HARDWARE
from kvref.measure import (kv_bytes_per_token_measured, kv_cache_bytes_measured, kv_recompute_flops_measured, meta_model,
                           step_flops_measured, weight_bytes_read, weight_nbytes)
from kvref.strategies import (DENSE_PRESET_NAMES, GQA_PRESET_NAMES, gqa_model_configs, hardware_presets, model_configs,
                              preset_names)

CONFIGS = st.builds(lambda cfg, mlp, tie: cfg.with_(mlp=mlp, tie_embeddings=tie), st.one_of(model_configs(), gqa_model_configs()),
                    st.sampled_from(["swiglu", "gelu"]), st.booleans())
BATCHES = st.integers(1, 4)
DTYPE_OF_BYTES = {4: torch.float32, 2: torch.bfloat16, 1: torch.float8_e4m3fn}
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float8_e4m3fn])
TOY_LOSER = ModelConfig(vocab_size=8, n_layers=1, d_model=8, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=8, max_seq_len=4096)
BF16 = torch.bfloat16
MIB = 2**20


# --- hardware -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,bandwidth,bf16,tf32,fp32,fp8,mib", [
    ("A100-40GB", 1555e9, 312e12, 156e12, 19.5e12, None, 40_960),
    ("A100-80GB-SXM", 2039e9, 312e12, 156e12, 19.5e12, None, 81_920),
    ("H100-SXM", 3.35e12, 989e12, 495e12, 67e12, 1979e12, 81_559),
    ("H200", 4.8e12, 989e12, 495e12, 67e12, 1979e12, 143_771)])
def test_hardware_presets_carry_the_datasheet_numbers(name, bandwidth, bf16, tf32, fp32, fp8, mib):
    # CARDS.md facts: dense peaks per dtype; memory as nvidia-smi reports it.
    hw = hwm.hardware(name)
    assert hw.mem_bandwidth == bandwidth and hw.memory_bytes == mib * MIB and hw.source
    assert hw.peak_flops(torch.bfloat16) == hw.peak_flops(torch.float16) == bf16
    assert hw.peak_flops(torch.float32) == fp32 and hw.peak_flops(torch.float32, allow_tf32=True) == tf32
    if fp8 is None:
        with pytest.raises(ValueError, match=f"{name} has no peak FLOP/s for float8_e4m3fn"):
            hw.peak_flops(torch.float8_e4m3fn)
    else:
        assert hw.peak_flops(torch.float8_e4m3fn) == fp8
    assert rl.ridge_point(hw, BF16) == bf16 / bandwidth


def test_the_h100_ridge_point_is_about_295_flop_per_byte_in_bf16_and_20_in_fp32():
    assert rl.ridge_point(H100_SXM, BF16) == pytest.approx(295, rel=0.01)  # CARDS.md facts
    assert rl.ridge_point(H100_SXM, torch.float32) == pytest.approx(20, rel=0.01)


def test_the_h100_reports_85_5_gb_not_80():
    assert H100_SXM.memory_bytes == 85_520_809_984  # 81,559 MiB


def test_peak_flops_names_the_device_and_the_dtype_it_lacks():
    with pytest.raises(ValueError, match=r"H100-SXM has no peak FLOP/s for int8 \(it has: .*bfloat16"):
        H100_SXM.peak_flops(torch.int8)
    with pytest.raises(TypeError, match="dtype"):
        H100_SXM.peak_flops(2)


def test_tensor_parallel_multiplies_everything_and_says_it_is_optimistic():
    tp = H100_SXM.tensor_parallel(4)
    assert (tp.n_devices, tp.name) == (4, "4xH100-SXM")
    assert tp.peak_flops(BF16) == 4 * 989e12 and tp.mem_bandwidth == 4 * 3.35e12
    assert tp.memory_bytes == 4 * H100_SXM.memory_bytes
    assert "communication ignored" in tp.source
    with pytest.raises(ValueError, match="n must be"):
        H100_SXM.tensor_parallel(0)


def test_hardware_prints_on_one_line_and_hashes():
    assert "\n" not in repr(H100_SXM) and "H100-SXM" in repr(H100_SXM)
    assert hash(H100_SXM) == hash(dataclasses.replace(H100_SXM))


@pytest.mark.parametrize("field,value,error", [("peaks", {}, ValueError), ("mem_bandwidth", -1.0, ValueError),
                                               ("memory_bytes", float("inf"), ValueError),
                                               ("peaks", {BF16: "1e15"}, TypeError), ("peaks", {"fp32": 1e12}, TypeError),
                                               ("mem_bandwidth", True, TypeError), ("name", "", ValueError),
                                               ("source", None, TypeError)])
def test_a_bad_hardware_field_is_named(field, value, error):
    with pytest.raises(error, match=field):
        dataclasses.replace(H100_SXM, **{field: value})


def test_an_unknown_hardware_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="H100-SXM"):
        hwm.hardware("B200")


def test_the_hardware_module_holds_no_answers():
    # A spec module: card02's stub imports it, so it must not compute a kata's answer.
    public = {n for n in vars(hwm) if not n.startswith("_")}
    assert not public & {"forward_flops", "kv_bytes_per_token", "decode_cost", "step_time", "recompute_to_read_ratio",
                         "fits", "memory_needed", "n_params"}


def test_roofline_says_first_that_it_answers_cards_01_and_02():
    assert rl.__doc__.splitlines()[0].startswith("Spoiler: answers cards 01 and 02")


# --- the roofline itself ------------------------------------------------------------------------

@given(flops=st.floats(0, 1e18), bytes_=st.floats(0, 1e13), hw=hardware_presets, dtype=st.sampled_from([BF16, torch.float32]))
def test_step_time_is_the_slower_of_compute_and_memory(flops, bytes_, hw, dtype):
    t = rl.step_time(flops, bytes_, hw, dtype)
    assert t == max(flops / hw.peak_flops(dtype), bytes_ / hw.mem_bandwidth)
    assert rl.step_time(2 * flops, 2 * bytes_, hw, dtype) == pytest.approx(2 * t)  # linear in the work
    assert rl.step_time(flops, bytes_, hw.scaled(flops=2, bandwidth=2), dtype) == pytest.approx(t / 2)
    # The no-overlap time at peak is at least the perfect-overlap time and at most twice it.
    upper = rl.step_time_no_overlap(flops, bytes_, hw, dtype)
    assert t <= upper <= 2 * t * (1 + 1e-12)


def test_step_time_limits_and_units():
    assert rl.step_time(0, 0, H100_SXM, BF16) == 0
    assert rl.step_time(989e12, 0, H100_SXM, BF16) == 1.0  # one second of peak bf16 compute
    assert rl.step_time(67e12, 0, H100_SXM, torch.float32) == 1.0  # fp32 runs at 67 TFLOP/s
    assert rl.step_time(0, 3.35e12, H100_SXM, BF16) == 1.0  # one second of bandwidth
    ridge = rl.ridge_point(H100_SXM, BF16)
    assert rl.step_time(ridge * 1e9, 1e9, H100_SXM, BF16) == pytest.approx(1e9 / 3.35e12)  # at the ridge both agree
    assert rl.step_time_no_overlap(ridge * 1e9, 1e9, H100_SXM, BF16) == pytest.approx(2e9 / 3.35e12)


@pytest.mark.parametrize("args,error,match", [((-1, 0), ValueError, "flops"), ((0, float("nan")), ValueError, "bytes_"),
                                              (("1", 0), TypeError, "flops"), ((0, None), TypeError, "bytes_")])
def test_step_time_names_a_bad_argument(args, error, match):
    with pytest.raises(error, match=match):
        rl.step_time(*args, H100_SXM, BF16)


def test_step_time_wants_a_hardware_and_a_dtype():
    with pytest.raises(TypeError, match="Hardware"):
        rl.step_time(1, 1, "H100", BF16)
    with pytest.raises(TypeError, match="dtype"):
        rl.step_time(1, 1, H100_SXM, 2)


def test_arithmetic_intensity_and_memory_bound():
    assert rl.arithmetic_intensity(600, 2) == 300
    with pytest.raises(ValueError, match="bytes_"):
        rl.arithmetic_intensity(1, 0)
    assert rl.Cost(290, 1).memory_bound(H100_SXM, BF16) and not rl.Cost(300, 1).memory_bound(H100_SXM, BF16)
    assert not rl.Cost(30, 1).memory_bound(H100_SXM, torch.float32)  # fp32's ridge is 20 FLOP/B


# --- a model's weights, FLOPs and bytes against measurement -----------------------------------------

@given(cfg=st.one_of(CONFIGS, st.builds(lambda c, e: c.with_(n_experts=e, experts_per_token=min(2, e)),
                                        gqa_model_configs(), st.integers(1, 4))))
def test_matmul_params_and_n_params_count_the_models_parameters(cfg):
    model = meta_model(cfg)
    assert rl.matmul_params(cfg) == weight_bytes_read(model) // 2  # bf16: 2 bytes per weight
    assert rl.n_params(cfg) == sum(p.numel() for p in model.parameters()) == weight_nbytes(model) // 2


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "llama-3.1-70b", "mistral-7b",
                                  "mixtral-8x7b"])
def test_n_params_of_presets_equal_the_published_totals(name):
    assert rl.n_params(PRESETS[name]) == PRESETS[name].n_params


def test_mixtral_stores_46_7e9_parameters_and_a_token_uses_12_9e9():
    cfg = preset("mixtral-8x7b")
    assert rl.n_params(cfg) == pytest.approx(46.7e9, rel=1e-3)
    embedding_and_norms = rl.n_params(cfg) - rl.matmul_params(cfg)
    assert rl.active_matmul_params(cfg) + embedding_and_norms == pytest.approx(12.9e9, rel=1e-2)  # Mixtral paper


def test_gpt_3_has_a_two_matrix_gelu_mlp_and_174_6e9_parameters():
    cfg = preset("gpt-3-175b")
    model = meta_model(cfg)
    assert not hasattr(model.layers[0].mlp, "gate_proj")
    # kvref's build lacks GPT-3's learned positions (25.2M) and biases and LayerNorm biases (15.3M).
    assert rl.n_params(cfg) + 25_165_824 + 15_335_424 + 12_288 == pytest.approx(174.6e9, rel=1e-4)


@given(tokens=st.integers(1, 10**4))
def test_expected_experts_go_from_k_per_token_to_all_of_them(tokens):
    cfg = preset("mixtral-8x7b")
    touched = rl.expected_experts(cfg, tokens)
    assert min(2, 8) <= touched <= min(2 * tokens, 8) + 1e-9
    assert rl.expected_experts(cfg, 1) == pytest.approx(2)
    assert rl.expected_experts(cfg, 64) == pytest.approx(8, rel=1e-7)
    assert rl.expected_experts(preset("llama-2-7b"), tokens) == 1


def test_a_mixtral_step_reads_the_active_weights_at_batch_1_and_nearly_all_at_batch_64():
    cfg = preset("mixtral-8x7b")
    at_1, at_64 = rl.decode_cost(cfg, 1, 1, 2).bytes, rl.decode_cost(cfg, 64, 1, 2).bytes
    assert at_1 == pytest.approx(2 * rl.active_matmul_params(cfg), rel=1e-3)
    assert at_64 == pytest.approx(2 * rl.matmul_params(cfg), rel=1e-3)


@given(cfg=CONFIGS, batch=BATCHES, n_new=st.integers(1, 6), n_cached=st.integers(0, 40))
def test_forward_flops_are_what_flop_counter_mode_counts(cfg, batch, n_new, n_cached):
    assert rl.forward_flops(cfg, batch, n_new, n_cached) == step_flops_measured(cfg, batch, n_new, n_cached).total


@given(cfg=CONFIGS, window=st.integers(2, 8), batch=BATCHES, n_new=st.integers(1, 4), n_cached=st.integers(0, 12))
def test_forward_flops_within_a_sliding_window_are_what_flop_counter_mode_counts(cfg, window, batch, n_new, n_cached):
    cfg = cfg.with_(sliding_window=window)
    if n_cached + n_new <= window:
        assert rl.forward_flops(cfg, batch, n_new, n_cached) == step_flops_measured(cfg, batch, n_new, n_cached).total
    else:  # kvref's model refuses to attend past the window; the cost model reads the window only
        with pytest.raises(ValueError, match="sliding window"):
            step_flops_measured(cfg, batch, n_new, n_cached)
    if n_new == 1 and n_cached + 1 > window:
        assert rl.forward_flops(cfg, batch, 1, n_cached) == rl.forward_flops(cfg, batch, 1, window - 1)


# The preset steps whose FLOPs the katas take from kvref.roofline instead of measuring them (cards 01,
# 02 and 11: measuring a preset costs a learner's run the torch._dynamo import of PyTorch's meta
# kernels). Each is measured here on the meta device, then drawn ones beside them.
KATA_PRESET_STEPS = [
    ("llama-2-70b", 1, 1, 4095),  # card01: one token after 4,095 cached
    ("llama-3-8b", 1, 2048, 0),  # card02: the uncached step at 2k tokens, in three dtypes
    ("mistral-7b", 8, 1, 4095),  # card02, card11: a decode step reading exactly its 4,096-token window
    ("llama-2-70b", 1, 4096, 0),  # a whole-context prefill: the scores' rectangle at its largest
    ("llama-3-8b", 2, 1, 4095),
]


@pytest.mark.parametrize("name, batch, n_new, n_cached", KATA_PRESET_STEPS)
def test_forward_flops_of_the_presets_the_katas_use_are_what_flop_counter_mode_counts(name, batch, n_new, n_cached):
    cfg = preset(name)
    assert rl.forward_flops(cfg, batch, n_new, n_cached) == step_flops_measured(cfg, batch, n_new, n_cached).total


@pytest.mark.slow  # every example runs a whole preset on the meta device: 0.2 to 1 s each
@given(name=st.sampled_from(DENSE_PRESET_NAMES), batch=st.integers(1, 64),
       n_new=st.one_of(st.integers(1, 3), st.integers(1, 64)),  # decode steps, chunks, card11's prefixes
       n_cached=st.one_of(st.just(0), st.integers(0, 32_767)))
def test_forward_flops_of_drawn_preset_steps_are_what_flop_counter_mode_counts(name, batch, n_new, n_cached):
    cfg = PRESETS[name]
    n_cached = min(n_cached, cfg.max_seq_len - n_new)
    if cfg.sliding_window:  # kvref's model refuses to attend past the window
        n_cached = min(n_cached, cfg.sliding_window - n_new)
    assert rl.forward_flops(cfg, batch, n_new, n_cached) == step_flops_measured(cfg, batch, n_new, n_cached).total


@given(cfg=CONFIGS, n_tokens=st.integers(1, 8))
def test_kv_recompute_params_are_the_projections_flop_counter_mode_counts(cfg, n_tokens):
    assert 2 * n_tokens * rl.kv_recompute_params(cfg) == kv_recompute_flops_measured(cfg, n_tokens).projections


@given(cfg=CONFIGS, batch=BATCHES, seq_len=st.integers(1, 40), dtype=DTYPES, use_cache=st.booleans())
def test_decode_cost_is_measured_flops_and_bytes(cfg, batch, seq_len, dtype, use_cache):
    cost = rl.decode_cost(cfg, batch, seq_len, dtype.itemsize, use_cache)
    weights = weight_bytes_read(meta_model(cfg, dtype))
    if use_cache:
        assert cost.flops == step_flops_measured(cfg, batch, 1, seq_len).total
        assert cost.bytes == weights + kv_cache_bytes_measured(cfg, batch, seq_len + 1, dtype)
    else:
        assert cost.flops == step_flops_measured(cfg, batch, seq_len + 1, 0).total
        assert cost.bytes == weights


@given(cfg=CONFIGS, batch=BATCHES, prompt_len=st.integers(1, 40), dtype=DTYPES)
def test_prefill_cost_is_measured_flops_and_bytes(cfg, batch, prompt_len, dtype):
    cost = rl.prefill_cost(cfg, batch, prompt_len, dtype.itemsize)
    assert cost.flops == step_flops_measured(cfg, batch, prompt_len, 0).total
    assert cost.bytes == weight_bytes_read(meta_model(cfg, dtype)) + kv_cache_bytes_measured(cfg, batch, prompt_len, dtype)


@given(cfg=CONFIGS, dtype_bytes=st.sampled_from([1, 2, 4]))
def test_kv_bytes_per_token_is_a_one_token_cache(cfg, dtype_bytes):
    assert rl.kv_bytes_per_token(cfg, dtype_bytes) == kv_bytes_per_token_measured(cfg, DTYPE_OF_BYTES[dtype_bytes])


@given(cfg=CONFIGS, batch=BATCHES, seq_len=st.integers(1, 40), dtype=DTYPES)
def test_memory_needed_is_every_parameter_plus_the_cache(cfg, batch, seq_len, dtype):
    need = weight_nbytes(meta_model(cfg, dtype)) + kv_cache_bytes_measured(cfg, batch, seq_len, dtype)
    assert rl.memory_needed(cfg, batch, seq_len, dtype.itemsize) == need
    assert rl.fits(cfg, dataclasses.replace(H100_SXM, memory_bytes=need), batch, seq_len, dtype)
    assert not rl.fits(cfg, dataclasses.replace(H100_SXM, memory_bytes=need - 1), batch, seq_len, dtype)


@pytest.mark.parametrize("name", ["llama-2-70b", "llama-3-70b"])
def test_llama_70b_in_bf16_fits_two_h100s_or_an_h200_but_not_one_h100(name):
    cfg = preset(name)
    assert rl.n_params(cfg) * 2 == pytest.approx(138e9, rel=0.03)
    assert not rl.fits(cfg, H100_SXM, 1, 1, BF16)
    assert rl.fits(cfg, H100_SXM.tensor_parallel(2), 1, 4096, BF16) and rl.fits(cfg, H200, 1, 4096, BF16)


def test_a_100k_context_of_llama_2_70b_takes_32_8_gb_in_bf16():
    assert rl.kv_bytes_per_token(preset("llama-2-70b"), 2) * 100_000 == pytest.approx(32.8e9, rel=1e-3)


@pytest.mark.parametrize("name,per_token", [("deepseek-v2", 69_120), ("deepseek-v3", 70_272)])
def test_mla_presets_cache_a_latent_and_a_rope_key_per_layer(name, per_token):
    assert rl.kv_bytes_per_token(preset(name), 2) == per_token  # CARDS.md facts, bf16
    with pytest.raises(ValueError, match="does not cost MLA models"):
        rl.matmul_params(preset(name))


def test_a_separate_kv_element_size_changes_only_the_cache_bytes():
    cfg = preset("llama-2-70b")
    bf16, int4_kv = rl.decode_cost(cfg, 8, 4095, 2), rl.decode_cost(cfg, 8, 4095, 2, kv_dtype_bytes=0.5)
    assert int4_kv.flops == bf16.flops
    assert bf16.bytes - int4_kv.bytes == pytest.approx(8 * 4096 * 327_680 * 0.75)


def test_a_sliding_window_caps_what_a_cached_step_reads():
    cfg = preset("mistral-7b")
    at_window = rl.decode_cost(cfg, 1, 4095, 2)
    for seq_len in (4096, 8191, 32767):
        assert rl.decode_cost(cfg, 1, seq_len, 2) == at_window
    assert at_window.bytes == weight_bytes_read(meta_model(cfg, BF16)) + kv_cache_bytes_measured(cfg, 1, 4096, BF16)


@pytest.mark.parametrize("call,match", [(lambda: rl.decode_cost(preset("llama-2-7b"), 0, 8, 2), "batch"),
                                        (lambda: rl.decode_cost(preset("llama-2-7b"), 1, 0, 2), "seq_len"),
                                        (lambda: rl.decode_cost(preset("llama-2-7b"), 1, 8, 0), "dtype_bytes"),
                                        (lambda: rl.decode_cost(preset("llama-2-7b"), 1, 8, 2, use_cache="yes"), "use_cache"),
                                        (lambda: rl.prefill_cost("llama-2-7b", 1, 8, 2), "cfg"),
                                        (lambda: rl.recompute_to_read_ratio(preset("llama-2-7b"), None, BF16), "hw"),
                                        (lambda: rl.recompute_to_read_ratio(preset("llama-2-7b"), H100_SXM, 2), "dtype"),
                                        (lambda: rl.fits(preset("llama-2-7b"), H100_SXM, 1, 0, BF16), "seq_len"),
                                        (lambda: rl.expected_experts(preset("mixtral-8x7b"), 0), "tokens")])
def test_bad_model_arguments_are_named(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


@pytest.mark.parametrize("call", [
    lambda: rl.memory_needed(preset("llama-2-7b"), 1, 8, 2, kv_dtype_bytes=0),
    lambda: rl.prefill_cost(preset("llama-2-7b"), 1, 8, 2, kv_dtype_bytes=-1),
    lambda: rl.decode_cost(preset("llama-2-7b"), 1, 8, 2, use_cache=True, kv_dtype_bytes=0),
    lambda: rl.decode_cost(preset("llama-2-7b"), 1, 8, 2, use_cache=False, kv_dtype_bytes=0),  # unused, still wrong
])
def test_a_bad_kv_element_size_is_named_as_itself_not_as_dtype_bytes(call):
    with pytest.raises(ValueError, match=r"^kv_dtype_bytes must be finite and > 0"):
        call()


# --- laws and worked numbers ----------------------------------------------------------------------

@given(name=preset_names, hw=hardware_presets, batch=st.integers(1, 64), seq_len=st.integers(1, 32768))
def test_cached_decode_of_a_real_preset_in_bf16_is_memory_bound_and_grows_with_the_context(name, hw, batch, seq_len):
    cfg = PRESETS[name]
    cost = rl.decode_cost(cfg, batch, seq_len, 2)
    assert cost.memory_bound(hw, BF16)
    longer = rl.decode_time(cfg, hw, batch, 2 * seq_len, BF16)
    if cfg.sliding_window and seq_len + 1 >= cfg.sliding_window:
        assert longer == cost.time(hw, BF16)
    else:
        assert longer > cost.time(hw, BF16)
    assert cost.time(hw.scaled(bandwidth=0.5), BF16) == pytest.approx(2 * cost.time(hw, BF16))


def test_fp32_decode_at_batch_64_is_compute_bound_on_an_a100():
    # 2 FLOPs per weight per sequence over 4 bytes per weight: 32 FLOP/B against a ridge of 12.5.
    cost = rl.decode_cost(preset("llama-2-7b"), 64, 1, 4)
    assert not cost.memory_bound(HARDWARE["A100-40GB"], torch.float32)
    assert cost.memory_bound(HARDWARE["A100-40GB"], BF16)


@given(name=st.sampled_from(DENSE_PRESET_NAMES), hw=hardware_presets, dtype=DTYPES)
def test_real_presets_never_prefer_recompute_and_the_toy_does(name, hw, dtype):
    if not hw.computes_in(dtype):
        return
    assert not rl.caching_loses(PRESETS[name], hw, dtype)
    assert rl.caching_loses(TOY_LOSER, hw, dtype)


def test_the_toy_would_rather_recompute_by_about_twice_the_margin_of_the_naive_count():
    # Rebuilding the one layer's K/V needs its k and v projections only (4,096 weights), not the
    # whole forward pass with lm_head (8,448): the naive count overstates recompute about 2x.
    assert rl.kv_recompute_params(TOY_LOSER) == 4096 and rl.active_matmul_params(TOY_LOSER) == 8448


def test_uncached_decode_wins_only_where_it_costs_no_extra_time():
    # The toy: uncached is faster at short contexts, slower once the recomputed scores grow.
    assert rl.decode_time(TOY_LOSER, H100_SXM, 1, 8, BF16, False) < rl.decode_time(TOY_LOSER, H100_SXM, 1, 8, BF16, True)
    assert rl.decode_time(TOY_LOSER, H100_SXM, 1, 4095, BF16, True) < rl.decode_time(TOY_LOSER, H100_SXM, 1, 4095, BF16, False)
    # A real model, on a device it fits: at 9 tokens both steps stream the weights; past the ridge, the cache wins.
    cfg = preset("llama-2-70b")
    short = [rl.decode_time(cfg, H200, 1, 8, BF16, uc) for uc in (True, False)]
    assert short[1] < short[0] < short[1] * 1.0001
    assert rl.decode_time(cfg, H200, 1, 1024, BF16, True) < rl.decode_time(cfg, H200, 1, 1024, BF16, False)


def test_worked_numbers_for_llama_2_70b():
    cfg = preset("llama-2-70b")
    cached = rl.decode_cost(cfg, 1, 4095, 2)
    assert cached.bytes == pytest.approx(138.77e9, rel=1e-4)  # 137.4 GB of weights + 1.34 GB of K/V
    assert cached.intensity == pytest.approx(1.07, rel=1e-2)
    assert not rl.fits(cfg, H100_SXM, 1, 4096, BF16)  # 139.3 GB of weights and cache against 85.5 GB
    assert cached.time(H100_SXM.tensor_parallel(2), BF16) == pytest.approx(0.02071, rel=1e-3)
    assert cached.time(H200, BF16) == pytest.approx(0.02891, rel=1e-3)
    assert cached.time_no_overlap(H200, BF16) == pytest.approx(0.02891 + 0.15e-3, rel=2e-3)
    tp4 = H100_SXM.tensor_parallel(4)
    assert rl.fits(cfg, tp4, 64, 4096, BF16) and not rl.fits(cfg, H200, 64, 4096, BF16)
    assert rl.decode_time(cfg, tp4, 64, 4095, BF16) == pytest.approx(0.016666, rel=1e-3)
    assert rl.recompute_to_read_ratio(cfg, H100_SXM, BF16) == pytest.approx(1397.83, rel=1e-4)
    uncached = rl.decode_cost(cfg, 1, 4095, 2, use_cache=False)
    assert not uncached.memory_bound(H200, BF16) and uncached.time(H200, BF16) == pytest.approx(0.614, rel=1e-2)


def test_ratio_scales_with_the_hardware_and_the_element_size():
    cfg = preset("llama-3-8b")
    r = rl.recompute_to_read_ratio(cfg, H100_SXM, BF16)
    assert rl.recompute_to_read_ratio(cfg, H200, BF16) == pytest.approx(r * 4.8 / 3.35)
    assert rl.recompute_to_read_ratio(cfg, H100_SXM, torch.float8_e4m3fn) == pytest.approx(r, rel=1e-3)  # 2x the peak, half the bytes
    assert math.isclose(r, 2 * rl.kv_recompute_params(cfg) / (131_072 * rl.ridge_point(H100_SXM, BF16)))


def test_every_preset_in_the_strategies_is_costed():
    for name in GQA_PRESET_NAMES:
        for hw in HARDWARE.values():
            assert 0 < rl.decode_time(PRESETS[name], hw, 1, 4095, BF16) < 1
