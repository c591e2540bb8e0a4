"""kvref.roofline: the cost model's inputs against measurement, its outputs against its laws.

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
from torch import nn

from kvref import roofline as rl
from kvref.config import PRESETS, ModelConfig, preset
from kvref.measure import kv_bytes_per_token_measured, kv_cache_bytes_measured, meta_model, step_flops_measured, weight_bytes_read
from kvref.roofline import H100_SXM, HARDWARE
from kvref.strategies import GQA_PRESET_NAMES, gqa_model_configs, hardware_presets, model_configs, preset_names

CONFIGS = st.one_of(model_configs(), gqa_model_configs())
BATCHES = st.integers(1, 4)
DTYPE_OF_BYTES = {4: torch.float32, 2: torch.bfloat16, 1: torch.float8_e4m3fn}
TOY_LOSER = ModelConfig(vocab_size=8, n_layers=1, d_model=8, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=8)


# --- hardware -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,bandwidth,peak", [("A100-40GB", 1555e9, 312e12), ("A100-80GB-SXM", 2039e9, 312e12),
                                                 ("H100-SXM", 3.35e12, 989e12), ("H200", 4.8e12, 989e12)])
def test_hardware_presets_carry_the_datasheet_numbers(name, bandwidth, peak):
    hw = rl.hardware(name)
    assert (hw.mem_bandwidth, hw.peak_flops) == (bandwidth, peak) and hw.source
    assert rl.ridge_point(hw) == peak / bandwidth


def test_the_h100_ridge_point_is_about_295_flop_per_byte():
    assert rl.ridge_point(H100_SXM) == pytest.approx(295, rel=0.01)  # CARDS.md facts


@pytest.mark.parametrize("field,value,error", [("peak_flops", 0, ValueError), ("mem_bandwidth", -1.0, ValueError),
                                               ("memory_bytes", float("inf"), ValueError), ("peak_flops", "1e15", TypeError),
                                               ("mem_bandwidth", True, TypeError), ("name", "", ValueError),
                                               ("source", None, TypeError)])
def test_a_bad_hardware_field_is_named(field, value, error):
    with pytest.raises(error, match=field):
        dataclasses.replace(H100_SXM, **{field: value})


def test_an_unknown_hardware_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="H100-SXM"):
        rl.hardware("B200")


# --- the roofline itself ------------------------------------------------------------------------

@given(flops=st.floats(0, 1e18), bytes_=st.floats(0, 1e13), hw=hardware_presets)
def test_step_time_is_the_slower_of_compute_and_memory(flops, bytes_, hw):
    t = rl.step_time(flops, bytes_, hw)
    assert t == max(flops / hw.peak_flops, bytes_ / hw.mem_bandwidth)
    assert rl.step_time(2 * flops, 2 * bytes_, hw) == pytest.approx(2 * t)  # linear in the work
    faster = dataclasses.replace(hw, peak_flops=2 * hw.peak_flops, mem_bandwidth=2 * hw.mem_bandwidth)
    assert rl.step_time(flops, bytes_, faster) == pytest.approx(t / 2)


def test_step_time_limits_and_units():
    assert rl.step_time(0, 0, H100_SXM) == 0
    assert rl.step_time(989e12, 0, H100_SXM) == 1.0  # one second of peak compute
    assert rl.step_time(0, 3.35e12, H100_SXM) == 1.0  # one second of bandwidth
    ridge = rl.ridge_point(H100_SXM)
    assert rl.step_time(ridge * 1e9, 1e9, H100_SXM) == pytest.approx(1e9 / 3.35e12)  # at the ridge both agree


@pytest.mark.parametrize("args,error,match", [((-1, 0), ValueError, "flops"), ((0, float("nan")), ValueError, "bytes_"),
                                              (("1", 0), TypeError, "flops"), ((0, None), TypeError, "bytes_")])
def test_step_time_names_a_bad_argument(args, error, match):
    with pytest.raises(error, match=match):
        rl.step_time(*args, H100_SXM)


def test_step_time_wants_a_hardware():
    with pytest.raises(TypeError, match="Hardware"):
        rl.step_time(1, 1, "H100")


def test_arithmetic_intensity_and_memory_bound():
    assert rl.arithmetic_intensity(600, 2) == 300
    with pytest.raises(ValueError, match="bytes_"):
        rl.arithmetic_intensity(1, 0)
    assert rl.Cost(290, 1).memory_bound(H100_SXM) and not rl.Cost(300, 1).memory_bound(H100_SXM)


# --- a model's weights, FLOPs and bytes against measurement -----------------------------------------

@given(cfg=CONFIGS)
def test_matmul_params_and_n_params_count_the_models_parameters(cfg):
    model = meta_model(cfg)
    assert rl.matmul_params(cfg) == sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert rl.n_params(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b"])
def test_n_params_of_dense_presets_equal_the_published_totals(name):
    # Mixtral (8 experts) and GPT-3 (a 2-matrix GELU MLP) do not fit ModelConfig's one SwiGLU
    # MLP per layer: counted from the config they give 7.2e9 and 2.3e11, not 46.7e9 and 175e9.
    assert rl.n_params(PRESETS[name]) == PRESETS[name].n_params


@given(cfg=CONFIGS, batch=BATCHES, n_new=st.integers(1, 6), n_cached=st.integers(0, 40))
def test_forward_flops_are_what_flop_counter_mode_counts(cfg, batch, n_new, n_cached):
    assert rl.forward_flops(cfg, batch, n_new, n_cached) == step_flops_measured(cfg, batch, n_new, n_cached).total


def test_forward_flops_of_a_real_preset_are_what_flop_counter_mode_counts():
    cfg = preset("llama-3-8b")
    assert rl.forward_flops(cfg, 2, 1, 4095) == step_flops_measured(cfg, 2, 1, 4095).total


@given(cfg=CONFIGS, batch=BATCHES, seq_len=st.integers(1, 40), dtype_bytes=st.sampled_from([1, 2, 4]),
       use_cache=st.booleans())
def test_decode_cost_is_measured_flops_and_bytes(cfg, batch, seq_len, dtype_bytes, use_cache):
    dtype = DTYPE_OF_BYTES[dtype_bytes]
    cost = rl.decode_cost(cfg, batch, seq_len, dtype_bytes, use_cache)
    weights = weight_bytes_read(meta_model(cfg, dtype))
    if use_cache:
        assert cost.flops == step_flops_measured(cfg, batch, 1, seq_len).total
        assert cost.bytes == weights + kv_cache_bytes_measured(cfg, batch, seq_len + 1, dtype)
    else:
        assert cost.flops == step_flops_measured(cfg, batch, seq_len + 1, 0).total
        assert cost.bytes == weights


@given(cfg=CONFIGS, batch=BATCHES, prompt_len=st.integers(1, 40), dtype_bytes=st.sampled_from([1, 2, 4]))
def test_prefill_cost_is_measured_flops_and_bytes(cfg, batch, prompt_len, dtype_bytes):
    dtype = DTYPE_OF_BYTES[dtype_bytes]
    cost = rl.prefill_cost(cfg, batch, prompt_len, dtype_bytes)
    assert cost.flops == step_flops_measured(cfg, batch, prompt_len, 0).total
    assert cost.bytes == weight_bytes_read(meta_model(cfg, dtype)) + kv_cache_bytes_measured(cfg, batch, prompt_len, dtype)


@given(cfg=CONFIGS, dtype_bytes=st.sampled_from([1, 2, 4]))
def test_kv_bytes_per_token_is_a_one_token_cache(cfg, dtype_bytes):
    assert rl.kv_bytes_per_token(cfg, dtype_bytes) == kv_bytes_per_token_measured(cfg, DTYPE_OF_BYTES[dtype_bytes])


@pytest.mark.parametrize("name,per_token", [("deepseek-v2", 69_120), ("deepseek-v3", 70_272)])
def test_mla_presets_cache_a_latent_and_a_rope_key_per_layer(name, per_token):
    assert rl.kv_bytes_per_token(preset(name), 2) == per_token  # CARDS.md facts, bf16
    with pytest.raises(ValueError, match="MLA"):
        rl.matmul_params(preset(name))


def test_a_separate_kv_element_size_changes_only_the_cache_bytes():
    cfg = preset("llama-2-70b")
    bf16, int4_kv = rl.decode_cost(cfg, 8, 4095, 2), rl.decode_cost(cfg, 8, 4095, 2, kv_dtype_bytes=0.5)
    assert int4_kv.flops == bf16.flops
    assert bf16.bytes - int4_kv.bytes == pytest.approx(8 * 4096 * 327_680 * 0.75)


@pytest.mark.parametrize("call,match", [(lambda: rl.decode_cost(preset("llama-2-7b"), 0, 8, 2), "batch"),
                                        (lambda: rl.decode_cost(preset("llama-2-7b"), 1, 0, 2), "seq_len"),
                                        (lambda: rl.decode_cost(preset("llama-2-7b"), 1, 8, 0), "dtype_bytes"),
                                        (lambda: rl.decode_cost(preset("llama-2-7b"), 1, 8, 2, use_cache="yes"), "use_cache"),
                                        (lambda: rl.prefill_cost("llama-2-7b", 1, 8, 2), "cfg"),
                                        (lambda: rl.recompute_to_read_ratio(preset("llama-2-7b"), None, 2), "hw")])
def test_bad_model_arguments_are_named(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


# --- laws and worked numbers ----------------------------------------------------------------------

@given(name=preset_names, hw=hardware_presets, batch=st.integers(1, 64), seq_len=st.integers(1, 32768),
       dtype_bytes=st.sampled_from([1, 2, 4]))
def test_cached_decode_of_a_real_preset_is_memory_bound_and_grows_with_the_context(name, hw, batch, seq_len, dtype_bytes):
    cfg = PRESETS[name]
    cost = rl.decode_cost(cfg, batch, seq_len, dtype_bytes)
    assert cost.memory_bound(hw)
    assert rl.decode_time(cfg, hw, batch, 2 * seq_len, dtype_bytes) > cost.time(hw)
    slower = dataclasses.replace(hw, mem_bandwidth=hw.mem_bandwidth / 2)
    assert cost.time(slower) == pytest.approx(2 * cost.time(hw))


@given(name=preset_names, hw=hardware_presets, dtype_bytes=st.sampled_from([1, 2, 4]))
def test_real_presets_never_prefer_recompute_and_the_toy_does(name, hw, dtype_bytes):
    assert not rl.caching_loses(PRESETS[name], hw, dtype_bytes)
    assert rl.caching_loses(TOY_LOSER, hw, dtype_bytes)


def test_uncached_decode_wins_only_where_it_costs_no_extra_time():
    # The toy: uncached is faster at short contexts, slower once the recomputed scores grow.
    assert rl.decode_time(TOY_LOSER, H100_SXM, 1, 8, 2, False) < rl.decode_time(TOY_LOSER, H100_SXM, 1, 8, 2, True)
    assert rl.decode_time(TOY_LOSER, H100_SXM, 1, 4096, 2, True) < rl.decode_time(TOY_LOSER, H100_SXM, 1, 4096, 2, False)
    # A real model: at 9 tokens both steps stream the weights; past the ridge, the cache wins.
    cfg = preset("llama-2-70b")
    short = [rl.decode_time(cfg, H100_SXM, 1, 8, 2, uc) for uc in (True, False)]
    assert short[1] < short[0] < short[1] * 1.0001
    assert rl.decode_time(cfg, H100_SXM, 1, 1024, 2, True) < rl.decode_time(cfg, H100_SXM, 1, 1024, 2, False)


def test_worked_numbers_for_llama_2_70b_on_an_h100():
    cfg = preset("llama-2-70b")
    cached = rl.decode_cost(cfg, 1, 4095, 2)
    assert cached.bytes == pytest.approx(138.77e9, rel=1e-4)  # 137.4 GB of weights + 1.34 GB of K/V
    assert cached.time(H100_SXM) == pytest.approx(0.0414, rel=1e-3)
    assert cached.intensity == pytest.approx(1.07, rel=1e-2)
    assert rl.decode_time(cfg, H100_SXM, 64, 4095, 2) == pytest.approx(0.0667, rel=1e-3)
    assert rl.recompute_to_read_ratio(cfg, H100_SXM, 2) == pytest.approx(1420.6, rel=1e-3)
    uncached = rl.decode_cost(cfg, 1, 4095, 2, use_cache=False)
    assert not uncached.memory_bound(H100_SXM) and uncached.time(H100_SXM) == pytest.approx(0.614, rel=1e-2)


def test_ratio_scales_with_the_hardware_and_the_element_size():
    cfg = preset("llama-3-8b")
    r = rl.recompute_to_read_ratio(cfg, H100_SXM, 2)
    assert rl.recompute_to_read_ratio(cfg, HARDWARE["H200"], 2) == pytest.approx(r * 4.8 / 3.35)
    assert rl.recompute_to_read_ratio(cfg, H100_SXM, 1) == pytest.approx(2 * r)
    assert math.isclose(rl.recompute_to_read_ratio(cfg, H100_SXM, 2),
                        2 * rl.matmul_params(cfg) / (131_072 * rl.ridge_point(H100_SXM)))


def test_every_preset_in_the_strategies_is_costed():
    for name in GQA_PRESET_NAMES:
        for hw in HARDWARE.values():
            assert 0 < rl.decode_time(PRESETS[name], hw, 1, 4095, 2) < 1
