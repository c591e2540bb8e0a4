"""kvref.energy: built on kvref.roofline's measured-checked FLOPs and bytes; the laws it must obey; its constants' sources."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvref import energy as en
from kvref import roofline as rl
from kvref.config import PRESETS, ModelConfig, preset
from kvref.hardware import (ENERGY_COSTS, H100_SXM, H100_SXM_BOARD_WATTS, H200, PUBLISHED_ENERGY, SOURCE_CARD_ENERGY,
                            EnergyCosts)
from kvref.measure import kv_cache_bytes_measured, meta_model, step_flops_measured, weight_bytes_read
from kvref.strategies import DENSE_PRESET_NAMES, gqa_model_configs, model_configs

COSTS = st.sampled_from(list(ENERGY_COSTS.values()))
BF16 = torch.bfloat16


def test_energy_module_says_first_that_it_answers_card11():
    assert en.__doc__.splitlines()[0].startswith("Spoiler for card11")


def test_the_h100s_board_power_caps_the_energy_of_an_fma_below_both_constant_sets():
    """700 W over 494.5e12 FMA/s: 1.42 pJ per FMA for the whole board. 5 pJ/FMA would need 2.5 kW."""
    fma_per_s = H100_SXM.peak_flops(BF16) / 2
    board_pj_per_fma = H100_SXM_BOARD_WATTS / fma_per_s * 1e12
    assert math.isclose(board_pj_per_fma, 1.4156, rel_tol=1e-3)
    assert PUBLISHED_ENERGY.pj_per_fma > board_pj_per_fma
    assert math.isclose(SOURCE_CARD_ENERGY.pj_per_fma * 1e-12 * fma_per_s, 2472.5, rel_tol=1e-3)  # watts


def test_the_two_constant_sets_carry_their_numbers_and_name_their_sources():
    assert (SOURCE_CARD_ENERGY.pj_per_bit, SOURCE_CARD_ENERGY.pj_per_fma) == (0.5, 5.0)
    assert PUBLISHED_ENERGY.pj_per_bit == 4.0 and math.isclose(PUBLISHED_ENERGY.pj_per_fma, 1.5)
    assert "no source" in SOURCE_CARD_ENERGY.source.lower()
    for name in ("O'Connor", "MICRO 2017", "Horowitz", "ISSCC 2014", "1.1 pJ", "0.4 pJ", "20-40 pJ/bit"):
        assert name in PUBLISHED_ENERGY.source


@pytest.mark.parametrize("field,value,error", [("pj_per_bit", 0.0, ValueError), ("pj_per_fma", -1.0, ValueError),
                                               ("pj_per_bit", "4", TypeError)])
def test_a_bad_energy_constant_is_named(field, value, error):
    with pytest.raises(error, match=field):
        dataclasses.replace(PUBLISHED_ENERGY, **{field: value})


@given(cfg=st.one_of(model_configs(), gqa_model_configs()), batch=st.integers(1, 4), seq_len=st.integers(1, 30),
       costs=COSTS)
def test_energy_per_token_is_measured_bytes_and_flops_times_the_constants(cfg, batch, seq_len, costs):
    flops = step_flops_measured(cfg, batch, 1, seq_len).total
    bytes_ = weight_bytes_read(meta_model(cfg, BF16)) + kv_cache_bytes_measured(cfg, batch, seq_len + 1, BF16)
    assert math.isclose(en.memory_energy_per_token(cfg, batch, seq_len, BF16, costs),
                        bytes_ * 8 * costs.pj_per_bit * 1e-12 / batch, rel_tol=1e-12)
    assert math.isclose(en.compute_energy_per_token(cfg, batch, seq_len, BF16, costs),
                        flops / 2 * costs.pj_per_fma * 1e-12 / batch, rel_tol=1e-12)


@given(name=st.sampled_from(DENSE_PRESET_NAMES), batch=st.integers(1, 128), seq_len=st.integers(1, 2000), costs=COSTS)
def test_energy_laws_on_real_presets(name, batch, seq_len, costs):
    cfg = PRESETS[name]
    mem = en.memory_energy_per_token(cfg, batch, seq_len, BF16, costs)
    comp = en.compute_energy_per_token(cfg, batch, seq_len, BF16, costs)
    assert en.memory_energy_per_token(cfg, 2 * batch, seq_len, BF16, costs) < mem
    assert math.isclose(en.compute_energy_per_token(cfg, 2 * batch, seq_len, BF16, costs), comp, rel_tol=1e-12)
    assert math.isclose(en.memory_energy_per_token(cfg, batch, seq_len, torch.float32, costs), 2 * mem, rel_tol=1e-12)
    assert math.isclose(en.energy_per_token(cfg, batch, seq_len, BF16, costs), mem + comp, rel_tol=1e-12)
    assert en.memory_energy_per_token(cfg, 1, seq_len, BF16, costs) > en.compute_energy_per_token(cfg, 1, seq_len, BF16, costs)


@given(cfg=st.one_of(model_configs(), gqa_model_configs()), seq_len=st.integers(1, 40), costs=COSTS)
def test_the_crossover_batch_is_the_first_where_compute_reaches_memory(cfg, seq_len, costs):
    b = en.energy_crossover_batch(cfg, seq_len, BF16, costs)

    def compute_wins(batch):
        return (en.compute_energy_per_token(cfg, batch, seq_len, BF16, costs)
                >= en.memory_energy_per_token(cfg, batch, seq_len, BF16, costs) * (1 - 1e-12))

    if b is None:
        assert not compute_wins(10**9)
    else:
        assert compute_wins(b) and (b == 1 or not compute_wins(b - 1))


def test_worked_numbers_of_llama_2_70b_with_both_sets():
    cfg = preset("llama-2-70b")
    assert math.isclose(en.memory_energy_per_token(cfg, 1, 4095, BF16, PUBLISHED_ENERGY), 4.4406, rel_tol=1e-4)
    assert math.isclose(en.compute_energy_per_token(cfg, 1, 4095, BF16, PUBLISHED_ENERGY), 0.11112, rel_tol=1e-4)
    assert en.energy_crossover_batch(cfg, 4095, BF16, PUBLISHED_ENERGY) == 65
    assert en.energy_crossover_batch(cfg, 4095, BF16, SOURCE_CARD_ENERGY) == 2
    assert en.energy_crossover_batch(preset("llama-3-8b"), 4095, BF16, PUBLISHED_ENERGY) is None
    with pytest.raises(ValueError, match="mixture of experts"):
        en.energy_crossover_batch(preset("mixtral-8x7b"), 10, BF16, PUBLISHED_ENERGY)


def test_dollars_follow_the_roofline_and_bill_every_device():
    cfg = preset("llama-2-70b")
    two = H100_SXM.tensor_parallel(2)
    got = en.dollars_per_million_tokens(cfg, two, 1, 4095, BF16, 2.0)
    assert math.isclose(got, 2 * 2.0 / 3600 * rl.decode_time(cfg, two, 1, 4095, BF16) * 1e6, rel_tol=1e-12)
    assert math.isclose(got, 23.013, rel_tol=1e-4)
    assert en.dollars_per_million_tokens(cfg, two, 64, 4095, BF16, 2.0) < got / 30


def test_keep_prefix_cache_flips_at_its_break_even():
    cfg, gb_price = preset("llama-3-8b"), 2.0 / (H100_SXM.memory_bytes / 1e9)
    recompute = rl.prefill_time(cfg, H100_SXM, 1, 2048, BF16) * 2.0 / 3600
    storage = 2048 * rl.kv_bytes_per_token(cfg, 2) / 1e9 * gb_price
    threshold = storage / recompute
    assert 330 < threshold < 350
    assert en.keep_prefix_cache(cfg, H100_SXM, 2048, BF16, threshold * 1.001, 3600, 2.0, gb_price)
    assert not en.keep_prefix_cache(cfg, H100_SXM, 2048, BF16, threshold * 0.999, 3600, 2.0, gb_price)
    assert en.keep_prefix_cache(cfg, H200, 2048, BF16, 1, 1, 2.0, 1e-6)  # cheap storage: always keep
    with pytest.raises(ValueError, match="lifetime_s"):
        en.keep_prefix_cache(cfg, H100_SXM, 2048, BF16, 1, 0, 2.0, gb_price)


def test_energy_names_a_bad_argument():
    cfg = ModelConfig(vocab_size=8, n_layers=1, d_model=8, n_heads=2, d_ff=8)
    with pytest.raises(TypeError, match="costs"):
        en.memory_energy_per_token(cfg, 1, 1, BF16, 4.0)
    with pytest.raises(TypeError, match="dtype"):
        en.compute_energy_per_token(cfg, 1, 1, 2, PUBLISHED_ENERGY)
    with pytest.raises(ValueError, match="batch"):
        en.memory_energy_per_token(cfg, 0, 1, BF16, PUBLISHED_ENERGY)
    with pytest.raises(TypeError, match="EnergyCosts"):
        en.energy_crossover_batch(cfg, 1, BF16, "published")
