"""kvref.kv_quant against PyTorch's own quantizers, the round-trip bound, the model, and MiniLM's real keys."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvref.cache import GrowingKVCache
from kvref.config import ModelConfig, preset
from kvref.kv_quant import (QuantizedKVCache, QuantScheme, axis_errors, dequantize, fake_quantize, load,
                            outlier_channel_keys, outlier_token_keys, pack_bits, qrange, quantize,
                            quantized_cache_nbytes, store, unpack_bits)
from kvref.model import build_model

ROOT = Path(__file__).resolve().parent.parent


@st.composite
def tensors_and_schemes(draw):
    bits = draw(st.sampled_from([8, 4, 2]), label="bits")
    axis = draw(st.sampled_from(["token", "channel"]), label="axis")
    T = draw(st.sampled_from([1, 2, 4, 8, 12]), label="T")
    D = draw(st.sampled_from([4, 8, 16]), label="D")
    n = D if axis == "token" else T
    group = draw(st.sampled_from([0] + [g for g in range(1, n + 1) if n % g == 0]), label="group_size")
    shape = (draw(st.integers(1, 2), label="B"), draw(st.integers(1, 3), label="Hkv"), T, D)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="seed"))
    x = torch.randn(shape, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 50.0]), label="magnitude")
    if draw(st.booleans(), label="outliers"):
        x = x + outlier_channel_keys(shape, 1, 20.0, seed=1) - torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return x, QuantScheme(bits, axis, group, draw(st.booleans(), label="asymmetric"), torch.float32)


def _expand(t: torch.Tensor, x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """A grouped scale broadcast back to x's shape."""
    ones = torch.ones_like(x)
    return dequantize(torch.ones_like(x, dtype=torch.int16), t, None, scheme) * ones


@given(case=tensors_and_schemes())
def test_round_trip_error_is_at_most_half_a_step(case):
    x, scheme = case
    q, scale, zero = quantize(x, scheme)
    lo, hi = qrange(scheme.bits, scheme.asymmetric)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    err = (x.double() - dequantize(q, scale, zero, scheme).double()).abs()
    half = _expand(scale, x, scheme).double() / 2
    assert (err <= half * (1 + 1e-5) + 1e-6 * float(x.abs().max())).all(), float((err - half).max())


@given(case=tensors_and_schemes())
def test_packing_round_trips_and_shrinks_by_codes_per_byte(case):
    x, scheme = case
    q, _, _ = quantize(x, scheme)
    lo, _ = qrange(scheme.bits, scheme.asymmetric)
    codes = (q - lo).to(torch.uint8)
    if codes.shape[-1] % (8 // scheme.bits):
        return
    packed = pack_bits(codes, scheme.bits)
    assert packed.nbytes * (8 // scheme.bits) == codes.nbytes
    assert torch.equal(unpack_bits(packed, scheme.bits), codes)
    assert torch.allclose(load(store(x, scheme), scheme, torch.float32), dequantize(q, *quantize(x, scheme)[1:], scheme))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_symmetric_codes_are_stored_offset_by_half_the_range_minus_one(bits):
    x = torch.linspace(-1, 1, 8).reshape(1, 1, 1, 8)  # the group's extremes get the extreme codes
    scheme = QuantScheme(bits, "token", 0, False, torch.float32)
    stored = unpack_bits(store(x, scheme).codes, bits)
    assert (int(stored.min()), int(stored.max())) == (0, 2**bits - 2)
    assert torch.equal(stored.long(), quantize(x, scheme)[0].long() + 2 ** (bits - 1) - 1)


@given(case=tensors_and_schemes(), scale_dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_a_stored_block_reads_back_within_half_a_step_plus_the_rounding_of_its_scale_and_zero(case, scale_dtype):
    x, scheme = case
    scheme = QuantScheme(scheme.bits, scheme.axis, scheme.group_size, scheme.asymmetric, scale_dtype)
    q, scale, zero = quantize(x, scheme)
    block = store(x, scheme)
    err = (x.double() - load(block, scheme, torch.float32).double()).abs()
    bound = _expand(scale, x, scheme).double() / 2 + q.double().abs() * _expand(scale - block.scale.float(), x, scheme).double().abs()
    if zero is not None:
        bound += _expand(zero - block.zero.float(), x, scheme).double().abs()
    assert (err <= bound * (1 + 1e-5) + 1e-6 * float(x.abs().max())).all(), float((err - bound).max())


def test_an_fp16_zero_point_far_from_zero_costs_more_than_half_a_step():
    """KIVI's keys per channel: a channel near 100 (an outlier channel) spanning 2 has s = 2 / 255 at
    8 bits, but its zero point 99.01 is stored in fp16 as 99.015625 (spacing 2^-6 there): the
    element at the minimum (code 0) reads back 0.0056 off, 1.4 half-steps. The s / 2 bound is fp32's."""
    x = (100.01 + torch.linspace(-1, 1, 64)).reshape(1, 1, 64, 1)  # [B, Hkv, T, D]: one channel
    scheme = QuantScheme(8, "channel", 64, True, torch.float16)
    _, scale, zero = quantize(x, scheme)
    assert float((x - fake_quantize(x, scheme)).abs().max()) <= float(scale) / 2 * (1 + 1e-5)
    err = (x - load(store(x, scheme), scheme, torch.float32)).abs()
    dz = abs(float(zero) - float(zero.half()))
    assert math.isclose(float(err[0, 0, 0, 0]), dz, rel_tol=1e-3) and dz > 1.4 * float(scale) / 2


def test_quantized_cache_nbytes_refuses_mla_models():
    with pytest.raises(ValueError, match="MLA"):
        quantized_cache_nbytes(preset("deepseek-v2"), 1, 16, QuantScheme(4, "token", 32))


def test_a_bool_group_size_is_refused():
    with pytest.raises(ValueError, match="group_size"):
        QuantScheme(4, "token", True)


def test_int4_nibble_order_is_low_first():
    assert pack_bits(torch.tensor([1, 2, 15, 0], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F]
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_symmetric_int8_codes_match_torch_quantize_per_channel(axis):
    """PyTorch's quantized tensors (qint8, per-channel affine, zero point 0) compute the same codes."""
    x = outlier_channel_keys((2, 3, 16, 8), 2, 10.0, seed=0)
    scheme = QuantScheme(8, axis, 0, False, torch.float32)
    q, scale, _ = quantize(x, scheme)
    # Move the group's axis last, so each row of a 2-D view is one group.
    rows = (x if axis == "token" else x.transpose(2, 3)).reshape(-1, x.shape[3] if axis == "token" else x.shape[2])
    s = scale.reshape(-1).double()
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch 2.13; still the reference here
        warnings.simplefilter("ignore")
        theirs = torch.quantize_per_channel(rows, s, torch.zeros_like(s, dtype=torch.long), 0, torch.qint8).int_repr()
    ours = (q if axis == "token" else q.transpose(2, 3)).reshape(rows.shape)
    # torch multiplies by 1/scale where kvref divides: a value on a rounding tie may land either side.
    assert (theirs.long() - ours.long()).abs().max() <= 1
    assert (theirs.long() != ours.long()).float().mean() < 1e-3


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_asymmetric_fake_quantization_matches_torch_fake_quantize_per_channel_affine(bits, axis):
    """KIVI's x̂ = round((x - m) / s)·s + m is torch's affine fake quantization with zero point -m / s."""
    x = outlier_channel_keys((2, 3, 16, 8), 2, 10.0, seed=1)
    scheme = QuantScheme(bits, axis, 0, True, torch.float32)
    _, scale, zero = quantize(x, scheme)
    rows = (x if axis == "token" else x.transpose(2, 3)).reshape(-1, x.shape[3] if axis == "token" else x.shape[2])
    s, m = scale.reshape(-1), zero.reshape(-1)
    theirs = torch.fake_quantize_per_channel_affine(rows, s, -m / s, 0, 0, 2**bits - 1)
    ours = fake_quantize(x, scheme)
    ours = (ours if axis == "token" else ours.transpose(2, 3)).reshape(rows.shape)
    close = (theirs - ours).abs() <= 1e-4 * (1 + x.abs().max())
    on_tie = (theirs - ours).abs() <= s[:, None] * (1 + 1e-4)  # a tie rounded the other way: one step
    assert close.float().mean() > 0.999 and on_tie.all()


def test_outlier_channel_keys_have_the_stated_statistics():
    k = outlier_channel_keys((4, 2, 4096, 16), 2, 10.0, seed=0)
    mean, std = k.mean(dim=(0, 2)), k.std(dim=(0, 2))  # (Hkv, D)
    loud = mean.abs() > 5
    assert loud.sum(-1).tolist() == [2, 2]
    assert torch.allclose(mean[loud].abs(), torch.full((4,), 10.0), atol=0.05)
    assert torch.allclose(mean[~loud], torch.zeros(28), atol=0.05)
    assert torch.allclose(std, torch.ones_like(std), atol=0.05)
    t = outlier_token_keys((1, 2, 64, 4096), 2, 10.0, seed=0)
    norms = t.norm(dim=-1)[0, 0] / 64.0  # about the std of each token
    assert (norms > 5).sum() == 2 and torch.allclose(norms[norms > 5], torch.full((2,), 10.0), rtol=0.05)


CFG = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64)


def _generate(model, caches, prompt, n):
    with torch.no_grad():
        logits = [model.prefill(prompt, caches)]
        ids = prompt
        for _ in range(n - 1):
            ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], dim=1)
            logits.append(model.decode_step(ids[:, -1:], caches))
    return torch.stack(logits, 1)


def test_quantized_cache_with_a_window_past_the_length_decodes_bit_identically():
    model = build_model(CFG, seed=0)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    exact = _generate(model, [GrowingKVCache() for _ in range(2)], prompt, 6)
    scheme = QuantScheme(4, "channel", 4)
    quant = _generate(model, [QuantizedKVCache(scheme, residual=16) for _ in range(2)], prompt, 6)
    assert torch.equal(exact, quant)


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.3)])
def test_quantized_cache_decodes_with_the_model_close_to_full_precision(bits, tol):
    model = build_model(CFG, seed=0)
    prompt = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    exact = _generate(model, [GrowingKVCache() for _ in range(2)], prompt, 8)
    caches = [QuantizedKVCache(QuantScheme(bits, "channel", 4), QuantScheme(bits, "token", 8), residual=2)
              for _ in range(2)]
    quant = _generate(model, caches, prompt, 8)
    assert 0 < (exact - quant).abs().max() < tol
    # 16 positions: K quantized per channel in groups of 4 tokens, 2 kept exact -> 12 quantized, 4 recent;
    # V per token, 2 recent.
    c = caches[0]
    assert c.seq_len == 16 and c.k_recent.shape[2] == 4 and c.v_recent.shape[2] == 2


def test_nbytes_count_codes_scales_zero_points_and_the_residual_window():
    cfg = ModelConfig(vocab_size=64, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64)
    scheme = QuantScheme(4, "token", 8, True, torch.float16)
    B, T, Hkv, D, L = 2, 10, 2, 16, 3
    codes = 2 * L * B * T * Hkv * D // 2
    scales = 2 * L * B * T * Hkv * (D // 8) * 2 * 2
    assert quantized_cache_nbytes(cfg, B, T, scheme) == codes + scales
    full = 2 * L * B * 3 * Hkv * D * 2  # three residual tokens kept in fp16
    assert quantized_cache_nbytes(cfg, B, T, scheme, residual=3) == (codes + scales) * 7 // 10 + full


# --- real keys -------------------------------------------------------------------------------------

def _minilm_layers():
    try:
        from bench.minilm_keys import minilm_dir, minilm_qkv
        minilm_dir()
    except ImportError as exc:
        pytest.skip(f"MiniLM's weights are not installed ({exc})")
    return minilm_qkv()


def test_minilm_real_keys_favour_k_per_channel_and_v_per_token_as_recorded():
    """all-MiniLM-L6-v2 (a bidirectional encoder: real keys, not a decoder's attention pattern)."""
    layers = _minilm_layers()
    recorded = json.loads((ROOT / "bench" / "results" / "kv_quant_axes.json").read_text())
    for bits in (8, 4, 2):
        per_layer = [axis_errors(q, k, v, bits, 32) for q, k, v in layers]
        mean = {key: sum(e[key] for e in per_layer) / len(per_layer) for key in per_layer[0]}
        assert mean["k_channel_score"] < mean["k_token_score"], (bits, mean)
        assert mean["k_channel_output"] < mean["k_token_output"], (bits, mean)
        assert mean["v_token_output"] < mean["v_channel_output"], (bits, mean)
        for key, value in mean.items():
            assert math.isclose(value, recorded[str(bits)]["mean"][key], rel_tol=2e-3), (bits, key)  # BLAS and thread counts move the 4th digit (a fresh CI install: 4e-4)
