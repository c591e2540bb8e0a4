"""kvref.recurrent against code nobody here wrote: PyTorch's SDPA, conv1d, pinv, and its own step forms."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvref import recurrent as rc
from kvref.config import ModelConfig, preset
from kvref.measure import kv_cache_bytes_measured

SHAPES = dict(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 10), D=st.integers(1, 6), Dv=st.integers(1, 6))


def qkv(B, H, T, D, Dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64),
            torch.randn(B, H, T, D, generator=gen, dtype=torch.float64),
            torch.randn(B, H, T, Dv, generator=gen, dtype=torch.float64))


def test_recurrent_module_says_first_that_it_answers_card10():
    assert rc.__doc__.splitlines()[0].startswith("Spoiler for card10")


@given(**SHAPES, seed=st.integers(0, 99))
def test_linear_attention_recurrent_form_equals_the_parallel_causal_form(B, H, T, D, Dv, seed):
    q, k, v = qkv(B, H, T, D, Dv, seed)
    out, state = rc.linear_attention_recurrent(q, k, v)
    torch.testing.assert_close(out, rc.linear_attention_parallel(q, k, v), atol=1e-12, rtol=1e-10)
    assert state.S.shape == (B, H, D, Dv) and state.z.shape == (B, H, D)


@given(**SHAPES, seed=st.integers(0, 99))
def test_linear_attention_is_sdpa_with_log_kernel_scores_as_the_mask(B, H, T, D, Dv, seed):
    """softmax(log A) = A / ΣA: SDPA fed zero queries and the mask log(φ(q)φ(k)ᵀ), -inf in the future."""
    q, k, v = qkv(B, H, T, D, Dv, seed)
    kernel = rc.elu_feature_map(q) @ rc.elu_feature_map(k).transpose(-2, -1)  # (B, H, T, T), > 0
    future = ~torch.ones(T, T, dtype=torch.bool).tril()
    mask = kernel.log().masked_fill(future, float("-inf"))
    want = F.scaled_dot_product_attention(torch.zeros_like(q), k, v.contiguous(), attn_mask=mask)
    torch.testing.assert_close(rc.linear_attention_parallel(q, k, v), want, atol=1e-12, rtol=1e-10)


def test_linear_attention_state_bytes_do_not_depend_on_the_length():
    sizes = {T: rc.linear_attention_recurrent(*qkv(2, 3, T, 4, 5))[1].nbytes for T in (1, 7, 200)}
    assert len(set(sizes.values())) == 1 and sizes[1] == 2 * 3 * (4 * 5 + 4) * 8


def test_model_states_hold_one_state_per_kv_head_and_beat_the_cache_from_65_tokens():
    cfg = preset("llama-3-8b")
    state = rc.states_nbytes(rc.model_states(cfg, 1, 1, torch.bfloat16))
    assert state == 32 * 8 * (128 * 128 + 128) * 2 == 8_454_144
    assert rc.states_nbytes(rc.model_states(cfg.with_(n_layers=1), 1, 3, torch.bfloat16)) == state // 32
    assert kv_cache_bytes_measured(cfg, 1, 64, torch.bfloat16) < state < kv_cache_bytes_measured(cfg, 1, 65, torch.bfloat16)


@st.composite
def gates(draw):
    B, T, N = draw(st.integers(1, 3)), draw(st.integers(1, 70)), draw(st.integers(1, 5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    a = torch.rand(B, T, N, generator=gen, dtype=torch.float64)
    a = torch.where(a < 0.15, torch.zeros_like(a), a)
    return a, torch.randn(B, T, N, generator=gen, dtype=torch.float64)


@given(au=gates())
def test_ssm_scan_equals_the_step_by_step_recurrence(au):
    a, u = au
    torch.testing.assert_close(rc.ssm_scan(a, u), rc.ssm_recurrence(a, u), atol=1e-12, rtol=1e-10)


@settings(max_examples=min(settings().max_examples, 20))
@given(B=st.integers(1, 2), T=st.integers(1, 30), C=st.integers(1, 3), N=st.integers(1, 4), seed=st.integers(0, 99))
def test_a_time_invariant_diagonal_ssm_is_a_causal_convolution_computed_by_conv1d(B, T, C, N, seed):
    """S4's convolution view: y = K * x with K_j = Σ_n c_n a_n^j b_n, computed here by F.conv1d."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    a = torch.rand(C, N, generator=gen, dtype=torch.float64)
    b, c = torch.randn(C, N, generator=gen, dtype=torch.float64), torch.randn(C, N, generator=gen, dtype=torch.float64)
    powers = a[None] ** torch.arange(T, dtype=torch.float64)[:, None, None]  # (T, C, N)
    kernel = (powers * b * c).sum(-1)  # (T, C): K_j per channel
    weight = kernel.T.flip(-1)[:, None, :]  # (C, 1, T): conv1d correlates, so flip for a convolution
    want = F.conv1d(F.pad(x.transpose(1, 2), (T - 1, 0)), weight, groups=C).transpose(1, 2)  # (B, T, C)
    for scan in (True, False):
        torch.testing.assert_close(rc.diagonal_ssm(x, a, b, c, scan=scan), want, atol=1e-10, rtol=1e-9)


def test_ssm_scan_survives_an_exact_reset():
    a = torch.tensor([[[0.5], [0.0], [0.5]]], dtype=torch.float64)
    u = torch.tensor([[[1.0], [2.0], [4.0]]], dtype=torch.float64)
    assert rc.ssm_scan(a, u).flatten().tolist() == [1.0, 2.0, 5.0]


@pytest.mark.parametrize("d_key,n_pairs", [(4, 64), (8, 1024), (64, 512)])
def test_softmax_over_a_cache_recalls_every_pair_exactly_and_agrees_with_sdpa(d_key, n_pairs):
    keys, values = rc.recall_pairs(n_pairs, d_key, 5, seed=1)
    got = rc.softmax_recall(keys, values, keys)
    assert rc.exact_fraction(got, values) == 1.0
    sdpa = F.scaled_dot_product_attention(keys[None], keys[None], values[None], scale=1e6)[0]
    torch.testing.assert_close(got, sdpa, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("d_key,d_value", [(1, 1), (4, 9), (12, 3), (16, 16)])
def test_the_projection_state_reads_back_what_pinv_does_up_to_its_capacity_and_fails_past_it(d_key, d_value):
    for n in (1, d_key // 2 or 1, d_key):
        keys, values = rc.recall_pairs(n, d_key, d_value, seed=n)
        got, nbytes = rc.projection_state_recall(keys, values, keys)
        best = keys @ (torch.linalg.pinv(keys) @ values)  # the best any linear d_key x d_value state can do
        torch.testing.assert_close(got, best, atol=1e-8, rtol=1e-8)
        assert rc.exact_fraction(got, values) == 1.0
        assert nbytes == (d_key * d_value + d_key * d_key) * 8  # fixed, whatever n
    keys, values = rc.recall_pairs(d_key + 1, d_key, d_value, seed=0)
    best = keys @ (torch.linalg.pinv(keys) @ values)
    assert rc.exact_fraction(best, values) < 1.0  # no linear state of this size can hold d_key + 1 pairs
    assert rc.measured_capacity(d_key, d_value) == d_key


def test_the_hebbian_state_of_plain_linear_attention_is_not_exact_past_one_pair():
    curve = rc.recall_curve("hebbian state", 32, 8, [1, 2, 8, 32])
    assert curve[0] == 1.0 and max(curve[1:]) < 0.5


def test_recall_curve_names_an_unknown_method_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown method"):
        rc.recall_curve("lstm", 4, 4, [1])
    with pytest.raises(ValueError, match="n_pairs, d_key, d_value"):
        rc.recall_pairs(0, 4, 4)


def test_linear_attention_names_a_bad_shape():
    q, k, v = qkv(1, 2, 3, 4, 5)
    with pytest.raises((ValueError, TypeError), match="k"):
        rc.linear_attention_parallel(q, k[..., :3], v)
    with pytest.raises(ValueError, match="d_key"):
        rc.linear_attention_init(1, 1, 0, 1)
    with pytest.raises(ValueError, match="heads must be an int >= 1, got True"):
        rc.linear_attention_init(1, True, 4, 4)


def test_model_states_use_the_kv_heads_of_a_gqa_config():
    cfg = ModelConfig(vocab_size=8, n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=8)
    states = rc.model_states(cfg, 3, 2, torch.float32)
    assert len(states) == 2 and states[0].S.shape == (3, 2, 4, 4) and states[0].z.shape == (3, 2, 4)
